"""The engine: many requests in one batch give what each gives alone; prompts in pieces; fair admission; cancel.

The reference for every batched result is the same request run alone (``model.generate``/``stream``,
itself an engine of one request that the parity tests hold to transformers).
"""

from __future__ import annotations

import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import thinker_cases, tiny3_weights  # noqa: F401
from thinktalk.generation.engine import Engine, EngineConfig
from thinktalk.generation.inputs import ModelInputs
from thinktalk.generation.options import GenerateOptions, SpeechParams, TextParams
from thinktalk.generation.sampling import SamplingParams
from thinktalk.testing.speech import synthetic_inputs


@pytest.fixture(scope="module")
def q25(tiny25):
    return thinktalk.load(str(tiny25))


@pytest.fixture(scope="module")
def q3(tiny3_weights):  # noqa: F811
    return thinktalk.load(tiny3_weights)


def options(model, tokens=8, speech_codes=0, sample=False, seed=None, talker_sample=False) -> GenerateOptions:
    text = TextParams(max_new_tokens=tokens, eos_token_ids=(),
                      sampling=SamplingParams(do_sample=sample, temperature=1.3, top_k=50) if sample else SamplingParams())  # fmt: skip
    speech = None
    if speech_codes:
        talker = model.keywords.talker_sampling
        if not talker_sample:
            talker = SamplingParams(
                repetition_penalty=talker.repetition_penalty, suppress_tokens=talker.suppress_tokens
            )
        speech = SpeechParams(sampling=talker, max_new_tokens=speech_codes, num_steps=3)
    return GenerateOptions(text=text, speech=speech, seed=seed)


def drain(engine: Engine, requests) -> None:
    while not all(r.done for r in requests):
        engine.step()


def results(request) -> tuple[list[int], list[torch.Tensor] | None, torch.Tensor]:
    done = [e for e in request.events if e.kind == "done"][-1]
    audio = [e.audio for e in request.events if e.kind == "audio"]
    return done.text_ids[0].tolist(), done.codes, torch.cat(audio) if audio else torch.zeros(0)


def alone(model, inputs: ModelInputs, opts: GenerateOptions):
    engine = Engine(model, EngineConfig(rows=1, max_len=inputs.length + opts.text.max_new_tokens))
    with torch.inference_mode():
        req = engine.submit(inputs, opts)
    drain(engine, [req])
    return results(req)


def test_batched_requests_equal_each_alone_qwen25(q25):
    kinds = ["text", "audio", "image", "video"]
    work = []
    for i, kind in enumerate(kinds):
        inputs = ModelInputs.from_dict(synthetic_inputs(kind, seed=10 + i, pad=0))
        opts = options(q25, tokens=6 + i, speech_codes=30 if i % 2 else 0, sample=i >= 2, seed=i)
        work.append((inputs, opts))
    engine = Engine(q25, EngineConfig(rows=3, max_len=200, prefill_chunk=None))
    with torch.inference_mode():
        reqs = [engine.submit(inputs, opts) for inputs, opts in work]
    drain(engine, reqs)
    for (inputs, opts), req in zip(work, reqs):
        ids, codes, audio = results(req)
        ids1, codes1, audio1 = alone(q25, inputs, opts)
        assert ids == ids1
        if codes1 is not None:
            assert codes1[0].numel() > 0 and torch.equal(codes[0], codes1[0])
            torch.testing.assert_close(audio, audio1, atol=1e-4, rtol=0)


