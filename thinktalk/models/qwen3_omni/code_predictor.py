"""The MTP code predictor: codebooks 1 .. G-1 of one speech frame, from the Talker's state and codebook 0.

A small dense Qwen3 decoder (QK-norm, 1D rotary) run for a fixed number of steps per frame:

    step 0   input: [talker hidden state, embedding of code 0]  → head 0    → code 1
    step j   input: codec_embedding[j-1](code j)                  → head j    → code j+1   (j = 1 .. G-2)

Each codebook has its own input embedding table and output head. The sum of all G code embeddings
of the frame is the Talker's next input.
"""

from __future__ import annotations

import torch
from torch import nn

from thinktalk.generation.sampling import SamplingParams, choose
from thinktalk.models.qwen3_omni.config import CodePredictorConfig
from thinktalk.models.qwen3_omni.decoder import QKNormAttention
from thinktalk.nn.cache import KVCache
from thinktalk.nn.mlp import GatedMLP
from thinktalk.nn.norm import RMSNorm
from thinktalk.nn.rotary import inv_freq, rotary_cos_sin

# What the reference samples the residual codebooks with when the Talker samples.
SAMPLING = SamplingParams(do_sample=True, top_k=50, top_p=0.8)


class Layer(nn.Module):
    def __init__(self, cfg: CodePredictorConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = QKNormAttention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps,
            cfg.attention_bias, layer,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, None, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class CodePredictorModel(nn.Module):
    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.codec_embedding = nn.ModuleList(
            nn.Embedding(cfg.vocab_size, cfg.hidden_size) for _ in range(cfg.num_code_groups - 1)
        )

    def forward(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x [B, T, H] at positions cache.length .. + T (no padding) → normed hidden [B, T, H]."""
        t = x.shape[1]
        positions = torch.arange(cache.length, cache.length + t, device=x.device)
        cos, sin = rotary_cos_sin(inv_freq(self.cfg.head_dim, self.cfg.rope_theta, device=x.device), positions)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        cache.advance(t)
        return self.norm(x)


class CodePredictor(nn.Module):
    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.model = CodePredictorModel(cfg)
        self.lm_head = nn.ModuleList(
            nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) for _ in range(cfg.num_code_groups - 1)
        )

    def new_cache(self, batch: int) -> KVCache:
        w, c = self.model.norm.weight, self.cfg
        return KVCache.allocate(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, c.num_code_groups, w.dtype, w.device)

    @torch.inference_mode()
    def predict(
        self,
        talker_hidden: torch.Tensor,
        code0_embed: torch.Tensor,
        sampling: SamplingParams | None = None,
        generator: torch.Generator | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """talker_hidden, code0_embed [B, 1, H] → (codes 1..G-1 [B, G-1], their input embeddings [B, G-1, H]).

        ``sampling`` None is greedy. ``cache`` (from :meth:`new_cache`) is reused across frames.
        """
        cache = cache or self.new_cache(talker_hidden.shape[0])
        cache.truncate(0)
        sampling = sampling or SamplingParams()
        x = torch.cat([talker_hidden, code0_embed], dim=1)
        codes, embeds = [], []
        for step in range(self.cfg.num_code_groups - 1):
            h = self.model(x, cache)
            code = choose(self.lm_head[step](h[:, -1]), None, sampling, generator)
            codes.append(code)
            x = self.model.codec_embedding[step](code)[:, None]
            embeds.append(x)
        return torch.stack(codes, dim=1), torch.cat(embeds, dim=1)

    def graphed(self, batch: int = 1) -> GraphedPredictor:
        """The greedy :meth:`predict` of ``batch`` rows captured as one CUDA graph (built on first use).

        The fixed-length loop (G-1 steps, every shape and cache position the same for every frame) is
        ~75 small layer calls; replaying it as a graph removes their launch overhead. The graph (and its
        static buffers) is shared by everyone using this model: use it from one thread at a time.
        """
        graphs = self.__dict__.setdefault("_graphs", {})
        if batch not in graphs:
            graphs[batch] = GraphedPredictor(self, batch)
        return graphs[batch]


class GraphedPredictor:
    """Greedy :meth:`CodePredictor.predict` as a CUDA graph over static input/output buffers."""

    def __init__(self, predictor: CodePredictor, batch: int):
        w = predictor.model.norm.weight
        if w.device.type != "cuda":
            raise ValueError("CUDA graphs need the code predictor on a CUDA device")
        dim = predictor.cfg.hidden_size
        with torch.inference_mode():
            self.hidden = torch.zeros(batch, 1, dim, dtype=w.dtype, device=w.device)
            self.code0_embed = torch.zeros_like(self.hidden)
            self.cache = predictor.new_cache(batch)
            side = torch.cuda.Stream(device=w.device)
            side.wait_stream(torch.cuda.current_stream(w.device))
            with torch.cuda.stream(side):  # warm up (kernel selection) outside the capture
                for _ in range(2):
                    predictor.predict(self.hidden, self.code0_embed, None, None, self.cache)
            torch.cuda.current_stream(w.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.codes, self.embeds = predictor.predict(self.hidden, self.code0_embed, None, None, self.cache)

    def __call__(self, talker_hidden: torch.Tensor, code0_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.hidden.copy_(talker_hidden)
        self.code0_embed.copy_(code0_embed)
        self.graph.replay()
        return self.codes.clone(), self.embeds.clone()
