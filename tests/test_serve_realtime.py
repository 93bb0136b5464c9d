"""The realtime WebSocket on a real server: an audio turn streamed back, cancel, barge-in, errors, auth."""

from __future__ import annotations

import base64
import json
import time

import pytest

pytest.importorskip("fastapi")
websockets = pytest.importorskip("websockets")
pytest.register_assert_rewrite("tests.serve_helpers")

from websockets.sync.client import connect  # noqa: E402

from tests.serve_helpers import b64, espeak_wav, pcm16_24k, start_server, wait_idle  # noqa: E402

pytest_plugins = ["tests.serve_helpers"]
SPEECH_SECONDS = 1.0


class Realtime:
    """A thin test client: send events, read events until a type shows up."""

    def __init__(self, url: str, subprotocols=("realtime",)):
        # Entered as a context manager (websockets wants that); __exit__ is close().
        self.ws = connect(url.replace("http://", "ws://") + "/v1/realtime", subprotocols=list(subprotocols),
                          open_timeout=10, max_size=2**24).__enter__()  # fmt: skip
        self.seen: list[dict] = []

    def send(self, **event) -> None:
        self.ws.send(json.dumps(event))

    def recv(self, timeout: float = 30) -> dict:
        event = json.loads(self.ws.recv(timeout=timeout))
        self.seen.append(event)
        return event

    def until(self, kind: str, timeout: float = 30) -> list[dict]:
        """Events up to and including the first of type ``kind``."""
        out, deadline = [], time.monotonic() + timeout
        while True:
            event = self.recv(max(0.1, deadline - time.monotonic()))
            out.append(event)
            if event["type"] == kind:
                return out

    def close(self) -> None:
        self.ws.close()


def test_realtime_audio_turn(server, tmp_path):
    rt = Realtime(server.url)
    try:
        created = rt.recv()
        assert created["type"] == "session.created" and created["session"]["voice"] == "Chelsie"
        rt.send(
            type="session.update", session={"voice": "ethan", "modalities": ["text", "audio"], "turn_detection": None}
        )
        updated = rt.until("session.updated")[-1]
        assert updated["session"]["voice"] == "Ethan"

        pcm = pcm16_24k(espeak_wav("What time is it?", str(tmp_path / "q.wav")))
        step = 2400 * 2  # 100 ms chunks, as a microphone would send them
        for i in range(0, len(pcm), step):
            rt.send(type="input_audio_buffer.append", audio=b64(pcm[i : i + step]))
        rt.send(type="input_audio_buffer.commit")
        committed = rt.until("conversation.item.created")
        assert committed[0]["type"] == "input_audio_buffer.committed"
        assert committed[-1]["item"]["role"] == "user"

        rt.send(type="response.create", response={"max_output_tokens": 8})
        events = rt.until("response.done", timeout=60)
        kinds = [e["type"] for e in events]
        assert kinds[0] == "response.created"
        done = events[-1]["response"]
        assert done["status"] in ("completed", "incomplete"), done
        audio = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.audio.delta")
        assert len(audio) == int(SPEECH_SECONDS * 24000) * 2
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.audio_transcript.delta")
        transcript = next(e for e in events if e["type"] == "response.audio_transcript.done")["transcript"]
        assert deltas == transcript and transcript
        assert done["output"][0]["content"][0]["transcript"] == transcript
        ids = {(e["response_id"], e["item_id"]) for e in events if e["type"] == "response.audio.delta"}
        assert ids == {(done["id"], done["output"][0]["id"])}
        first_tokens = done["usage"]["input_tokens"]

        # A text turn, answered in text only: the conversation (audio turn + answer) is kept.
        rt.send(type="conversation.item.create",
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And now?"}]})  # fmt: skip
        rt.until("conversation.item.created")
        rt.send(type="response.create", response={"modalities": ["text"], "max_output_tokens": 4})
        events = rt.until("response.done", timeout=60)
        assert not any(e["type"] == "response.audio.delta" for e in events)
        assert any(e["type"] == "response.text.delta" for e in events)
        assert events[-1]["response"]["usage"]["input_tokens"] > first_tokens
    finally:
        rt.close()
    wait_idle(server.url)


def test_realtime_errors_keep_the_session(server):
    rt = Realtime(server.url)
    try:
        rt.recv()
        bad = [
            ("{not json", "not valid json"),
            (json.dumps({"type": "no.such.event"}), "unsupported event"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}), "base64"),
            (json.dumps({"type": "input_audio_buffer.commit"}), "empty"),
            (json.dumps({"type": "response.create"}), "no user input"),
            (json.dumps({"type": "response.cancel"}), "no response in progress"),
            (json.dumps({"type": "session.update", "session": {"voice": "nobody"}}), "unknown voice"),
            (json.dumps({"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}}), "pcm16"),
            (json.dumps({"type": "session.update", "session": {"turn_detection": {"type": "semantic_vad"}}}), "turn"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": b64(b"\0\0" * 24000 * 9)}), "too long"),
            (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
                {"type": "input_image", "image_url": "data:image/png;base64," + b64(b"junk")}]}}), "not an image"),
        ]  # fmt: skip
        for raw, text in bad:
            rt.ws.send(raw)
            event = rt.recv()
            assert event["type"] == "error", (raw[:60], event)
            assert text in event["error"]["message"].lower(), (raw[:60], event)
        rt.send(type="conversation.item.create", event_id="evt_1",
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]})  # fmt: skip
        rt.until("conversation.item.created")
        rt.send(type="response.create", response={"modalities": ["text"], "max_output_tokens": 2})
        assert rt.until("response.done")[-1]["response"]["status"] in ("completed", "incomplete")
    finally:
        rt.close()