def test_batched_speech_requests_equal_each_alone_qwen3(q3):
    """Qwen3-Omni speech of several conversations at once (each its own request, batched by the engine)."""
    cases = thinker_cases()
    work = []
    for i, name in enumerate(["audio", "image", "text"]):
        inputs, use_aiv = cases[name]
        inputs = ModelInputs.from_dict(inputs, use_aiv)
        work.append((inputs, options(q3, tokens=7, speech_codes=6 + i, seed=i, talker_sample=i == 1)))
    engine = Engine(q3, EngineConfig(rows=3, max_len=300))
    with torch.inference_mode():
        reqs = [engine.submit(inputs, opts) for inputs, opts in work]
    drain(engine, reqs)
    for (inputs, opts), req in zip(work, reqs):
        ids, codes, audio = results(req)
        ids1, codes1, audio1 = alone(q3, inputs, opts)
        assert ids == ids1 and codes1[0].shape[0] > 0 and torch.equal(codes[0], codes1[0])
        torch.testing.assert_close(audio, audio1, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_5_omni", "qwen3_omni_moe"])
def test_prompts_read_in_pieces_equal_whole(family, q25, q3):
    model = q25 if family == "qwen2_5_omni" else q3
    if family == "qwen2_5_omni":
        inputs = ModelInputs.from_dict(synthetic_inputs("image", seed=3, pad=0))
    else:  # deepstack: the visual tokens' features are split across the pieces too
        raw, use_aiv = thinker_cases()["image"]
        inputs = ModelInputs.from_dict(raw, use_aiv)
    opts = options(model, tokens=6)
    whole, _, _ = alone(model, inputs, opts)
    engine = Engine(model, EngineConfig(rows=1, max_len=inputs.length + 6, prefill_chunk=7))
    with torch.inference_mode():
        req = engine.submit(inputs, opts)
        engine.step()
    assert 0 < req.thinker.prefilled <= 7 < inputs.length  # one piece per step
    drain(engine, [req])
    ids, _, _ = results(req)
    assert ids == whole


def test_long_prompt_does_not_stall_the_others_and_admission_is_fifo(q25):
    short = ModelInputs.from_dict(synthetic_inputs("text", seed=1, pad=0))
    long = ModelInputs.from_dict(synthetic_inputs("video", seed=2, pad=0))
    engine = Engine(q25, EngineConfig(rows=2, max_len=long.length + 40, prefill_chunk=8))
    with torch.inference_mode():
        a = engine.submit(short, options(q25, tokens=30))
        engine.step()
        engine.step()  # a is decoding
        b = engine.submit(long, options(q25, tokens=4))
        c = engine.submit(short, options(q25, tokens=3))  # no row for c until someone finishes
        seen = []
        while b.thinker is None or not b.thinker.prefill_done:
            before = a.chooser.steps
            engine.step()
            seen.append(a.chooser.steps - before)
        assert len(seen) >= 3 and all(n == 1 for n in seen)  # a got a token every step while b's prompt was read
        assert c.rows is None and list(engine.waiting) == [c]
        drain(engine, [a, b, c])
    assert all(r.done and r.rows is None for r in (a, b, c))
    assert engine._free == [True, True]


def test_cancel_frees_the_rows_within_one_step(q25):
    inputs = ModelInputs.from_dict(synthetic_inputs("audio", seed=5, pad=0))
    engine = Engine(q25, EngineConfig(rows=1, max_len=inputs.length + 60))
    with torch.inference_mode():
        a = engine.submit(inputs, options(q25, tokens=50, speech_codes=200))
        b = engine.submit(inputs, options(q25, tokens=4))
        for _ in range(5):
            engine.step()
        assert a.rows == (0, 1) and b.rows is None
        a.cancel()
        engine.step()
    assert a.done and a.rows is None and b.rows == (0, 1)
    done = [e for e in a.events if e.kind == "done"][-1]
    assert done.finish_reasons == ["cancelled"] and 0 < done.num_tokens[0] < 50
    with torch.inference_mode():
        drain(engine, [b])
    assert results(b)[0] == alone(q25, inputs, options(q25, tokens=4))[0]


def test_oversize_requests_are_refused_with_the_numbers(q25):
    inputs = ModelInputs.from_dict(synthetic_inputs("text", seed=1, pad=0))
    engine = Engine(q25, EngineConfig(rows=1, max_len=inputs.length + 4))
    with pytest.raises(ValueError, match=rf"prompt \({inputs.length} tokens\) plus max_new_tokens \(5\)"):
        engine.submit(inputs, options(q25, tokens=5))
    two = ModelInputs.from_dict(synthetic_inputs("text", seed=1, pad=0))
    two.input_ids = two.input_ids.expand(2, -1)
    with pytest.raises(ValueError, match="2 conversations in one request; this engine holds 1"):
        engine.submit(two, options(q25, tokens=2))


def _turns(model, kind: str, seed: int):
    """Turn 1 (a prompt with media) and turn 2 (turn 1, its answer as read, and a new user turn)."""
    first = synthetic_inputs(kind, seed=seed, pad=0)
    opts = options(model, tokens=6)
    engine = Engine(model, EngineConfig(rows=2, max_len=400, prefix_reuse=True, keep_layers=model.talker_reads))
    with torch.inference_mode():
        a = engine.submit(ModelInputs.from_dict(first), opts)
        drain(engine, [a])
    answer = results(a)[0]
    tail = torch.randint(0, 150000, (1, 7), generator=torch.Generator().manual_seed(seed))
    second = dict(first)
    second["input_ids"] = torch.cat([first["input_ids"], torch.tensor([answer[:-1]]), tail], dim=1)
    second["attention_mask"] = torch.ones_like(second["input_ids"])
    return engine, first, second, answer


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_prefix_reuse_gives_the_fresh_prefill_results(q25, kind):
    engine, first, second, answer = _turns(q25, kind, seed=40)
    assert len(engine.parked) == 1
    opts = options(q25, tokens=6, speech_codes=20, seed=7)  # seeded: the DiT noise is the same in both runs
    with torch.inference_mode():
        b = engine.submit(ModelInputs.from_dict(second), opts)
        drain(engine, [b])
    reused_len = first["input_ids"].shape[1] + len(answer) - 1
    assert b.reused == reused_len  # the whole first turn and its answer: only the new user turn was read
    ids, codes, audio = results(b)
    ids1, codes1, audio1 = alone(q25, ModelInputs.from_dict(second), opts)
    assert ids == ids1 and torch.equal(codes[0], codes1[0]) and codes1[0].numel() > 0
    torch.testing.assert_close(audio, audio1, atol=1e-4, rtol=0)


def test_prefix_reuse_never_shares_other_media(q25):
    engine, first, second, _ = _turns(q25, "image", seed=41)
    other = dict(second)
    other["pixel_values"] = second["pixel_values"] + 1.0  # same placeholders, another picture
    opts = options(q25, tokens=5)
    with torch.inference_mode():
        b = engine.submit(ModelInputs.from_dict(other), opts)
        drain(engine, [b])
    image_at = int((first["input_ids"][0] == 151655).nonzero()[0])
    assert b.reused == 0 or b.reused <= image_at
    assert results(b)[0] == alone(q25, ModelInputs.from_dict(other), opts)[0]


def test_parked_rows_are_evicted_for_new_conversations(q25):
    engine, first, second, _ = _turns(q25, "text", seed=42)
    other = ModelInputs.from_dict(synthetic_inputs("audio", seed=43, pad=0))
    with torch.inference_mode():
        reqs = [engine.submit(other, options(q25, tokens=3)) for _ in range(2)]
        drain(engine, reqs)
    assert all(r.done and r.reused == 0 for r in reqs)
    assert len(engine.parked) <= 2 and sum(engine._free) + len(engine.parked) == 2


def test_vocoder_batched_across_requests_equals_each_alone(q25, monkeypatch):
    """Streaming Token2Wav of several requests runs as one batch (DiT windows, vocoder pieces) and each request
    gets the audio it gets alone."""
    from thinktalk.models.qwen2_5_omni import token2wav

    work = []
    for i in range(3):
        inputs = ModelInputs.from_dict(synthetic_inputs("text", seed=30 + i, pad=0))
        work.append((inputs, options(q25, tokens=6, speech_codes=60, seed=i)))
    batches = []
    solve = token2wav.solve

    def spy(dit, noise, *args, **kwargs):
        batches.append(noise.shape[0])
        return solve(dit, noise, *args, **kwargs)

    monkeypatch.setattr(token2wav, "solve", spy)
    engine = Engine(q25, EngineConfig(rows=3, max_len=200))
    with torch.inference_mode():
        reqs = [engine.submit(inputs, opts) for inputs, opts in work]
    drain(engine, reqs)
    monkeypatch.undo()
    assert max(batches) > 1  # windows of different requests were solved together
    for (inputs, opts), req in zip(work, reqs):
        ids, codes, audio = results(req)
        ids1, codes1, audio1 = alone(q25, inputs, opts)
        assert ids == ids1 and torch.equal(codes[0], codes1[0]) and codes1[0].numel() > 36
        assert audio.numel() == codes1[0].numel() * 480
        # Batched matmuls round differently (~1e-7 in the mel); the tiny random vocoder amplifies ~500x.
        torch.testing.assert_close(audio, audio1, atol=1e-3, rtol=0)


def test_code2wav_batched_across_requests_equals_each_alone(q3):
    """Qwen3-Omni's streamed Code2Wav of several requests runs as one batch (Code2Wav.stream_many) and each
    request gets the audio it gets alone."""
    from thinktalk.models.qwen3_omni.code2wav import Code2Wav

    cases = thinker_cases()
    work = []
    for i, name in enumerate(["text", "image", "audio"]):
        inputs, use_aiv = cases[name]
        work.append((ModelInputs.from_dict(inputs, use_aiv), options(q3, tokens=7, speech_codes=8 + 2 * i, seed=i)))
    batches = []
    many = Code2Wav.stream_many

    def spy(self, codes, states):
        batches.append(len(codes))
        return many(self, codes, states)

    engine = Engine(q3, EngineConfig(rows=3, max_len=300, talker_max_len=300))
    Code2Wav.stream_many = spy
    try:
        with torch.inference_mode():
            reqs = [engine.submit(inputs, opts) for inputs, opts in work]
        drain(engine, reqs)
    finally:
        Code2Wav.stream_many = many
    assert max(batches) > 1  # frames of different requests were decoded together
    for (inputs, opts), req in zip(work, reqs):
        ids, codes, audio = results(req)
        ids1, codes1, audio1 = alone(q3, inputs, opts)
        assert ids == ids1 and torch.equal(codes[0], codes1[0]) and codes1[0].shape[0] > 1
        assert audio.numel() == audio1.numel() > 0
        torch.testing.assert_close(audio, audio1, atol=1e-4, rtol=0)


@pytest.mark.parametrize("talker_sample", [False, True], ids=["greedy", "seeded_sampling"])
def test_code_predictor_batched_across_requests_equals_each_alone(q3, talker_sample):
    """Qwen3-Omni's code predictor runs once per step for every speaking request (TalkerStage.choose_many), not
    once per request; each request's codes are those it gets alone — with sampling too, each request's rows
    drawn from its own seeded generator."""
    from thinktalk.models.qwen3_omni.code_predictor import CodePredictor

    cases = thinker_cases()
    work = []
    for i, name in enumerate(["text", "image", "audio"]):
        inputs, use_aiv = cases[name]
        opts = options(q3, tokens=7, speech_codes=8 + 2 * i, seed=10 + i, talker_sample=talker_sample)
        work.append((ModelInputs.from_dict(inputs, use_aiv), opts))
    batches = []
    predict = CodePredictor.predict

    def spy(self, hidden, *args, **kwargs):
        batches.append(hidden.shape[0])
        return predict(self, hidden, *args, **kwargs)

    engine = Engine(q3, EngineConfig(rows=3, max_len=300, talker_max_len=300))
    CodePredictor.predict = spy
    try:
        with torch.inference_mode():
            reqs = [engine.submit(inputs, opts) for inputs, opts in work]
        drain(engine, reqs)
    finally:
        CodePredictor.predict = predict
    assert max(batches) == 3  # the three requests' frames in one predictor loop
    for (inputs, opts), req in zip(work, reqs):
        ids, codes, _ = results(req)
        ids1, codes1, _ = alone(q3, inputs, opts)
        assert ids == ids1 and codes1[0].shape[0] > 1
        assert torch.equal(codes[0], codes1[0])


def _audio_turn(model, frames: int, feats: torch.Tensor, seed: int = 50) -> dict:
    """A one-row prompt: text, one audio clip of the first ``frames`` mel frames of ``feats``, text."""
    from thinktalk.testing.speech import IM_END, IM_START

    lay = model.thinker.media_layout({"feature_attention_mask": torch.ones(1, frames, dtype=torch.long)})
    tid = model.thinker.token_ids
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, 150000, (6,), generator=g).tolist()
    tail = torch.randint(0, 150000, (5,), generator=g).tolist()
    audio = [tid.audio_start] + [tid.audio] * lay.audio[0] + [tid.audio_start + 1]  # <|audio_eos|> follows <|audio_bos|>
    ids = [IM_START, *head, *audio, *tail, IM_END]
    ids += [IM_START, 77091, 198]  # <|im_start|>assistant\n: the Talker's prompt starts there
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "input_features": feats[:, :, :frames].clone(),
        "feature_attention_mask": torch.ones(1, frames, dtype=torch.long),
    }


