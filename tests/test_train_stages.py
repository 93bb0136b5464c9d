"""The pretraining stages train exactly the parameters they should (final checkpoint compared with the base)."""

from __future__ import annotations

import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import tiny3  # noqa: F401
from tests.train_helpers import changed, chat_rows, media_rows, run, tensors, write_jsonl
from thinktalk.train import forward
from thinktalk.train.data import build_dataset, collate, encode_chat

# In the checkpoint but unused by the model (the reference's Qwen2.5 audio tower has it too).
UNUSED = {"thinker.audio_tower.audio_bos_eos_token.weight"}


@pytest.fixture(scope="module")
def mm25(tmp_path_factory):
    d = tmp_path_factory.mktemp("mm25")
    return write_jsonl(str(d / "mm.jsonl"), media_rows(str(d), 2))


def test_stage1_trains_encoders_and_adapters_only(tiny25, mm25, tmp_path):
    out = tmp_path / "stage1"
    res = run(tiny25, mm25, out, recipe="stage1", max_steps=1, lr=1e-3, batch_size=2)
    assert len(res.losses) == 1
    before, after = tensors(tiny25), tensors(out)
    diff = changed(before, after)
    encoders = {n for n in before if n.startswith(("thinker.audio_tower.", "thinker.visual."))}
    assert diff == encoders - UNUSED
    assert "thinker.audio_tower.proj.weight" in diff and "thinker.visual.merger.mlp.0.weight" in diff


def test_stage1_adapters_only_qwen3(tiny3, tmp_path):  # noqa: F811
    data = write_jsonl(str(tmp_path / "mm.jsonl"), media_rows(str(tmp_path), 2))
    out = tmp_path / "stage1"
    run(tiny3, data, out, recipe="stage1", adapters_only=True, max_steps=1, lr=1e-3, batch_size=2)
    before = tensors(tiny3)
    adapters = {n for n in before if n.startswith(("thinker.audio_tower.proj1.", "thinker.audio_tower.proj2.",
                                                   "thinker.visual.merger.", "thinker.visual.merger_list."))}
    assert any("merger_list" in n for n in adapters) and "thinker.audio_tower.proj2.weight" in adapters
    assert changed(before, tensors(out)) == adapters


def test_stage2_trains_the_whole_thinker_on_a_mixture(tiny25, mm25, tmp_path):
    text = write_jsonl(str(tmp_path / "text.jsonl"), chat_rows(4))
    out = tmp_path / "stage2"
    res = run(tiny25, [{"path": mm25, "weight": 1}, {"path": text, "weight": 1}], out, recipe="stage2",
              max_steps=1, lr=1e-3, length_bucketing=True)
    assert len(res.records) == 1
    before, after = tensors(tiny25), tensors(out)
    thinker = {n for n in before if n.startswith("thinker.")}
    assert changed(before, after) == thinker - UNUSED  # and nothing outside the Thinker


def test_stage3_packs_with_checkpointing_and_chunked_loss(tiny25, mm25, tmp_path):
    text = write_jsonl(str(tmp_path / "text.jsonl"), chat_rows(8))
    out = tmp_path / "stage3"
    res = run(tiny25, [mm25, text], out, recipe="stage3", max_steps=1, lr=1e-3, batch_size=1, max_length=256,
              loss_chunk_size=16)
    cfg_used = res.records[0]
    assert cfg_used["tokens"] > 0
    before, after = tensors(tiny25), tensors(out)
    assert changed(before, after) <= {n for n in before if n.startswith("thinker.")}
    assert "thinker.model.layers.0.mlp.down_proj.weight" in changed(before, after)


@pytest.mark.parametrize("family", ["qwen2_5_omni", "qwen3_omni_moe"])
def test_packing_gives_the_same_per_sample_loss(family, tiny25, tiny3, tmp_path):  # noqa: F811
    """Packed rows (block-diagonal attention, positions restarting per row) = the rows one by one."""
    directory = str(tiny25 if family == "qwen2_5_omni" else tiny3)
    model = thinktalk.load(directory, components=("thinker",))
    proc = thinktalk.Processor.from_pretrained(directory)
    path = write_jsonl(str(tmp_path / "mm.jsonl"), media_rows(str(tmp_path), 2) + chat_rows(3))
    positions = forward.positions_fn(model.thinker, family)
    ds = build_dataset([path], lambda r: encode_chat(proc, r, positions, 4096), skip_bad_rows=False)
    pad = proc.tokenizer.pad_token_id

    def per_row_losses(batch):
        with torch.no_grad():
            hidden = forward.hidden_states(model.thinker, batch)
            h, y, rows = forward.targets(hidden, batch.labels)
            lp = forward.token_logprobs(model.thinker.lm_head, h, y)
        return lp, rows

    one_by_one = [per_row_losses(collate([[e]], pad))[0].mean() for e in ds.examples]
    packed = collate([ds.examples[:3], ds.examples[3:]], pad, packed=True)  # image, audio, text | text, text
    lp, rows = per_row_losses(packed)
    got, start = [], 0
    for e in ds.examples:
        n = e.num_targets
        got.append(lp[start : start + n].mean())
        start += n
    torch.testing.assert_close(torch.stack(got), torch.stack(one_by_one), rtol=1e-5, atol=1e-5)
    # and the mask matters: the same row without segment ids (one long sequence) differs
    flat = collate([ds.examples[:3]], pad, packed=True)
    flat.inputs["attention_mask"] = (flat.inputs["attention_mask"] > 0).long()
    lp_flat, _ = per_row_losses(flat)
    n0 = ds.examples[0].num_targets
    assert not torch.allclose(lp_flat[n0:], lp[n0 : lp_flat.shape[0]], atol=1e-4)


def test_checkpointing_and_chunked_loss_keep_loss_and_gradients(tiny25, tmp_path):
    """The memory savers of stage3 against the plain path: same loss, same gradients."""
    from thinktalk.train.distributed import apply_activation_checkpointing

    model = thinktalk.load(str(tiny25), components=("thinker",))
    proc = thinktalk.Processor.from_pretrained(str(tiny25))
    path = write_jsonl(str(tmp_path / "mm.jsonl"), media_rows(str(tmp_path), 2) + chat_rows(2))
    positions = forward.positions_fn(model.thinker, model.family)
    ds = build_dataset([path], lambda r: encode_chat(proc, r, positions, 4096), skip_bad_rows=False)
    batch = collate([ds.examples], proc.tokenizer.pad_token_id, packed=True)

    def loss_and_grads(chunk: int):
        model.zero_grad(set_to_none=True)
        hidden = forward.hidden_states(model.thinker, batch)
        h, y, _ = forward.targets(hidden, batch.labels)
        loss = forward.cross_entropy_sum(model.thinker.lm_head, h, y, chunk)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads(0)
    assert apply_activation_checkpointing(model) == 2
    saved_loss, saved = loss_and_grads(7)
    torch.testing.assert_close(saved_loss, plain_loss, rtol=1e-5, atol=1e-4)
    assert set(saved) == set(plain) and any(n.startswith("thinker.visual.") for n in plain)
    for n in plain:  # chunking re-associates sums: equal up to float rounding, relative to each gradient's size
        assert (saved[n] - plain[n]).norm() <= 1e-4 * plain[n].norm() + 1e-7, n
