"""Training data: assistant-only labels, bad rows named by file and line, batch plans, packing, chunked losses."""

from __future__ import annotations

import collections
import json

import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import tiny3  # noqa: F401
from tests.train_helpers import chat_rows, media_rows, write_jsonl
from thinktalk.train import forward
from thinktalk.train.data import (
    IGNORE,
    BatchPlan,
    DataError,
    Row,
    build_dataset,
    collate,
    encode_chat,
    micro_batches,
    pack_first_fit,
)


@pytest.fixture(scope="module")
def proc25(tiny25):
    return thinktalk.Processor.from_pretrained(str(tiny25))


@pytest.fixture(scope="module")
def model25(tiny25):
    return thinktalk.load(str(tiny25), components=("thinker",))


def _encoder(proc, model, max_length=4096, loss_on="assistant"):
    positions = forward.positions_fn(model.thinker, model.family)
    return lambda row: encode_chat(proc, row, positions, max_length, loss_on)


CONV = [
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": [{"type": "text", "text": "Bye?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Bye now."}]},
]


def test_labels_cover_only_the_assistant_turns(proc25, model25, tmp_path):
    row = Row(str(tmp_path / "d.jsonl"), 1, {"messages": CONV})
    ex = _encoder(proc25, model25)(row)
    learned = ex.labels[ex.labels != IGNORE]
    assert proc25.decode(learned, skip_special_tokens=False) == "Hello.<|im_end|>Bye now.<|im_end|>"
    assert ex.num_targets == learned.numel()
    every = _encoder(proc25, model25, loss_on="all")(row)
    assert torch.equal(every.labels, every.input_ids)


def test_assistant_mask_qwen3(tiny3):  # noqa: F811
    proc = thinktalk.Processor.from_pretrained(tiny3)
    ids = proc(CONV, add_generation_prompt=False)["input_ids"][0]
    text = proc.decode(ids[proc.assistant_mask(ids)], skip_special_tokens=False)
    # The template writes the (empty) reasoning block into the last assistant turn: it is the model's to write.
    assert text.startswith("Hello.<|im_end|>") and text.endswith("Bye now.<|im_end|>")
    assert "user" not in text and "Bye?" not in text


def test_media_paths_resolve_relative_to_the_jsonl(proc25, model25, tmp_path):
    path = write_jsonl(str(tmp_path / "sub" / "mm.jsonl"), media_rows(str(tmp_path / "sub"), 2))
    ds = build_dataset([path], _encoder(proc25, model25), skip_bad_rows=False)
    image, audio = ds.examples
    assert image.media["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert audio.media["input_features"].shape[0] == 1
    # media placeholders are never labels
    assert not torch.isin(image.labels, torch.tensor([proc25.image_token_id])).any()


def test_bad_rows_name_file_and_line(proc25, model25, tmp_path):
    rows = chat_rows(2) + [
        "{not json",
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "missing.png"}]},
                      {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "robot", "content": "?"}]},
        {"messages": [{"role": "user", "content": "long " * 300}, {"role": "assistant", "content": "ok"}]},
    ]
    path = write_jsonl(str(tmp_path / "bad.jsonl"), rows)
    enc = _encoder(proc25, model25, max_length=200)
    with pytest.raises(DataError) as err:
        build_dataset([path], enc, skip_bad_rows=False)
    msg = str(err.value)
    assert "5 bad row(s)" in msg
    assert f"{path}:3: not valid JSON" in msg
    assert f"{path}:4:" in msg and "image file 'missing.png' not found" in msg
    assert f"{path}:5: no assistant turn" in msg
    assert f"{path}:6:" in msg and "'robot'" in msg
    assert f"{path}:7:" in msg and "longer than max_length=200" in msg
    ds = build_dataset([path], enc, skip_bad_rows=True)
    assert len(ds.examples) == 2 and ds.bad_rows == 5


