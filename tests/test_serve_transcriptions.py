"""Speech recognition and translation: OpenAI's audio endpoints on a live server, the Python API, the CLI.

The tiny random checkpoint used here has random words, so word accuracy is checked on the trained default
model instead (tests/test_default_model.py: the SDK's transcription call on espeak-ng speech of words it was
trained on, and ``model.transcribe`` with the official ASR instruction). What is checked here: the SDK parses every response shape, the server's transcript is exactly what
``model.transcribe`` / ``model.translate`` return for the same audio (greedy, same token cap), bad uploads
are 400s in OpenAI's error shape, and the prompts are the official ones.
"""

from __future__ import annotations

import os
import time
import warnings

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")
pytest.register_assert_rewrite("tests.serve_helpers")
openai = pytest.importorskip("openai")

from openai.types.audio import (  # noqa: E402
    Transcription,
    TranscriptionTextDeltaEvent,
    TranscriptionTextDoneEvent,
    TranscriptionVerbose,
    Translation,
    TranslationVerbose,
)

from tests.media import have_espeak, speech_wav  # noqa: E402
from tests.serve_helpers import TEST_LIMITS, start_server, tone, wait_idle, wav_bytes  # noqa: E402

pytest_plugins = ["tests.serve_helpers"]
# The SDK marks translations.create deprecated (OpenAI's whisper-1 schedule); the call is what clients use.
pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")

MAX_TOKENS = TEST_LIMITS["max_tokens"]  # the server's cap on a transcript; the Python API gets the same


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> str:
    """espeak-ng speech as a 16 kHz WAV: both decoders (PyAV in the server, libsndfile in the processor)
    read its int16 samples to the same floats, with no resampler in between."""
    if not have_espeak():
        pytest.skip("espeak-ng is not installed (scripts/setup.sh test installs it)")
    path = str(tmp_path_factory.mktemp("asr") / "hello.wav")
    return speech_wav(path, "Hello world, one two three.", sample_rate=16000)


def api(model, audio, task: str = "transcribe", **kw) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random model never ends on its own: the cap warning is expected
        return getattr(model, task)(audio, max_new_tokens=MAX_TOKENS, **kw)


def error_of(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    return body["error"]


def post(srv, data: bytes, path: str = "transcriptions", filename: str = "a.wav", **fields) -> httpx.Response:
    form = {"model": srv.model_name, **{k: str(v) for k, v in fields.items()}}
    return httpx.post(f"{srv.url}/v1/audio/{path}", data=form, files={"file": (filename, data)}, timeout=60)


# -- the SDK's calls and shapes ------------------------------------------------------------------------
def test_transcriptions_shapes_and_python_api_agree(server, speech):
    c = client(server)
    model = server.model
    expected = {lang: api(model, speech, language=lang) for lang in (None, "en")}
    expected["translate"] = api(model, speech, "translate")
    # The comparison below could not fail if the tiny model ignored its prompt: it must not.
    assert len(set(expected.values())) == 3, expected

    with open(speech, "rb") as fh:
        res = c.audio.transcriptions.create(model=server.model_name, file=fh)
    assert isinstance(res, Transcription)
    assert res.text == expected[None]
    assert res.usage.type == "tokens" and res.usage.input_tokens > 20
    assert res.usage.output_tokens == MAX_TOKENS and res.usage.total_tokens == res.usage.input_tokens + MAX_TOKENS

    text = c.audio.transcriptions.create(model=server.model_name, file=open(speech, "rb"), response_format="text")
    assert isinstance(text, str) and text == expected[None]

    verbose = c.audio.transcriptions.create(model=server.model_name, file=("hello.wav", open(speech, "rb").read()),
                                            response_format="verbose_json", language="en", temperature=0.0)  # fmt: skip
    assert isinstance(verbose, TranscriptionVerbose)
    assert verbose.text == expected["en"]
    assert verbose.language == "english"
    import soundfile as sf

    assert verbose.duration == pytest.approx(sf.info(speech).duration, abs=1e-3)
    assert verbose.segments is None and verbose.words is None  # no honest timings (see serve/README.md)
    assert verbose.usage.type == "duration" and verbose.usage.seconds == pytest.approx(verbose.duration)

    tr = c.audio.translations.create(model=server.model_name, file=open(speech, "rb"))
    assert isinstance(tr, Translation) and tr.text == expected["translate"]
    tv = c.audio.translations.create(model=server.model_name, file=open(speech, "rb"), response_format="verbose_json")
    assert isinstance(tv, TranslationVerbose) and tv.language == "english" and tv.text == expected["translate"]
    assert tv.duration == pytest.approx(verbose.duration)
    assert c.audio.translations.create(model=server.model_name, file=open(speech, "rb"), response_format="text") == tr.text

    # The cut at the server's token cap is not silent.
    r = post(server, open(speech, "rb").read())
    assert r.status_code == 200 and r.headers["x-finish-reason"] == "length"


def test_transcription_stream(server, speech):
    c = client(server)
    events = list(c.audio.transcriptions.create(model=server.model_name, file=open(speech, "rb"), stream=True))
    *deltas, done = events
    assert deltas and all(isinstance(e, TranscriptionTextDeltaEvent) for e in deltas)
    assert isinstance(done, TranscriptionTextDoneEvent)
    assert "".join(e.delta for e in deltas) == done.text == api(server.model, speech)
    assert done.usage.output_tokens == MAX_TOKENS and done.usage.input_tokens > 20
    raw = httpx.post(f"{server.url}/v1/audio/transcriptions", data={"stream": "true"},
                     files={"file": ("a.wav", open(speech, "rb").read())}, timeout=60)  # fmt: skip
    assert raw.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in raw.text.split("\n\n") if ln]
    assert all(ln.startswith("data: {") for ln in lines) and '"transcript.text.done"' in lines[-1]


