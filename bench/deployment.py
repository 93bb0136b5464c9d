"""GPU rows of docs/deployment.md: peak memory and decode speed of the Thinker, bf16 vs 4-bit, at 7B shapes.

    python bench/deployment.py --device cuda --shape 7b                 # one GPU: bf16, GPTQ plain, GPTQ int4mm
    python bench/deployment.py --shape small --new-tokens 8             # CPU smoke run of the same code

Weights are random at the chosen shapes (speed and memory do not depend on their values); the 4-bit
model is the same one with every decoder projection round-to-nearest quantized into GPTQ tensors
(group 128) by thinktalk's packer, so it runs the same QuantLinear code an official checkpoint loads into.
Tensor-parallel rows need several GPUs: run ``thinktalk serve DIR --tensor-parallel-size N`` on them.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.thinker import make_inputs, thinker_config  # noqa: E402
from thinktalk.benchmark import sync  # noqa: E402
from thinktalk.loading import build  # noqa: E402
from thinktalk.nn.quant import QuantConfig, QuantLinear, pack_gptq, quantize_rtn  # noqa: E402
from thinktalk.quantized import use_int4mm  # noqa: E402
from thinktalk.testing.tiny import randomize  # noqa: E402


def random_thinker(shape: str, device: torch.device, dtype: torch.dtype):
    model = build(thinker_config(shape), ("thinker",))
    model.to_empty(device="cpu")
    randomize(model, seed=0)
    from thinktalk.checkpoint import materialize_buffers

    model.to(device=device, dtype=dtype)
    materialize_buffers(model, device)
    model.eval()
    model.dtype, model.device, model.tokenizer = dtype, device, None
    return model


def quantize_in_place(model, group: int = 128) -> int:
    """Every Linear of the Thinker's decoder layers → a GPTQ QuantLinear (RTN). Returns how many."""
    layers = model.thinker.model.layers
    targets = [(n, m) for n, m in layers.named_modules() if isinstance(m, torch.nn.Linear)]
    for name, lin in targets:
        g = math.gcd(lin.in_features, group)  # 128 at real shapes; smaller for the tiny test shapes
        codes, zeros, scales = quantize_rtn(lin.weight.float(), g)
        q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, QuantConfig("gptq", group_size=g))
        for key, t in pack_gptq(codes, zeros, scales).items():
            setattr(q, key, t.to(lin.weight.device) if key != "scales" else t.to(lin.weight.device, torch.float16))
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        layers.set_submodule(name, q)
    return len(targets)


def measure(model, device: torch.device, new_tokens: int) -> dict:
    inputs = {k: v.to(device) for k, v in make_inputs(2.0, (28, 28), 64).items()}
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, eos_token_id=())
        sync(device)
        t = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, eos_token_id=())
        sync(device)
        elapsed = time.perf_counter() - t
    row = {"decode_tok_s": new_tokens / elapsed}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="small", help="a shape of bench/thinker.py: tiny, small, 7b")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--configs", default="float,gptq,gptq-int4mm", help="float: bf16 on CUDA, float32 on CPU")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for config in a.configs.split(","):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = random_thinker(a.shape, device, dtype)
        if config.startswith("gptq"):
            quantize_in_place(model)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        if config == "gptq-int4mm":
            use_int4mm(model)
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**30
        row = {
            "config": config,
            "shape": a.shape,
            "device": str(device),
            "weights_gib": weights,
            **measure(model, device, a.new_tokens),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model
        gc.collect()
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
