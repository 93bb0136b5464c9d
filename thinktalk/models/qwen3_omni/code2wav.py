"""Code2Wav: the causal ConvNet vocoder of Qwen3-Omni (G codebooks at 12.5 Hz → 24 kHz waveform).

    codes [B, G, T] → mean of the G code embeddings → sliding-window causal transformer (RMSNorm,
    layer scale) → ×2 ×2 upsampling (transposed conv + ConvNeXt block) → conv → 4 decoder blocks
    (SnakeBeta, ×8 ×5 ×4 ×3 transposed conv, 3 dilated residual units) → SnakeBeta → conv → clamp

Every layer looks only left: convolutions are padded on the left, attention sees the last
``sliding_window`` frames, and the stride-r transposed convolutions (kernel 2r) drop r samples at
each end, so the first (L-1)·r outputs of L inputs never change when more inputs arrive. Hence
T frames give ``1920·T - 555`` samples (published settings) and decoding frame by frame with
left context only (:meth:`Code2Wav.stream`, state in :class:`Code2WavState`) reproduces the
offline waveform exactly, sample for sample: audio can start after the first frame.
:meth:`Code2Wav.stream_many` steps several conversations' streams at once, each at its own frame position
(the engine's vocoder batch across requests).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from thinktalk.generation import compiled
from thinktalk.models.qwen3_omni.config import Code2WavConfig
from thinktalk.nn.attention import attention
from thinktalk.nn.mlp import GatedMLP
from thinktalk.nn.norm import RMSNorm
from thinktalk.nn.rotary import apply_rotary, inv_freq, rotary_cos_sin

Context = dict[str, torch.Tensor]


@contextlib.contextmanager
def full_precision_convs(device: torch.device):
    """cuDNN's default TF32 convolutions round to 10 mantissa bits, and the snake activations of this
    deep conv stack amplify such rounding until streamed and offline waveforms differ visibly; the
    vocoder is small next to the LLMs, so it runs its convolutions in full float32."""
    if device.type != "cuda":
        yield
        return
    b = torch.backends.cudnn
    with b.flags(enabled=b.enabled, benchmark=b.benchmark, deterministic=b.deterministic, allow_tf32=False):
        yield


@dataclass
class Code2WavState:
    """What streaming decoding keeps between frames (one conversation or a batch in step).

    ``frames``: frames decoded so far (the next frame's rotary position); ``kv``: per transformer
    layer, keys/values of the last ``sliding_window - 1`` frames (already rotated); ``convs``: per
    causal convolution (by module path), its last ``(kernel - 1) · dilation`` inputs, and per stride-r
    transposed convolution its last input frame.
    """

    frames: int = 0
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    convs: Context = field(default_factory=dict)


class CausalConv1d(nn.Module):
    """Conv1d (stride 1) padded on the left only."""

    def __init__(self, dim_in: int, dim_out: int, kernel: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(dim_in, dim_out, kernel, dilation=dilation, groups=groups)
        self.context = (kernel - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.context, 0)))

    def step(self, x: torch.Tensor, ctx: Context, key: str) -> torch.Tensor:
        past = ctx.get(key)
        if past is None:
            past = x.new_zeros(x.shape[0], x.shape[1], self.context)
        x = torch.cat([past, x], dim=-1)
        ctx[key] = x[..., x.shape[-1] - self.context :].contiguous()  # a copy: the frame itself is not kept alive
        return self.conv(x)


class CausalTransConv1d(nn.Module):
    """ConvTranspose1d (stride r, kernel r or 2r) with ``kernel - r`` samples cut at both ends."""

    def __init__(self, dim_in: int, dim_out: int, kernel: int, stride: int):
        super().__init__()
        if kernel not in (stride, 2 * stride):
            raise ValueError(f"causal transposed conv needs kernel = stride or 2 * stride (got {kernel}, {stride})")
        self.conv = nn.ConvTranspose1d(dim_in, dim_out, kernel, stride=stride)
        self.stride, self.trim = stride, kernel - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[..., self.trim : y.shape[-1] - self.trim]

    def step(self, x: torch.Tensor, ctx: Context, key: str) -> torch.Tensor:
        if self.trim == 0:
            return self.conv(x)
        # Output samples [i·r, (i+1)·r) need inputs i-1 and i: recompute with the previous input frame.
        r, n = self.stride, x.shape[-1]
        past = ctx.get(key)
        ctx[key] = x[..., -1:].contiguous()
        if past is None:
            return self.conv(x)[..., r : n * r]  # the first r samples are the left cut
        return self.conv(torch.cat([past, x], dim=-1))[..., r : (n + 1) * r]


class SnakeBeta(nn.Module):
    """x + 1/exp(β) · sin²(exp(α) · x), per channel (α, β stored in log scale)."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.exp(self.alpha)[None, :, None]
        beta = torch.exp(self.beta)[None, :, None]
        return x + 1.0 / (beta + 1e-9) * torch.sin(x * alpha).pow(2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def _pointwise(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(x.transpose(1, 2)))))
        return (self.gamma * h).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._pointwise(self.dwconv(x))

    def step(self, x: torch.Tensor, ctx: Context, key: str) -> torch.Tensor:
        return x + self._pointwise(self.dwconv.step(x, ctx, f"{key}.dwconv"))


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv1d(dim, dim, 7, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act2(self.conv1(self.act1(x))))

    def step(self, x: torch.Tensor, ctx: Context, key: str) -> torch.Tensor:
        h = self.conv1.step(self.act1(x), ctx, f"{key}.conv1")
        return x + self.conv2(self.act2(h))  # kernel 1: no context


