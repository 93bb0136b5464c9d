"""The GA Realtime API with the official ``openai`` SDK's realtime client, unmodified, against a live server:
hands-free turns with server VAD (the real Silero model), barge-in, truncation, errors, tools."""

from __future__ import annotations

import base64
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
pytest.importorskip("websockets")
pytest.importorskip("silero_vad")
pytest.register_assert_rewrite("tests.serve_helpers")

from tests.serve_helpers import b64, espeak_wav, pcm16_24k, start_server, wait_idle  # noqa: E402

pytest_plugins = ["tests.serve_helpers"]
CHUNK = 2400 * 2  # 100 ms of pcm16 at 24 kHz, as a microphone sends it
SILENCE = b"\0\0" * 24000


def client_for(url: str):
    ws = url.replace("http://", "ws://") + "/v1"
    return openai.OpenAI(api_key="unused", base_url=url + "/v1", websocket_base_url=ws)


def vad_session(**turn) -> dict:
    td = {"type": "server_vad", "silence_duration_ms": 400, "prefix_padding_ms": 200, **turn}
    return {"type": "realtime", "output_modalities": ["audio"], "instructions": "Answer briefly.",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": td},
                      "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "Ethan"}},
            "max_output_tokens": 8}  # fmt: skip


class Mic:
    """Streams pcm16 to the connection at real-time pace from a thread (as a microphone would)."""

    def __init__(self, conn, pcm: bytes):
        self.conn, self.pcm = conn, pcm
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.done = threading.Event()
        self.thread.start()

    def _run(self):
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(self.pcm), CHUNK)):
            self.conn.input_audio_buffer.append(audio=b64(self.pcm[i : i + CHUNK]))
            time.sleep(max(0.0, t0 + (k + 1) * 0.1 - time.monotonic()))
        self.done.set()

    def join(self):
        self.thread.join(30)


def until(conn, kind: str, timeout: float = 60, seen: list | None = None) -> list:
    """Events (SDK models, with their arrival time as ``.t``) up to and including the first of type ``kind``."""
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = conn.recv()
        object.__setattr__(ev, "_t", time.monotonic())
        out.append(ev)
        if seen is not None:
            seen.append(ev)
        if ev.type == kind:
            return out
    raise AssertionError(f"no {kind} within {timeout} s; saw {[e.type for e in out]}")


@pytest.fixture(scope="module")
def question(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("rt_ga")
    return pcm16_24k(espeak_wav("What time is it?", str(d / "q.wav")))


def test_sdk_hands_free_turn(server, question):
    """Speech streamed at real-time pace, no commit: the server's VAD ends the turn and the answer is spoken."""
    from openai.types.realtime import InputAudioBufferSpeechStoppedEvent, ResponseAudioDeltaEvent, SessionUpdatedEvent

    with client_for(server.url).realtime.connect(model=server.model_name) as conn:
        assert conn.recv().type == "session.created"
        session = vad_session()
        session["audio"]["input"]["transcription"] = {"model": "whisper-1", "language": "en"}
        conn.session.update(session=session)
        updated = until(conn, "session.updated")[-1]
        assert isinstance(updated, SessionUpdatedEvent)
        assert updated.session.type == "realtime" and updated.session.output_modalities == ["audio"]
        assert updated.session.audio.input.turn_detection.silence_duration_ms == 400
        assert updated.session.audio.output.voice == "Ethan"

        mic = Mic(conn, SILENCE[:24000] + question + SILENCE * 1)  # 0.5 s lead-in, speech, 1 s of silence
        events = until(conn, "response.done", timeout=60)
        mic.join()
        kinds = [e.type for e in events]
        for k in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                  "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done",
                  "response.created", "response.output_item.added", "response.content_part.added",
                  "response.output_audio.delta", "response.output_audio_transcript.done",
                  "response.output_audio.done", "response.output_item.done"):  # fmt: skip
            assert k in kinds, (k, kinds)
        assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.speech_stopped")
        assert not any(k.startswith("response.audio") for k in kinds)  # GA names only
        started = next(e for e in events if e.type == "input_audio_buffer.speech_started")
        stopped = next(e for e in events if e.type == "input_audio_buffer.speech_stopped")
        assert isinstance(stopped, InputAudioBufferSpeechStoppedEvent)
        speech_ms = len(question) / 48
        assert 300 <= started.audio_start_ms <= 800, started  # the speech begins 500 ms in
        assert started.audio_start_ms + 0.5 * speech_ms < stopped.audio_end_ms < 500 + speech_ms + 400
        committed = next(e for e in events if e.type == "input_audio_buffer.committed")
        assert committed.item_id == started.item_id == stopped.item_id
        deltas = [e for e in events if e.type == "response.output_audio.delta"]
        assert isinstance(deltas[0], ResponseAudioDeltaEvent)
        audio = b"".join(base64.b64decode(e.delta) for e in deltas)
        assert len(audio) == 24000 * 2  # max_speech_seconds = 1 s
        done = events[-1].response
        assert done.status in ("completed", "incomplete")
        assert done.output[0].content[0].type == "output_audio"
        transcribed = [e for e in events if e.type == "conversation.item.input_audio_transcription.completed"]
        if not transcribed:  # done by the model too, alongside the answer: it may come after it
            transcribed = until(conn, "conversation.item.input_audio_transcription.completed")[-1:]
        assert transcribed[0].item_id == committed.item_id and isinstance(transcribed[0].transcript, str)
        latency = deltas[0]._t - stopped._t
        print(f"first audio after speech_stopped (client side): {latency * 1000:.0f} ms")
        assert latency < 3.0
    wait_idle(server.url)


