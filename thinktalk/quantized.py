"""Loading the official 4-bit checkpoints (GPTQ, AWQ): which layers are quantized, and how they are read.

The checkpoint itself says which layers are quantized: a linear layer ``P`` is stored as ``P.qweight``
(+ ``qzeros``, ``scales``, GPTQ's ``g_idx``) instead of ``P.weight``. The published Qwen-Omni builds
quantize the Thinker's LLM layers and keep the encoders, the Talker and the vocoder in floating point
(``modules_to_not_convert``); whatever a build chose, it is read from the tensor names:

* ``P`` is an ``nn.Linear`` of ours → it becomes a :class:`~thinktalk.nn.quant.QuantLinear` (the packed
  tensors stay packed in memory);
* otherwise (Qwen3's experts, which we stack into one tensor per projection) → the weight is
  dequantized while loading and read as ``P.weight`` (correct, but without the memory saving);
* ``dequantize=True`` does the second for every layer: the float model the checkpoint means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from thinktalk.checkpoint import CheckpointError, WeightMap
from thinktalk.nn.quant import QUANT_TENSORS, QuantConfig, QuantLinear, dequantize


def quantized_prefixes(names) -> list[str]:
    return sorted(n[: -len(".qweight")] for n in names if n.endswith(".qweight"))


@dataclass
class DequantizingSource:
    """A checkpoint seen with some quantized layers replaced by their dequantized ``.weight``."""

    base: object
    cfg: QuantConfig
    virtual: dict[str, str] = field(default_factory=dict)  # "P.weight" -> "P"

    @property
    def directory(self) -> str:
        return self.base.directory

    def names(self) -> list[str]:
        hidden = {f"{p}.{t}" for p in self.virtual.values() for t in QUANT_TENSORS}
        return [n for n in self.base.names() if n not in hidden] + list(self.virtual)

    def nbytes(self, name: str) -> int:
        if name in self.virtual:
            return self.base.nbytes(f"{self.virtual[name]}.qweight") * 4
        return self.base.nbytes(name)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.virtual:
            return self.base.tensor(name)
        p = self.virtual[name]
        names = set(self.base.names())
        for t in ("qweight", "qzeros", "scales"):
            if f"{p}.{t}" not in names:
                raise CheckpointError(f"quantized layer '{p}' has no '{p}.{t}' in '{self.directory}'")
        g_idx = self.base.tensor(f"{p}.g_idx") if f"{p}.g_idx" in names else None
        scales = self.base.tensor(f"{p}.scales").to(torch.float32)
        return dequantize(
            self.cfg.method,
            self.base.tensor(f"{p}.qweight"),
            self.base.tensor(f"{p}.qzeros"),
            scales,
            g_idx,
            self.cfg.zero_offset,
        )


def prepare_quantized(model: nn.Module, source, weight_map: WeightMap, cfg: QuantConfig, dequantize_all: bool = False):
    """Swap ``model``'s quantized linear layers (on meta) for QuantLinear; return the source to load from."""
    prefixes = quantized_prefixes(source.names())
    if not prefixes:
        raise CheckpointError(
            f"config.json declares {cfg.method.upper()} quantization but '{source.directory}' has no '*.qweight' tensors"
        )
    virtual = {}
    for p in prefixes:
        module_name = weight_map.to_module(f"{p}.weight")[: -len(".weight")]
        try:
            target = model.get_submodule(module_name)
        except AttributeError:
            target = None
        if dequantize_all or not isinstance(target, nn.Linear):
            virtual[f"{p}.weight"] = p
            continue
        with torch.device("meta"):
            q = QuantLinear(target.in_features, target.out_features, target.bias is not None, cfg)
        model.set_submodule(module_name, q)
    return DequantizingSource(source, cfg, virtual) if virtual else source


def quantized_dtype_for(dtype_for, model_dtype: torch.dtype):
    """Scales keep float16 (as stored: bfloat16 would drop 3 bits of every scale) unless the model is float32."""

    def pick(name: str) -> torch.dtype:
        if name.endswith(".scales"):
            return torch.float32 if model_dtype == torch.float32 else torch.float16
        return dtype_for(name)

    return pick


def use_int4mm(model: nn.Module) -> tuple[int, int]:
    """Switch every QuantLinear that allows it to torch's int4 matmul; (switched, left on the plain path)."""
    import logging

    fast = plain = 0
    reasons = set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            why = m.int4mm_supported()
            if why is None:
                m.use_int4mm()
                fast += 1
            else:
                plain += 1
                reasons.add(why)
    if plain:
        logging.getLogger("thinktalk").info(
            "int4mm: %d layers switched, %d stay plain (%s)", fast, plain, "; ".join(sorted(reasons))
        )
    return fast, plain
