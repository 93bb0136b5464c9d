"""The generation core: one driver over explicit stage states, typed options, trainable modules.

- the reference's keyword spellings give the reference's results (``min_new_tokens`` and the
  ``thinker_`` spelling against transformers' own ``generate``);
- unknown keywords, and another family's keywords, are clear errors in both families;
- ``generate`` is ``stream`` drained (text ids and codes, both families; Qwen3 audio too);
- forced Thinker tokens (text-to-speech) give exactly the codes of a run that chose those tokens;
- the KV cache: prefill in chunks == whole prefill, the static full-buffer path == the plain path;
- every module runs under autograd with finite gradients (Thinker, Talker, code predictor, Code2Wav,
  Token2Wav), i.e. the modules are trainable as they are.
"""

from __future__ import annotations

import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import thinker_cases, tiny3_weights  # noqa: F401
from tests.qwen25_inputs import cases
from thinktalk.generation.api import speak
from thinktalk.generation.inputs import ModelInputs
from thinktalk.generation.reply import ReplyTrack
from thinktalk.generation.thinker import ThinkerRead
from thinktalk.testing.speech import synthetic_inputs

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def q25(tiny25):
    return thinktalk.load(str(tiny25))


@pytest.fixture(scope="module")
def q3(tiny3_weights):  # noqa: F811
    return thinktalk.load(tiny3_weights)


@pytest.fixture(scope="module")
def ref25(tiny25):
    return transformers.Qwen2_5OmniForConditionalGeneration.from_pretrained(str(tiny25), dtype=torch.float32).eval()