def test_sdk_barge_in_and_truncate(serve_model, question):
    """Speech during an answer cancels it (output_audio_buffer.cleared) and becomes the next turn; truncate cuts
    the interrupted item to what was played."""
    srv = start_server(serve_model, slow_s=0.03, max_speech_seconds=6.0)
    try:
        with client_for(srv.url).realtime.connect(model="tiny") as conn:
            conn.recv()
            conn.session.update(session={**vad_session(), "max_output_tokens": 32})
            until(conn, "session.updated")
            mic = Mic(conn, question + SILENCE)
            first = until(conn, "response.output_audio.delta")
            mic.join()
            answer_id = first[-1].item_id
            mic = Mic(conn, question + SILENCE)  # the user talks over the answer
            events = until(conn, "response.done", timeout=30)
            kinds = [e.type for e in events]
            assert "input_audio_buffer.speech_started" in kinds and "output_audio_buffer.cleared" in kinds, kinds
            barge = kinds.index("input_audio_buffer.speech_started")
            # cancelled within a step: at most a few audio chunks were already on their way
            assert kinds[barge:].count("response.output_audio.delta") <= 2, kinds[barge:]
            done = events[-1].response
            assert done.status == "cancelled" and done.status_details.reason == "turn_detected"
            played = sum(
                len(base64.b64decode(e.delta)) for e in first + events if e.type == "response.output_audio.delta"
            )
            played_ms = played // 48
            conn.conversation.item.truncate(item_id=answer_id, content_index=0, audio_end_ms=played_ms // 2)
            truncated = until(conn, "conversation.item.truncated")[-1]
            assert truncated.item_id == answer_id and truncated.audio_end_ms == played_ms // 2
            conn.conversation.item.retrieve(item_id=answer_id)
            kept = until(conn, "conversation.item.retrieved")[-1].item.content[0].transcript
            heard = next(e for e in events if e.type == "response.output_audio_transcript.done").transcript
            assert len(kept) <= len(heard) and heard.startswith(kept)  # cut to what was heard
            # the second utterance ends and becomes a turn; answered in text (a 6 s spoken answer is slow here)
            conn.session.update(session={"audio": {"input": {"turn_detection": {"type": "server_vad",
                                         "silence_duration_ms": 400, "create_response": False}}}})  # fmt: skip
            events = until(conn, "conversation.item.done", timeout=30)
            mic.join()
            assert "input_audio_buffer.speech_stopped" in [e.type for e in events]
            conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 3})
            events = until(conn, "response.done", timeout=30)
            assert events[-1].response.status in ("completed", "incomplete")
            conn.conversation.item.truncate(item_id=answer_id, content_index=0, audio_end_ms=10**7)
            err = until(conn, "error")[-1]
            assert "past the item's audio" in err.error.message
        wait_idle(srv.url, timeout=10)
    finally:
        srv.stop()