def test_batch_plan_is_deterministic_and_weighted():
    sources = [list(range(0, 40)), list(range(40, 50))]
    lengths = [10 + (i * 7) % 50 for i in range(50)]
    plan = BatchPlan(sources, [3.0, 1.0], lengths, items=8, seed=3, bucketing=True, bucket_batches=4)
    a = [b for _, b in zip(range(30), plan)]
    b = [b for _, b in zip(range(30), plan)]
    assert a == b
    drawn = collections.Counter(0 if i < 40 else 1 for batch in a for item in batch for i in item)
    share = drawn[0] / (drawn[0] + drawn[1])
    assert 0.68 < share < 0.82  # weights 3:1
    # length bucketing: a batch spans far less of the length range than random batches do
    spread = sum(max(lengths[i[0]] for i in batch) - min(lengths[i[0]] for i in batch) for batch in a) / len(a)
    plain = BatchPlan(sources, [3.0, 1.0], lengths, items=8, seed=3, bucketing=False)
    spread_plain = sum(max(lengths[i[0]] for i in batch) - min(lengths[i[0]] for i in batch)
                       for _, batch in zip(range(30), plain)) / 30
    assert spread < spread_plain / 2


def test_packing_plan_respects_max_length():
    lengths = [5, 3, 4, 2, 6, 7, 1, 8]
    assert pack_first_fit([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    plan = BatchPlan([list(range(8))], [1.0], lengths, items=2, seed=0, packing=True, max_length=10)
    seen = []
    for _, batch in zip(range(8), plan):
        for pack in batch:
            assert sum(lengths[i] for i in pack) <= 10
            seen.extend(pack)
    assert set(seen) == set(range(8))
    batch = list(range(12))
    assert micro_batches(batch, 2, 3, rank=1, world=2) == [[2, 3], [6, 7], [10, 11]]


def test_collate_packed_rows(proc25, model25, tmp_path):
    path = write_jsonl(str(tmp_path / "mm.jsonl"), media_rows(str(tmp_path), 3))
    ds = build_dataset([path], _encoder(proc25, model25), skip_bad_rows=False)
    a, b, c = ds.examples
    batch = collate([[a, b], [c]], pad_id=proc25.tokenizer.pad_token_id, packed=True)
    seg = batch.inputs["attention_mask"]
    assert seg[0, : a.length].eq(1).all() and seg[0, a.length : a.length + b.length].eq(2).all()
    assert seg[1, : c.length].eq(1).all() and seg[1, c.length :].eq(0).all()
    # every packed row's TMRoPE positions start again at 0
    assert batch.position_ids[:, 0, a.length].tolist() == [0, 0, 0]
    assert torch.equal(batch.position_ids[:, 0, a.length : a.length + b.length], b.position_ids)
    assert batch.inputs["image_grid_thw"].shape[0] == 2 and batch.inputs["input_features"].shape[0] == 1


def test_chunked_losses_match_the_plain_path():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    h = torch.randn(37, 16, requires_grad=True)
    y = torch.randint(0, 300, (37,))
    plain = forward.cross_entropy_sum(head, h, y, 0)
    ref = torch.nn.functional.cross_entropy(head(h), y, reduction="sum")
    torch.testing.assert_close(plain, ref)
    (g_plain,) = torch.autograd.grad(plain, h)
    chunked = forward.cross_entropy_sum(head, h, y, 8)
    (g_chunked,) = torch.autograd.grad(chunked, h)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_chunked, g_plain, rtol=1e-5, atol=1e-6)
    # KL terms: zero against themselves, chunked equal to plain
    with torch.no_grad():
        ids, lps = forward.teacher_topk(head, h, 300)
        logits = head(h)
    assert forward.topk_kl_sum(head, h, ids, lps, 0).abs() < 1e-3
    assert forward.reverse_kl_sum(head, h, logits, 8).abs() < 1e-3
    ids, lps = forward.teacher_topk(head, torch.randn(37, 16), 5)
    torch.testing.assert_close(forward.topk_kl_sum(head, h, ids, lps, 8), forward.topk_kl_sum(head, h, ids, lps, 0))


def test_rows_must_be_objects(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps([1, 2]) + "\n\n")
    with pytest.raises(DataError, match=r"x.jsonl:1: a row is a JSON object"):
        build_dataset([str(path)], lambda r: None, skip_bad_rows=False)