class DecoderBlock(nn.Module):
    """SnakeBeta → ×r transposed conv (halving the channels) → residual units with dilation 1, 3, 9."""

    def __init__(self, dim_in: int, dim_out: int, rate: int):
        super().__init__()
        self.block = nn.ModuleList(
            [SnakeBeta(dim_in), CausalTransConv1d(dim_in, dim_out, 2 * rate, rate)]
            + [ResidualUnit(dim_out, d) for d in (1, 3, 9)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.block:
            x = m(x)
        return x

    def step(self, x: torch.Tensor, ctx: Context, key: str) -> torch.Tensor:
        x = self.block[0](x)
        for i, m in enumerate(self.block[1:], start=1):
            x = m.step(x, ctx, f"{key}.block.{i}")
        return x


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), 0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class Attention(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=bias)

    def forward(self, x, cos, sin, mask, past: tuple[torch.Tensor, torch.Tensor] | None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = attention(q, k, v, mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), (k, v)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size)

    def forward(self, x, cos, sin, mask, past):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + self.self_attn_layer_scale(h)
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x))), kv


def sliding_mask(q_start: int, q_len: int, k_start: int, k_len: int, window: int, dtype, device) -> torch.Tensor:
    """Additive mask: query frame i sees key frames j with i - window < j <= i."""
    qi = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    kj = torch.arange(k_start, k_start + k_len, device=device)[None, :]
    allowed = (kj <= qi) & (kj > qi - window)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class PreTransformer(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, start: int = 0, past: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """x [B, T, H] = frames start .. start+T; ``past`` keys/values of the frames just before.

        Returns the normed output and, per layer, the keys/values of the last ``sliding_window - 1`` frames.
        """
        t, window = x.shape[1], self.cfg.sliding_window
        held = past[0][0].shape[2] if past else 0
        positions = torch.arange(start, start + t, device=x.device)
        cos, sin = rotary_cos_sin(inv_freq(self.cfg.head_dim, self.cfg.rope_theta, device=x.device), positions)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask = sliding_mask(start, t, start - held, held + t, window, x.dtype, x.device)
        keep = []
        for i, layer in enumerate(self.layers):
            x, (k, v) = layer(x, cos, sin, mask, past[i] if past else None)
            keep.append((k[:, :, -(window - 1) :], v[:, :, -(window - 1) :]) if window > 1 else (k[:, :, :0], v[:, :, :0]))
        return self.norm(x), keep


    def forward_rows(
        self, x: torch.Tensor, starts: list[int], pasts: list[list[tuple[torch.Tensor, torch.Tensor]]]
    ) -> tuple[torch.Tensor, list[list[tuple[torch.Tensor, torch.Tensor]]]]:
        """:meth:`forward` for B conversations at once, row b at its own frame ``starts[b]`` with its own ``pasts[b]``
        (per layer, keys/values [1, Hkv, held_b, D] of its last ``held_b <= sliding_window - 1`` frames). The
        pasts are left-padded to the longest and the padding masked; each row keeps what :meth:`forward` keeps."""
        b, t, window = x.shape[0], x.shape[1], self.cfg.sliding_window
        held = [p[0][0].shape[2] for p in pasts]
        pad = max(held)
        steps = torch.arange(t, device=x.device)
        start = torch.tensor(starts, device=x.device)
        cos, sin = rotary_cos_sin(inv_freq(self.cfg.head_dim, self.cfg.rope_theta, device=x.device), start[:, None] + steps)
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # [B, 1, t, D]: per row, broadcast over heads
        # Key slot j of row b: frame start_b - pad + j (a real frame only for j >= pad - held_b).
        query = (start[:, None] + steps)[:, :, None]  # [B, t, 1]
        key = (start[:, None] - pad + torch.arange(pad + t, device=x.device))[:, None, :]  # [B, 1, pad + t]
        real = torch.arange(pad + t, device=x.device)[None, None, :] >= (pad - torch.tensor(held, device=x.device))[:, None, None]
        allowed = real & (key <= query) & (key > query - window)
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, torch.finfo(x.dtype).min)
        mask = mask[:, None]  # [B, 1, t, pad + t]
        padded = []
        for i in range(len(self.layers)):
            ks, vs = [], []
            for row, past in enumerate(pasts):
                k, v = past[i]
                missing = pad - held[row]
                ks.append(F.pad(k, (0, 0, missing, 0)) if missing else k)
                vs.append(F.pad(v, (0, 0, missing, 0)) if missing else v)
            padded.append((torch.cat(ks), torch.cat(vs)))
        keep: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(b)]
        for i, layer in enumerate(self.layers):
            x, (k, v) = layer(x, cos, sin, mask, padded[i])
            for row in range(b):
                n = min(held[row] + t, window - 1)
                keep[row].append((k[row : row + 1, :, k.shape[2] - n :], v[row : row + 1, :, v.shape[2] - n :]))
        return self.norm(x), keep


