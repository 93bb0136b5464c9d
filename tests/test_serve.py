"""The HTTP API on a real server (loopback, tiny checkpoint): OpenAI client, limits, errors, auth, overload."""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.register_assert_rewrite("tests.serve_helpers")
openai = pytest.importorskip("openai")

from tests.serve_helpers import (  # noqa: E402
    b64,
    espeak_wav,
    metrics,
    parse_wav,
    png_bytes,
    start_server,
    tone,
    wait_idle,
    wav_bytes,
)
from thinktalk.serve.server import ServeProcess  # noqa: E402

pytest_plugins = ["tests.serve_helpers"]

SPEECH_SECONDS = 1.0  # TEST_LIMITS["max_speech_seconds"]: the tiny Talker never ends on its own


def client(srv, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=60, **kw)


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def test_models_health_and_page(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [server.model_name]
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["voices"] == ["Chelsie", "Ethan"] and card["default_voice"] == "Chelsie"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert httpx.get(server.url + "/static/app.js").status_code == 200
    m = metrics(server.url)
    for name in ("thinktalk_queue_depth", "thinktalk_active_sessions", "thinktalk_first_audio_seconds_count"):
        assert name in m


def test_chat_text(server):
    res = client(server).chat.completions.create(model=server.model_name, max_tokens=8,
                                                 messages=[{"role": "user", "content": "Hello there"}])  # fmt: skip
    assert res.object == "chat.completion"
    msg = res.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str) and msg.content
    # Exact once model.stream's text events carry every token id (see the report): held-back tokens are lost now.
    assert 1 <= res.usage.completion_tokens <= 8
    assert res.usage.prompt_tokens > 10


def test_chat_audio_out(server):
    """Non-streaming and streaming answers with speech: valid audio of the announced rate and length."""
    c = client(server)
    messages = [{"role": "user", "content": "Say something nice."}]
    text = c.chat.completions.create(model=server.model_name, messages=messages, max_tokens=10)
    res = c.chat.completions.create(model=server.model_name, messages=messages, max_tokens=10,
                                    modalities=["text", "audio"], audio={"voice": "chelsie", "format": "wav"})  # fmt: skip
    audio = res.choices[0].message.audio
    assert res.choices[0].message.content is None  # OpenAI's shape: the text is the transcript
    assert audio.transcript == text.choices[0].message.content  # the Talker does not change the Thinker's answer
    rate, channels, width, frames = parse_wav(base64.b64decode(audio.data))
    assert (rate, channels, width) == (24000, 1, 2)
    assert len(frames) // 2 == int(SPEECH_SECONDS * 24000)
    assert np.abs(np.frombuffer(frames, "<i2")).max() > 0
    assert audio.id.startswith("audio_") and audio.expires_at > time.time()

    # Streaming: pcm16 deltas and transcript deltas in OpenAI's chunk shapes, then a usage chunk.
    stream = c.chat.completions.create(model=server.model_name, messages=messages, max_tokens=10, stream=True,
                                       modalities=["text", "audio"], audio={"voice": "Ethan", "format": "pcm16"},
                                       stream_options={"include_usage": True})  # fmt: skip
    pcm, transcript, finish, usage, ids = b"", "", None, None, set()
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            if delta.audio is not None:
                ids.add(delta.audio.id)
                pcm += base64.b64decode(delta.audio.data or "")
                transcript += delta.audio.transcript or ""
            assert not delta.content
            finish = choice.finish_reason or finish
    assert transcript == audio.transcript
    assert len(pcm) == int(SPEECH_SECONDS * 24000) * 2
    assert finish in ("stop", "length") and 1 <= usage.completion_tokens <= 10 and len(ids) == 1

    # The answer can be referred to by its audio id in the next turn.
    follow = c.chat.completions.create(model=server.model_name, max_tokens=4, messages=[
        *messages, {"role": "assistant", "audio": {"id": audio.id}}, {"role": "user", "content": "Again?"}])  # fmt: skip
    assert follow.usage.prompt_tokens > res.usage.prompt_tokens


