"""Training logs: ``output_dir/metrics.jsonl`` (one JSON object per logged step), TensorBoard when
installed, a progress bar, and ``thinktalk plot`` (the curves as a PNG)."""

from __future__ import annotations

import json
import math
import os
import sys


class MetricsLog:
    """Rank-0 sink for per-step metrics. ``resume_step`` drops lines of steps a resumed run redoes."""

    def __init__(self, output_dir: str, tensorboard: str = "auto", resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.writer = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resume_step > 0 and os.path.exists(self.path):
            kept = [line for line in open(self.path, encoding="utf-8") if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.writelines(kept)
        elif os.path.exists(self.path):
            os.remove(self.path)
        if tensorboard != "false":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                if tensorboard == "true":
                    raise
                self.writer = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(output_dir: str) -> list[dict]:
    path = output_dir if output_dir.endswith(".jsonl") else os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics.jsonl in '{output_dir}' (is it a training output_dir?)")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


PLOT_SKIP = {"step", "epoch", "skipped_rows", "tokens", "seconds"}


def plot(output_dir: str, out: str | None = None, keys: list[str] | None = None, title: str | None = None) -> str:
    """Draw the metrics of a run (one panel per figure: loss, lr, reward ...) into a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    if not records:
        raise ValueError(f"'{output_dir}' has an empty metrics.jsonl")
    if keys is None:
        keys = []
        for r in records:
            for k, v in r.items():
                if k not in PLOT_SKIP and k not in keys and isinstance(v, (int, float)):
                    keys.append(k)
        keys.sort(key=lambda k: (k != "loss", k == "lr", k))
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 60 else None, lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = out or os.path.join(output_dir if os.path.isdir(output_dir) else os.path.dirname(output_dir), "curves.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)
