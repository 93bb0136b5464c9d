"""Talker recipes (talker, dpo, speaker) on tiny checkpoints of both families: the loss falls and, after
training, the Talker speaks the trained codes for the trained prompt and answer (greedy, the Thinker
teacher-forced on the answer as in TTS); the DPO margin rises; a new voice is usable by name; the exported
checkpoints load in the reference (transformers 5.23) with equal Talker logits / codes."""

from __future__ import annotations

import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import tiny3  # noqa: F401
from tests.train_helpers import changed, run, tensors, write_jsonl
from thinktalk.generation import api
from thinktalk.generation.inputs import ModelInputs
from thinktalk.generation.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

PROMPT, ANSWER = "Say hello.", "Hello there!"
CODES25 = [17, 301, 5, 88, 1200, 64, 64, 9]  # Qwen2.5 Talker codec ids


def codes3(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (n, 16), generator=g).tolist()


def row(codes=None, **extra) -> dict:
    r = {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]}
    if codes is not None:
        r["codes"] = codes
    r.update(extra)
    return r


def spoken_codes(directory, speaker=None, max_codes=20) -> torch.Tensor:
    """Greedy codes the checkpoint speaks for PROMPT / ANSWER (the Thinker reads ANSWER, then its end token)."""
    model = thinktalk.load(str(directory))
    proc = thinktalk.Processor.from_pretrained(str(directory))
    inputs = ModelInputs.from_dict(proc([{"role": "user", "content": PROMPT}]))
    events = api.speak(model, inputs, proc.tokenizer.encode(ANSWER), speaker=speaker, max_new_codes=max_codes,
                       sampling=SamplingParams())  # fmt: skip
    done = [ev for ev in events if ev.kind == "done"][0]
    return done.codes[0]


def test_talker_qwen25_speaks_the_trained_codes(tiny25, tmp_path):
    data = write_jsonl(str(tmp_path / "speech.jsonl"), [row(CODES25)])
    out = tmp_path / "talker"
    before = spoken_codes(tiny25)
    res = run(tiny25, data, out, recipe="talker", max_steps=30, lr=2e-2, batch_size=1)
    print("talker qwen2.5 losses", [round(x, 3) for x in res.losses])
    assert res.losses[-1] < 0.1 * res.losses[0]
    diff = changed(tensors(tiny25), tensors(out))
    assert diff and all(n.startswith("talker.") for n in diff)  # the Thinker and Token2Wav are the base's
    after = spoken_codes(out)
    print("before", before.flatten().tolist(), "after", after.flatten().tolist())
    assert after.flatten().tolist() == CODES25
    assert before.flatten().tolist() != CODES25


def test_talker_qwen3_speaks_the_trained_frames(tiny3, tmp_path):  # noqa: F811
    frames = codes3(5, seed=1)
    data = write_jsonl(str(tmp_path / "speech.jsonl"), [row(frames)])
    out = tmp_path / "talker"
    res = run(tiny3, data, out, recipe="talker", max_steps=30, lr=2e-2, batch_size=1)
    rs = res.records
    print("talker qwen3 losses", [round(x, 3) for x in res.losses])
    assert res.losses[-1] < 0.1 * res.losses[0]
    assert rs[-1]["codec_loss"] < 0.1 * rs[0]["codec_loss"] and rs[-1]["predictor_loss"] < 0.1 * rs[0]["predictor_loss"]
    diff = changed(tensors(tiny3), tensors(out))
    assert any(n.startswith("talker.code_predictor.") for n in diff)  # both trained
    assert any(n.startswith("talker.model.layers.") for n in diff)
    assert all(n.startswith("talker.") for n in diff)
    after = spoken_codes(out)
    assert after.tolist() == frames


def test_dpo_margin_rises_qwen25(tiny25, tmp_path):
    rejected = [c + 400 for c in CODES25]
    data = write_jsonl(str(tmp_path / "prefs.jsonl"), [row(chosen=CODES25, rejected=rejected)])
    out = tmp_path / "dpo"
    res = run(tiny25, data, out, recipe="dpo", max_steps=8, lr=5e-3, batch_size=1, beta=0.1)
    rs = res.records
    print("dpo qwen2.5 margin", [round(r["margin"], 3) for r in rs], "loss", [round(x, 3) for x in res.losses])
    assert all({"margin", "reward_chosen", "reward_rejected", "accuracy"} <= set(r) for r in rs)
    assert abs(rs[0]["margin"]) < 1e-4 and abs(rs[0]["loss"] - 0.6931) < 1e-3  # the policy starts as the reference
    assert rs[-1]["margin"] > rs[0]["margin"] + 1.0 and rs[-1]["accuracy"] == 1.0
    assert rs[-1]["reward_chosen"] > 0 > rs[-1]["reward_rejected"]
    assert all(n.startswith("talker.") for n in changed(tensors(tiny25), tensors(out)))


def test_dpo_margin_rises_qwen3(tiny3, tmp_path):  # noqa: F811
    data = write_jsonl(str(tmp_path / "prefs.jsonl"), [row(chosen=codes3(4, 1), rejected=codes3(4, 2))])
    res = run(tiny3, data, tmp_path / "dpo", recipe="dpo", max_steps=6, lr=5e-3, batch_size=1, beta=0.1)
    rs = res.records
    print("dpo qwen3 margin", [round(r["margin"], 3) for r in rs])
    assert abs(rs[0]["margin"]) < 1e-3
    assert rs[-1]["margin"] > rs[0]["margin"] + 1.0
