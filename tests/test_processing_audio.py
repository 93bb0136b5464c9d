"""Audio: log-mel features against WhisperFeatureExtractor, file decoding and resampling against the
reference's ``load_audio`` (soundfile + soxr, what librosa.load gives qwen-omni-utils users), and the
audio token counts against the reference processors' formulas."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import media  # noqa: E402

from thinktalk.processing import audio as A  # noqa: E402
from thinktalk.processing import load_audio  # noqa: E402

pytestmark = pytest.mark.skipif(not media.have_espeak(), reason="espeak-ng is needed to make test speech")


@pytest.fixture(scope="module")
def ref():
    return media.reference()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return media.tiny_processor_dir(str(tmp_path_factory.mktemp("ckpt")), "qwen3_omni_moe")


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    text = "The quick brown fox jumps over the lazy dog, twice, while the band plays."
    return {
        22050: media.speech_wav(str(root / "s22.wav"), text),  # espeak-ng's own rate
        44100: media.speech_wav(str(root / "s44.wav"), text, sample_rate=44100),
        16000: media.speech_wav(str(root / "s16.wav"), text, sample_rate=16000),
        "stereo": media.speech_wav(str(root / "st.wav"), text, sample_rate=48000, channels=2),
    }


@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_log_mel_matches_whisper_feature_extractor(ref, ckpt, speech, padding):
    waves = [
        ref("load_audio", speech[16000]),
        ref("load_audio", speech[22050])[:20000],
        A.resample(media.tone(0.73, 16000), 16000, 16000),
    ]
    # The checkpoint's extractor: chunk_length 300 (Qwen2.5-Omni pads to it, Qwen3-Omni to the longest).
    theirs = ref(
        "features",
        ckpt,
        waves,
        sampling_rate=16000,
        padding=padding,
        return_attention_mask=True,
        truncation=padding == "max_length",
    )
    config = A.AudioFeatureConfig.from_dict({"chunk_length": 300, "feature_size": 128})
    features, mask = A.extract_features(waves, config, padding)
    assert features.dtype == theirs["input_features"].dtype and features.shape == theirs["input_features"].shape
    torch.testing.assert_close(features, theirs["input_features"], atol=1e-5, rtol=1e-5)
    assert mask.dtype == theirs["attention_mask"].dtype
    assert torch.equal(mask, theirs["attention_mask"])
    # a frame counts when its first sample is real; the last partial frame of the padded batch is dropped
    frames = features.shape[-1]
    assert mask.sum(-1).tolist() == [min(math.ceil(len(w) / 160), frames) for w in waves]


def test_mel_filter_bank_is_whispers(ref, ckpt):
    ours = A.mel_filter_bank(201, 128, 0.0, 8000.0, 16000)
    theirs = torch.from_numpy(ref("mel_filters", ckpt)).float()
    torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("rate", [22050, 44100, 16000, "stereo"])
def test_wav_resampling_matches_reference(ref, speech, rate):
    ours = load_audio(speech[rate])
    theirs = ref("load_audio", speech[rate])
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
    if rate != 16000:
        import soundfile as sf

        info = sf.info(speech[rate])
        assert len(ours) == math.ceil(info.frames * 16000 / info.samplerate)


@pytest.mark.parametrize("ext", ["flac", "ogg", "mp3"])
def test_other_formats_match_reference(ref, speech, tmp_path, ext):
    path = media.convert_audio(speech[22050], str(tmp_path / f"speech.{ext}"))
    ours = load_audio(path)
    theirs = ref("load_audio", path)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)


def test_m4a_through_ffmpeg(speech, tmp_path):
    """Formats libsndfile cannot read go through PyAV; the result is the same speech at 16 kHz."""
    import av

    wav = load_audio(speech[16000])
    path = str(tmp_path / "speech.m4a")
    with av.open(path, "w") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        data = wav[None]
        for start in range(0, data.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(data[:, start : start + 1024]), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 16000, start
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    decoded = load_audio(path)
    assert abs(len(decoded) - len(wav)) <= 2048  # AAC priming/padding
    # aligned, the codec's copy is close to the original (lossy, so only a correlation check)
    best = max(np.corrcoef(wav[: len(wav) - 2048], decoded[o : o + len(wav) - 2048])[0, 1] for o in range(0, 2048, 8))
    assert best > 0.9


def test_array_inputs_with_a_sample_rate(ref, speech):
    import soundfile as sf

    data, sr = sf.read(speech[44100], dtype="float32")
    np.testing.assert_allclose(load_audio(data, sampling_rate=sr), ref("load_audio", speech[44100]), atol=1e-6)
    np.testing.assert_array_equal(load_audio(torch.from_numpy(data[:16000])), data[:16000])


@pytest.mark.parametrize("family", ["qwen2_5_omni", "qwen3_omni_moe"])
def test_audio_token_counts_match_reference(ref, family):
    frames = [1, 2, 3, 4, 5, 7, 8, 99, 100, 101, 130, 199, 200, 250, 1000, 1001, 2999, 3000, 30000]
    from thinktalk.positions import audio_token_count, aut_token_count

    count = audio_token_count if family == "qwen2_5_omni" else aut_token_count
    assert [count(n) for n in frames] == ref("audio_token_counts", family, frames)


def test_qwen2_5_refuses_audio_over_the_window():
    config = A.AudioFeatureConfig(chunk_length=300)
    with pytest.raises(A.AudioTooLongError, match="300 s"):
        A.extract_features([np.zeros(300 * 16000 + 1, np.float32)], config, "max_length")
    # exactly 300 s is fine; Qwen3's "longest" padding has no window
    features, mask = A.extract_features(
        [np.zeros(2 * 16000, np.float32)], A.AudioFeatureConfig(chunk_length=2), "max_length"
    )
    assert features.shape == (1, 128, 200) and mask.sum() == 200


def test_max_length_features_equal_the_whole_padded_clip():
    """The max_length fast path (mel over the clip + one window, the rest filled) is the plain path's result:
    clips shorter than a window, around it, long, exactly the window, silent. Equal up to float rounding only:
    the STFT and mel matmul run on tensors of another length, and their blocking (so the last bit) differs by
    CPU; a wrong fill or a shifted frame differs by far more than 1e-5."""
    cfg = A.AudioFeatureConfig()
    rng = np.random.default_rng(0)
    lengths = (1, 399, 400, 401, 24_000, 16000 * 29 + 123, 16000 * 30 - 100, 16000 * 30)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths] + [np.zeros(8000, np.float32)]
    fast, mask = A.extract_features(waves, cfg, "max_length")
    batch, sample_mask = A.pad_waveforms(waves, cfg, "max_length")
    plain = A.log_mel_spectrogram(batch, cfg)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
    assert torch.equal(mask, A.frame_mask(sample_mask, cfg.hop_length))
    with pytest.raises(A.AudioTooLongError):
        A.extract_features([np.zeros(16000 * 30 + 1, np.float32)], cfg, "max_length")
