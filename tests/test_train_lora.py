"""LoRA: only the adapters train, the loss falls, and the exported (merged) checkpoint loads in the reference
and in thinktalk with equal logits and generates the same tokens."""

from __future__ import annotations

import os

import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import tiny3  # noqa: F401
from tests.train_helpers import changed, chat_rows, run, tensors, write_jsonl
from thinktalk.train import lora

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_merge_matches_peft_forward():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("q_proj", torch.nn.Linear(8, 6))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"]), net)
    with torch.no_grad():
        net.q_proj.lora_B["default"].weight.normal_()  # peft starts B at zero
    x = torch.randn(3, 8)
    merged = lora.merge_state(dict(net.state_dict()), LoraConfig(r=2, lora_alpha=6))
    assert set(merged) == {"q_proj.weight", "q_proj.bias"}
    plain = torch.nn.functional.linear(x, merged["q_proj.weight"], merged["q_proj.bias"])
    torch.testing.assert_close(plain, net(x), rtol=1e-5, atol=1e-6)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _check_export(family_dir, out, exported, ref_cls, proc_conv):
    from thinktalk.cli import main

    assert main(["export", str(out), str(exported)]) == 0
    merged_by_trainer, merged_by_export = tensors(out), tensors(exported)
    assert set(merged_by_trainer) == set(merged_by_export)
    for name, t in merged_by_trainer.items():
        torch.testing.assert_close(merged_by_export[name], t, rtol=0, atol=1e-6)
    proc = thinktalk.Processor.from_pretrained(str(exported))
    inputs = proc(proc_conv)
    ours = thinktalk.load(str(exported), components=("thinker",))
    ref = ref_cls.from_pretrained(str(exported), dtype=torch.float32).eval()
    a, b = _logits(ref, inputs), _logits(ours.thinker, inputs)
    assert (a - b).abs().max() <= 1e-4 * max(1.0, float(a.abs().max()))
    base = thinktalk.load(str(family_dir), components=("thinker",))
    assert (_logits(base.thinker, inputs) - b).abs().max() > 1e-3  # the adapters changed the model
    with torch.no_grad():
        ref_ids = ref.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=151643)
    res = ours.generate(**inputs, max_new_tokens=6, eos_token_id=())
    assert torch.equal(res.text_ids, ref_ids[:, inputs["input_ids"].shape[1] :])
    return ours


def test_lora_qwen25(tiny25, tmp_path):
    data = write_jsonl(str(tmp_path / "chat.jsonl"), chat_rows(4))
    out = tmp_path / "lora"
    res = run(tiny25, data, out, recipe="lora", max_steps=6, lr=2e-2, lora_rank=4, lora_alpha=8)
    print("lora losses", [round(x, 3) for x in res.losses])
    assert res.losses[-1] < res.losses[0] - 1.0
    assert os.path.exists(out / "adapter" / "adapter_config.json")
    base = tensors(tiny25)
    diff = changed(base, tensors(out))
    expected = {n for n in base if n.startswith("thinker.model.layers.") and n.endswith(tuple(f"{t}.weight" for t in TARGETS))}
    assert diff == expected  # adapters merged into exactly their projections; biases, encoders, Talker untouched
    _check_export(tiny25, out, tmp_path / "exported", transformers.Qwen2_5OmniThinkerForConditionalGeneration,
                  [{"role": "user", "content": "What is two plus two?"}])


def test_lora_qwen3(tiny3, tmp_path):  # noqa: F811
    data = write_jsonl(str(tmp_path / "chat.jsonl"), chat_rows(4))
    out = tmp_path / "lora"
    res = run(tiny3, data, out, recipe="lora", max_steps=4, lr=2e-2, lora_rank=4, lora_alpha=8)
    assert res.losses[-1] < res.losses[0]
    diff = changed(tensors(tiny3), tensors(out))
    assert diff and all(".self_attn." in n or ".mlp." in n for n in diff)
    assert not any(".experts." in n or ".gate." in n for n in diff)  # routed experts are stacked tensors: no LoRA
    _check_export(tiny3, out, tmp_path / "exported", transformers.Qwen3OmniMoeThinkerForConditionalGeneration,
                  [{"role": "user", "content": "What is two plus two?"}])
