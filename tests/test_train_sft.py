"""Thinker SFT from the example config on the command line: the loss falls, the logs and the plot exist,
the model still speaks (Talker bit for bit), and a resumed run continues the identical loss sequence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import tiny3  # noqa: F401
from tests.train_helpers import changed, chat_rows, run, tensors, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "thinktalk", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sft_out(tiny25, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    proc = cli("train", "recipes/sft.yaml", f"model={tiny25}", f"output_dir={out}", "max_steps=6", "lr=1e-2",
               "warmup_steps=0", "grad_accum=1", "save_every=4", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: step 6" in proc.stderr
    return out


def records(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_sft_loss_falls_and_logs(sft_out):
    rs = records(sft_out)
    assert [r["step"] for r in rs] == list(range(1, 7))
    assert all({"step", "loss", "lr", "grad_norm", "tokens"} <= set(r) for r in rs)
    print("sft losses", [round(r["loss"], 3) for r in rs])
    assert rs[-1]["loss"] < rs[0]["loss"] - 1.5
    assert rs[1]["lr"] < rs[0]["lr"]  # cosine decay
    assert os.path.isdir(os.path.join(sft_out, "checkpoint-4")) and os.path.isdir(os.path.join(sft_out, "checkpoint-6"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(sft_out, "tensorboard")))


def test_plot_draws_the_curves(sft_out, tmp_path):
    from PIL import Image

    from thinktalk.cli import main

    png = tmp_path / "curves.png"
    assert main(["plot", str(sft_out), "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_speech_still_works_after_thinker_sft(tiny25, sft_out):
    base, after = tensors(tiny25), tensors(sft_out)
    diff = changed(base, after)
    llm = {n for n in base if n.startswith(("thinker.model.", "thinker.lm_head."))}
    assert diff == llm  # the LLM trained; encoders, Talker and Token2Wav are bit for bit the base's
    for name in ("spk_dict.pt", "tokenizer.json", "preprocessor_config.json", "config.json"):
        assert os.path.exists(os.path.join(sft_out, name))
    model = thinktalk.load(str(sft_out))
    proc = thinktalk.Processor.from_pretrained(str(sft_out))
    with torch.no_grad():
        model.token2wav.code2wav_bigvgan_model.conv_post.weight.mul_(0.008)  # keep the random vocoder out of clipping
    inputs = proc([{"role": "user", "content": "Say something."}])
    res = model.generate(**inputs, speaker="Ethan", max_new_tokens=4, talker_max_new_tokens=12, talker_do_sample=False,
                         token2wav_num_steps=2, return_audio=True)
    audio = res.audio[0]
    assert res.codes[0].numel() > 0 and audio.numel() >= 480 and torch.isfinite(audio).all() and audio.abs().max() > 0


def test_resume_continues_the_identical_loss_sequence(tiny25, tmp_path):
    data = write_jsonl(str(tmp_path / "chat.jsonl"), chat_rows(8))
    common = dict(max_steps=4, batch_size=2, grad_accum=2, save_every=2, save_final=False, length_bucketing=True,
                  trainable=["llm_layers"])
    first = run(tiny25, data, tmp_path / "a", **common)
    resumed_dir = tmp_path / "b"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", resumed_dir / "checkpoint-2")
    second = run(tiny25, data, resumed_dir, **common)
    assert second.start_step == 2
    assert second.losses == first.losses[2:]  # bit for bit
    assert [r["lr"] for r in second.records] == [r["lr"] for r in first.records[2:]]


def test_sft_qwen3(tiny3, tmp_path):  # noqa: F811
    data = write_jsonl(str(tmp_path / "chat.jsonl"), chat_rows(4))
    res = run(tiny3, data, tmp_path / "out", max_steps=5, trainable=["llm_layers", "lm_head"])
    print("qwen3 sft losses", [round(x, 3) for x in res.losses])
    assert res.losses[-1] < res.losses[0] - 1.0
    diff = changed(tensors(tiny3), tensors(tmp_path / "out"))
    assert any(".mlp.experts." in n for n in diff) and "thinker.model.layers.0.mlp.gate.weight" in diff
    assert not any(n.startswith(("thinker.model.embed_tokens", "talker.", "code2wav.", "thinker.visual")) for n in diff)