def _ref_thinker_ids(ref, inputs, **kw) -> list[int]:
    with torch.no_grad():
        out = ref.thinker.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   do_sample=False, **kw)  # fmt: skip
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_min_new_tokens_forces_the_length_as_the_reference(q25, ref25):
    inputs, _ = cases()["text"]
    free = q25.generate(**inputs, max_new_tokens=12, eos_token_id=()).text_ids[0].tolist()
    eos = free[2]  # an end token the model would produce third: without min_new_tokens it stops there
    stopped = q25.generate(**inputs, max_new_tokens=12, eos_token_id=eos).text_ids[0].tolist()
    assert stopped == free[:3]
    expected = _ref_thinker_ids(ref25, inputs, max_new_tokens=12, min_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    for spelling in ({"min_new_tokens": 6}, {"thinker_min_new_tokens": 6}):
        got = q25.generate(**inputs, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, **spelling).text_ids[0].tolist()
        assert got == expected[: len(got)] and len(got) >= 7
        assert eos not in got[:6]
    # The thinker_ spelling wins over the plain one, as in the reference.
    both = q25.generate(**inputs, max_new_tokens=5, thinker_max_new_tokens=9, eos_token_id=()).text_ids
    assert both.shape[1] == 9


def test_unknown_and_foreign_keywords_are_clear_errors(q25, q3):
    inputs, _ = cases()["text"]
    for model in (q25, q3):
        with pytest.raises(TypeError, match="unexpected generate\\(\\) arguments: nonsense"):
            model.generate(**inputs, nonsense=1)
        with pytest.raises(TypeError, match="unexpected stream\\(\\) arguments: thinker_nonsense"):
            model.stream(**inputs, thinker_nonsense=1)
        with pytest.raises(TypeError, match="num_beams"):
            model.generate(**inputs, num_beams=4)
    with pytest.raises(TypeError, match="'talker_system_ids' is not an option of Qwen2.5-Omni"):
        q25.generate(**inputs, return_audio=True, talker_system_ids=[1, 2])
    with pytest.raises(TypeError, match="'token2wav_num_steps' is not an option of Qwen3-Omni"):
        q3.generate(**inputs, return_audio=True, token2wav_num_steps=4)
    with pytest.raises(ValueError, match="min_new_tokens must be in"):
        q25.generate(**inputs, max_new_tokens=3, min_new_tokens=5)


def _drain(model, inputs, **kw):
    events = list(model.stream(**inputs, return_audio=True, **kw))
    done = events[-1]
    audio = [e.audio for e in events if e.kind == "audio"]
    return done, torch.cat(audio) if audio else torch.zeros(0)


def test_generate_is_the_stream_drained_qwen25(q25):
    inputs = synthetic_inputs("audio", seed=3)
    kw = dict(speaker="Ethan", max_new_tokens=8, talker_max_new_tokens=40, talker_do_sample=False, token2wav_num_steps=3,
              seed=5)  # fmt: skip
    res = q25.generate(**inputs, **kw, return_audio=True)
    done, audio = _drain(q25, inputs, **kw)
    assert torch.equal(res.text_ids, done.text_ids)
    assert torch.equal(res.codes[0], done.codes[0]) and res.codes[0].numel() > 0
    assert res.audio[0].shape == audio.shape == (res.codes[0].numel() * 480,)


def test_generate_is_the_stream_drained_qwen3(q3):
    inputs, use_aiv = thinker_cases()["audio"]
    kw = dict(use_audio_in_video=use_aiv, max_new_tokens=8, eos_token_id=(), talker_max_new_tokens=9, talker_do_sample=True,
              seed=11)  # fmt: skip
    res = q3.generate(**inputs, **kw, return_audio=True)
    done, audio = _drain(q3, inputs, **kw)
    assert torch.equal(res.text_ids, done.text_ids)
    assert torch.equal(res.codes[0], done.codes[0]) and res.codes[0].shape == (8, 16)
    torch.testing.assert_close(res.audio[0], audio, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_5_omni", "qwen3_omni_moe"])
def test_forced_answer_speaks_like_a_chosen_one(family, q25, q3):
    """Text-to-speech (the Thinker reads given tokens) gives the codes of a run that chose the same tokens."""
    import dataclasses

    from thinktalk.generation.engine import run
    from thinktalk.generation.options import GenerateOptions, SpeechParams, TextParams

    model = q25 if family == "qwen2_5_omni" else q3
    inputs = synthetic_inputs("text", seed=4, pad=0) if family == "qwen2_5_omni" else thinker_cases()["text"][0]
    steps = 3 if family == "qwen2_5_omni" else 10
    kw = dict(talker_max_new_tokens=12, talker_do_sample=False)
    if family == "qwen2_5_omni":
        kw["token2wav_num_steps"] = steps
    free = model.generate(**inputs, max_new_tokens=8, eos_token_id=()).text_ids[0].tolist()
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    end = free[k]  # declared the end token: the chosen run stops there
    chosen = model.generate(**inputs, max_new_tokens=8, eos_token_id=end, return_audio=True, **kw)
    answer = free[:k]
    assert chosen.text_ids[0].tolist()[: k + 1] == [*answer, end]
    talker = dataclasses.replace(model.keywords.talker_sampling, do_sample=False)
    opts = GenerateOptions(text=TextParams(max_new_tokens=k + 1),
                           speech=SpeechParams(sampling=talker, max_new_tokens=12, num_steps=steps))  # fmt: skip
    events = list(run(model, ModelInputs.from_dict(inputs), opts, forced=[*answer, end]))
    done = events[-1]
    assert done.text_ids[0].tolist() == [*answer, end]
    assert chosen.codes[0].shape[0] > 0 and torch.equal(done.codes[0], chosen.codes[0])
    assert any(e.kind == "audio" for e in events)
    # The server's entry point: the family's default (sampling) Talker speaks the text after the prompt.
    spoken = list(speak(model, ModelInputs.from_dict(inputs), answer, max_new_codes=12, seed=0))
    assert spoken[-1].text_ids[0].tolist() == [*answer, model.eos_token_ids[0]]
    assert any(e.kind == "audio" for e in spoken)


def test_reply_track_reads_one_token_per_step_then_eos_then_pad():
    prompt = ThinkerRead(-1, torch.zeros(2, 5), {0: torch.zeros(2, 3, 4)})
    track = ReplyTrack(2, prompt)
    read = ThinkerRead(0, torch.zeros(2, 5), {0: torch.ones(2, 1, 4)})
    track.push_token(torch.tensor([7, 8]), torch.tensor([False, True]))  # row 1 ends at once: empty answer
    assert track.entries(0) is None  # row 0's token 0 is not read yet
    track.push_read(read)
    assert [e.kind for e in track.entries(0)] == ["token", "eos"] and track.empty(1)
    track.push_token(torch.tensor([9, 0]), torch.tensor([False, True]))
    assert track.entries(1) is None
    track.stop()  # the Thinker stops by length: token 1 of row 0 is never read
    assert [e.kind for e in track.entries(1)] == ["eos", "pad"]
    assert [e.kind for e in track.entries(2)] == ["pad", "pad"]


def _prefill_logits(thinker, inputs, chunks: list[int], full: bool) -> torch.Tensor:
    """Last-position logits after reading the prompt in pieces of the given lengths."""
    mask = inputs.mask()
    emb = thinker.embed(inputs.input_ids, mask, **inputs.media())
    cache = thinker.model.new_cache(inputs.batch, inputs.length + 4)
    cache.full = full
    start = 0
    for n in chunks:
        sl = slice(start, start + n)
        kw = emb.decoder_kwargs if start == 0 and hasattr(emb, "decoder_kwargs") and n == inputs.length else {}
        logits, _ = thinker.decode(emb.inputs_embeds[:, sl], emb.position_ids[:, :, sl], mask[:, sl], cache, **kw)
        start += n
    return logits[:, -1]


@pytest.mark.parametrize("case", ["text", "audio", "batch_left_padding"])
def test_incremental_prefill_and_static_cache_equal_whole_prefill(q25, case):
    inputs = ModelInputs.from_dict(cases()[case][0])
    th = q25.thinker
    with torch.inference_mode():
        whole = _prefill_logits(th, inputs, [inputs.length], full=False)
        n = inputs.length
        pieces = _prefill_logits(th, inputs, [n // 3, n // 3, n - 2 * (n // 3)], full=False)
        static = _prefill_logits(th, inputs, [n], full=True)
        static_pieces = _prefill_logits(th, inputs, [n // 2, n - n // 2], full=True)
        ref = th(**cases()[case][0]).logits[:, -1]
    for got in (pieces, static, static_pieces):
        torch.testing.assert_close(got, whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(whole, ref, atol=1e-4, rtol=1e-4)
    assert (whole - ref).abs().max() < (whole.std() * 1e-3)


def _finite_grads(module: torch.nn.Module) -> int:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads, "no gradient reached the module"
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    return sum(int(g.abs().sum() > 0) for g in grads)


def test_qwen25_modules_train_under_autograd(tiny25):
    model = thinktalk.load(str(tiny25))
    model.train()
    inputs, _ = cases()["audio"]
    out = model.thinker(**inputs, output_hidden_states=True)
    out.logits.float().logsumexp(-1).mean().backward()
    assert _finite_grads(model.thinker.audio_tower) > 0 and _finite_grads(model.thinker.model) > 0
    talker = model.talker
    t = 6
    embeds = torch.randn(1, t, talker.cfg.embedding_size)
    pos = torch.arange(t).view(1, 1, t).expand(3, 1, t)
    talker(embeds, pos).logsumexp(-1).mean().backward()
    assert _finite_grads(talker) > 0
    voice = next(iter(model.speakers.values()))
    codes = torch.randint(0, 100, (1, 12))
    wav = model.token2wav(codes, voice["cond"], voice["ref_mel"], num_steps=2, noise=torch.randn(1, 24, 80))
    wav.pow(2).mean().backward()
    assert _finite_grads(model.token2wav) > 0


def test_qwen3_modules_train_under_autograd(tiny3_weights):  # noqa: F811
    model = thinktalk.load(tiny3_weights)
    model.train()
    inputs, use_aiv = thinker_cases()["image"]
    out = model.thinker(**inputs, use_audio_in_video=use_aiv)
    out.logits.float().logsumexp(-1).mean().backward()
    assert _finite_grads(model.thinker.visual) > 0 and _finite_grads(model.thinker.model) > 0
    talker = model.talker
    d = talker.cfg.text.hidden_size
    t = 5
    pos = torch.arange(t).view(1, 1, t).expand(3, 1, t).float()
    logits, hidden = talker.decode(torch.randn(1, t, d), pos, None, None)
    logits.logsumexp(-1).mean().backward()
    assert _finite_grads(talker.model) > 0
    g = talker.cfg.num_code_groups
    codes = torch.randint(0, 64, (3, g))
    pred = talker.code_predictor(torch.randn(3, 1, d), codes, talker.model.codec_embedding)
    assert pred.shape == (3, g - 1, talker.code_predictor.cfg.vocab_size)
    pred.logsumexp(-1).mean().backward()
    assert _finite_grads(talker.code_predictor) > 0
    wav = model.code2wav(torch.randint(0, 64, (1, g, 4)))
    wav.pow(2).mean().backward()
    assert _finite_grads(model.code2wav) > 0


def test_code_predictor_teacher_forced_equals_its_greedy_steps(q3):
    """The training forward (whole frames at once) gives the logits the frame-by-frame predictor chose from."""
    predictor, talker = q3.talker.code_predictor, q3.talker
    d = talker.cfg.text.hidden_size
    hidden = torch.randn(2, 1, d)
    code0 = torch.randint(0, 64, (2,))
    with torch.inference_mode():
        rest, _ = predictor.predict(hidden, talker.model.codec_embedding(code0)[:, None])
        codes = torch.cat([code0[:, None], rest], dim=1)
        logits = predictor(hidden, codes, talker.model.codec_embedding)
    assert torch.equal(logits.argmax(-1), rest)


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="reads /proc (Linux)")
def test_a_cpu_kv_pool_costs_memory_only_as_it_is_written():
    """KVCache.allocate on the CPU: zeros (every dtype), writable, and a 1.5 GiB pool does not touch its pages at
    allocation (the server allocates its whole pool at start); writing a row maps that row only."""
    from thinktalk.nn.cache import KVCache

    for dtype in (torch.float32, torch.bfloat16):
        small = KVCache.allocate(2, 3, 2, 8, 16, dtype, "cpu")
        assert small.keys[0].dtype == dtype and small.keys[0].shape == (3, 2, 17, 8)
        assert all(not t.any() for t in small.keys + small.values)
        small.keys[1][2, 1, 5] = 1.5
        assert float(small.keys[1].sum()) == 1.5 * 8
    before = _rss_bytes()
    pool = KVCache.allocate(4, 24, 2, 64, 16384, torch.float32, "cpu")  # 4 layers x (k, v) x 24 x 2 x 16385 x 64 x 4 B
    size = sum(t.numel() * t.element_size() for t in pool.keys + pool.values)
    assert size > 1.5 * 2**30
    assert _rss_bytes() - before < 64 * 2**20  # not written: not resident
    pool.keys[0][0].fill_(1.0)  # one row of one layer: ~8 MiB
    grown = _rss_bytes() - before
    assert 4 * 2**20 < grown < 96 * 2**20
    assert float(pool.keys[0][1].abs().sum()) == 0.0 and float(pool.keys[0][0].mean()) == 1.0


def test_kv_cache_row_views_are_kept_and_share_the_pool():
    """KVCache.rows: the same rows give the same view (made once: an engine asks every step), its reserve/writes go
    to the pool, the fast decode reserve equals the general one, and only a bounded number of views is kept."""
    from thinktalk.nn.cache import KVCache

    pool = KVCache.allocate(2, 6, 1, 4, 8, torch.float32, "cpu")
    view = pool.rows(2, 4)
    assert pool.rows(2, 4) is view and pool.rows(0, 2) is not view
    slots = view.reserve(3)  # the decode fast path (every row, no padding)
    assert slots.tolist() == [[0, 1, 2], [0, 1, 2]] and view.end == 3
    assert pool.host_lengths.tolist() == [0, 0, 3, 3, 0, 0] and pool.lengths.tolist() == [0, 0, 3, 3, 0, 0]
    assert pool.valid[2:4, :3].all() and not pool.valid[:2].any() and not pool.valid[2:4, 3:].any()
    general = pool.rows(4, 6)
    general.reserve(3, active=[True, True])  # the general path: the same slots and validity
    assert torch.equal(pool.valid[4:6], pool.valid[2:4]) and pool.host_lengths[4:].tolist() == [3, 3]
    view.write(0, torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4), view.reserve(1))
    assert float(pool.keys[0][2:4, :, 3].sum()) == 8.0 and float(pool.keys[0][:2].sum()) == 0.0
    with pytest.raises(RuntimeError, match="KV cache overflow: 9 positions"):
        view.reserve(5)
    big = KVCache.allocate(1, 12, 1, 4, 8, torch.float32, "cpu")
    for lo in range(12):
        for hi in range(lo + 1, 13):
            big.rows(lo, hi)
    assert len(big._views) == KVCache.KEEP_VIEWS < 78  # 78 ranges asked for, the latest KEEP_VIEWS kept
    assert (11, 12, False, None) in big._views and (0, 1, False, None) not in big._views
