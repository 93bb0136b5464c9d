"""thinktalk.compile_speech: the speech decoders through torch.compile (inductor, on this CPU) give the samples of
the eager modules — the plain path stays the reference — and generation really runs the compiled code."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch._dynamo.utils import counters

import thinktalk
from tests.qwen3_fixtures import tiny3_weights  # noqa: F401
from thinktalk.generation import compiled
from thinktalk.models.qwen2_5_omni.speakers import load_speakers

# inductor compiles CPU kernels with the system's C++ compiler (this project's machines have g++)
needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="torch.compile on the CPU needs a C++ compiler")  # fmt: skip


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@needs_compiler
@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)  # a function past its limit would run eagerly, silently
def test_compiled_token2wav_equals_eager(tiny25):
    model = thinktalk.load(tiny25)  # its own instance: other modules' fixtures stay eager
    t2w = model.token2wav
    voice = load_speakers(tiny25)["Ethan"]
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8192, (1, 30), generator=g)
    noise = torch.randn(1, 60, 80, generator=g)
    long_codes = torch.randint(0, 8192, (1, 100), generator=g)

    def streamed(n: int = 1):  # pieces of 9 codes: DiT windows, vocoder slices of several lengths (dynamic shapes);
        # n > 1: n utterances pushed together (stream_push_many: batched DiT windows and vocoder pieces)
        sts = [t2w.stream_start(voice["cond"], voice["ref_mel"], num_steps=3, generator=torch.Generator().manual_seed(1))
               for _ in range(n)]  # fmt: skip
        parts = [t2w.stream_push_many(sts, [long_codes[:, i : i + 9]] * n, [False] * n) for i in range(0, 100, 9)]
        parts.append(t2w.stream_push_many(sts, [None] * n, [True] * n))
        return [torch.cat([p[k] for p in parts]) for k in range(n)]

    with torch.inference_mode():
        eager = t2w(codes, voice["cond"], voice["ref_mel"], num_steps=3, noise=noise)
        eager_stream = streamed()[0]
        assert thinktalk.compile_speech(model, only=("token2wav DiT", "BigVGAN anti-aliased activations")) == [
            "token2wav DiT", "BigVGAN anti-aliased activations"]  # fmt: skip
        try:
            before = graphs()
            fast = t2w(codes, voice["cond"], voice["ref_mel"], num_steps=3, noise=noise)
            assert graphs() > before  # the DiT and BigVGAN's activations ran compiled
            # fused kernels round differently, and three ODE steps carry it: 19 of 14400 samples differ by ~2e-4
            torch.testing.assert_close(fast, eager, atol=5e-4, rtol=0)
            assert (fast - eager).pow(2).mean() < 1e-6 * eager.pow(2).mean()  # > 60 dB SNR
            assert eager.abs().max().item() > 1e-3  # a real waveform compared
            before = graphs()
            fast_stream = streamed()[0]
            assert graphs() > before  # the streamed pieces' shapes compiled too
            torch.testing.assert_close(fast_stream, eager_stream, atol=5e-4, rtol=0)
            assert (fast_stream - eager_stream).pow(2).mean() < 1e-6 * eager_stream.pow(2).mean()
            for wav in streamed(2):  # two streams batched: the batch's shapes (12 activation graphs in all)
                torch.testing.assert_close(wav, eager_stream, atol=5e-4, rtol=0)
        finally:
            compiled.uncompile(model)
        assert not compiled.is_compiled(t2w.code2wav_bigvgan_model.activation_post, "fused")
        torch.testing.assert_close(t2w(codes, voice["cond"], voice["ref_mel"], num_steps=3, noise=noise), eager,
                                   atol=0, rtol=0)  # fmt: skip


@needs_compiler
def test_compiled_code2wav_streams_equal_eager(tiny3_weights):  # noqa: F811
    """Streamed frame by frame (one conversation: the B=1 graph), two conversations batched (stream_many: the
    batched graph) and offline: compiled == eager to float rounding; the first frame stays eager."""
    model = thinktalk.load(tiny3_weights)
    c2w = model.code2wav
    codes = torch.randint(0, 2048, (2, 16, 5), generator=torch.Generator().manual_seed(4))

    def run():
        alone = []
        for b in range(2):
            state, parts = c2w.new_state(), []
            for j in range(codes.shape[-1]):
                wav, state = c2w.stream(codes[b : b + 1, :, j : j + 1], state)
                parts.append(wav)
            alone.append(torch.cat(parts, dim=-1))
        states = [c2w.stream(codes[b : b + 1, :, :1], c2w.new_state())[1] for b in range(2)]
        together = [[], []]
        for j in range(1, codes.shape[-1]):
            done = c2w.stream_many([codes[b : b + 1, :, j : j + 1] for b in range(2)], states)
            states = [st for _, st in done]
            for b in range(2):
                together[b].append(done[b][0])
        return alone, [torch.cat(t, dim=-1) for t in together], c2w.decode(codes)

    with torch.inference_mode():
        eager = run()
        thinktalk.compile_speech(model, only=("Code2Wav frame", "Code2Wav"))
        try:
            before = graphs()
            fast = run()
            assert graphs() >= before + 3  # one frame, a batch of frames, a whole utterance
        finally:
            compiled.uncompile(model)
    for b in range(2):
        torch.testing.assert_close(fast[0][b], eager[0][b], atol=5e-5, rtol=0)
        torch.testing.assert_close(fast[1][b], eager[1][b], atol=5e-5, rtol=0)
    torch.testing.assert_close(fast[2], eager[2], atol=5e-5, rtol=0)
    assert eager[2].abs().max().item() > 1e-3


DECODE_STEPS = ("Talker decode step", "Thinker decode step")


@needs_compiler
@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
def test_compiled_decode_steps_equal_eager(tiny25):
    """The Thinker's and the Talker's decode steps (Decoder.body, one token) compiled: the logits of eager steps to
    float rounding, the same greedy text and codec ids end to end — alone, and two requests of different lengths
    batched in one engine (rows at different fill levels: the masked step; one ending first: inactive rows)."""
    from thinktalk.generation.engine import Engine, EngineConfig
    from thinktalk.generation.options import parse_generate_kwargs
    from thinktalk.testing.speech import synthetic_inputs

    model = thinktalk.load(tiny25)
    kw = {"max_new_tokens": 8, "eos_token_id": [-1], "talker_max_new_tokens": 24, "talker_do_sample": False,
          "token2wav_num_steps": 2, "seed": 3}  # fmt: skip
    prompts = [synthetic_inputs("audio", seed=11), synthetic_inputs("text", seed=12, text_len=17)]

    def steps():  # logits of a few decode steps of each decoder, straight from the modules
        g = torch.Generator().manual_seed(0)
        out = []
        for dec, head in ((model.thinker.model, model.thinker.lm_head), (model.talker.model, model.talker.codec_head)):
            cache = dec.new_cache(2, 16)
            x = torch.randn(2, 5, dec.spec.hidden_size, generator=g)
            pos = torch.arange(5).expand(3, 2, 5)
            dec(x, pos, torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), cache)  # a padded row: the masked step
            for i in range(3):
                y = torch.randn(2, 1, dec.spec.hidden_size, generator=g)
                out.append(head(dec(y, torch.full((3, 2, 1), 5 + i), None, cache).last_hidden_state))
            out.append(head(dec(y, torch.full((3, 2, 1), 8), None, cache, active=[True, False]).last_hidden_state))
        return out

    def engine_run():
        engine = Engine(model, EngineConfig(rows=2, max_len=80, keep_layers=model.talker_reads))
        reqs = []
        for inputs, n in zip(prompts, (8, 5)):
            prompt, options = parse_generate_kwargs({**inputs, **kw, "max_new_tokens": n, "return_audio": True},
                                                    model.keywords, True)  # fmt: skip
            reqs.append(engine.submit(prompt, options))
        while not all(r.done for r in reqs):
            engine.step()
        return [(r.chooser.sequences(), torch.cat([e.audio for e in r.events if e.kind == "audio"])) for r in reqs]

    with torch.inference_mode():
        eager_steps = steps()
        eager = model.generate(**prompts[0], return_audio=True, **kw)
        eager_engine = engine_run()
        assert thinktalk.compile_speech(model, only=DECODE_STEPS) == list(DECODE_STEPS)
        try:
            before = graphs()
            fast_steps = steps()
            assert graphs() >= before + 2  # the Thinker's and the Talker's steps ran compiled
            for a, b in zip(fast_steps, eager_steps):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            fast = model.generate(**prompts[0], return_audio=True, **kw)
            fast_engine = engine_run()
        finally:
            compiled.uncompile(model)
    assert torch.equal(fast.text_ids, eager.text_ids)
    assert torch.equal(fast.codes[0], eager.codes[0]) and len(eager.codes[0]) == 24
    torch.testing.assert_close(fast.audio[0], eager.audio[0], atol=1e-5, rtol=0)
    for (tokens, audio), (tokens0, audio0) in zip(fast_engine, eager_engine):
        assert torch.equal(tokens, tokens0)
        torch.testing.assert_close(audio, audio0, atol=1e-5, rtol=0)
    assert eager_engine[0][0].shape != eager_engine[1][0].shape  # the two requests really differed


@needs_compiler
@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
def test_compiled_code_predictor_equals_eager(tiny3_weights):  # noqa: F811
    """Qwen3's code predictor with its decode step compiled: the codes and embeddings of the eager loop."""
    model = thinktalk.load(tiny3_weights)
    cp = model.talker.code_predictor
    g = torch.Generator().manual_seed(5)
    hidden, code0 = torch.randn(3, 1, cp.cfg.hidden_size, generator=g), torch.randn(3, 1, cp.cfg.hidden_size, generator=g)
    with torch.inference_mode():
        eager = cp.predict(hidden, code0)
        assert thinktalk.compile_speech(model, only=["code predictor decode step"]) == ["code predictor decode step"]
        try:
            before = graphs()
            fast = cp.predict(hidden, code0)
            assert graphs() > before
        finally:
            compiled.uncompile(model)
    assert torch.equal(fast[0], eager[0])
    torch.testing.assert_close(fast[1], eager[1], atol=1e-5, rtol=1e-5)


