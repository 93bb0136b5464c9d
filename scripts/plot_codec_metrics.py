#!/usr/bin/env python
"""Draw a codec run's metrics.jsonl as a PNG (training loss terms, and the held-out eval loss when logged).

    python scripts/plot_codec_metrics.py runs/codec-tiny docs/img/codec_loss.png        (needs matplotlib)
"""

from __future__ import annotations

import json
import os
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit(__doc__)
    run, png = argv
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train]
    for key, label in (("loss", "total"), ("mel", "multi-scale mel L1"), ("stft", "multi-resolution STFT")):
        axes[0].plot(steps, [r[key] for r in train], label=label, linewidth=0.8, alpha=0.8)
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="black", label="eval total")
        axes[1].plot([r["step"] for r in evals], [r["eval_mel"] for r in evals], "o-", label="eval mel L1")
        if any("eval_code_gain" in r for r in evals):
            axes[1].plot([r["step"] for r in evals], [r.get("eval_code_gain", 0.0) for r in evals], "s-",
                         label="eval code gain")
    top = max(r["loss"] for r in train[len(train) // 20 :]) if len(train) > 20 else None
    if top:
        axes[0].set_ylim(0, 1.3 * top)  # the first steps (and the step-0 eval) are off the scale
    twin = axes[1].twinx()
    twin.plot(steps, [r["perplexity"] for r in train], color="tab:gray", linewidth=0.6, alpha=0.6)
    twin.set_ylabel("codebook perplexity (train batch, gray)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[0].set_title("codec training loss")
    axes[1].set_xlabel("step")
    axes[1].legend(loc="center right")
    axes[1].set_title("held-out mel distance and how much the codes matter")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png} ({len(train)} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
