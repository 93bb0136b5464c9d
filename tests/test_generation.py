"""Text generation: sampling processors vs the reference's, streaming vs offline, sessions."""

from __future__ import annotations

import pytest
import torch

import thinktalk
from tests.qwen25_inputs import cases
from thinktalk.generation.sampling import SamplingParams, process_logits

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1),
        SamplingParams(do_sample=True, temperature=1.3, top_k=0, top_p=0.5, repetition_penalty=1.0),
        SamplingParams(do_sample=True, temperature=1.0, top_k=5, top_p=1.0, repetition_penalty=0.9),
        SamplingParams(do_sample=False, repetition_penalty=1.05, suppress_tokens=(3, 7)),
    ],
)
def test_logits_processing_matches_reference(params):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 200, generator=gen) * 3
    history = torch.randint(0, 200, (3, 12), generator=gen)
    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.suppress_tokens:
        procs.append(SuppressTokensLogitsProcessor(list(params.suppress_tokens)))
    if params.do_sample:
        if params.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            procs.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            procs.append(TopPLogitsWarper(params.top_p))
    ref = procs(history, logits.clone())
    ours = process_logits(logits.clone(), history, params)
    assert torch.equal(torch.isinf(ref), torch.isinf(ours))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite])


@pytest.fixture(scope="module")
def model(tiny25):
    return thinktalk.load(str(tiny25), components=("thinker",))


def test_stream_text_equals_generate_and_accounts_for_every_token(model):
    inputs, _ = cases()["image"]
    res = model.generate(**inputs, max_new_tokens=20, eos_token_id=())
    events = list(model.stream(**inputs, max_new_tokens=20, eos_token_id=()))
    assert events[-1].kind == "done"
    text_events = [e for e in events if e.kind == "text"]
    ids = [t for e in text_events for t in e.token_ids]
    assert ids == res.text_ids[0].tolist()
    assert "".join(e.text for e in text_events) == res.text[0]
    assert events[-1].finish_reasons == ["length"] and events[-1].num_tokens == [20]


def test_end_token_stops_and_is_reported(model):
    inputs, _ = cases()["text"]
    first = model.generate(**inputs, max_new_tokens=3, eos_token_id=()).text_ids[0].tolist()
    # Declare the third greedy token an end token: generation must stop right there.
    res = model.generate(**inputs, max_new_tokens=10, eos_token_id=first[2])
    assert res.text_ids[0].tolist() == first[:3]
    done = list(model.stream(**inputs, max_new_tokens=10, eos_token_id=first[2]))[-1]
    assert done.finish_reasons == ["stop"] and done.num_tokens == [2]


def test_batch_rows_finish_independently(model):
    inputs, _ = cases()["batch_left_padding"]
    free = model.generate(**inputs, max_new_tokens=6, eos_token_id=()).text_ids
    stop = int(free[0, 1])
    res = model.generate(**inputs, max_new_tokens=6, eos_token_id=stop, pad_token_id=0)
    row0 = res.text_ids[0].tolist()
    assert row0[:2] == free[0, :2].tolist() and all(t == 0 for t in row0[2:])
    if stop not in free[1].tolist():
        assert torch.equal(res.text_ids[1], free[1])


def test_sampling_with_seed_is_reproducible(model):
    inputs, _ = cases()["text"]
    kw = dict(max_new_tokens=12, eos_token_id=(), do_sample=True, temperature=1.5, top_k=100, seed=123)
    a = model.generate(**inputs, **kw).text_ids
    b = model.generate(**inputs, **kw).text_ids
    c = model.generate(**inputs, **{**kw, "seed": 124}).text_ids
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cancel_stops_at_the_next_step(model):
    class CancelAfter:  # set once the driver has asked n times (it asks before every step)
        def __init__(self, n: int):
            self.n, self.calls = n, 0

        def is_set(self) -> bool:
            self.calls += 1
            return self.calls > self.n

    inputs, _ = cases()["text"]
    events = list(model.stream(**inputs, max_new_tokens=50, eos_token_id=(), cancel=CancelAfter(3)))
    done = events[-1]
    ids = [t for e in events if e.kind == "text" for t in e.token_ids]
    assert done.kind == "done" and done.finish_reasons == ["cancelled"]
    # Every engine step asks once; the first step reads the prompt and the first answer token.
    assert done.num_tokens == [4] and done.text_ids[0].tolist() == ids and len(ids) == 4

def test_bad_arguments_are_clear(model):
    inputs, _ = cases()["text"]
    with pytest.raises(TypeError, match="unexpected generate\\(\\) arguments: nonsense"):
        model.generate(**inputs, nonsense=1)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate(**inputs, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        model.generate(**inputs, max_new_tokens=0)