def test_other_formats_and_sampling(server, tmp_path):
    """Any format libav reads is accepted (ogg here, by content, whatever the file name says), and
    temperature > 0 samples (a different path through the same backend)."""
    import soundfile as sf

    path = str(tmp_path / "t.ogg")
    sf.write(path, tone(1.0), 16000, format="OGG")
    c = client(server)
    res = c.audio.transcriptions.create(model=server.model_name, file=("audio.bin", open(path, "rb")), temperature=0.7)
    assert isinstance(res, Transcription) and res.usage.output_tokens >= 1


def test_transcription_runs_through_the_backend_and_cancels(serve_model, speech):
    """The same scheduler as chat: sessions are counted under their own kind, and a streaming client that
    leaves early cancels its transcription within a step (64 tokens at 50 ms each would take > 3 s)."""
    srv = start_server(serve_model, slow_s=0.05)
    try:
        url = srv.url + "/v1/audio/transcriptions"
        files = {"file": ("a.wav", open(speech, "rb").read())}
        with httpx.stream("POST", url, data={"stream": "true"}, files=files, timeout=60) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_lines()):
                if i >= 4:
                    break
        t0 = time.monotonic()
        m = wait_idle(srv.url, timeout=5)
        assert time.monotonic() - t0 < 2.5
        assert m['thinktalk_sessions_total{kind="transcription",outcome="cancelled"}'] == 1
        assert m['thinktalk_http_requests_total{path="/v1/audio/transcriptions",status="200"}'] == 1
    finally:
        srv.stop()


# -- bad requests --------------------------------------------------------------------------------------
def test_bad_uploads_are_400s(server, speech):
    good = open(speech, "rb").read()
    cases = {
        "corrupt": (b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 50, {}, "file", "invalid_audio"),
        "empty": (b"", {}, "file", "invalid_audio"),
        "over the seconds limit": (wav_bytes(tone(TEST_LIMITS["max_audio_seconds"] + 2), 16000), {}, "file",
                                   "audio_too_long"),
        "srt": (good, {"response_format": "srt"}, "response_format", "unsupported_response_format"),
        "vtt": (good, {"response_format": "vtt"}, "response_format", "unsupported_response_format"),
        "unknown format": (good, {"response_format": "xml"}, "response_format", "unsupported_response_format"),
        "timestamps": (good, {"response_format": "verbose_json", "timestamp_granularities[]": "word"},
                       "timestamp_granularities", "unsupported_parameter"),
        "language": (good, {"language": "xx"}, "language", "unsupported_language"),
        "temperature": (good, {"temperature": "1.5"}, "temperature", None),
        "stream verbose": (good, {"stream": "true", "response_format": "verbose_json"}, "response_format", None),
        "unknown field": (good, {"speed": "2"}, "speed", "unknown_parameter"),
    }  # fmt: skip
    for name, (data, fields, param, code) in cases.items():
        err = error_of(post(server, data, **fields))
        assert err["param"] == param, (name, err)
        if code is not None:
            assert err["code"] == code, (name, err)
        if name in ("srt", "vtt", "timestamps"):
            assert "timing" in err["message"], err  # says why, not just "unsupported"
    err = error_of(post(server, good, path="translations", response_format="srt"))
    assert err["param"] == "response_format"

    # Through the SDK: the same 400s surface as BadRequestError with OpenAI's body.
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.audio.transcriptions.create(model=server.model_name, file=("x.mp3", b"\x00" * 2000))
    assert e.value.status_code == 400 and e.value.body["param"] == "file"
    with pytest.raises(openai.BadRequestError) as e:
        c.audio.transcriptions.create(model=server.model_name, file=open(speech, "rb"), response_format="verbose_json",
                                      timestamp_granularities=["segment"])  # fmt: skip
    assert e.value.body["param"] == "timestamp_granularities"
    with pytest.raises(openai.NotFoundError):
        c.audio.transcriptions.create(model="whisper-1", file=open(speech, "rb"))

    # Not a form; a form without a file; a body over the byte limit (413, as for chat).
    error_of(httpx.post(f"{server.url}/v1/audio/transcriptions", json={"file": "x"}, timeout=30))
    url = f"{server.url}/v1/audio/transcriptions"
    r = httpx.post(url, files={"model": (None, server.model_name)}, timeout=30)  # multipart, no file
    assert error_of(r)["code"] == "missing_file"
    r = httpx.post(url, files={"file": (None, "hello")}, timeout=30)  # a text field, not an upload
    assert error_of(r)["code"] == "invalid_file"
    big = b"\x00" * (TEST_LIMITS["max_body_bytes"] + 1024)
    error_of(post(server, big), status=413)
    # The server still works.
    assert client(server).audio.transcriptions.create(model=server.model_name, file=open(speech, "rb")).text