def _prefill_logits(engine: Engine) -> list:
    """A spy on the engine's Thinker stage: the logits of every finished prompt read."""
    seen, prefill = [], engine._stage.prefill

    def spy(state, budget=None):
        read = prefill(state, budget)
        if read is not None:
            seen.append(read.logits.clone())
        return read

    engine._stage.prefill = spy
    return seen


def _whole_prefill(model, whole: dict, opts: GenerateOptions):
    fresh = Engine(model, EngineConfig(rows=1, max_len=whole["input_ids"].shape[1] + 16))
    seen = _prefill_logits(fresh)
    with torch.inference_mode():
        req = fresh.submit(ModelInputs.from_dict(whole), opts)
        drain(fresh, [req])
    return seen[-1], results(req)


@pytest.mark.parametrize("family", ["qwen2_5_omni", "qwen3_omni_moe"])
def test_audio_prefilled_while_it_grows_equals_the_whole_prefill(family, q25, q3):
    """A clip prefilled in blocks (prefill_only requests of the turn so far, as a realtime session sends them)
    leaves only its last block and the prompt tail to read, and gives the logits, tokens, codes and audio of
    the whole prompt read at once."""
    model = q25 if family == "qwen2_5_omni" else q3
    window, per = model.thinker.audio_block  # tiny Qwen2.5: 16 frames -> 4 tokens; tiny Qwen3: 200 -> 26
    frames = 6 * window + window // 4
    feats = torch.randn(1, 128, frames, generator=torch.Generator().manual_seed(51))
    whole = _audio_turn(model, frames, feats)
    opts = options(model, tokens=6, speech_codes=20, seed=7)
    max_len = whole["input_ids"].shape[1] + 16
    engine = Engine(model, EngineConfig(rows=2, max_len=max_len, prefix_reuse=True, keep_layers=model.talker_reads))
    seen = _prefill_logits(engine)
    audio_at = int((whole["input_ids"][0] == model.thinker.token_ids.audio).nonzero()[0])  # the first placeholder
    with torch.inference_mode():
        for k, grown in enumerate((2 * window, 4 * window)):  # the user is still speaking
            part = engine.submit(ModelInputs.from_dict(_audio_turn(model, grown, feats)), options(model, tokens=1),
                                 prefill_only=True)  # fmt: skip
            drain(engine, [part])
            assert part.reused == (0 if k == 0 else audio_at + 2 * per)  # the first blocks were not read again
            assert [e.kind for e in part.events] == ["done"] and len(engine.parked) == 1
        final = engine.submit(ModelInputs.from_dict(whole), opts)
        drain(engine, [final])
    assert final.reused == audio_at + 4 * per  # only the last windows and the tail were read
    assert final.error is None, final.error
    ids, codes, audio = results(final)
    logits1, (ids1, codes1, audio1) = _whole_prefill(model, whole, opts)
    torch.testing.assert_close(seen[-1], logits1, atol=1e-5, rtol=1e-5)
    assert ids == ids1 and torch.equal(codes[0], codes1[0]) and codes1[0].numel() > 0
    torch.testing.assert_close(audio, audio1, atol=1e-4, rtol=0)


