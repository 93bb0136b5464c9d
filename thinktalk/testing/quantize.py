"""Tiny 4-bit checkpoints in the published GPTQ / AWQ layouts, written from a float checkpoint directory.

As the official Qwen-Omni builds do, only the Thinker's LLM layers are quantized; the encoders, the
Talker, the vocoder and ``lm_head`` stay in floating point and are listed in ``modules_to_not_convert``.
Rounding is plain round-to-nearest (:func:`thinktalk.nn.quant.quantize_rtn`): the tests need the
format, not GPTQ's or AWQ's calibrated accuracy.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from thinktalk.checkpoint import Checkpoint, save_tensors
from thinktalk.nn.quant import pack_awq, pack_gptq, quantize_rtn

THINKER_LLM_LINEAR = r"^thinker\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|mlp\.experts\.\d+\.(gate|up|down)_proj)\.weight$"
NOT_CONVERTED = ["lm_head", "audio_tower", "visual", "talker", "token2wav", "code2wav", "code_predictor"]


def quantize_checkpoint(
    src: str, dst: str, method: str = "gptq", group_size: int = 16, include: str = THINKER_LLM_LINEAR
) -> list[str]:
    """Write ``dst``: ``src`` with the linear weights matching ``include`` stored as 4-bit ``method`` tensors.

    Returns the quantized layer names. Files beside the weights (tokenizer, speakers ...) are copied.
    """
    if method not in ("gptq", "awq"):
        raise ValueError(f"unknown method '{method}' (gptq, awq)")
    ckpt = Checkpoint.open(src)
    pattern = re.compile(include)
    out, layers = {}, []
    for name in ckpt.names():
        t = ckpt.tensor(name)
        if not pattern.match(name):
            out[name] = t
            continue
        prefix = name[: -len(".weight")]
        codes, zeros, scales = quantize_rtn(t, group_size)
        packed = pack_gptq(codes, zeros, scales) if method == "gptq" else pack_awq(codes, zeros, scales)
        out.update({f"{prefix}.{k}": v for k, v in packed.items()})
        layers.append(prefix)
    os.makedirs(dst, exist_ok=True)
    for entry in os.listdir(src):
        path = os.path.join(src, entry)
        if os.path.isfile(path) and not entry.endswith(".safetensors") and entry != "model.safetensors.index.json":
            shutil.copy(path, os.path.join(dst, entry))
    save_tensors(out, dst)
    with open(os.path.join(dst, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False, "sym": False,
              "checkpoint_format": "gptq", "pack_dtype": "int32", "lm_head": False}  # fmt: skip
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm", "zero_point": True}
    qc["modules_to_not_convert"] = NOT_CONVERTED
    config["quantization_config"] = qc
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    return layers
