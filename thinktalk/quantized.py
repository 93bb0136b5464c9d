"""Loading the official 4-bit checkpoints (GPTQ, AWQ): which layers are quantized, and how they are read.

The checkpoint itself says which layers are quantized: a linear layer ``P`` is stored as ``P.qweight``
(+ ``qzeros``, ``scales``, GPTQ's ``g_idx``) instead of ``P.weight``. The published Qwen-Omni builds
quantize the Thinker's LLM layers and keep the encoders, the Talker and the vocoder in floating point
(``modules_to_not_convert``); whatever a build chose, it is read from the tensor names:

* ``P`` is an ``nn.Linear`` of ours → it becomes a :class:`~thinktalk.nn.quant.QuantLinear` (the packed
  tensors stay packed in memory);
* ``P`` is expert ``i`` of a stacked MoE (Qwen3: ``...mlp.experts.{i}.gate_proj``) → the experts module
  becomes a :class:`~thinktalk.nn.quant.QuantExperts` holding every expert's packed tensors stacked
  (extra ``Stacked`` rules route each expert's tensors into row ``i``);
* otherwise → the weight is dequantized while loading and read as ``P.weight``;
* ``dequantize=True`` does the last for every layer: the float model the checkpoint means.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from thinktalk.checkpoint import CheckpointError, Stacked, WeightMap
from thinktalk.nn.moe import Experts
from thinktalk.nn.quant import QUANT_TENSORS, QuantConfig, QuantExperts, QuantLinear, dequantize

_EXPERT = re.compile(r"^(?P<head>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate|up|down)_proj$")


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


def prepare_quantized(
    model: nn.Module, source, weight_map: WeightMap, cfg: QuantConfig, dequantize_all: bool = False
) -> tuple[object, WeightMap]:
    """Swap ``model``'s quantized layers (on meta) for packed ones; return the source and weight map to load with."""
    prefixes = quantized_prefixes(source.names())
    if not prefixes:
        raise CheckpointError(
            f"config.json declares {cfg.method.upper()} quantization but '{source.directory}' has no '*.qweight' tensors"
        )
    virtual, rules = {}, []
    for p in prefixes:
        module_name = weight_map.to_module(f"{p}.weight")[: -len(".weight")]
        expert = _EXPERT.match(module_name)
        if expert and not dequantize_all:
            head = expert["head"]
            owner = _submodule(model, head)
            if isinstance(owner, Experts) and not isinstance(owner, QuantExperts):
                with torch.device("meta"):
                    q = QuantExperts(owner.num_experts, owner.gate_up_proj.shape[-1], owner.hidden, owner.act_name, cfg)
                q.impl = owner.impl
                model.set_submodule(head, q)
                owner = q
            if isinstance(owner, QuantExperts):
                continue
        target = _submodule(model, module_name)
        if dequantize_all or not isinstance(target, nn.Linear):
            virtual[f"{p}.weight"] = p
            continue
        with torch.device("meta"):
            q = QuantLinear(target.in_features, target.out_features, target.bias is not None, cfg)
        model.set_submodule(module_name, q)
    if any(isinstance(m, QuantExperts) for m in model.modules()):
        kinds = ("qweight", "qzeros", "scales") + (("g_idx",) if cfg.method == "gptq" else ())
        rules = [
            Stacked(f"{{prefix}}.experts.{{index}}.{proj}_proj.{kind}", f"{{prefix}}.experts.{proj}_{kind}")
            for proj in QuantExperts.PROJECTIONS
            for kind in kinds
        ]
        weight_map = dataclasses.replace(weight_map, stacked=tuple(rules) + weight_map.stacked)
    return (DequantizingSource(source, cfg, virtual) if virtual else source), weight_map


def _submodule(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def quantized_dtype_for(dtype_for, model_dtype: torch.dtype):
    """Scales keep float16 (as stored: bfloat16 would drop 3 bits of every scale) unless the model is float32."""

    def pick(name: str) -> torch.dtype:
        if name.endswith("scales"):  # QuantLinear's .scales, QuantExperts' {gate,up,down}_scales
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
