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
from thinktalk.nn.cache import KVCache
from thinktalk.nn.decoder import Decoder, DecoderSpec
from thinktalk.nn.mlp import GatedMLP

# What the reference samples the residual codebooks with when the Talker samples.
SAMPLING = SamplingParams(do_sample=True, top_k=50, top_p=0.8)


class CodePredictorModel(Decoder):
    """The shared decoder (QK-norm, 1-D rotary, no token table) plus one input embedding per residual codebook."""

    def __init__(self, cfg: CodePredictorConfig):
        spec = DecoderSpec(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta,
            qkv_bias=cfg.attention_bias,
            o_bias=cfg.attention_bias,
            qk_norm=True,
        )
        super().__init__(spec, lambda layer: GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act))
        self.cfg = cfg
        self.codec_embedding = nn.ModuleList(
            nn.Embedding(cfg.vocab_size, cfg.hidden_size) for _ in range(cfg.num_code_groups - 1)
        )


class CodePredictor(nn.Module):
    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.model = CodePredictorModel(cfg)
        self.lm_head = nn.ModuleList(
            nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) for _ in range(cfg.num_code_groups - 1)
        )

    def new_cache(self, batch: int) -> KVCache:
        """A cache for one frame: the Talker's hidden state, code 0 and codes 1 .. G-2 (reused frame after frame)."""
        return self.model.new_cache(batch, self.cfg.num_code_groups)

    def forward(self, talker_hidden: torch.Tensor, codes: torch.Tensor, embed_code0) -> torch.Tensor:
        """Teacher-forced logits of codebooks 1..G-1 for whole frames (training; no cache).

        ``talker_hidden`` [N, 1, H]: the Talker's hidden state before each frame; ``codes`` [N, G]: the
        frame's codes; ``embed_code0``: the Talker's codec embedding (codebook 0's table).
        Returns [N, G-1, vocab]: position j predicts code j+1 from the hidden state and codes 0..j.
        """
        g = self.cfg.num_code_groups
        inputs = [talker_hidden, embed_code0(codes[:, :1])]
        inputs += [self.model.codec_embedding[j - 1](codes[:, j : j + 1]) for j in range(1, g - 1)]
        x = torch.cat(inputs, dim=1)
        positions = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        h = self.model(x, positions).last_hidden_state[:, 1:]
        return torch.stack([self.lm_head[j](h[:, j]) for j in range(g - 1)], dim=1)

    def predict(
        self,
        talker_hidden: torch.Tensor,
        code0_embed: torch.Tensor,
        sampling: SamplingParams | None = None,
        generator: torch.Generator | None | list[tuple[int, torch.Generator | None]] = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """talker_hidden, code0_embed [B, 1, H] → (codes 1..G-1 [B, G-1], their input embeddings [B, G-1, H]).

        ``sampling`` None is greedy. ``cache`` (from :meth:`new_cache`) is reused across frames: every
        call starts it empty, and every call has the same shapes (what a captured graph replays).
        ``generator``: one for every row, or ``[(rows, generator), ...]`` — consecutive row groups (several
        requests' frames predicted as one batch), each sampled with its own generator, as it would be alone.
        """
        cache = cache or self.new_cache(talker_hidden.shape[0])
        cache.reset()
        sampling = sampling or SamplingParams()
        if isinstance(generator, list) and all(g is None for _, g in generator):
            generator = None  # no row is seeded: one draw for all (torch's default generator)
        x = torch.cat([talker_hidden, code0_embed], dim=1)
        codes, embeds = [], []
        for step in range(self.cfg.num_code_groups - 1):
            h = self.model(x, None, cache=cache).last_hidden_state
            logits = self.lm_head[step](h[:, -1])
            code = choose(logits, None, sampling, generator)
            codes.append(code)
            x = self.model.codec_embedding[step](code)[:, None]
            embeds.append(x)
        return torch.stack(codes, dim=1), torch.cat(embeds, dim=1)
