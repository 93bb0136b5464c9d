"""Fixtures and helpers for the serve tests: a tiny checkpoint, a real server on loopback, media makers.

Used as a pytest plugin (``pytest_plugins = ["tests.serve_helpers"]`` in the test files) so every serve test
module shares one session-scoped server.

The tiny random checkpoint is adjusted so its output is *decodable*: a random 152k-way LM head almost
never picks one of the ~500 ids the tiny tokenizer knows (so the text would be empty), and a random
codec head picks ids outside the DiT's codebook (which the vocoder refuses). Zeroing the rows of the
ids we do not want makes every maximum land on a wanted id. The end-of-speech row is zeroed too, so
every answer is spoken for exactly ``max_speech_seconds`` (the server's cap): deterministic lengths.
The pipeline stays the real one.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import time
import wave

import numpy as np
import pytest
import torch

ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artifacts")
CODEBOOK = 8194  # ids the DiT embeds (0..8193); the Talker's vocabulary is 8448
TEST_LIMITS = dict(
    max_audio_seconds=8.0,
    max_image_pixels=640 * 640,
    max_body_bytes=4 * 2**20,
    max_tokens=64,
    default_max_tokens=12,
    max_sessions=32,
    max_speech_seconds=1.0,
)


# -- the checkpoint ------------------------------------------------------------------------------------
def make_serve_checkpoint(directory: str, seed: int = 0) -> str:
    """A tiny Qwen2.5-Omni checkpoint whose answers decode to text and speech (see the module docstring)."""
    from safetensors.torch import load_file, save_file

    from thinktalk.testing.tiny import build_tiny_checkpoint

    build_tiny_checkpoint(directory, "qwen2_5_omni", seed=seed, with_speech=True)
    path = os.path.join(directory, "model.safetensors")
    weights = load_file(path)
    with open(os.path.join(directory, "vocab.json"), encoding="utf-8") as fh:
        plain = sum(1 for i in json.load(fh).values() if i < 151643)  # byte-level BPE ids, no special tokens
    lm = weights["thinker.lm_head.weight"].clone()
    lm[plain:] = 0
    weights["thinker.lm_head.weight"] = lm
    head = weights["talker.codec_head.weight"].clone()
    head[CODEBOOK:] = 0
    weights["talker.codec_head.weight"] = head
    save_file(weights, path, metadata={"format": "pt"})
    return directory


# -- media -------------------------------------------------------------------------------------------------
def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def tone(seconds: float, rate: int = 16000, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def espeak_wav(text: str, path: str) -> str:
    """Speech made by espeak-ng (22.05 kHz WAV); a tone when espeak-ng is missing."""
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", path, text], check=True, capture_output=True)
    else:
        with open(path, "wb") as fh:
            fh.write(wav_bytes(tone(1.5, 22050), 22050))
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes(width: int, height: int) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (width, height), (200, 60, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pcm16_24k(wav_path: str) -> bytes:
    """A WAV file as pcm16 mono 24 kHz (what the realtime API takes)."""
    from thinktalk.serve import media

    with open(wav_path, "rb") as fh:
        audio16 = media.decode_audio(fh.read(), "wav", "file", 60)
    return media.float_to_pcm16(media.resample(audio16, 16000, 24000))


def parse_wav(data: bytes) -> tuple[int, int, int, bytes]:
    """(rate, channels, sample width, frames) of a WAV file, checking the header against the data."""
    with wave.open(io.BytesIO(data), "rb") as w:
        rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
        frames = w.readframes(n)
    assert len(frames) == n * channels * width, "WAV header length does not match its data"
    return rate, channels, width, frames


def metrics(url: str) -> dict[str, float]:
    import httpx

    from thinktalk.serve.metrics import parse

    return parse(httpx.get(url + "/metrics", timeout=10).text)


def wait_idle(url: str, timeout: float = 20.0) -> dict[str, float]:
    """Metrics once no session is queued or running (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["thinktalk_active_sessions"] == 0 and m["thinktalk_queue_depth"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"sessions still active: {m['thinktalk_active_sessions']}")
        time.sleep(0.05)


class SlowModel:
    """The real model with a pause after each event: makes "mid-response" deterministic in tests."""

    def __init__(self, model, delay_s: float):
        self._model = model
        self._delay = delay_s

    def __getattr__(self, name):
        return getattr(self._model, name)

    def stream(self, **kwargs):
        for event in self._model.stream(**kwargs):
            time.sleep(self._delay)
            yield event


def slow_engine(backend, delay_s: float) -> None:
    """The batching backend's engine with a pause after each step (the SlowModel of continuous batching)."""
    cls = type(backend.engine)

    def step(self):
        cls.step(self)
        time.sleep(delay_s)

    backend.engine.step = step.__get__(backend.engine)


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory) -> str:
    return make_serve_checkpoint(str(tmp_path_factory.mktemp("serve_tiny")))


@pytest.fixture(scope="session")
def serve_model(serve_checkpoint):
    from thinktalk.serve.server import load_for_serving

    torch.manual_seed(0)
    return load_for_serving(serve_checkpoint)


@pytest.fixture(scope="session")
def server(serve_model):
    """The server under test (default limits tightened so the limit tests are cheap)."""
    from thinktalk.serve.app import create_app
    from thinktalk.serve.server import ServerThread
    from thinktalk.serve.settings import ServeSettings

    model, processor = serve_model
    app = create_app(model, processor, ServeSettings(**TEST_LIMITS))
    with ServerThread(app) as srv:
        srv.model, srv.processor, srv.app = model, processor, app
        srv.model_name = app.state.ctx.info.name
        yield srv


def start_server(serve_model, slow_s: float = 0.0, **settings):
    """Another server on the same model (other settings, or a SlowModel); the caller stops it."""
    from thinktalk.serve.app import create_app
    from thinktalk.serve.server import ServerThread
    from thinktalk.serve.settings import ServeSettings

    model, processor = serve_model
    single = settings.get("scheduler") == "single"
    if slow_s and single:
        model = SlowModel(model, slow_s)
    app = create_app(model, processor, ServeSettings(**{**TEST_LIMITS, **settings}), model_name="tiny")
    if slow_s and not single:
        slow_engine(app.state.ctx.backend, slow_s)
    srv = ServerThread(app).start()
    srv.app = app
    srv.model_name = "tiny"
    return srv