# -- the prompts, the Python API on both families, the CLI -------------------------------------------
def test_prompts_follow_the_official_recipes():
    from thinktalk.asr import asr_conversation, language_name

    # Qwen2.5-Omni cookbook (universal_audio_understanding): system role sentence, text before audio.
    conv = asr_conversation("qwen2_5_omni", "a.wav", "transcribe", "en")
    assert conv == [
        {"role": "system", "content": [{"type": "text", "text": "You are a speech recognition model."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Transcribe the English audio into text without any punctuation marks."},
            {"type": "audio", "audio": "a.wav"}]},
    ]  # fmt: skip
    conv = asr_conversation("qwen2_5_omni", "a.wav", "translate", "en")
    assert conv[0]["content"][0]["text"] == "You are a speech translation model."
    assert conv[1]["content"][0]["text"] == "Listen to the provided English speech and produce a translation in English text."
    # Qwen3-Omni README (evaluation settings): no system prompt, text after the audio.
    conv = asr_conversation("qwen3_omni_moe", "a.wav", "transcribe", "fr")
    assert conv == [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"},
                                                 {"type": "text", "text": "Transcribe the French audio into text."}]}]  # fmt: skip
    assert asr_conversation("qwen3_omni_moe", "a", "transcribe", "zh")[0]["content"][1]["text"] == "请将这段中文语音转换为纯文本。"
    conv = asr_conversation("qwen3_omni_moe", "a", "translate", "Chinese", prompt="Names: Zhang Wei.")
    assert conv[0] == {"role": "system", "content": [{"type": "text", "text": "Names: Zhang Wei."}]}
    assert conv[1]["content"][1]["text"] == "Listen to the provided Chinese speech and produce a translation in English text."
    assert language_name("EN") == language_name("english") == language_name("en-US") == "English"
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        language_name("klingon")


def test_python_api_inputs_and_qwen3(serve_model, speech, tmp_path):
    """Path, bytes and 16 kHz samples give the same transcript; the Qwen3-Omni model has the same API."""
    import soundfile as sf

    from thinktalk.testing.tiny import build_tiny_checkpoint

    model, _ = serve_model
    samples, rate = sf.read(speech, dtype="float32")
    assert rate == 16000
    by_path = api(model, speech)
    assert api(model, open(speech, "rb").read()) == by_path
    assert api(model, samples) == by_path
    assert api(model, np.zeros(16000, np.float32)) != by_path  # the audio is read

    import thinktalk

    d = build_tiny_checkpoint(str(tmp_path / "q3"), "qwen3_omni_moe", with_speech=False)
    q3 = thinktalk.load(d)
    assert isinstance(api(q3, speech, language="en"), str)
    assert isinstance(api(q3, speech, "translate"), str)
    with pytest.warns(UserWarning, match="max_new_tokens=2"):
        q3.transcribe(speech, max_new_tokens=2)
    with pytest.raises(TypeError, match="text only"):
        q3.transcribe(speech, return_audio=True)
    with pytest.raises(ValueError, match="unknown language"):
        q3.transcribe(speech, language="xx")


def test_cli_transcribe(serve_model, serve_checkpoint, speech, capsys):
    from thinktalk.cli import main

    model, _ = serve_model
    for flags, task in (([], "transcribe"), (["--translate"], "translate")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(["transcribe", speech, "--model", serve_checkpoint, "--language", "en",
                         "--max-new-tokens", str(MAX_TOKENS), *flags]) == 0  # fmt: skip
        assert capsys.readouterr().out == api(model, speech, task, language="en") + "\n"
    with pytest.raises(SystemExit, match="no such audio file"):
        main(["transcribe", os.path.join(os.path.dirname(speech), "missing.wav"), "--model", serve_checkpoint])
    with pytest.raises(SystemExit, match="--language"):
        main(["transcribe", speech, "--model", serve_checkpoint, "--language", "xx"])