def test_audio_reuse_stops_at_the_first_changed_window(q25):
    """Features that changed in a window (as the Whisper peak normalisation can change a quiet stretch when a
    louder one follows) end the reuse there; the result is still the whole prefill's."""
    window, per = q25.thinker.audio_block
    feats = torch.randn(1, 128, 100, generator=torch.Generator().manual_seed(52))
    engine = Engine(q25, EngineConfig(rows=2, max_len=200, prefix_reuse=True, keep_layers=q25.talker_reads))
    seen = _prefill_logits(engine)
    with torch.inference_mode():
        drain(engine, [engine.submit(ModelInputs.from_dict(_audio_turn(q25, 4 * window, feats)), options(q25, 1),
                                     prefill_only=True)])  # fmt: skip
        changed = feats.clone()
        changed[..., window + 3] += 0.5  # window 1 differs
        whole = _audio_turn(q25, 100, changed)
        final = engine.submit(ModelInputs.from_dict(whole), options(q25, tokens=4))
        drain(engine, [final])
    audio_at = int((whole["input_ids"][0] == q25.thinker.token_ids.audio).nonzero()[0])
    assert final.reused == audio_at + per  # window 0 only
    logits1, _ = _whole_prefill(q25, whole, options(q25, tokens=4))
    torch.testing.assert_close(seen[-1], logits1, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prefill_only"):
        engine.submit(ModelInputs.from_dict(whole), options(q25, 1, speech_codes=5), prefill_only=True)