def test_chat_multimodal_inputs(server, tmp_path):
    """input_audio (wav and mp3), an image data URL and a video data URL in one turn."""
    from thinktalk.serve import media

    wav = open(espeak_wav("What is in the picture?", str(tmp_path / "q.wav")), "rb").read()
    mp3 = media.encode_audio(media.float_to_pcm16(tone(0.8)), 16000, "mp3")
    video = _tiny_video(str(tmp_path / "v.mp4"))
    content = [
        {"type": "input_audio", "input_audio": {"data": b64(wav), "format": "wav"}},
        {"type": "input_audio", "input_audio": {"data": b64(mp3), "format": "mp3"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png_bytes(64, 48))}},
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(open(video, "rb").read())}},
        {"type": "text", "text": "Describe all of it."},
    ]
    res = client(server).chat.completions.create(model=server.model_name, max_tokens=4,
                                                 messages=[{"role": "user", "content": content}])  # fmt: skip
    assert res.usage.prompt_tokens > 100  # audio, image and video tokens were placed
    assert res.usage.completion_tokens == 4


def _tiny_video(path: str, seconds: float = 1.0, fps: int = 8) -> str:
    import av

    with av.open(path, "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(int(seconds * fps)):
            img = np.full((64, 64, 3), (i * 30) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def test_speech_endpoint(server):
    """/v1/audio/speech: the given text teacher-forced through the Thinker, spoken by the Talker."""
    c = client(server)
    res = c.audio.speech.create(model=server.model_name, voice="ethan", input="Hello world", response_format="wav")
    rate, channels, width, frames = parse_wav(res.content)
    assert (rate, channels, width) == (24000, 1, 2) and len(frames) == int(SPEECH_SECONDS * 24000) * 2
    pcm = httpx.post(server.url + "/v1/audio/speech", json={"input": "Hello world", "response_format": "pcm"}, timeout=60)
    assert pcm.status_code == 200 and pcm.headers["content-type"] == "audio/pcm"
    assert len(pcm.content) == int(SPEECH_SECONDS * 24000) * 2
    mp3 = httpx.post(server.url + "/v1/audio/speech", json={"input": "Hi", "response_format": "mp3"}, timeout=60)
    assert mp3.status_code == 200 and mp3.headers["content-type"] == "audio/mpeg" and len(mp3.content) > 100
    with httpx.stream("POST", server.url + "/v1/audio/speech", timeout=60,
                      json={"input": "Hi", "stream_format": "sse"}) as r:  # fmt: skip
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    assert sum(len(base64.b64decode(e["audio"])) for e in events[:-1]) == int(SPEECH_SECONDS * 24000) * 2


def _part(kind: str, **fields) -> dict:
    return {"type": kind, **fields}


def _user(*parts) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}], "max_tokens": 2}


