"""The engine's encoder thread (``EngineConfig.encode_async``): media prompts encode beside the steps.

Held to the plain path (the encoders inside the step): the same prompt logits, tokens and codes for both
families and every media kind; prefix reuse still encodes only the new part and equals a fresh prefill;
and while a media prompt is encoding, a running conversation keeps getting a token every engine step.
"""

from __future__ import annotations

import threading

import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import thinker_cases, tiny3_weights  # noqa: F401
from tests.test_engine import _prefill_logits, _turns, drain, options, results
from thinktalk.generation.engine import Engine, EngineConfig
from thinktalk.generation.inputs import ModelInputs
from thinktalk.testing.speech import synthetic_inputs


@pytest.fixture(scope="module")
def q25(tiny25):
    return thinktalk.load(str(tiny25))


@pytest.fixture(scope="module")
def q3(tiny3_weights):  # noqa: F811
    return thinktalk.load(tiny3_weights)


def _inputs(family: str, kind: str) -> ModelInputs:
    if family == "qwen2_5_omni":
        return ModelInputs.from_dict(synthetic_inputs(kind, seed=60, pad=0))
    raw, use_aiv = thinker_cases()[kind]  # image/video: deepstack
    return ModelInputs.from_dict(raw, use_aiv)


def _run(model, work, encode_async: bool):
    """Requests of ``work`` in one engine; their results and the logits of every prompt read (in order).
    Whole prompts per step: pieces cut elsewhere give the same tokens but not bit-equal logits."""
    length = max(i.length + o.text.max_new_tokens for i, o in work)
    engine = Engine(model, EngineConfig(rows=len(work), max_len=length + 1, encode_async=encode_async))
    seen = _prefill_logits(engine)
    with torch.inference_mode():
        reqs = [engine.submit(i, o) for i, o in work]
    drain(engine, reqs)
    engine.close()
    return [results(r) for r in reqs], seen