def test_realtime_cancel_and_barge_in(serve_model, tmp_path):
    """response.cancel stops an answer mid-stream; a new user turn (barge-in) does too."""
    srv = start_server(serve_model, slow_s=0.03, max_speech_seconds=6.0)
    rt = Realtime(srv.url)
    pcm = pcm16_24k(espeak_wav("Hello", str(tmp_path / "hello.wav")))
    try:
        rt.recv()
        rt.send(type="input_audio_buffer.append", audio=b64(pcm))
        rt.send(type="input_audio_buffer.commit")
        rt.until("conversation.item.created")
        rt.send(type="response.create", response={"max_output_tokens": 32})
        rt.until("response.audio.delta")
        rt.send(type="response.cancel")
        events = rt.until("response.done")
        done = events[-1]["response"]
        assert done["status"] == "cancelled" and done["status_details"]["type"] == "cancelled"

        rt.send(type="response.create", response={"max_output_tokens": 32})
        rt.until("response.audio.delta")
        rt.send(type="input_audio_buffer.append", audio=b64(pcm))
        rt.send(type="input_audio_buffer.commit")  # the user talks over the answer
        events = rt.until("response.done")
        assert events[-1]["response"]["status"] == "cancelled"
        if not any(e["type"] == "conversation.item.created" for e in events):
            events += rt.until("conversation.item.created")
        assert any(e["type"] == "input_audio_buffer.committed" for e in events)

        rt.send(type="response.create", response={"modalities": ["text"], "max_output_tokens": 3})
        assert rt.until("response.done")[-1]["response"]["status"] in ("completed", "incomplete")

        # Leaving mid-answer cancels it: nothing keeps running after the socket closes.
        rt.send(type="response.create", response={"max_output_tokens": 32})
        rt.until("response.audio.delta")
    finally:
        rt.close()
    try:
        wait_idle(srv.url, timeout=5)
    finally:
        srv.stop()


def test_realtime_auth(serve_model):
    srv = start_server(serve_model, api_keys=["sekret"], max_realtime_connections=1)
    try:
        rt = Realtime(srv.url)
        event = rt.recv()
        assert event["type"] == "error" and event["error"]["code"] == "invalid_api_key"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            rt.recv(timeout=5)
        assert closed.value.rcvd.code == 1008
        ok = Realtime(srv.url, subprotocols=("realtime", "openai-insecure-api-key.sekret"))
        assert ok.recv()["type"] == "session.created"
        second = Realtime(srv.url, subprotocols=("realtime", "openai-insecure-api-key.sekret"))
        event = second.recv()
        assert event["type"] == "error" and "too many realtime connections" in event["error"]["message"]
        second.close()
        ok.close()
    finally:
        srv.stop()
