"""Qwen2.5-Omni speech end to end: generate(return_audio=True) against the reference, streaming, and errors."""

from __future__ import annotations

import shutil

import pytest
import torch

import thinktalk
from thinktalk.models.qwen2_5_omni import talker as talking
from thinktalk.testing.speech import THINKER_EOS, reference_speech, synthetic_inputs
from thinktalk.testing.tiny import build_reference_checkpoint

TAME = 0.008  # see test_qwen25_token2wav: keeps the random vocoder out of clipping
SPEECH = {"talker_do_sample": False, "token2wav_num_steps": 3}


def tame(model) -> None:
    with torch.no_grad():
        model.token2wav.code2wav_bigvgan_model.conv_post.weight.mul_(TAME)


@pytest.fixture(scope="module")
def model(tiny25):
    m = thinktalk.load(tiny25)
    tame(m)
    return m


def snr_db(reference: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - x).pow(2).sum().clamp_min(1e-30)))


def test_generate_matches_reference(tiny25, model):
    from transformers import Qwen2_5OmniForConditionalGeneration

    ref = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(tiny25)).eval()
    tame(ref)
    inputs = synthetic_inputs("audio", seed=11)
    torch.manual_seed(21)  # the reference's only random draw (greedy everywhere) is the DiT's noise
    expected = reference_speech(
        ref, inputs, speaker="Ethan", thinker_max_new_tokens=8, thinker_do_sample=False,
        thinker_eos_token_id=list(THINKER_EOS), talker_max_new_tokens=30, **SPEECH,
    )
    n = talking.utterance_lengths(expected.codes, model.talker.eos_token_ids)[0]
    torch.manual_seed(21)
    noise = torch.randn(1, 2 * n, 80)
    res = model.generate(**inputs, speaker="ethan", max_new_tokens=8, talker_max_new_tokens=30, noise=noise,
                         return_audio=True, **SPEECH)
    assert torch.equal(res.text_ids, expected.text_ids)
    assert torch.equal(res.codes[0], expected.codes[0, :n])
    assert res.sample_rate == 24000 and res.audio[0].shape == expected.audio.shape == (n * 480,)
    assert res.audio[0].abs().max() < 1
    torch.testing.assert_close(res.audio[0], expected.audio, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def long_answer(model):
    """A 60-token answer spoken for up to 100 codes, offline and streamed with the same seed."""
    inputs = synthetic_inputs("text", seed=12)
    kw = {"max_new_tokens": 60, "eos_token_id": [-1], "talker_max_new_tokens": 100, "seed": 5, **SPEECH}
    offline = model.generate(**inputs, return_audio=True, **kw)
    # Without a tokenizer every token is a text event (random ids mostly decode to nothing).
    tokenizer, model.tokenizer = model.tokenizer, None
    try:
        events = list(model.stream(**inputs, speaker="Chelsie", **kw))
    finally:
        model.tokenizer = tokenizer
    return offline, events


def test_stream_speaks_before_the_thinker_is_done(long_answer):
    offline, events = long_answer
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done"
    text = [i for i, k in enumerate(kinds) if k == "text"]
    audio = [i for i, k in enumerate(kinds) if k == "audio"]
    assert len(text) == 60 and audio
    assert audio[0] < text[-1]  # audio arrives while the Thinker is still writing
    assert [e.token_ids[0] for e in events if e.kind == "text"] == offline.text_ids[0].tolist()


def test_stream_relation_to_offline(long_answer):
    offline, events = long_answer
    streamed = torch.cat([e.audio for e in events if e.kind == "audio"])
    wav = offline.audio[0]
    assert wav.numel() == offline.codes[0].numel() * 480 > 0
    assert streamed.shape == wav.shape  # same codes, same length
    assert snr_db(wav, streamed) > 50  # the bound of test_qwen25_token2wav, end to end
    # No clicks where audio pieces join: the stream matches offline there as well as anywhere.
    near = torch.zeros_like(wav, dtype=torch.bool)
    for b in torch.tensor([e.audio.numel() for e in events if e.kind == "audio"]).cumsum(0)[:-1].tolist():
        near[b - 240 : b + 240] = True
    assert snr_db(wav[near], streamed[near]) > 40


def test_unknown_speaker_lists_the_voices(model):
    inputs = synthetic_inputs("text", seed=13)
    with pytest.raises(ValueError, match="unknown speaker 'Nobody'; available: Chelsie, Ethan"):
        model.generate(**inputs, speaker="Nobody", return_audio=True, max_new_tokens=2)


def test_checkpoint_without_talker_refuses_audio(tmp_path):
    build_reference_checkpoint(str(tmp_path), seed=0, with_speech=False, extras=False)
    m = thinktalk.load(tmp_path)
    assert m.talker is None and not m.has_speech
    inputs = synthetic_inputs("text", seed=13)
    with pytest.raises(ValueError, match="no Talker/Token2Wav weights"):
        m.generate(**inputs, return_audio=True, max_new_tokens=2)
    assert m.generate(**inputs, max_new_tokens=2).text_ids.shape == (1, 2)


def test_checkpoint_without_voices_names_the_file(tiny25, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny25 / name, tmp_path / name)
    m = thinktalk.load(tmp_path)
    assert m.has_speech and m.speakers == {}
    with pytest.raises(ValueError, match="spk_dict.pt"):
        m.generate(**synthetic_inputs("text", seed=13), return_audio=True, max_new_tokens=2)


def test_empty_answer_has_no_speech(model):
    inputs = synthetic_inputs("text", seed=14)
    first = int(model.generate(**inputs, max_new_tokens=1).text_ids[0, 0])
    res = model.generate(**inputs, max_new_tokens=5, eos_token_id=[first], return_audio=True, **SPEECH)
    assert res.text_ids.tolist() == [[first]]
    assert res.codes[0].numel() == 0 and res.audio[0].numel() == 0
    events = list(model.stream(**inputs, max_new_tokens=5, eos_token_id=[first], speaker="Chelsie", **SPEECH))
    assert [e.kind for e in events] == ["done"]  # no text (the answer is empty), no audio
