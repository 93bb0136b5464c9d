"""Running the app: load a checkpoint and serve it with uvicorn, in the foreground or in a thread."""

from __future__ import annotations

import logging
import socket
import threading
import time

log = logging.getLogger("thinktalk.serve")


def load_for_serving(
    directory: str, device: str = "cpu", dtype=None, tensor_parallel_size: int = 1, quant_kernel: str = "plain",
    compile: bool = False,
):
    """(model, processor) of a checkpoint directory, with a short warm-up generation.

    ``tensor_parallel_size`` > 1 starts the other ranks (see :mod:`thinktalk.parallel`). ``compile``: the speech
    decoders and decode steps through torch.compile (:func:`thinktalk.compile_speech`), compiled during the warm-up — one stream and
    two at once — so that no client waits for a compilation."""
    import thinktalk
    from thinktalk.processing import Processor

    model = thinktalk.load(
        directory, device=device, dtype=dtype, tensor_parallel_size=tensor_parallel_size, quant_kernel=quant_kernel
    )
    processor = Processor.from_pretrained(model.checkpoint_dir)
    names = []
    if compile and not getattr(model, "has_speech", False):
        log.warning("--compile: this model has no speech decoders; nothing is compiled")
    elif compile:
        names = thinktalk.compile_speech(model)
    t0 = time.perf_counter()
    # compiled: the batches' shapes too — 2 (batch > 1), and 16: torch's convolutions take another path (another
    # graph) from 16 rows on, which a server would otherwise compile under load, its clients waiting
    warmup(model, processor, batches=(2, 16) if names else ())
    if names:
        log.info("compiled %s during the warm-up (%.0f s)", ", ".join(names), time.perf_counter() - t0)
    return model, processor


def warmup(model, processor, batches: tuple[int, ...] = ()) -> None:
    """One tiny text and speech generation, so the first client does not pay for lazy initialisation; then, for
    each n of ``batches``, n speech generations batched in one engine (the shapes batching uses)."""
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
            for together in batches:
                from thinktalk.generation.engine import Engine, EngineConfig
                from thinktalk.generation.options import parse_generate_kwargs

                prompt, options = parse_generate_kwargs(
                    {**inputs, "max_new_tokens": 4, "speaker": speakers[0], "return_audio": True,
                     "talker_max_new_tokens": codes}, model.keywords, True)  # fmt: skip
                engine = Engine(model, EngineConfig(rows=together, max_len=prompt.length + 8,
                                                    keep_layers=getattr(model, "talker_reads", ())))  # fmt: skip
                requests = [engine.submit(prompt, options) for _ in range(together)]
                while not all(r.done for r in requests):
                    engine.step()
    except Exception as e:  # a warm-up failure is not fatal; the first request will report the problem
        log.warning("warm-up generation failed: %s: %s", type(e).__name__, e)


def serve_directory(
    directory: str,
    host: str,
    port: int,
    device: str,
    dtype,
    log_level: str,
    settings,
    tensor_parallel_size: int = 1,
    quant_kernel: str = "plain",
    compile: bool = False,
) -> None:
    import uvicorn

    from thinktalk.serve.app import create_app

    log.info("loading %s on %s ...", directory, device)
    model, processor = load_for_serving(
        directory, device=device, dtype=dtype, tensor_parallel_size=tensor_parallel_size, quant_kernel=quant_kernel,
        compile=compile,
    )
    app = create_app(model, processor, settings)
    voices = ", ".join(app.state.ctx.info.voices) or "none (text only)"
    print(f"thinktalk: serving {app.state.ctx.info.name} ({model.family}; voices: {voices})")
    print(f"thinktalk: web demo at http://{'localhost' if host in ('0.0.0.0', '::') else host}:{port}/")
    server = uvicorn.Server(uvicorn_config(app, host, port, log_level, graceful_s=5))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on (uvicorn.run swallows it too)
        pass
    if not server.started:
        raise SystemExit(3)  # uvicorn's startup failure (e.g. the port is taken); it logged why


def uvicorn_config(app, host: str, port: int, log_level: str = "info", graceful_s: int = 5):
    """The uvicorn configuration for ``app``, with the connection limits of its :class:`ServeSettings`.

    The HTTP protocol is uvicorn's h11 one with a header deadline and a connection cap
    (:mod:`thinktalk.serve.connections`); keep-alive, WebSocket message size and shutdown come from uvicorn.
    """
    import uvicorn

    from thinktalk.serve.connections import ConnectionLimits, connection_budget, guarded_protocol, install_log_redaction
    from thinktalk.serve.settings import ServeSettings

    ctx = getattr(app.state, "ctx", None)
    settings = ctx.settings if ctx is not None else ServeSettings()
    cap, backlog = connection_budget(settings.max_connections)
    limits = ConnectionLimits(header_timeout_s=settings.header_timeout_s, max_connections=cap)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        backlog=backlog,
        http=guarded_protocol(limits),
        ws_max_size=settings.max_body_bytes,
        # No permessage-deflate: inflating runs on the event loop (a 2 MB audio event stalled /health for
        # ~100 ms each; a small frame can inflate to ws_max_size), and base64 PCM hardly compresses anyway.
        ws_per_message_deflate=False,
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
        timeout_graceful_shutdown=graceful_s,
        lifespan="on",
    )
    if settings.keep_alive_timeout_s != config.timeout_keep_alive:
        config.timeout_keep_alive = settings.keep_alive_timeout_s  # uvicorn's type says int; a float works
    install_log_redaction()  # uvicorn.Config has just (re)configured its loggers
    return config


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServeProcess:
    """``thinktalk serve ARGS`` in a child process, as users start it (tests, benchmarks): up once /health answers;
    ``stop()`` — or leaving the ``with`` block — sends SIGINT (a clean shutdown) and waits. Its output goes to
    ``log`` (an open file) or, by default, to a pipe (``proc.stdout``, read it after stopping)."""

    def __init__(self, args: list[str], log=None, env: dict | None = None, preexec_fn=None, timeout_s: float = 120):
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "thinktalk.cli", "serve", *args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if log is None else log, stderr=subprocess.STDOUT,
                                     text=True, env=env, preexec_fn=preexec_fn)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not self._healthy():
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if log is None else f"see {getattr(log, 'name', 'its log')}"
                raise RuntimeError(f"`thinktalk serve` exited ({self.proc.returncode}): {out}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"`thinktalk serve` did not answer /health in {timeout_s:g} s")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerThread:
    """uvicorn in a background thread (tests, notebooks): ``with ServerThread(app) as srv: srv.url``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(uvicorn_config(app, host, self.port, log_level, graceful_s=3))
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
