"""Server VAD: the session's turn_detection object, and the Silero model (the silero-vad package's own) with
the turn logic on real speech (espeak-ng), silence and noise."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("silero_vad")

from tests.serve_helpers import espeak_wav  # noqa: E402
from thinktalk.serve.errors import APIError  # noqa: E402
from thinktalk.serve.vad import TurnDetection, VoiceActivity  # noqa: E402


def test_turn_detection_parse():
    assert TurnDetection.parse(None, "td") is None
    td = TurnDetection.parse({"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 300}, "td")
    assert td.threshold == 0.6 and td.silence_duration_ms == 300 and td.prefix_padding_ms == 300
    assert td.to_json()["type"] == "server_vad" and td.to_json()["idle_timeout_ms"] is None
    for bad, param in [({"type": "semantic_vad"}, "td.type"), ({"threshold": 1.5}, "td.threshold"),
                       ({"silence_duration_ms": 5}, "td.silence_duration_ms"), ({"create_response": 1}, "td.create_response"),
                       ({"idle_timeout_ms": 10}, "td.idle_timeout_ms"), ({"eagerness": "low"}, "td.eagerness"), ("x", "td")]:  # fmt: skip
        with pytest.raises(APIError) as e:
            TurnDetection.parse(bad, "td")
        assert e.value.param == param, (bad, e.value.param)


def speech_16k(tmp_path, text: str) -> np.ndarray:
    from thinktalk.serve import media

    with open(espeak_wav(text, str(tmp_path / "s.wav")), "rb") as fh:
        return media.decode_audio(fh.read(), "wav", "file", 60)


def feed_in_chunks(vad: VoiceActivity, audio: np.ndarray, chunk: int) -> list[tuple[str, int]]:
    events = []
    for i in range(0, len(audio), chunk):
        events += vad.feed(audio[i : i + chunk])
    return events


def test_silero_turns_on_speech_not_on_silence_or_noise(tmp_path):
    speech = speech_16k(tmp_path, "What time is it?")
    lead, tail = np.zeros(8000, np.float32), np.zeros(16000, np.float32)
    audio = np.concatenate([lead, speech, tail])
    td = TurnDetection(silence_duration_ms=400)
    events = feed_in_chunks(VoiceActivity(td), audio, 1600)
    assert [k for k, _ in events] == ["speech_started", "speech_stopped"], events
    (_, start), (_, end) = events
    speech_ms = len(speech) / 16
    assert 300 <= start <= 700 and start + 0.5 * speech_ms <= end <= 500 + speech_ms + 100, events
    # the same audio in other chunk sizes: the same decisions (they depend on the audio, not on its pacing)
    assert feed_in_chunks(VoiceActivity(td), audio, 333) == events
    assert feed_in_chunks(VoiceActivity(td), audio, len(audio)) == events
    rng = np.random.default_rng(0)
    quiet = np.concatenate([np.zeros(16000, np.float32), (0.001 * rng.standard_normal(32000)).astype(np.float32)])
    assert feed_in_chunks(VoiceActivity(td), quiet, 1600) == []
    # the threshold matters: a stricter one opens the turn no earlier
    strict = feed_in_chunks(VoiceActivity(TurnDetection(threshold=0.99, silence_duration_ms=400)), audio, 1600)
    assert strict and strict[0][1] >= start, (strict, events)
