"""Weight and KV-cache memory per deployment configuration, computed (not measured) from the model shapes.

    python bench/memory.py            # the tables of docs/deployment.md

The Thinker LLM's parameters are counted exactly from the published configs' shapes (below). The other
components (audio and vision encoders, Talker, vocoder) are the published total parameter count minus
that: an estimate to within the rounding of the published totals (0.1B).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class LLM:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int = 0  # dense SwiGLU
    experts: int = 0  # MoE
    moe_intermediate: int = 0
    tied: bool = False
    qkv_bias: bool = True
    total_params: float = 0.0  # the whole checkpoint, as published (billions)

    def linear_params(self) -> int:
        """Parameters of the layers' linear projections (what 4-bit checkpoints quantize, what TP shards)."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        mlp = (
            3 * self.hidden * self.intermediate
            if not self.experts
            else self.experts * 3 * self.hidden * self.moe_intermediate
        )
        return self.layers * (q + kv + o + mlp)

    def other_llm_params(self) -> int:
        """Token table, lm_head, norms, biases, routers (kept in bf16; replicated over TP ranks)."""
        table = self.vocab * self.hidden * (1 if self.tied else 2)
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        router = self.hidden * self.experts
        return table + self.layers * (2 * self.hidden + bias + router)

    def llm_params(self) -> int:
        return self.linear_params() + self.other_llm_params()

    def rest_params(self) -> int:
        return int(self.total_params * 1e9) - self.llm_params()

    def kv_bytes_per_token(self, bytes_per: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per


MODELS = [
    LLM("Qwen2.5-Omni-3B", hidden=2048, layers=36, heads=16, kv_heads=2, head_dim=128, vocab=151936,
        intermediate=11008, tied=True, total_params=5.54),
    LLM("Qwen2.5-Omni-7B", hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, vocab=152064,
        intermediate=18944, total_params=10.7),
    LLM("Qwen3-Omni-30B-A3B", hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128, vocab=151936,
        experts=128, moe_intermediate=768, qkv_bias=False, total_params=35.3),
]  # fmt: skip

INT4_BYTES = 0.5 + 2 / 128 + 0.5 / 128  # packed codes + a float16 scale and a 4-bit zero per 128 inputs


def weights_gib(m: LLM, int4: bool = False, tp: int = 1) -> float:
    """Weights on the busiest rank (rank 0 holds everything that is not sharded)."""
    linear = m.linear_params() * (INT4_BYTES if int4 else 2) / tp
    return (linear + 2 * m.other_llm_params() + 2 * m.rest_params()) / GiB


def main() -> None:
    print(
        "| model | Thinker LLM params | of which linear | rest (encoders, Talker, vocoder) | KV cache per token (bf16) |"
    )
    print("|---|---|---|---|---|")
    for m in MODELS:
        print(f"| {m.name} | {m.llm_params() / 1e9:.2f} B | {m.linear_params() / 1e9:.2f} B | "
              f"~{m.rest_params() / 1e9:.1f} B | {m.kv_bytes_per_token() / 1024:.0f} KiB |")  # fmt: skip
    print()
    print("| model | bf16, 1 GPU | 4-bit, 1 GPU | 4-bit, TP 2 (rank 0) | bf16, TP 2 (rank 0) | bf16, TP 4 (rank 0) "
          "| bf16, TP 8 (rank 0) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for m in MODELS:
        cells = [weights_gib(m), weights_gib(m, int4=True), weights_gib(m, int4=True, tp=2)]
        cells += [weights_gib(m, tp=n) for n in (2, 4, 8)]
        tp_ok = [True, True] + [m.kv_heads % n == 0 and m.heads % n == 0 for n in (2, 2, 4, 8)]
        text = [f"{c:.1f} GiB" if ok else "n/a (kv heads)" for c, ok in zip(cells, tp_ok)]
        print(f"| {m.name} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    main()
