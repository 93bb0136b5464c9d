"""Weight-only 4-bit linear layers in the formats the official checkpoints are published in (GPTQ, AWQ).

Both formats store, per linear layer with ``in`` inputs and ``out`` outputs and groups of ``g`` inputs,
integer codes ``q`` (0..15), one zero point ``z`` and one scale ``s`` per (group, output), and mean
``W[o, i] = (q[i, o] - z[i // g, o]) · s[i // g, o]``. They differ in how the codes are packed into
int32 words (eight 4-bit codes per word, the first in the lowest bits):

* **GPTQ** (AutoGPTQ / GPTQModel, ``checkpoint_format`` "gptq"): ``qweight [in/8, out]`` packs eight
  consecutive *inputs*; ``qzeros [in/g, out/8]`` packs eight consecutive *outputs*; ``scales [in/g, out]``;
  ``g_idx [in]`` is the group of every input (not always ``i // g``: with ``desc_act`` the inputs were
  quantized in another order). The v1 format stores ``z - 1`` (an AutoGPTQ legacy every published
  GPTQ checkpoint carries); ``gptq_v2`` stores ``z``.
* **AWQ** (AutoAWQ "gemm" version): ``qweight [in, out/8]`` and ``qzeros [in/g, out/8]`` both pack eight
  consecutive *outputs*, interleaved: word position ``j`` holds output ``AWQ_ORDER[j]`` of its eight
  (the layout its GEMM kernel reads); ``scales [in/g, out]``; zeros stored as they are.

:class:`QuantLinear` keeps the packed tensors (a quarter of the bfloat16 bytes, plus scales) and, on
its plain path, dequantizes the weight on every call and runs a float ``F.linear``: slow, but exactly
the float model the checkpoint means, which the tests compare with the reference. :func:`quantize_rtn`
and the ``pack_*`` functions write such checkpoints (round-to-nearest, not GPTQ's or AWQ's
calibrated rounding: tests need the format, not the accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from thinktalk.nn.mlp import activation
from thinktalk.nn.moe import Experts

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word position j holds output column AWQ_ORDER[j] of its 8
METHODS = ("gptq", "awq")
QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


class QuantConfigError(ValueError):
    """A ``quantization_config`` thinktalk cannot load (named in the message)."""


@dataclass(frozen=True)
class QuantConfig:
    """The ``quantization_config`` of a ``config.json``, reduced to what dequantization needs."""

    method: str  # "gptq" | "awq"
    bits: int = 4
    group_size: int = 128
    zero_offset: int = 1  # added to the stored zeros: 1 for GPTQ v1 checkpoints, 0 for gptq_v2 and AWQ
    modules_to_not_convert: tuple[str, ...] = ()

    @classmethod
    def from_hf(cls, data: dict) -> QuantConfig:
        if not isinstance(data, dict):
            raise QuantConfigError(f"quantization_config must be an object, got {type(data).__name__}")
        method = str(data.get("quant_method", "")).lower()
        if method not in METHODS:
            raise QuantConfigError(
                f"quantization_config.quant_method '{data.get('quant_method')}' is not supported (thinktalk loads: {', '.join(METHODS)})"
            )
        bits = data.get("bits", data.get("w_bit", 4))
        if bits != 4:
            raise QuantConfigError(
                f"quantization_config.bits={bits}: only 4-bit {method.upper()} checkpoints are supported"
            )
        group = data.get("group_size", data.get("q_group_size", 128))
        if not isinstance(group, int) or group == 0 or group < -1:
            raise QuantConfigError(f"quantization_config.group_size must be a positive integer or -1, got {group!r}")
        offset = 0
        if method == "gptq":
            fmt = str(data.get("checkpoint_format", "gptq")).lower()
            if fmt not in ("gptq", "gptq_v2"):
                raise QuantConfigError(f"GPTQ checkpoint_format '{fmt}' is not supported (gptq, gptq_v2)")
            offset = 1 if fmt == "gptq" else 0
            pack = str(data.get("pack_dtype", "int32")).replace("torch.", "")
            if pack != "int32":
                raise QuantConfigError(f"GPTQ pack_dtype '{pack}' is not supported (int32)")
        else:
            version = str(data.get("version", "gemm")).lower()
            if version != "gemm":
                raise QuantConfigError(f"AWQ version '{version}' is not supported (gemm; gemv packs differently)")
            if data.get("zero_point", True) is False:
                raise QuantConfigError("AWQ without zero points (zero_point=false) is not supported")
        skip = data.get("modules_to_not_convert") or ()
        return cls(method=method, bits=4, group_size=group, zero_offset=offset, modules_to_not_convert=tuple(skip))


def find_quant_config(config: dict) -> QuantConfig | None:
    """The quantization of a checkpoint's ``config.json``: top level, or in the Thinker's (text) config."""
    places = [config, config.get("thinker_config") or {}, (config.get("thinker_config") or {}).get("text_config") or {}]
    for place in places:
        if isinstance(place, dict) and place.get("quantization_config") is not None:
            return QuantConfig.from_hf(place["quantization_config"])
    return None


# -- packing --------------------------------------------------------------------------------------
def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 → the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int4(codes: torch.Tensor, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Eight 4-bit codes along ``dim`` per int32 word, the first in the lowest bits.

    >>> hex(int(pack_int4(torch.arange(1, 9)[None], dim=1)) & 0xFFFFFFFF)
    '0x87654321'
    """
    codes = codes.movedim(dim, -1).to(torch.int64)
    if codes.shape[-1] % 8:
        raise ValueError(f"cannot pack {codes.shape[-1]} codes into whole int32 words (a multiple of 8 is needed)")
    if int(codes.min()) < 0 or int(codes.max()) > 15:
        raise ValueError("4-bit codes must lie in 0..15")
    grouped = codes.reshape(*codes.shape[:-1], -1, 8)
    if order is not None:
        grouped = grouped[..., list(order)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    words = (grouped << shifts).sum(-1)
    return _to_int32(words).movedim(-1, dim).contiguous()


def unpack_int4(words: torch.Tensor, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: int32 words → int32 codes, eight per word along ``dim``
    (0/1 of a 2-D tensor, or -2/-1 of a batch of them, e.g. stacked experts).

    Arithmetic shifts of the int32 words then a 4-bit mask give every nibble, the sign bit included;
    an interleaved ``order`` is undone by shifting each output column's own nibble out (no gather).
    """
    if words.dim() < 2 or dim not in (0, 1, -2, -1) or (dim >= 0 and words.dim() != 2):
        raise ValueError("unpack_int4 takes [..., R, C] word tensors and dim -2/-1 (0/1 when 2-D)")
    position = list(range(8)) if order is None else [order.index(c) for c in range(8)]
    shifts = torch.tensor([4 * p for p in position], dtype=torch.int32, device=words.device)
    w = words.to(torch.int32)
    if dim in (0, -2):
        return ((w[..., :, None, :] >> shifts[:, None]) & 0xF).reshape(*w.shape[:-2], -1, w.shape[-1])
    return ((w[..., None] >> shifts) & 0xF).reshape(*w.shape[:-1], -1)


# -- dequantization ---------------------------------------------------------------------------------
def dequantize(
    method: str,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    zero_offset: int = 0,
) -> torch.Tensor:
    """The float weight ``[out, in]`` (as ``nn.Linear`` holds it; a transposed view) of packed GPTQ or
    AWQ tensors, in ``scales.dtype``; leading dimensions (stacked experts) are kept.

    ``(q - z)`` is a small integer, exact in any float dtype, so one product in ``scales.dtype`` rounds
    once: the same value as computing in float32 and rounding at the end.
    """
    groups, out = scales.shape[-2:]
    if method == "gptq":
        q = unpack_int4(qweight, dim=-2)  # [..., in, out]
    elif method == "awq":
        q = unpack_int4(qweight, dim=-1, order=AWQ_ORDER)
    else:
        raise ValueError(f"unknown quantization method '{method}'")
    z = unpack_int4(qzeros, dim=-1, order=AWQ_ORDER if method == "awq" else None)[..., :out] + zero_offset
    n_in = q.shape[-2]
    g = n_in // groups
    lead = q.shape[:-2]
    trivial = g_idx is None or torch.equal(
        g_idx.to(torch.long), (torch.arange(n_in, device=g_idx.device) // g).expand(g_idx.shape)
    )
    if trivial:  # groups of consecutive inputs: broadcast per group, no gather
        w = (q.view(*lead, groups, g, out) - z[..., None, :]).to(scales.dtype) * scales[..., None, :]
        return w.view(*lead, n_in, out).transpose(-1, -2)
    idx = g_idx.long()[..., None].expand(*g_idx.shape, out)
    zz, ss = torch.gather(z, -2, idx), torch.gather(scales, -2, idx)
    return ((q - zz).to(scales.dtype) * ss).transpose(-1, -2)


# -- quantizing (test checkpoints) -----------------------------------------------------------------
def quantize_rtn(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric 4-bit quantization of ``weight [out, in]`` in groups of inputs.

    Returns (codes [in, out] 0..15, zeros [groups, out] 0..15, scales [groups, out] float16), the
    unpacked contents of either format; the scales are rounded to float16 first, as stored.
    """
    out, n_in = weight.shape
    g = n_in if group_size == -1 else group_size
    if n_in % g:
        raise ValueError(f"{n_in} inputs are not a whole number of groups of {g}")
    w = weight.detach().to(torch.float32).t().reshape(n_in // g, g, out)  # [groups, g, out]
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-5).to(torch.float16)
    s = scales.to(torch.float32)
    zeros = torch.round(-lo / s).clamp(0, 15)
    codes = (torch.round(w / s[:, None]) + zeros[:, None]).clamp(0, 15)
    return codes.reshape(n_in, out).to(torch.int64), zeros.to(torch.int64), scales


def pack_gptq(
    codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, v1: bool = True
) -> dict[str, torch.Tensor]:
    """GPTQ tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``) of :func:`quantize_rtn`'s output."""
    n_in, groups = codes.shape[0], zeros.shape[0]
    stored = zeros - 1 if v1 else zeros
    if v1 and int(stored.min()) < 0:
        # AutoGPTQ's v1 files hold z - 1 in 4 bits; z = 0 wraps to 15 there and back to 0 (mod 16)
        # only in kernels that overflow the same way. Keep every zero >= 1 instead.
        raise ValueError("GPTQ v1 cannot store a zero point of 0; quantize with zeros >= 1")
    return {
        "qweight": pack_int4(codes, dim=0),
        "qzeros": pack_int4(stored, dim=1),
        "scales": scales,
        "g_idx": (torch.arange(n_in, device=codes.device) // (n_in // groups)).to(torch.int32),
    }


def pack_awq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """AWQ (gemm) tensors (``qweight``, ``qzeros``, ``scales``) of :func:`quantize_rtn`'s output."""
    return {
        "qweight": pack_int4(codes, dim=1, order=AWQ_ORDER),
        "qzeros": pack_int4(zeros, dim=1, order=AWQ_ORDER),
        "scales": scales,
    }


# -- the layer -------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A linear layer holding packed 4-bit weights (GPTQ or AWQ layout), dequantized on each call.

    The buffers carry the checkpoint's names, so a quantized checkpoint loads into it like any
    other module. ``weight`` (a property) is the dequantized float matrix ``[out, in]``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: QuantConfig):
        super().__init__()
        g = in_features if cfg.group_size == -1 else cfg.group_size
        if in_features % g or in_features % 8 or out_features % 8:
            raise QuantConfigError(
                f"a {in_features}->{out_features} linear layer cannot hold {cfg.method.upper()} 4-bit weights in groups of {g}"
                " (inputs must be a multiple of the group size and of 8, outputs of 8)"
            )
        self.in_features, self.out_features, self.method, self.zero_offset = (
            in_features,
            out_features,
            cfg.method,
            cfg.zero_offset,
        )
        groups = in_features // g
        if cfg.method == "gptq":
            self.register_buffer("qweight", torch.empty(in_features // 8, out_features, dtype=torch.int32))
            self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32))
        else:
            self.register_buffer("qweight", torch.empty(in_features, out_features // 8, dtype=torch.int32))
            self.g_idx = None
        self.register_buffer("qzeros", torch.empty(groups, out_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, out_features))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

        self.kernel = "plain"  # or "int4mm": torch's int4 matmul (see use_int4mm)
        self._int4: tuple[torch.Tensor, torch.Tensor, int] | None = None
        # A row shard (thinktalk.parallel) holds the groups from this one on; its g_idx counts from 0 here.
        self.group_offset = 0

    @property
    def config(self) -> QuantConfig:
        return QuantConfig(
            self.method, group_size=self.in_features // self.scales.shape[0], zero_offset=self.zero_offset
        )

    def local_g_idx(self) -> torch.Tensor | None:
        return None if self.g_idx is None else self.g_idx - self.group_offset

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.method, self.qweight, self.qzeros, self.scales, self.local_g_idx(), self.zero_offset)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [in, out], zeros [groups, out]) unpacked from either layout, zero offset applied."""
        order = AWQ_ORDER if self.method == "awq" else None
        q = unpack_int4(self.qweight, dim=0 if self.method == "gptq" else 1, order=order)
        z = unpack_int4(self.qzeros, dim=1, order=order)[:, : self.out_features] + self.zero_offset
        return q, z

    def int4mm_supported(self) -> str | None:
        """None when :meth:`use_int4mm` can run this layer, else why not."""
        groups = self.scales.shape[0]
        g = self.in_features // groups
        if g not in (32, 64, 128, 256):
            return f"group size {g} (the int4 kernels take 32, 64, 128, 256)"
        if self.in_features % 64 or self.out_features % 16:
            return f"shape {self.in_features}->{self.out_features}"
        if self.g_idx is not None and not torch.equal(
            self.local_g_idx().long().cpu(), torch.arange(self.in_features) // g
        ):
            return "act-order (desc_act) groups"
        return None

    def use_int4mm(self) -> None:
        """Repack for torch's tinygemm int4 kernels (``_weight_int4pack_mm``: CUDA; ``..._for_cpu``: CPU).

        They compute ``W = (q - 8)·s + m`` per group, so the checkpoint's ``(q - z)·s`` becomes
        ``m = (8 - z)·s``. The checkpoint-layout buffers stay (``weight`` and the plain path still work).
        """
        why = self.int4mm_supported()
        if why is not None:
            raise QuantConfigError(f"int4mm cannot run this layer: {why}")
        q, z = self.codes()
        s = self.scales.to(torch.float32)
        scale_zero = torch.stack([s, (8 - z).to(torch.float32) * s], dim=-1).contiguous()  # [groups, out, 2]
        w = q.t().contiguous().to(torch.int32)  # [out, in]
        inner_k_tiles = 8 if self.in_features % 256 == 0 else (4 if self.in_features % 128 == 0 else 2)
        if w.device.type == "cuda":
            w8 = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(w8, inner_k_tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, inner_k_tiles)
        self._int4 = (packed, scale_zero, self.in_features // self.scales.shape[0])
        self.kernel = "int4mm"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` without the bias."""
        if self.kernel == "int4mm" and self._int4 is not None:
            packed, scale_zero, g = self._int4
            flat = x.reshape(-1, self.in_features).contiguous()
            cuda = x.device.type == "cuda"
            mm = torch.ops.aten._weight_int4pack_mm if cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
            return mm(flat, packed, g, scale_zero.to(x.dtype)).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, method={self.method}, bias={self.bias is not None}"


class QuantExperts(Experts):
    """The stacked MoE experts of a 4-bit checkpoint, kept packed: ``{gate,up,down}_{qweight,qzeros,scales}``
    (+ GPTQ's ``g_idx``) with the experts stacked on dimension 0, each expert as the checkpoint stores it.

    A forward dequantizes only the experts the router chose for these tokens (decoding: at most
    tokens x top-k of them) and runs the float experts' computation on them.
    """

    PROJECTIONS = ("gate", "up", "down")

    def __init__(self, num_experts: int, dim: int, hidden: int, act: str, cfg: QuantConfig):
        nn.Module.__init__(self)
        self.num_experts, self.hidden, self.dim = num_experts, hidden, dim
        self.act, self.act_name = activation(act), act
        self.impl = "auto"
        self.method, self.zero_offset = cfg.method, cfg.zero_offset
        for proj, (n_in, n_out) in zip(self.PROJECTIONS, ((dim, hidden), (dim, hidden), (hidden, dim))):
            g = n_in if cfg.group_size == -1 else cfg.group_size
            if n_in % g or n_in % 8 or n_out % 8:
                raise QuantConfigError(f"experts of {n_in}->{n_out} cannot hold 4-bit weights in groups of {g}")
            groups = n_in // g
            if cfg.method == "gptq":
                self.register_buffer(f"{proj}_qweight", torch.empty(num_experts, n_in // 8, n_out, dtype=torch.int32))
                self.register_buffer(f"{proj}_g_idx", torch.empty(num_experts, n_in, dtype=torch.int32))
            else:
                self.register_buffer(f"{proj}_qweight", torch.empty(num_experts, n_in, n_out // 8, dtype=torch.int32))
            self.register_buffer(f"{proj}_qzeros", torch.empty(num_experts, groups, n_out // 8, dtype=torch.int32))
            self.register_buffer(f"{proj}_scales", torch.empty(num_experts, groups, n_out))

    @property
    def config(self) -> QuantConfig:
        return QuantConfig(self.method, group_size=self.dim // self.gate_scales.shape[1], zero_offset=self.zero_offset)

    def dequantized(self, proj: str, experts: torch.Tensor | None = None) -> torch.Tensor:
        """The float weights ``[E', out, in]`` of projection ``proj`` for ``experts`` (default: all)."""

        def pick(name):
            t = getattr(self, f"{proj}_{name}", None)
            return t if t is None or experts is None else t[experts]

        return dequantize(self.method, pick("qweight"), pick("qzeros"), pick("scales"), pick("g_idx"), self.zero_offset)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        used, local = torch.unique(experts, return_inverse=True)
        gate_up = torch.cat([self.dequantized("gate", used), self.dequantized("up", used)], dim=1).to(x.dtype)
        down = self.dequantized("down", used).to(x.dtype)
        return self.compute(x, weights, local.view_as(experts), gate_up, down, used.numel())
