"""Text generation: sampling processors vs the reference's, streaming vs offline, sessions."""

from __future__ import annotations

import pytest
import torch

import thinktalk
from tests.qwen25_inputs import cases
from thinktalk.generation.sampling import SamplingParams, TokenChooser, process_logits

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


def _choosers(seeded: bool):
    """Five requests' choosers: two greedy with a repetition penalty, two sampling (top-k/top-p), one forced; one
    request of two rows; one still under its min_new_tokens."""
    sample = SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    greedy = SamplingParams(repetition_penalty=1.3)
    history = torch.tensor([[5, 9, 9]])
    gen = (lambda s: torch.Generator().manual_seed(s)) if seeded else (lambda s: None)
    return [
        TokenChooser(greedy, (7,), 0, 6, history=history, vocab_size=50),
        TokenChooser(sample, (7,), 0, 6, generator=gen(1)),
        TokenChooser(greedy, (7,), 0, 6, min_new_tokens=3, history=torch.tensor([[1], [2]]), vocab_size=50),
        TokenChooser(sample, (7,), 0, 6, generator=gen(2)),
        TokenChooser(sample, (7,), 0, 6, forced=[4, 4, 7, 0, 0, 0]),
    ]


@pytest.mark.parametrize("seeded", [True, False])
def test_choosers_batched_across_requests_choose_as_each_alone(seeded):
    """TokenChooser.choose_many (the engine's one logits pass for every request of a step) gives every request
    the tokens, ends and histories its chooser gives alone: greedy + penalty, sampling with its own generator, a
    forced one, min_new_tokens. Unseeded sampling rows draw from torch's generator at once (other numbers than
    one by one): those are checked to be valid draws only."""
    gen = torch.Generator().manual_seed(0)
    steps = [[torch.randn(b, 50, generator=gen) * 3 for b in (1, 1, 2, 1, 1)] for _ in range(6)]
    alone, together = _choosers(seeded), _choosers(seeded)
    want = [[c.choose(lg) for c, lg in zip(alone, logits)] for logits in steps]
    got = [TokenChooser.choose_many(together, logits) for logits in steps]
    exact = [k for k, c in enumerate(alone) if seeded or not c.params.do_sample or c.forced is not None]
    assert exact == ([0, 1, 2, 3, 4] if seeded else [0, 2, 4])
    for w, g in zip(want, got):
        for k, (a, b) in enumerate(zip(w, g)):
            assert b.shape == a.shape and 0 <= int(b.min()) and int(b.max()) < 50
            if k in exact:
                assert torch.equal(a, b), (k, a, b)
    for k in exact:
        assert torch.equal(alone[k].sequences(), together[k].sequences())
        assert torch.equal(alone[k].finished, together[k].finished)
        if alone[k].history is not None:
            assert torch.equal(alone[k].history, together[k].history)
    assert bool(together[4].finished.all()) and together[2].steps == 6  # the forced one ended at its 7
    assert int(together[2].sequences()[:, :3].eq(7).sum()) == 0  # no end token under min_new_tokens
    if seeded:  # the sampling ones drew from their own generators: swapping the generators changes their tokens
        swapped = _choosers(True)
        swapped[1].generator, swapped[3].generator = swapped[3].generator, swapped[1].generator
        other = [TokenChooser.choose_many(swapped, logits) for logits in steps]
        assert any(not torch.equal(o[1], g[1]) for o, g in zip(other, got))


def test_a_failing_chooser_fails_alone():
    """One request's bad logits (NaN under sampling) give that request its error; the others their tokens."""
    sample = SamplingParams(do_sample=True, top_k=10)
    choosers = [TokenChooser(sample, (7,), 0, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    alone = [TokenChooser(sample, (7,), 0, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    logits = [torch.randn(1, 30, generator=torch.Generator().manual_seed(5 + i)) for i in range(3)]
    bad = logits[1].clone().fill_(float("nan"))
    out = TokenChooser.choose_many(choosers, [logits[0], bad, logits[2]])
    assert isinstance(out[1], Exception)
    assert torch.equal(out[0], alone[0].choose(logits[0])) and torch.equal(out[2], alone[2].choose(logits[2]))


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