WAV_1S = wav_bytes(tone(1.0), 16000)
BAD_REQUESTS = {
    "corrupt base64": (_user(_part("input_audio", input_audio={"data": "!!not base64!!", "format": "wav"})),
                       400, "base64", "messages[0].content[0].input_audio.data"),
    "wrong audio format": (_user(_part("input_audio", input_audio={"data": b64(WAV_1S), "format": "mp3"})),
                           400, "not mp3", "messages[0].content[0].input_audio.data"),
    "unsupported audio format": (_user(_part("input_audio", input_audio={"data": b64(WAV_1S), "format": "xyz"})),
                                 400, "unsupported audio format", None),
    "not audio at all": (_user(_part("input_audio", input_audio={"data": b64(b"hello" * 100), "format": "wav"})),
                         400, "could not read the audio", None),
    "too-long audio": (_user(_part("input_audio", input_audio={"data": b64(wav_bytes(tone(9.0), 16000)),
                                                               "format": "wav"})), 400, "too long", None),
    "huge image": (_user(_part("image_url", image_url={"url": "data:image/png;base64," + b64(png_bytes(1000, 1000))})),
                   400, "too large", "messages[0].content[0].image_url"),
    "not an image": (_user(_part("image_url", image_url={"url": "data:image/png;base64," + b64(b"nope" * 10)})),
                     400, "not an image", None),
    "remote image url": (_user(_part("image_url", image_url={"url": "http://example.com/cat.png"})),
                         400, "data:", None),
    "local file not allowed": (_user(_part("image_url", image_url={"url": "/etc/passwd"})), 400, "data:", None),
    "unknown voice": ({"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"],
                       "audio": {"voice": "Nobody", "format": "wav"}}, 400, "Chelsie, Ethan", "audio.voice"),
    "stream needs pcm16": ({"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"],
                            "stream": True, "audio": {"voice": "Chelsie", "format": "wav"}}, 400, "pcm16", "audio.format"),
    "unknown content type": (_user({"type": "hologram", "data": 1}), 400, "hologram", None),
    "no messages": ({"model": "x"}, 400, "messages", "messages"),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role", "messages[0].role"),
    "too many tokens": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "at most",
                        "max_tokens"),
    "unknown model": ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist", "model"),
    "no user turn": ({"messages": [{"role": "system", "content": "hi"}]}, 400, "user message", "messages"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests(server, case):
    body, status, text, param = BAD_REQUESTS[case]
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = error_of(r)
    assert text.lower() in err["message"].lower(), err
    if param is not None:
        assert err["param"] == param, err


JSON = {"content-type": "application/json"}


def test_bad_bodies_and_recovery(server):
    url = server.url + "/v1/chat/completions"
    cases = [
        (httpx.post(url, content=b"{not json", headers=JSON), 400, "not valid json"),
        (httpx.post(url, content=b"", headers=JSON), 400, "empty"),
        (httpx.post(url, content=b"[1, 2]", headers=JSON), 400, "json object"),
        (httpx.post(url, content=b"x" * (5 * 2**20)), 413, "too large"),
        (httpx.post(url, content=iter([b"x" * 2**20] * 5), headers=JSON), 413, "too large"),  # chunked: no content-length
        (httpx.get(server.url + "/v1/nothing"), 404, "no such endpoint"),
        (httpx.get(url), 405, "not allowed"),
        (httpx.post(server.url + "/v1/audio/speech", json={"input": ""}), 400, "input"),
        (httpx.post(server.url + "/v1/audio/speech", json={"input": "hi", "voice": "nobody"}), 400, "unknown voice"),
    ]
    for r, status, text in cases:
        assert r.status_code == status, r.text
        assert text in error_of(r)["message"].lower()
    # ... and the server still answers.
    ok = httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200
    assert metrics(server.url)['thinktalk_http_requests_total{path="/v1/chat/completions",status="413"}'] >= 2


def test_auth_cors_and_local_media(serve_model, tmp_path):
    srv = start_server(serve_model, api_keys=["sekret"], cors_origins=["http://example.com"], allow_local_media=True,
                       local_media_dirs=[str(tmp_path)])  # fmt: skip
    try:
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert [m.id for m in client(srv, api_key="sekret").models.list().data] == ["tiny"]
        with pytest.raises(openai.AuthenticationError):
            client(srv, api_key="wrong").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
        assert httpx.get(srv.url + "/health").status_code == 200  # health, metrics and the page stay open
        assert httpx.get(srv.url + "/").status_code == 200
        pre = httpx.options(srv.url + "/v1/chat/completions", headers={
            "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})  # fmt: skip
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://example.com"
        r = httpx.get(srv.url + "/v1/models", headers={"Origin": "http://example.com", "Authorization": "Bearer sekret"})
        assert r.headers["access-control-allow-origin"] == "http://example.com"
        bad = httpx.options(srv.url + "/v1/chat/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})  # fmt: skip
        assert "access-control-allow-origin" not in bad.headers

        (tmp_path / "red.png").write_bytes(png_bytes(32, 32))
        auth = {"Authorization": "Bearer sekret"}
        for url, status in ((str(tmp_path / "red.png"), 200), ((tmp_path / "red.png").as_uri(), 200),
                            ("/etc/hostname", 400), (str(tmp_path / "missing.png"), 400)):  # fmt: skip
            body = _user(_part("image_url", image_url={"url": url}))
            r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "model": "tiny"}, headers=auth, timeout=30)
            assert r.status_code == status, (url, r.text)
    finally:
        srv.stop()


def test_cli_serve_subprocess(serve_checkpoint):
    """`thinktalk serve DIR` as users start it: a real process, flags applied, clean shutdown on SIGINT."""
    args = [serve_checkpoint, "--api-key", "k1", "--max-audio-seconds", "2", "--model-name", "omni", "--log-level",
            "warning"]  # fmt: skip
    with ServeProcess(args) as srv:
        url = srv.url
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k1"}).json()
        assert models["data"][0]["id"] == "omni"
        body = _user(_part("input_audio", input_audio={"data": b64(wav_bytes(tone(3.0), 16000)), "format": "wav"}))
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k1"}, timeout=30)
        assert r.status_code == 400 and "at most 2 s" in error_of(r)["message"]
    assert srv.proc.returncode == 0, srv.proc.stdout.read()


@pytest.mark.parametrize("scheduler", ["batch", "single"])
def test_overload_queue_and_disconnect(serve_model, scheduler):
    """A full server answers 429 + Retry-After (never crashes); a client that leaves cancels its session."""
    srv = start_server(serve_model, slow_s=0.05, max_sessions=2, scheduler=scheduler)
    url = srv.url + "/v1/chat/completions"
    long_req = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 40, "stream": True}
    try:
        results = {}

        def stream_all(name):
            with httpx.stream("POST", url, json=long_req, timeout=60) as r:
                results[name] = (r.status_code, [line for line in r.iter_lines() if line.startswith("data: ")])

        threads = [threading.Thread(target=stream_all, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while metrics(srv.url)["thinktalk_active_sessions"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        m = metrics(srv.url)
        if scheduler == "single":  # one runs, one waits
            assert m["thinktalk_queue_depth"] == 1 and m["thinktalk_running_sessions"] == 1
        else:  # both run, batched (the second may still be preparing)
            assert m["thinktalk_queue_depth"] + m["thinktalk_running_sessions"] == 2
        r = httpx.post(url, json={**long_req, "stream": False}, timeout=30)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert error_of(r)["type"] == "rate_limit_error"
        assert httpx.get(srv.url + "/health").json()["status"] == "busy"
        for t in threads:
            t.join(60)
        assert results["a"][0] == results["b"][0] == 200
        assert results["a"][1][-1] == results["b"][1][-1] == "data: [DONE]"
        wait_idle(srv.url)

        # Streaming client leaves after the first chunks: its session is cancelled, not run to the end.
        before = metrics(srv.url).get('thinktalk_sessions_total{kind="chat",outcome="cancelled"}', 0)
        with httpx.stream("POST", url, json={**long_req, "max_tokens": 64}, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 4:
                    break
        t0 = time.monotonic()
        wait_idle(srv.url, timeout=5)
        assert time.monotonic() - t0 < 2.5  # 64 tokens would take >3 s more at 50 ms each
        # A non-streaming client that times out: the server notices the disconnect and cancels too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json={**long_req, "stream": False, "max_tokens": 64}, timeout=0.5)
        wait_idle(srv.url, timeout=5)
        after = metrics(srv.url)['thinktalk_sessions_total{kind="chat",outcome="cancelled"}']
        assert after - before == 2
    finally:
        srv.stop()


def test_teacher_forced_thinker_equals_one_pass(serve_model):
    """The speech endpoint's Thinker states are those of one forward pass over prompt + the given text."""
    import torch

    from thinktalk.generation.inputs import ModelInputs
    from thinktalk.generation.sampling import SamplingParams, TokenChooser
    from thinktalk.generation.thinker import ThinkerStage
    from thinktalk.serve.tts import answer_token_ids, tts_conversation

    model, processor = serve_model
    inputs = processor(tts_conversation("Hello world, how are you?", None))
    ids = answer_token_ids(processor, "Hello world, how are you?")
    end = model.eos_token_ids[0]
    stage = ThinkerStage(model.thinker, keep_layers=(0, -1))
    chooser = TokenChooser(SamplingParams(), (end,), end, len(ids) + 1, forced=[*ids, end])
    with torch.inference_mode():
        mi = ModelInputs.from_dict(inputs)
        state = stage.new_state(mi, stage.new_cache(1, mi.length + len(ids) + 1))
        reads = [stage.prefill(state)]
        while not chooser.done:
            tok = chooser.choose(reads[-1].logits)
            if not chooser.done:
                reads.append(stage.step(state, tok))
    assert chooser.sequences()[0].tolist() == [*ids, end]
    assert chooser.finished.tolist() == [True] and len(reads) == len(ids) + 1
    t = inputs["input_ids"].shape[1]
    full = torch.cat([inputs["input_ids"], torch.tensor([ids])], dim=1)
    with torch.inference_mode():
        out = model.thinker(input_ids=full, attention_mask=torch.ones_like(full), output_hidden_states=True)
    for layer in (0, -1):
        torch.testing.assert_close(reads[0].states[layer], out.hidden_states[layer][:, :t], atol=1e-4, rtol=1e-4)
        for k in range(1, len(reads)):
            got = reads[k].states[layer][:, 0]
            torch.testing.assert_close(got, out.hidden_states[layer][:, t + k - 1], atol=1e-4, rtol=1e-4)
