"""4-bit linear layers: the plain dequantizing path vs torch's int4 matmul vs a float matmul, at 7B shapes.

    python bench/quant_kernels.py [--device cpu|cuda] [--tokens 1 512]

Prints milliseconds per call of one Qwen2.5-Omni-7B Thinker projection (3584 -> 18944, the MLP's up
projection) and the bytes each representation holds.
"""

from __future__ import annotations

import argparse
import time

import torch

from thinktalk.nn.quant import QuantConfig, QuantLinear, pack_gptq, quantize_rtn


def timed(fn, repeats: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 128])
    p.add_argument("--in-features", type=int, default=3584)
    p.add_argument("--out-features", type=int, default=18944)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    w = torch.randn(a.out_features, a.in_features) * 0.02
    codes, zeros, scales = quantize_rtn(w, 128)
    layer = QuantLinear(a.in_features, a.out_features, False, QuantConfig("gptq", group_size=128))
    for name, t in pack_gptq(codes, zeros, scales).items():
        setattr(layer, name, t.to(dtype) if name == "scales" else t)
    layer.to(a.device)
    dense = torch.nn.Linear(a.in_features, a.out_features, bias=False).to(a.device, dtype)
    packed_bytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    print(
        f"{a.in_features}->{a.out_features} on {a.device} ({dtype}, {torch.get_num_threads()} threads): "
        f"packed {packed_bytes / 2**20:.1f} MiB, dense {dense.weight.numel() * dense.weight.element_size() / 2**20:.1f} MiB"
    )
    with torch.inference_mode():
        for n in a.tokens:
            x = torch.randn(n, a.in_features, device=a.device, dtype=dtype)
            layer.kernel = "plain"
            plain = timed(lambda x=x: layer(x), a.repeats)
            layer.use_int4mm()
            fast = timed(lambda x=x: layer(x), a.repeats)
            ref = timed(lambda x=x: dense(x), a.repeats)
            print(
                f"  {n:4d} tokens: plain (dequantize + matmul) {plain:8.2f} ms | int4mm {fast:8.2f} ms | float {ref:8.2f} ms"
            )


if __name__ == "__main__":
    main()