class Code2Wav(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.code_embedding = nn.Embedding(cfg.codebook_size * cfg.num_quantizers, h)
        self.pre_transformer = PreTransformer(cfg)
        self.upsample = nn.ModuleList(
            nn.ModuleList([CausalTransConv1d(h, h, f, f), ConvNeXtBlock(h)]) for f in cfg.upsampling_ratios
        )
        dims = [cfg.decoder_dim // 2**i for i in range(len(cfg.upsample_rates) + 1)]
        self.decoder = nn.ModuleList(
            [CausalConv1d(h, cfg.decoder_dim, 7)]
            + [DecoderBlock(dims[i], dims[i + 1], r) for i, r in enumerate(cfg.upsample_rates)]
            + [SnakeBeta(dims[-1]), CausalConv1d(dims[-1], 1, 7)]
        )
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        offset = torch.arange(self.cfg.num_quantizers, device=device).view(1, -1, 1) * self.cfg.codebook_size
        self.register_buffer("code_offset", offset, persistent=False)

    @property
    def samples_per_frame(self) -> int:
        return self.cfg.samples_per_frame

    def num_samples(self, frames: int) -> int:
        """Waveform length of ``frames`` frames decoded at once (each stride-r stage drops r samples)."""
        n = frames
        for f in self.cfg.upsampling_ratios:
            n *= f
        for r in self.cfg.upsample_rates:
            n = max(0, (n - 1) * r)
        return n

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.shape[1] != self.cfg.num_quantizers:
            raise ValueError(f"expected codes [B, {self.cfg.num_quantizers}, frames], got {tuple(codes.shape)}")
        return self.code_embedding(codes + self.code_offset).mean(1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, G, T] → waveform [B, 1, samples] in [-1, 1] (the reference's layout)."""
        with full_precision_convs(codes.device):
            x, _ = self.pre_transformer(self._embed(codes))
            x = x.transpose(1, 2)
            for blocks in self.upsample:
                for m in blocks:
                    x = m(x)
            for m in self.decoder:
                x = m(x)
        return x.clamp(-1, 1)

    def decode(self, codes: torch.Tensor, chunk_frames: int = 300) -> torch.Tensor:
        """:meth:`forward`, run in chunks of ``chunk_frames`` through :meth:`stream` for long inputs
        (same samples, bounded memory).

        The reference's ``chunked_decode`` instead restarts every 300 frames from 25 frames of left
        context and drops 555 samples at each chunk end; up to 300 frames both are :meth:`forward`.
        """
        if codes.shape[-1] <= chunk_frames:
            return compiled.call(self, "forward", codes)
        state, parts = self.new_state(), []
        for i in range(0, codes.shape[-1], chunk_frames):
            wav, state = self.stream(codes[..., i : i + chunk_frames], state)
            parts.append(wav)
        return torch.cat(parts, dim=-1)

    def new_state(self) -> Code2WavState:
        return Code2WavState()

    def stream(self, codes: torch.Tensor, state: Code2WavState) -> tuple[torch.Tensor, Code2WavState]:
        """Decode the next frames ``codes`` [B, G, n] with left context only → (new samples [B, 1, s], state).

        Concatenating the outputs of successive calls gives exactly :meth:`forward` of all frames.
        """
        with full_precision_convs(codes.device):
            x, kv = self.pre_transformer(self._embed(codes), state.frames, state.kv or None)
            x = x.transpose(1, 2)
            if state.convs:
                wav, convs = compiled.call(self, "decode_step", x, state.convs)
            else:  # the first frame starts every convolution's context (another computation): eager, not compiled
                wav, convs = self.decode_step(x, state.convs)
        return wav, Code2WavState(frames=state.frames + codes.shape[-1], kv=kv, convs=convs)

    def decode_step(self, x: torch.Tensor, convs: Context) -> tuple[torch.Tensor, Context]:
        """The convolutional half of a streamed step: pre-transformer output x [B, H, n] (channels first) and each
        causal convolution's context → (the new samples [B, 1, s] in [-1, 1], the contexts after them). Pure: ``convs``
        is not changed (what :func:`thinktalk.compile_speech` compiles)."""
        ctx = dict(convs)
        for i, (up, convnext) in enumerate(self.upsample):
            x = convnext.step(up.step(x, ctx, f"upsample.{i}.0"), ctx, f"upsample.{i}.1")
        for i, m in enumerate(self.decoder):
            x = m(x) if isinstance(m, SnakeBeta) else m.step(x, ctx, f"decoder.{i}")
        return x.clamp(-1, 1), ctx

    def stream_many(self, codes: list[torch.Tensor], states: list[Code2WavState]) -> list[tuple[torch.Tensor, Code2WavState]]:
        """:meth:`stream` of several conversations in one batch: ``codes[b]`` [1, G, n] (the same n for all) are
        the next frames of the stream whose state is ``states[b]``; each gets what :meth:`stream` gives it
        (up to the rounding of batched kernels). Streams that have not decoded a frame yet start as one batch of
        their own (their first frame's transposed convolutions cut differently); a stream whose frame count
        differs goes through :meth:`stream` alone."""
        out: list[tuple[torch.Tensor, Code2WavState] | None] = [None] * len(codes)
        n = codes[0].shape[-1] if codes else 0
        rows = [i for i, (c, s) in enumerate(zip(codes, states)) if s.frames > 0 and s.kv and c.shape[-1] == n and c.shape[0] == 1]
        fresh = [i for i, (c, s) in enumerate(zip(codes, states)) if s.frames == 0 and c.shape[-1] == n and c.shape[0] == 1]
        if len(rows) < 2:
            rows = []
        if len(fresh) < 2:
            fresh = []
        for i in set(range(len(codes))) - set(rows) - set(fresh):
            out[i] = self.stream(codes[i], states[i])
        if fresh:  # first frames of several streams: one stream() of a batch in step, then a state per row
            wav, st = self.stream(torch.cat([codes[i] for i in fresh]), Code2WavState())
            for r, i in enumerate(fresh):
                kv = [(k[r : r + 1], v[r : r + 1]) for k, v in st.kv]
                out[i] = (wav[r : r + 1], Code2WavState(frames=st.frames, kv=kv, convs={k: v[r : r + 1] for k, v in st.convs.items()}))
        if rows:
            keys = list(states[rows[0]].convs)
            ctx = {k: torch.cat([states[i].convs[k] for i in rows]) for k in keys}
            with full_precision_convs(codes[rows[0]].device):
                x, kv = self.pre_transformer.forward_rows(
                    self._embed(torch.cat([codes[i] for i in rows])), [states[i].frames for i in rows], [states[i].kv for i in rows]
                )
                x, ctx = compiled.call(self, "decode_step", x.transpose(1, 2), ctx)
            for r, i in enumerate(rows):
                convs = {k: v[r : r + 1] for k, v in ctx.items()}
                out[i] = (x[r : r + 1], Code2WavState(frames=states[i].frames + n, kv=kv[r], convs=convs))
        return out  # type: ignore[return-value]
