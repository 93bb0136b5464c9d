"""thinktalk.codec: Mimi encoding against the reference, and the project's own codec (train, resume, export).

Speech comes from espeak-ng (22.05 kHz WAVs, resampled to 24 kHz with soxr by the code under test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import thinktalk
from tests.qwen3_fixtures import tiny3_weights  # noqa: F401
from thinktalk.codec import (
    CodecTrainConfig,
    MimiEncoder,
    export_qwen3_checkpoint,
    frames_for_samples,
    load_code2wav,
    load_codec,
    qwen3_codes,
    train_codec,
)
from thinktalk.codec.data import CodecDataError, load_corpus
from thinktalk.codec.model import Codec, CodecConfig, code2wav_from_embeddings
from thinktalk.config import ConfigError
from thinktalk.processing.audio import decode_audio, resample, to_mono
from thinktalk.testing.espeak import have_espeak, speech_corpus
from thinktalk.testing.tiny import TINY_QWEN3_OMNI

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed")

# The tiny Qwen3-Omni Code2Wav (16 codebooks of 2048 codes: what its Talker emits), so the trained decoder
# can replace that checkpoint's; and a smaller one for the resume test.
TINY3_CODEC = {"code2wav_config": TINY_QWEN3_OMNI["code2wav_config"], "encoder": {"channels": 16, "max_channels": 32},
               "quantizer": {"kmeans_iters": 3}}
SMALL_CODEC = {
    "code2wav_config": {"codebook_size": 32, "num_quantizers": 3, "hidden_size": 16, "intermediate_size": 32,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "sliding_window": 4,
                        "decoder_dim": 16},
    "encoder": {"channels": 8, "max_channels": 16, "residual_dilations": [1], "frontend_mels": 32},
    "quantizer": {"codebook_dim": 8, "kmeans_iters": 2},
}
LOSS_KEYS = ("loss", "lr", "mel", "stft", "commitment", "grad_norm", "perplexity", "restarted_codes")


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("speech")
    speech_corpus(d, count=8)
    return str(d)


def speech_24k(path: str, seconds: float | None = None) -> torch.Tensor:
    wav, rate = decode_audio(path)
    out = torch.from_numpy(resample(to_mono(wav), rate, 24000))
    return out[: int(seconds * 24000)] if seconds else out


# -- (a) Mimi --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mimi(tmp_path_factory):
    from thinktalk.testing.mimi import build_reference_mimi

    d = tmp_path_factory.mktemp("tiny_mimi")
    ref = build_reference_mimi(str(d), seed=0)
    return str(d), ref


def test_mimi_codes_match_reference(tiny_mimi, speech_dir):
    directory, ref = tiny_mimi
    ours = MimiEncoder.from_pretrained(directory, num_quantizers=16)
    a = speech_24k(os.path.join(speech_dir, "speech_000.wav"), 1.3)
    b = speech_24k(os.path.join(speech_dir, "speech_001.wav"), 1.3)
    x = torch.stack([a, b])[:, None]  # 31200 samples: not a whole number of 1920-sample frames
    with torch.no_grad():
        want = ref.encode(x, num_quantizers=16).audio_codes
        enc = ours.encode_with_intermediates(x)
        seanet = ref.encoder.encoder_seanet(x)
        transformer = ref.encoder.encoder_transformer(seanet.transpose(1, 2)).last_hidden_state.transpose(1, 2)
        latents = ref.encoder(x).latents
    assert want.shape == enc.codes.shape == (2, 16, frames_for_samples(x.shape[-1])) == (2, 16, 17)
    assert torch.equal(enc.codes, want)
    for level in range(16):  # every level uses many codes: a wrong module could not match by accident
        assert enc.codes[:, level].unique().numel() >= 5
    torch.testing.assert_close(enc.seanet, seanet, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.transformer, transformer, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.latents, latents, rtol=1e-5, atol=1e-5)
    # The transformer moves the latents (layer scales are not the reference's near-zero init).
    assert (transformer - seanet).abs().mean() > 0.1 * seanet.abs().mean()
    # Fewer levels = a prefix of the 16, as in the reference.
    assert torch.equal(ours.encode(x, num_quantizers=4), want[:, :4])


def test_qwen3_codes_resample_and_errors(tiny_mimi, speech_dir):
    directory, ref = tiny_mimi
    ours = MimiEncoder.from_pretrained(directory)
    wav, rate = decode_audio(os.path.join(speech_dir, "speech_002.wav"))
    assert rate == 22050
    codes = qwen3_codes(ours, wav, rate)
    x = torch.from_numpy(resample(to_mono(wav), rate, 24000))[None, None]
    with torch.no_grad():
        assert torch.equal(codes, ref.encode(x, num_quantizers=16).audio_codes[0])
    with pytest.raises(ValueError, match="num_quantizers 21"):
        MimiEncoder.from_pretrained(directory, num_quantizers=21)
    with pytest.raises(ValueError, match="empty waveform"):
        ours.encode(torch.zeros(1, 1, 0))


# -- (b) the project's codec ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, speech_dir):
    """A codec with the tiny Qwen3-Omni decoder shape, trained a few dozen steps on espeak-ng speech."""
    out = tmp_path_factory.mktemp("codec_run")
    cfg = CodecTrainConfig(output_dir=str(out), data=[speech_dir], codec=TINY3_CODEC, max_steps=30, batch_size=4,
                           segment_frames=4, lr=2e-3, save_every=1000, eval_every=10, eval_batches=2, progress=False,
                           device="cpu", num_threads=1)
    return train_codec(cfg)


def test_codec_loss_falls(trained):
    rows = [json.loads(line) for line in open(os.path.join(trained.output_dir, "metrics.jsonl"))]
    assert rows == trained.metrics
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    assert all(k in r for r in train_rows for k in LOSS_KEYS)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 4  # steps 0, 10, 20, 30
    print("eval loss", [round(e, 4) for e in evals], "train loss first/last", train_rows[0]["loss"], train_rows[-1]["loss"])
    assert evals[-1] < 0.85 * evals[0]
    first = sum(r["loss"] for r in train_rows[:5]) / 5
    last = sum(r["loss"] for r in train_rows[-5:]) / 5
    assert last < first
    assert os.path.isdir(os.path.join(trained.output_dir, "checkpoint-30"))


def test_decoder_exports_as_qwen3_code2wav(trained, tiny3_weights, speech_dir, tmp_path):  # noqa: F811
    codec = load_codec(trained.codec_dir)
    x = speech_24k(os.path.join(speech_dir, "speech_003.wav"), 1.0)[None, None]
    codes = codec.encode(x)
    assert codes.shape == (1, 16, frames_for_samples(24000)) and int(codes.max()) < 2048
    with torch.no_grad():
        ours = codec.decode(codes)  # through the codebooks
        direct = codec.code2wav(codes)  # Code2Wav's own code embedding (folded codebooks)
    assert ours.shape == (1, 1, 1920 * codes.shape[-1] - 555)
    assert ours.std() > 1e-3 and (ours.abs() < 1).float().mean() > 0.99  # audible, not clamped
    torch.testing.assert_close(direct, ours, rtol=0, atol=1e-5)

    out = export_qwen3_checkpoint(trained.codec_dir, tiny3_weights, tmp_path / "exported")
    mine = thinktalk.load(out)
    ref, info = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        wav_thinktalk = mine.code2wav(codes)
        wav_reference = ref.code2wav(codes)
        wav_base = thinktalk.load(tiny3_weights).code2wav(codes)
    torch.testing.assert_close(wav_thinktalk, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(wav_reference, wav_thinktalk, rtol=0, atol=1e-5)
    assert (wav_base - wav_thinktalk).abs().max() > 1e-2  # the decoder was really replaced
    torch.testing.assert_close(load_code2wav(out)(codes), wav_thinktalk, rtol=0, atol=0)
    # Everything else in the checkpoint is the base's, tensor for tensor.
    base_state, new_state = load_file(os.path.join(tiny3_weights, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    others = [k for k in base_state if not k.startswith("code2wav.")]
    assert others and all(torch.equal(base_state[k], new_state[k]) for k in others)
    assert {k for k in new_state if k.startswith("code2wav.")} == {k for k in base_state if k.startswith("code2wav.")}


def test_trained_decoder_streams_like_offline(trained, speech_dir):
    codec = load_codec(trained.codec_dir)
    codes = codec.encode(speech_24k(os.path.join(speech_dir, "speech_004.wav"), 1.2)[None, None])
    dec = codec.code2wav
    with torch.no_grad():
        offline = dec(codes)
        for chunk in (1, 3):
            state, parts = dec.new_state(), []
            for i in range(0, codes.shape[-1], chunk):
                wav, state = dec.stream(codes[..., i : i + chunk], state)
                parts.append(wav)
            torch.testing.assert_close(torch.cat(parts, dim=-1), offline, rtol=0, atol=1e-6)


def test_resume_replays_the_loss_sequence(tmp_path, speech_dir):
    def cfg(out, **kw):
        return CodecTrainConfig(output_dir=str(out), data=[speech_dir], codec=SMALL_CODEC, max_steps=6, batch_size=2,
                                segment_frames=3, lr=3e-3, warmup_steps=2, save_every=3, progress=False, device="cpu",
                                adversarial_weight=0.5, discriminator_channels=4, adversarial_start_step=1, num_threads=1, **kw)

    full = train_codec(cfg(tmp_path / "full"))
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", part / "checkpoint-3")
    with open(tmp_path / "full" / "metrics.jsonl") as src, open(part / "metrics.jsonl", "w") as dst:
        dst.writelines(src.readlines()[:5])  # rows 1..3, and two rows the resumed run must drop and rewrite
    resumed = train_codec(cfg(part, resume_from="latest"))
    assert [r["step"] for r in resumed.metrics] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full.metrics, resumed.metrics):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert all(k in full.metrics[-1] for k in (*LOSS_KEYS, "adversarial", "feature_matching", "discriminator"))
    assert len({r["loss"] for r in full.metrics}) == 6  # the steps differ: equality is not trivial
    sa = load_codec(full.codec_dir).state_dict()
    sb = load_codec(resumed.codec_dir).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_codec_shapes_and_config_errors(tmp_path, speech_dir):
    codec = Codec(CodecConfig.from_dict(SMALL_CODEC)).eval()
    codes = codec.encode(torch.randn(2, 1, 5000) * 0.1)
    assert codes.shape == (2, 3, 3)  # ceil(5000 / 1920) frames, right edge zero-padded
    q = codec.project(codec.quantizer.embed(codes))
    codec.sync_code_embedding()
    with torch.no_grad():  # the folded code embedding (D=8 → H=16 projection) is the codebook path
        torch.testing.assert_close(codec.code2wav(codes), code2wav_from_embeddings(codec.code2wav, q), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple of 1920"):
        codec(torch.zeros(1, 1, 1000))
    wave_cfg = {**SMALL_CODEC, "encoder": {"frontend": "waveform", "channels": 2, "max_channels": 8, "residual_dilations": [1]}}
    wave = Codec(CodecConfig.from_dict(wave_cfg)).eval()  # the SEANet-style alternative: strides (3, 4, 5, 8, 2, 2)
    assert wave.cfg.encoder_strides == (3, 4, 5, 8, 2, 2) and wave.encode(torch.randn(1, 1, 3840)).shape == (1, 3, 2)
    assert codec.cfg.encoder_strides == (2, 2, 2)  # mel frames every 240 samples, ×8 to 1920
    with pytest.raises(ConfigError, match="frontend must be 'mel' or 'waveform'"):
        CodecConfig.from_dict({**SMALL_CODEC, "encoder": {"frontend": "stft"}})
    with pytest.raises(ConfigError, match="unknown keys"):
        CodecConfig.from_dict({**SMALL_CODEC, "encoder": {"chanels": 4}})
    with pytest.raises(ConfigError, match="downsample by 960"):
        CodecConfig.from_dict({**SMALL_CODEC, "encoder": {"frontend": "waveform", "strides": [3, 4, 5, 8, 2]}})
    with pytest.raises(ConfigError, match="unknown keys for recipe codec: \\['batchsize'\\]"):
        CodecTrainConfig.from_dict({"output_dir": "x", "data": "y", "batchsize": 3})
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"audio": os.path.join(speech_dir, "speech_000.wav")}) + "\n"
                     + json.dumps({"audio": "missing.wav"}) + "\n"
                     + json.dumps([{"role": "user", "content": [{"type": "audio", "audio": "speech_001.wav"}]}]) + "\n")
    with pytest.raises(CodecDataError, match=r"rows.jsonl:2: audio file .*missing.wav' does not exist"):
        load_corpus(str(jsonl))
    shutil.copy(os.path.join(speech_dir, "speech_001.wav"), tmp_path / "speech_001.wav")
    corpus = load_corpus(str(jsonl), skip_bad_rows=True)
    assert len(corpus.clips) == 2 and len(corpus.skipped) == 1 and "rows.jsonl:2" in corpus.skipped[0]
    # The Talker of the base checkpoint must emit this codec's codebooks.
    with pytest.raises(ConfigError, match="num_code_groups is 16 but the codec has 3"):
        from thinktalk.codec.export import check_talker_fits

        check_talker_fits(codec.cfg, TINY_QWEN3_OMNI, "config.json")


def test_roundtrip_script_runs_on_tiny_weights(tiny_mimi, tiny3_weights):  # noqa: F811
    """The real-weights check, on tiny random stand-ins: it runs end to end (its numbers mean nothing here)."""
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "check_codec_roundtrip.py")
    res = subprocess.run([sys.executable, script, "--mimi", tiny_mimi[0], "--qwen3", tiny3_weights, "--espeak", "Hello there."],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["frames"] > 0 and report["decoded_samples"] == 1920 * report["frames"] - 555
    assert {"snr_db", "mel_distance", "mel_distance_random_codes", "mel_distance_codebook0_only"} <= set(report)


def test_thinktalk_train_runs_the_codec_recipe(tmp_path, speech_dir):
    """`thinktalk train recipes/codec_tiny.yaml ...` is the codec recipe of the one training command."""
    import json

    from thinktalk.cli import main

    out = tmp_path / "run"
    rc = main(["train", "recipes/codec_tiny.yaml", f"data=[{speech_dir}]", f"output_dir={out}", "max_steps=2",
               "eval_every=0", "save_every=0", "batch_size=2"])  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rc == 0 and [r["step"] for r in rows if "loss" in r][-1] == 2
