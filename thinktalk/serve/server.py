"""Running the app: load a checkpoint and serve it with uvicorn, in the foreground or in a thread."""

from __future__ import annotations

import logging
import socket
import threading
import time

log = logging.getLogger("thinktalk.serve")


def load_for_serving(directory: str, device: str = "cpu", dtype=None):
    """(model, processor) of a checkpoint directory, with a short warm-up generation."""
    import thinktalk
    from thinktalk.processing import Processor

    model = thinktalk.load(directory, device=device, dtype=dtype)
    processor = Processor.from_pretrained(model.checkpoint_dir)
    warmup(model, processor)
    return model, processor


def warmup(model, processor) -> None:
    """One tiny text and speech generation, so the first client does not pay for lazy initialisation."""
    conversation = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    try:
        inputs = processor(conversation)
        for _ in model.stream(**inputs, max_new_tokens=2, return_audio=False):
            pass
        speakers = list(getattr(model, "speakers", None) or {})
        hz = getattr(model, "codec_rate_hz", None)
        if getattr(model, "has_speech", False) and speakers and hz:
            codes = int(0.5 * hz)  # half a second: enough to run every stage once
            for _ in model.stream(**inputs, max_new_tokens=4, speaker=speakers[0], return_audio=True,
                                  talker_max_new_tokens=codes):  # fmt: skip
                pass
    except Exception as e:  # a warm-up failure is not fatal; the first request will report the problem
        log.warning("warm-up generation failed: %s: %s", type(e).__name__, e)


def serve_directory(directory: str, host: str, port: int, device: str, dtype, log_level: str, settings) -> None:
    import uvicorn

    from thinktalk.serve.app import create_app

    log.info("loading %s on %s ...", directory, device)
    model, processor = load_for_serving(directory, device=device, dtype=dtype)
    app = create_app(model, processor, settings)
    voices = ", ".join(app.state.ctx.info.voices) or "none (text only)"
    print(f"thinktalk: serving {app.state.ctx.info.name} ({model.family}; voices: {voices})")
    print(f"thinktalk: web demo at http://{'localhost' if host in ('0.0.0.0', '::') else host}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level=log_level, ws_max_size=settings.max_body_bytes,
                timeout_graceful_shutdown=5)  # fmt: skip


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn in a background thread (tests, notebooks): ``with ServerThread(app) as srv: srv.url``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        max_body = getattr(getattr(app.state, "ctx", None), "settings", None)
        ws_max = max_body.max_body_bytes if max_body is not None else 16 * 2**20
        config = uvicorn.Config(app, host=host, port=self.port, log_level=log_level, ws_max_size=ws_max,
                                timeout_graceful_shutdown=3, lifespan="on")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="thinktalk-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