def test_sdk_errors_keep_the_session(server):
    """Malformed events, garbage audio and oversized appends get error events; the session goes on."""
    with client_for(server.url).realtime.connect(model=server.model_name) as conn:
        conn.recv()
        conn.session.update(session=vad_session())
        until(conn, "session.updated")
        bad = [
            (dict(type="input_audio_buffer.append", audio=b64(b"\x01\x02\x03")), "2 bytes per sample"),
            (dict(type="input_audio_buffer.append", audio="not base64!"), "base64"),
            (dict(type="input_audio_buffer.append", audio=b64(b"\0\0" * 24000 * 9)), "over the 8 s"),
            (dict(type="session.update", session={"type": "transcription"}), "only 'realtime' sessions"),
            (dict(type="session.update", session={"audio": {"input": {"format": {"type": "audio/pcmu"}}}}), "audio/pcm"),
            (dict(type="session.update", session={"audio": {"input": {"turn_detection": {"type": "server_vad",
                                                                                          "threshold": 2}}}}), "between 0 and 1"),
            (dict(type="session.update", session={"tools": [{"type": "function", "name": "f"}]}), "tools"),
            (dict(type="conversation.item.truncate", item_id="nope", content_index=0, audio_end_ms=5), "no item"),
            (dict(type="conversation.item.create", item={"type": "function_call_output", "call_id": "c1"}), "output"),
        ]  # fmt: skip
        for event, text in bad:
            conn.send(event)
            err = until(conn, "error")[-1]
            assert text in err.error.message, (event, err.error.message)
        rng = np.random.default_rng(0)
        noise = (rng.standard_normal(24000) * 30).astype("<i2").tobytes()  # low noise: not speech
        for i in range(0, len(noise), CHUNK):
            conn.input_audio_buffer.append(audio=b64(noise[i : i + CHUNK]))
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "hi"}]})  # fmt: skip
        added = until(conn, "conversation.item.done")
        assert not any(e.type == "input_audio_buffer.speech_started" for e in added)
        conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 3})
        events = until(conn, "response.done")
        assert any(e.type == "response.output_text.delta" for e in events)
        assert events[-1].response.status in ("completed", "incomplete")


def test_sdk_idle_timeout_asks_for_a_response(server):
    """idle_timeout_ms: that much audio without speech after an answer -> timeout_triggered and a new response."""
    with client_for(server.url).realtime.connect(model=server.model_name) as conn:
        conn.recv()
        session = vad_session(idle_timeout_ms=1000)
        session["output_modalities"] = ["text"]
        conn.session.update(session={**session, "max_output_tokens": 2})
        assert until(conn, "session.updated")[-1].session.audio.input.turn_detection.idle_timeout_ms == 1000
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "hi"}]})  # fmt: skip
        conn.response.create()
        until(conn, "response.done")
        mic = Mic(conn, SILENCE + SILENCE[:24000])  # 1.5 s of silence
        events = until(conn, "response.done", timeout=30)
        mic.join()
        kinds = [e.type for e in events]
        assert "input_audio_buffer.timeout_triggered" in kinds and "input_audio_buffer.speech_started" not in kinds
        timeout = events[kinds.index("input_audio_buffer.timeout_triggered")]
        assert timeout.audio_end_ms - timeout.audio_start_ms >= 1000
        assert kinds.index("input_audio_buffer.timeout_triggered") < kinds.index("response.created")


def test_sdk_turn_read_while_spoken_equals_read_at_the_end(serve_model, tmp_path):
    """With server VAD the turn's audio is read into the engine while it is spoken (prefill_only requests): the
    answer's prompt then reuses it, and the answer is the one read at the end gives."""
    from tests.serve_helpers import metrics

    pcm = pcm16_24k(espeak_wav("What time is it now in the city of Paris?", str(tmp_path / "long.wav")))
    out = {}
    for ahead in (True, False):
        srv = start_server(serve_model, realtime_prefill_while_speaking=ahead)
        try:
            with client_for(srv.url).realtime.connect(model="tiny") as conn:
                conn.recv()
                conn.session.update(session={**vad_session(), "output_modalities": ["text"]})
                until(conn, "session.updated")
                mic = Mic(conn, pcm + SILENCE)
                events = until(conn, "response.done", timeout=60)
                mic.join()
                text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
                out[ahead] = (text, events[-1].response.usage.input_tokens, metrics(srv.url))
        finally:
            srv.stop()
    (text1, n1, m1), (text0, n0, m0) = out[True], out[False]
    assert text1 == text0 and text1 and n1 == n0
    turn_tokens = len(pcm) / 48 / 40  # ~25 audio tokens per second
    assert m1.get("thinktalk_prompt_tokens_reused_total", 0) > 0.5 * turn_tokens  # most of the turn was read ahead
    assert m0.get("thinktalk_prompt_tokens_reused_total", 0) == 0
