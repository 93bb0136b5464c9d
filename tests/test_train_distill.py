"""Strong-to-weak distillation: off-policy from stored or live teacher top-k (same losses), on-policy reverse KL."""

from __future__ import annotations

import os

import pytest

from tests.train_helpers import chat_rows, run, write_jsonl
from thinktalk.testing.tiny import build_tiny_checkpoint


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Another tiny Qwen2.5-Omni (same tokenizer, other weights) as the teacher."""
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("teacher")), "qwen2_5_omni", seed=7, with_speech=False)


def test_off_policy_stored_and_live_teacher_agree_and_kl_falls(tiny25, teacher, tmp_path):
    data = write_jsonl(str(tmp_path / "chat.jsonl"), chat_rows(4))
    stored = str(tmp_path / "teacher_top8.safetensors")
    common = dict(recipe="distill", max_steps=3, top_k=8, save_final=False)
    created = run(tiny25, data, tmp_path / "a", teacher=teacher, teacher_logits=stored, **common)
    assert os.path.exists(stored)
    two = {**common, "max_steps": 2}
    from_file = run(tiny25, data, tmp_path / "b", teacher_logits=stored, **two)  # no teacher needed
    live = run(tiny25, data, tmp_path / "c", teacher=teacher, **two)
    print("distill kl", [round(r["kl"], 4) for r in created.records])
    assert from_file.losses == created.losses[:2]
    assert live.losses == pytest.approx(created.losses[:2], rel=1e-6)
    assert created.records[-1]["kl"] < created.records[0]["kl"] - 1.0
    # a stored file is checked against the data it is used with
    with pytest.raises(ValueError, match="stores top-8 teacher tokens, the config asks for top_k=4"):
        run(tiny25, data, tmp_path / "d", **{**common, "top_k": 4}, teacher_logits=stored)


def test_on_policy_reverse_kl_falls(tiny25, teacher, tmp_path):
    prompts = write_jsonl(str(tmp_path / "prompts.jsonl"), [{"messages": [{"role": "user", "content": q}]}
                                                           for q in ("Say hello.", "Name a colour.")])
    res = run(tiny25, prompts, tmp_path / "on", recipe="distill", teacher=teacher, on_policy=True, max_new_tokens=4,
              max_steps=4, batch_size=2, save_final=False)
    kl = [r["kl"] for r in res.records]
    print("on-policy reverse kl", [round(x, 4) for x in kl])
    assert all(r["completion_tokens"] > 0 for r in res.records)
    assert kl[-1] < kl[0] * 0.7