@pytest.mark.parametrize(
    "family,kind",
    [("qwen2_5_omni", "image"), ("qwen2_5_omni", "audio"), ("qwen2_5_omni", "video"),
     ("qwen3_omni_moe", "image"), ("qwen3_omni_moe", "audio"), ("qwen3_omni_moe", "video")],
)  # fmt: skip
def test_encoder_thread_equals_the_plain_path(family, kind, q25, q3):
    model = q25 if family == "qwen2_5_omni" else q3
    chat = ModelInputs.from_dict(synthetic_inputs("text", seed=61, pad=0))
    speech = 12 if kind == "audio" else 0
    work = [
        (chat, options(model, tokens=9)),
        (_inputs(family, kind), options(model, tokens=5, speech_codes=speech, seed=3)),
    ]
    plain, plain_logits = _run(model, work, encode_async=False)
    fast, fast_logits = _run(model, work, encode_async=True)
    assert len(plain_logits) == len(fast_logits) == 2
    for a, b in zip(plain_logits, fast_logits):  # the chat's prompt, then the media prompt's
        assert torch.equal(a, b)
    for (ids, codes, audio), (ids1, codes1, audio1) in zip(fast, plain):
        assert ids == ids1
        if codes1 is not None:
            assert codes1[0].numel() > 0 and torch.equal(codes[0], codes1[0])
            torch.testing.assert_close(audio, audio1, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_encoder_thread_with_prefix_reuse_encodes_only_the_new_part(q25, kind):
    engine, first, second, answer = _turns(q25, kind, seed=62)
    engine = Engine(q25, EngineConfig(**{**engine.config.__dict__, "encode_async": True}))
    opts = options(q25, tokens=6)
    with torch.inference_mode():  # turn 1 through the encoder thread, parked
        a = engine.submit(ModelInputs.from_dict(first), opts)
        drain(engine, [a])
    assert results(a)[0] == answer and len(engine.parked) == 1
    tower = q25.thinker.visual if kind == "image" else q25.thinker.audio_tower
    calls = []
    hook = tower.register_forward_hook(lambda *_: calls.append(threading.current_thread().name))
    try:
        with torch.inference_mode():
            b = engine.submit(ModelInputs.from_dict(second), opts)
            drain(engine, [b])
    finally:
        hook.remove()
        engine.close()
    assert b.reused == first["input_ids"].shape[1] + len(answer) - 1
    assert calls == []  # the media were in the reused row: not encoded again
    fresh, _ = _run(q25, [(ModelInputs.from_dict(second), opts)], encode_async=False)
    assert results(b)[0] == fresh[0][0]


@pytest.mark.parametrize("encode_async", [True, False])
def test_a_running_conversation_gets_a_token_every_step_while_media_encode(q25, encode_async):
    """The image prompt's encoders are held (a gate the test opens) for several engine steps: with the encoder
    thread the chat reads a token in each of them; on the plain path the step itself waits for the encoder."""
    chat = ModelInputs.from_dict(synthetic_inputs("text", seed=63, pad=0))
    image = ModelInputs.from_dict(synthetic_inputs("image", seed=64, pad=0))
    engine = Engine(q25, EngineConfig(rows=2, max_len=300, prefill_chunk=16, encode_async=encode_async))
    gate, entered = threading.Event(), threading.Event()
    embed = engine._stage.embed

    def gated(inputs, start):
        if inputs.media():  # the image prompt (the chat's text is embedded at once)
            entered.set()
            assert gate.wait(30)
        return embed(inputs, start)

    engine._stage.embed = gated
    with torch.inference_mode():
        talk = engine.submit(chat, options(q25, tokens=40))
        while talk.chooser.steps < 2:
            engine.step()
        look = engine.submit(image, options(q25, tokens=4))
        if encode_async:
            tokens = talk.chooser.steps
            for _ in range(6):
                engine.step()
            assert entered.is_set() and look.thinker.prefilled == 0 and look.encoding is not None
            assert talk.chooser.steps == tokens + 6  # one token per step while the image encodes
            gate.set()
        else:
            timer = threading.Timer(0.5, gate.set)
            timer.start()
            tokens, steps = talk.chooser.steps, engine.steps
            engine.step()  # the encoder runs inside this step: it returns only once the gate opens
            assert gate.is_set() and engine.steps == steps + 1 and talk.chooser.steps == tokens + 1
        drain(engine, [talk, look])
    engine.close()
    alone, _ = _run(q25, [(image, options(q25, tokens=4))], encode_async=False)
    assert results(look)[0] == alone[0][0]


@pytest.mark.parametrize("short_first", [True, False])
def test_a_short_prompt_is_read_before_a_long_one_in_pieces(q25, short_first):
    """With ``short_first`` a chat turn arriving behind a long prompt read in pieces is read in the step it is
    admitted (the long one still gets the rest of the budget); without, it waits for the long prompt."""
    ids = torch.randint(0, 150000, (1, 300), generator=torch.Generator().manual_seed(65))
    long = ModelInputs.from_dict({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    chat = ModelInputs.from_dict(synthetic_inputs("text", seed=66, pad=0))
    assert chat.length <= 60 // 4
    engine = Engine(q25, EngineConfig(rows=2, max_len=320, prefill_chunk=60, short_first=short_first))
    with torch.inference_mode():
        a = engine.submit(long, options(q25, tokens=3))
        engine.step()
        assert a.thinker.prefilled == 60
        b = engine.submit(chat, options(q25, tokens=3))
        engine.step()
        if short_first:
            assert b.thinker.prefill_done and b.chooser.steps > 0 and a.thinker.prefilled == 60 + 60 - chat.length
        else:
            assert (
                not b.thinker.prefill_done
                and b.chooser.steps == 0
                and b.thinker.prefilled == 0
                and a.thinker.prefilled == 120
            )
        drain(engine, [a, b])
    for req, inputs in ((a, long), (b, chat)):
        assert results(req)[0] == _run(q25, [(inputs, options(q25, tokens=3))], encode_async=False)[0][0][0]


@pytest.mark.parametrize("encode_async", [True, False])
def test_an_encoder_error_fails_only_its_request(q25, encode_async):
    raw = synthetic_inputs("image", seed=67, pad=0)
    raw["pixel_values"] = raw["pixel_values"][:-4]  # fewer patches than the grid says
    bad = ModelInputs.from_dict(raw)
    chat = ModelInputs.from_dict(synthetic_inputs("text", seed=68, pad=0))
    engine = Engine(q25, EngineConfig(rows=2, max_len=200, prefill_chunk=16, encode_async=encode_async))
    with torch.inference_mode():
        good = engine.submit(chat, options(q25, tokens=4))
        failed = engine.submit(bad, options(q25, tokens=4))
        drain(engine, [good, failed])
    engine.close()
    assert failed.error is not None and [e.kind for e in failed.events] == ["error"]
    assert good.error is None and len(results(good)[0]) == 4 and engine._free == [True, True]
