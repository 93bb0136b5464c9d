"""Media errors (each names the file), the pure sizing/sampling/interleaving functions, the tokenizer,
and the tiny checkpoint's tokenizer files."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import media  # noqa: E402

from thinktalk.processing import (  # noqa: E402
    AudioDecodeError,
    EmptyAudioError,
    ImageDecodeError,
    ImageTooLargeError,
    MediaError,
    Processor,
    Tokenizer,
    VideoDecodeError,
    load_audio,
    load_image,
    load_video,
    smart_resize,
)
from thinktalk.processing.processor import chunk_boundaries, interleave_qwen2_5, interleave_qwen3  # noqa: E402
from thinktalk.processing.video import frame_indices, read_video, smart_nframes  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return media.tiny_processor_dir(str(tmp_path_factory.mktemp("ckpt")), "qwen2_5_omni")


@pytest.fixture(scope="module")
def proc(ckpt):
    return Processor.from_pretrained(ckpt)


def user(item):
    return [{"role": "user", "content": [item, {"type": "text", "text": "?"}]}]


# ---------------------------------------------------------------------------------------------------
# Errors


def test_corrupt_audio_file(tmp_path, proc):
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(300))
    with pytest.raises(AudioDecodeError, match="broken.wav"):
        load_audio(str(path))
    with pytest.raises(AudioDecodeError, match="broken.wav"):
        proc(user({"type": "audio", "audio": str(path)}))
    text = tmp_path / "notes.mp3"
    text.write_text("this is not audio at all " * 20)
    with pytest.raises(AudioDecodeError, match="notes.mp3"):
        load_audio(str(text))


def test_empty_audio(tmp_path, proc):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(EmptyAudioError, match="empty.wav"):
        proc(user({"type": "audio", "audio": str(empty)}))
    import soundfile as sf

    silent = tmp_path / "no_samples.wav"
    sf.write(str(silent), np.zeros(0, np.float32), 16000)
    with pytest.raises(EmptyAudioError, match="no_samples.wav"):
        load_audio(str(silent))
    with pytest.raises(EmptyAudioError):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(AudioDecodeError, match="missing.wav"):
        load_audio(str(tmp_path / "missing.wav"))


def test_unreadable_image(tmp_path, proc):
    path = tmp_path / "picture.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    with pytest.raises(ImageDecodeError, match="picture.png"):
        proc(user({"type": "image", "image": str(path)}))
    truncated = tmp_path / "cut.png"
    full = media.png(str(tmp_path / "full.png"), 64, 64)
    truncated.write_bytes(open(full, "rb").read()[:200])
    with pytest.raises(ImageDecodeError, match="cut.png"):
        load_image(str(truncated))


def test_image_over_the_pixel_limit(tmp_path, ckpt):
    path = media.png(str(tmp_path / "huge.png"), 300, 200)
    small_limit = Processor.from_pretrained(ckpt, max_image_pixels=200 * 200)
    with pytest.raises(ImageTooLargeError, match="huge.png"):
        small_limit(user({"type": "image", "image": path}))
    with pytest.raises(ImageTooLargeError, match="aspect ratio"):
        load_image(np.zeros((2, 500, 3), np.uint8))
    assert isinstance(load_image(path, max_image_pixels=300 * 200).size, tuple)


def test_unsupported_or_corrupt_video(tmp_path, proc):
    garbage = tmp_path / "clip.mp4"
    garbage.write_bytes(os.urandom(4000))
    with pytest.raises(VideoDecodeError, match="clip.mp4"):
        proc(user({"type": "video", "video": str(garbage)}))
    if media.have_espeak():
        wav = media.speech_wav(str(tmp_path / "voice.wav"), "no pictures here")
        with pytest.raises(VideoDecodeError, match="voice.wav.*no video stream"):
            load_video(wav)
    short = media.mp4(str(tmp_path / "one_frame.mp4"), seconds=0.1, fps=10)
    with pytest.raises(VideoDecodeError, match="one_frame.mp4"):
        load_video(short)
    with pytest.raises(VideoDecodeError):
        load_video(np.zeros((0, 4, 4, 3), np.uint8))


def test_errors_are_value_errors_and_media_errors(tmp_path):
    path = tmp_path / "x.wav"
    path.write_bytes(b"junk")
    with pytest.raises(MediaError):
        load_audio(str(path))
    with pytest.raises(ValueError):
        load_audio(str(path))


def test_bad_conversations(proc):
    with pytest.raises(ValueError, match="role"):
        proc([{"content": "hi"}])
    with pytest.raises(ValueError, match="unknown content item type"):
        proc([{"role": "user", "content": [{"type": "smell", "smell": "roses"}]}])
    with pytest.raises(ValueError, match="needs a source"):
        proc([{"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(ValueError, match="placeholder"):
        proc.process("<|vision_bos|><|IMAGE|><|vision_eos|>", images=[])


# ---------------------------------------------------------------------------------------------------
# Pure functions


def test_smart_resize_matches_reference():
    ref = media.reference()
    for h, w in [(70, 100), (28, 28), (10, 10), (1080, 1920), (3000, 40), (333, 777), (56, 5000)]:
        for factor, lo, hi in [(28, 3136, 12845056), (32, 128 * 32 * 32, 768 * 32 * 32), (28, 100352, 602112)]:
            assert smart_resize(h, w, factor, lo, hi) == tuple(
                ref("smart_resize", h, w, factor=factor, min_pixels=lo, max_pixels=hi)
            ), (h, w, factor)


def test_frame_sampling_rule():
    # qwen-omni-utils: fps 2, even count, 4..768 frames, never more than the clip has
    assert smart_nframes(300, 30.0) == 20
    assert smart_nframes(30, 10.0) == 6
    assert smart_nframes(12, 10.0) == 4
    assert smart_nframes(5, 10.0) == 4
    assert smart_nframes(30, 10.0, fps=1.0) == 4
    assert smart_nframes(300, 10.0, nframes=9) == 8  # round to even: 9 -> 8 (half to even)
    assert smart_nframes(100000, 30.0) == 768
    with pytest.raises(ValueError):
        smart_nframes(1, 10.0)
    assert frame_indices(0, 29, 6) == [0, 6, 12, 17, 23, 29]


def test_video_sampling_and_range(tmp_path):
    path = media.mp4(str(tmp_path / "v.mp4"), seconds=4.0, fps=10)
    whole = read_video(path)
    assert whole.frames.shape[0] == 8 and whole.fps == 2.0 and whole.total_frames == 40
    cut = read_video(path, video_start=1.0, video_end=3.0, fps=2.0)
    assert cut.frames.shape[0] == 4
    np.testing.assert_array_equal(cut.frames[0], read_video(path, nframes=40).frames[10])
    few = read_video(path, nframes=4)
    assert few.frames.shape[0] == 4


def test_chunking_and_interleaving():
    assert chunk_boundaries(np.array([0, 25, 50, 75, 100]), 50) == [(0, 2), (2, 4), (4, 5)]
    # the reference advances one chunk per boundary even when times jump
    assert chunk_boundaries(np.array([0, 200]), 50) == [(0, 1), (1, 2)]
    video_times = np.repeat(np.arange(3), 2) * 1.0 * 25  # 3 grids of 2 tokens, 1 s each
    assert interleave_qwen2_5(video_times, 120, 50) == [
        ("video", 4),
        ("audio", 50),
        ("video", 2),
        ("audio", 50),
        ("audio", 20),
    ]
    assert interleave_qwen3(np.repeat(np.arange(2), 2) * 2.0 * 13, 30) == [
        ("video", 2),
        ("audio", 26),
        ("video", 2),
        ("audio", 4),
    ]


# ---------------------------------------------------------------------------------------------------
# Tokenizer and the tiny checkpoint files


def test_tokenizer_matches_reference(ckpt):
    ref = media.reference()
    tok = Tokenizer.from_pretrained(ckpt, family="qwen2_5_omni")
    samples = [
        "Hello, world! How are you?",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
        "naïve café, 中文, emoji 🙂, numbers 1234567 and   spaces\t\n\n",
        "I'm sure they'll say we've done it.",
        "<|audio_bos|><|AUDIO|><|audio_eos|><|vision_bos|><|IMAGE|><|vision_eos|>",
    ]
    for text in samples:
        ids = tok.encode(text)
        assert ids == ref("encode", ckpt, text)
        assert tok.decode(ids, skip_special_tokens=False) == ref("decode", ckpt, ids, skip_special_tokens=False)
        assert tok.decode(ids) == ref("decode", ckpt, ids, skip_special_tokens=True)


def test_tokenizer_from_vocab_and_merges(ckpt, tmp_path):
    import shutil

    copy = tmp_path / "no_tokenizer_json"
    shutil.copytree(ckpt, copy)
    os.remove(copy / "tokenizer.json")
    a = Tokenizer.from_pretrained(ckpt, family="qwen2_5_omni")
    b = Tokenizer.from_pretrained(str(copy), family="qwen2_5_omni")
    for text in ["Hello there, <|im_start|>user\nWhat's this?<|im_end|>", "naïve 中文 42"]:
        assert a.encode(text) == b.encode(text)
        assert b.decode(b.encode(text), skip_special_tokens=False) == text


def test_tiny_tokenizer_files_are_deterministic_and_official(tmp_path):
    from thinktalk.testing.tokenizer import write_tokenizer_files

    for family in ("qwen2_5_omni", "qwen3_omni_moe"):
        a, b = tmp_path / f"a_{family}", tmp_path / f"b_{family}"
        write_tokenizer_files(str(a), family)
        write_tokenizer_files(str(b), family)
        for name in os.listdir(a):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
        tok = Tokenizer.from_pretrained(str(a), family=family)
        assert tok.token_to_id("<|endoftext|>") == 151643
        assert tok.token_to_id("<|im_start|>") == 151644 and tok.token_to_id("<|im_end|>") == 151645
        assert tok.token_to_id(tok.mm_tokens["image_token"]) == 151655
        assert tok.token_to_id(tok.mm_tokens["video_token"]) == 151656
        assert tok.token_to_id(tok.mm_tokens["vision_bos_token"]) == 151652
        if family == "qwen2_5_omni":
            assert [tok.token_to_id(t) for t in ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")] == [
                151646,
                151647,
                151648,
            ]
        else:
            assert [tok.token_to_id(t) for t in ("<|audio_pad|>", "<|audio_start|>", "<|audio_end|>")] == [
                151675,
                151669,
                151670,
            ]
            assert tok.token_to_id("<tts_pad>") == 151671
        merges = (a / "merges.txt").read_text().splitlines()[1:]
        assert 200 <= len(merges) <= 400
        config = json.loads((a / "tokenizer_config.json").read_text())
        assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"


@pytest.mark.parametrize("family", ["qwen2_5_omni", "qwen3_omni_moe"])
def test_reference_loads_the_tiny_files(tmp_path, family):
    ref = media.reference()
    directory = media.tiny_processor_dir(str(tmp_path), family)
    info = ref("describe", directory)
    assert info["processor"] == ("Qwen2_5OmniProcessor" if family == "qwen2_5_omni" else "Qwen3OmniMoeProcessor")
    assert info["tokenizer"] == "Qwen2Tokenizer" and info["feature_extractor"] == "WhisperFeatureExtractor"
    proc = Processor.from_pretrained(directory)
    assert info["token_ids"] == {
        "image_token_id": proc.image_token_id,
        "audio_token_id": proc.audio_token_id,
        "video_token_id": proc.video_token_id,
    }
    assert info["eos_token_id"] == 151645 and info["pad_token_id"] == 151643


def test_family_from_config(tmp_path, ckpt):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(ckpt, copy)
    (copy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="llama"):
        Processor.from_pretrained(str(copy))
    os.remove(copy / "config.json")
    assert Processor.from_pretrained(str(copy)).family == "qwen2_5_omni"  # from processor_class


def test_feature_dtypes_without_reference(proc):
    out = proc.process("<|audio_bos|><|AUDIO|><|audio_eos|>", audio=[np.zeros(16000, np.float32)])
    assert out["input_features"].dtype == torch.float32 and out["feature_attention_mask"].dtype == torch.int32
    assert out["input_features"].shape == (1, 128, 30000)
    assert int((out["input_ids"] == proc.audio_token_id).sum()) == 25
