"""Shared pieces of the training tests: tiny data sets (text, pictures, tones), in-process runs, tensors."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from thinktalk.checkpoint import Checkpoint

QA = [
    ("What is two plus two?", "Four."),
    ("Name a colour.", "Blue."),
    ("What is the sky?", "The sky is blue."),
    ("Say hello.", "Hello there!"),
    ("Count to three.", "One, two, three."),
    ("What do cats say?", "Cats say meow."),
    ("Is water wet?", "Yes, water is wet."),
    ("Say yes.", "Yes."),
]


def write_jsonl(path: str, rows: list) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def chat_rows(n: int = 4) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA[:n]]


def picture(path: str, seed: int, size: int = 56) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def tone(path: str, seconds: float, hz: float) -> str:
    import soundfile as sf

    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16000)
    return path


def media_rows(directory: str, n: int = 4) -> list[dict]:
    """Image-text and audio-text conversations, media referenced relative to the JSONL in ``directory``."""
    os.makedirs(os.path.join(directory, "media"), exist_ok=True)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            picture(os.path.join(directory, "media", f"p{i}.png"), seed=i)
            item = {"type": "image", "image": f"media/p{i}.png"}
            answer = f"A picture of noise number {i}."
        else:
            tone(os.path.join(directory, "media", f"t{i}.wav"), seconds=0.6 + 0.1 * i, hz=220 * (i + 1))
            item = {"type": "audio", "audio": f"media/t{i}.wav"}
            answer = f"A tone of {220 * (i + 1)} hertz."
        rows.append({"messages": [
            {"role": "user", "content": [item, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": answer},
        ]})
    return rows


def run(model: str, data, output_dir: str, recipe: str = "sft", **overrides):
    """Train in this process with test-friendly defaults; returns the TrainResult."""
    from thinktalk.train import load_config, train

    base = {
        "recipe": recipe, "model": str(model), "data": data, "output_dir": str(output_dir), "progress": False,
        "tensorboard": "false", "length_bucketing": False, "max_steps": 3, "lr": 1e-2, "batch_size": 4, "save_every": 0,
    }
    base.update(overrides)
    return train(load_config(None, base=base))


def tensors(directory) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(str(directory))
    return {n: ckpt.tensor(n) for n in ckpt.names()}


def changed(before: dict, after: dict) -> set[str]:
    assert set(before) == set(after), sorted(set(before) ^ set(after))[:5]
    return {n for n in before if not torch.equal(before[n], after[n])}