def test_compile_speech_names_what_it_can_compile(tiny25):
    model = thinktalk.load(tiny25)
    with pytest.raises(ValueError, match="nothing to compile is called"):
        thinktalk.compile_speech(model, only=["Talker step"])
    assert not compiled.is_compiled(model.talker.model, "body")


def test_a_model_without_speech_has_nothing_to_compile(tiny25):
    model = thinktalk.load(tiny25, components=("thinker",))
    with pytest.raises(ValueError, match="no Talker"):
        thinktalk.compile_speech(model)


@needs_compiler
def test_serve_warmup_compiles_every_shape_batching_meets(caplog):
    """`serve --compile` warms up one stream and batches of 2 and 16 (from 16 rows on torch's convolutions take
    another path: another graph); after it, batches of other sizes compile nothing more — no client waits for a
    compilation under load. The warm-up runs cleanly (a failure would only be logged, so the log is checked)."""
    import logging

    from thinktalk.default_model import shipped_model_dir
    from thinktalk.generation.engine import Engine, EngineConfig
    from thinktalk.generation.options import parse_generate_kwargs
    from thinktalk.processing import Processor
    from thinktalk.serve.server import warmup

    path = shipped_model_dir()  # the default model (a tokenizer, a voice)
    model = thinktalk.load(path)
    processor = Processor.from_pretrained(path)
    thinktalk.compile_speech(model)
    try:
        with caplog.at_level(logging.WARNING, logger="thinktalk.serve"):
            warmup(model, processor, batches=(2, 16))
        assert not [r for r in caplog.records if "warm-up" in r.getMessage()]
        compiled_graphs = graphs()
        inputs = processor([{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}])
        prompt, options = parse_generate_kwargs({**inputs, "max_new_tokens": 3, "return_audio": True,
                                                 "talker_max_new_tokens": 4}, model.keywords, True)  # fmt: skip
        for n in (5, 23):
            engine = Engine(model, EngineConfig(rows=n, max_len=prompt.length + 8, keep_layers=model.talker_reads))
            with torch.inference_mode():
                requests = [engine.submit(prompt, options) for _ in range(n)]
                while not all(r.done for r in requests):
                    engine.step()
            assert all(any(e.kind == "audio" for e in r.events) for r in requests)
        assert graphs() == compiled_graphs  # nothing compiled after the warm-up
    finally:
        compiled.uncompile(model)
