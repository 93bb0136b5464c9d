"""thinktalk-tiny's vision warm-up: the vision encoder learns form from labels before the LLM reads it.

    python -m thinktalk.data.vision_warmup runs/tiny/init runs/tiny/warm [--steps 400] [--batch 32] [--lr 2e-3]

Trained end to end through the language model, the tiny ViT learns colour and not form (docs/tiny-model.md: the
shape probe does not rise above the random encoder's, not even with the LLM frozen). Here the vision encoder
and its merger (``thinker.visual``) train directly: fresh single-shape pictures are drawn on the fly by the
generator's own scene code (:mod:`thinktalk.data.scenes`, the shape task's sizes, only the colour x shape pairs
the training split may contain: no held-out pair is ever drawn), the merged vision tokens are mean- and
max-pooled and two linear heads predict the shape and the colour (cross-entropy, summed). The other half of each
batch are count-task pictures (:func:`thinktalk.data.tasks.count_item`, seen shape x count pairs only), whose
mean-pooled tokens a linear head maps to the number of shapes of each kind (squared error): counting is a
quantity the tokens must carry, one readout for every kind, so a held-out count lies between seen ones. The heads are thrown
away; the output checkpoint is the input one with the ``thinker.visual.*`` tensors replaced (every other file
and tensor copied as it is). Printed: the loss and the heads' accuracy on a fixed batch of fresh pictures.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time

import torch
import torch.nn.functional as F

from thinktalk.data.scenes import SHAPES, draw, place
from thinktalk.data.tasks import PICTURE, _seen_pairs, count_item

COLOUR_NAMES = sorted({c for c, _ in _seen_pairs()})


def pictures(rng: random.Random, n: int) -> tuple[list, list[int], list[int]]:
    """``n`` single-shape pictures of seen colour x shape pairs, their shape and colour labels."""
    images, shape, colour = [], [], []
    pairs = _seen_pairs()
    for _ in range(n):
        c, s = rng.choice(pairs)
        images.append(draw(place(rng, [(s, c)], PICTURE, PICTURE, max_size=48), PICTURE, PICTURE))
        shape.append(SHAPES.index(s))
        colour.append(COLOUR_NAMES.index(c))
    return images, shape, colour


def count_pictures(rng: random.Random, n: int) -> tuple[list, list[list[float]]]:
    """``n`` count-task pictures of the training split's kind (seen shape x count pairs), the count of each kind."""
    images, counts = [], []
    for _ in range(n):
        item = count_item(rng, held_out=False)
        images.append(draw(item.shapes, PICTURE, PICTURE))
        counts.append([float(sum(s.kind == k for s in item.shapes)) for k in SHAPES])
    return images, counts


def pooled(thinker, processor, images) -> torch.Tensor:
    """[n, 2 * width] mean- and max-pooled merged vision tokens of each picture."""
    from thinktalk.processing.image import preprocess_image

    done = [preprocess_image(im, processor.image_config, resample=processor.image_resample) for im in images]
    pixel_values = torch.cat([p for p, _ in done])
    grid = torch.tensor([g for _, g in done], dtype=torch.long)
    feats, _ = thinker.image_features(pixel_values, grid)
    counts = (grid.prod(-1) // (thinker.visual.cfg.spatial_merge_size**2)).tolist()
    return torch.stack([torch.cat([f.mean(0), f.max(0).values]) for f in feats.split(counts)])


def warm_up(model_dir: str, out_dir: str, steps: int = 400, batch: int = 32, lr: float = 2e-3, seed: int = 0,
            log_every: int = 50) -> dict:  # fmt: skip
    from safetensors.torch import load_file, save_file

    import thinktalk

    if os.path.abspath(model_dir) == os.path.abspath(out_dir):
        raise ValueError("vision warm-up: out_dir must differ from the model directory")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = thinktalk.load(model_dir, components=("thinker",))
    processor = thinktalk.Processor.from_pretrained(model_dir)
    thinker = model.thinker
    visual = thinker.visual.float().train()
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(visual.parameters())
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        width = pooled(thinker, processor, pictures(random.Random(seed + 1), 1)[0]).shape[1]
    heads = torch.nn.ModuleDict({"shape": torch.nn.Linear(width, len(SHAPES)),
                                 "colour": torch.nn.Linear(width, len(COLOUR_NAMES)),
                                 "count": torch.nn.Linear(width, len(SHAPES))})  # fmt: skip
    norm = torch.nn.LayerNorm(width, elementwise_affine=False)
    opt = torch.optim.AdamW(params + list(heads.parameters()), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    held = pictures(random.Random(seed + 12345), 96)
    held_counts = count_pictures(random.Random(seed + 54321), 96)

    def accuracy() -> dict:
        with torch.no_grad():
            x = norm(pooled(thinker, processor, held[0]))
            acc = {k: float((heads[k](x).argmax(-1) == torch.tensor(y)).float().mean())
                   for k, y in (("shape", held[1]), ("colour", held[2]))}  # fmt: skip
            c = heads["count"](norm(pooled(thinker, processor, held_counts[0])))
            acc["count"] = float((c.round() == torch.tensor(held_counts[1])).all(-1).float().mean())
            return acc

    log = [{"step": 0, **accuracy()}]
    print(json.dumps(log[-1]), flush=True)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        images, shape, colour = pictures(rng, batch // 2)
        count_images, counts = count_pictures(rng, batch - batch // 2)
        x = norm(pooled(thinker, processor, images + count_images))
        single, many = x[: len(images)], x[len(images) :]
        loss = (F.cross_entropy(heads["shape"](single), torch.tensor(shape))
                + F.cross_entropy(heads["colour"](single), torch.tensor(colour))
                + F.mse_loss(heads["count"](many), torch.tensor(counts)))  # fmt: skip
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            log.append(
                {"step": step, "loss": float(loss.detach()), **accuracy(), "seconds": time.perf_counter() - start}
            )
            print(json.dumps(log[-1]), flush=True)
    # The output: the input checkpoint with the vision tensors replaced.
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    path = os.path.join(out_dir, "model.safetensors")
    if not os.path.exists(path):
        raise ValueError(f"vision warm-up writes single-file checkpoints: {path} not found")
    tensors = load_file(path)
    for name, p in visual.named_parameters():
        key = f"thinker.visual.{name}"
        if key not in tensors:
            raise ValueError(f"vision warm-up: {key} is not in {path}")
        tensors[key] = p.detach().to(tensors[key].dtype).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    with open(os.path.join(out_dir, "vision_warmup.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in log)
    return {"log": log, "out": out_dir}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m thinktalk.data.vision_warmup", description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    warm_up(a.model, a.out, a.steps, a.batch, a.lr, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
