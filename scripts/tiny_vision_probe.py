"""Is the shape (and the colour) of a picture in thinktalk-tiny's vision features? A linear probe.

    python scripts/tiny_vision_probe.py runs/tiny/data runs/tiny/init runs/tiny/sft [--rows 600]

For the single-shape pictures of the training split, the merged vision tokens (``thinker.image_features``) are
mean- and max-pooled, standardised, and a logistic regression is fit on 3/4 of them; printed: its accuracy on the
other 1/4 for shape and for colour, and the majority-class rate. A diagnostic, not a test.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

SHAPES = ["square", "circle", "triangle"]
COLOURS = ["red", "green", "blue", "yellow"]


def probe(x: torch.Tensor, y: torch.Tensor, train: int, steps: int = 300) -> float:
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(int(y.max()) + 1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:train] @ w + b, y[:train]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        opt.step()
    return ((x[train:] @ w + b).argmax(1) == y[train:]).float().mean().item()


def main() -> None:
    import thinktalk

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rows", type=int, default=600)
    a = ap.parse_args()
    with open(os.path.join(a.data, "train.jsonl"), encoding="utf-8") as fh:
        rows = [r for r in map(json.loads, fh) if r["task"] == "shape"][: a.rows]
    train = len(rows) * 3 // 4
    for directory in a.models:
        model = thinktalk.load(directory, components=("thinker",))
        proc = thinktalk.Processor.from_pretrained(directory)
        feats, shape, colour = [], [], []
        with torch.no_grad():
            for r in rows:
                image = os.path.join(a.data, r["messages"][0]["content"][0]["image"])
                inputs = proc(
                    [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "?"}]}]
                )
                f, _ = model.thinker.image_features(inputs["pixel_values"], inputs["image_grid_thw"])
                feats.append(torch.cat([f.mean(0), f.max(0).values]))
                shape.append(SHAPES.index(r["key"]))
                colour.append(COLOURS.index(r["combinations"][0][1][0]))
        x = torch.stack(feats)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        for label, y in (("shape", torch.tensor(shape)), ("colour", torch.tensor(colour))):
            majority = torch.bincount(y[train:]).max().item() / len(y[train:])
            print(f"{directory}: {label} probe {probe(x, y, train):.1%} (majority {majority:.1%})")


if __name__ == "__main__":
    main()
