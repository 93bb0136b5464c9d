"""The FastAPI application: routes, limits, auth, CORS, error shapes, metrics — around one :class:`Backend`."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from thinktalk.serve.backend import Backend, ModelInfo, SingleStreamBackend
from thinktalk.serve.errors import APIError, from_validation_error
from thinktalk.serve.metrics import Metrics
from thinktalk.serve.openai_api import ClientGone, Transcripts
from thinktalk.serve.settings import ServeSettings

log = logging.getLogger("thinktalk.serve")
STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
KNOWN_PATHS = ("/v1/chat/completions", "/v1/audio/speech", "/v1/audio/transcriptions", "/v1/audio/translations",
               "/v1/models", "/v1/realtime", "/health", "/metrics", "/")
# Open without a key unless --protect-metrics is off: they describe the server, not the model's answers.
PROTECTED_PATHS = ("/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass
class ServerContext:
    settings: ServeSettings
    backend: Backend
    metrics: Metrics
    transcripts: Transcripts
    realtime_connections: int = 0
    extras: dict = field(default_factory=dict)
    _edge_limiter: object = None

    async def offload(self, fn, *args):
        """``fn(*args)`` in a worker thread, at most ``settings.edge_workers`` at a time: JSON parsing and media
        decoding hold the GIL for much of their run, and a crowd of such threads starves the event loop
        (16 realtime clients decoding audio at once delayed /health by a second). Queued work waits its turn."""
        import functools

        import anyio

        if self._edge_limiter is None:
            self._edge_limiter = anyio.CapacityLimiter(self.settings.edge_workers)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._edge_limiter)

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    @property
    def default_voice(self) -> str | None:
        if not self.info.voices:
            return None
        return self.info.voice(self.settings.default_voice, None, "voice") if self.settings.default_voice else self.info.voices[0]

    def check_key(self, headers, subprotocols: list[str] | None = None) -> None:
        """Accept ``Authorization: Bearer KEY``, ``api-key: KEY`` or (browsers' WebSockets, which cannot set
        headers) the ``openai-insecure-api-key.KEY`` subprotocol; no keys configured means no authentication.
        Never the query string: URLs end up in access logs, proxies and browser history."""
        keys = self.settings.api_keys
        if not keys:
            return
        offered = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            offered.append(auth[7:].strip())
        if headers.get("api-key"):
            offered.append(headers["api-key"].strip())
        for proto in subprotocols or []:
            if proto.startswith("openai-insecure-api-key."):
                offered.append(proto[len("openai-insecure-api-key.") :])
        for key in offered:
            if any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
                return
        message = "missing API key (send 'Authorization: Bearer KEY')" if not offered else "incorrect API key provided"
        raise APIError(401, message, "invalid_request_error", None, "invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


def origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """Whether a browser at ``origin`` may use the API: no Origin header (not a browser, or a same-origin
    GET), the server's own origin (Origin's host and port equal the Host header), or one of ``allowed``."""
    if origin is None:
        return True
    if "*" in allowed or origin in allowed or origin.rstrip("/") in allowed:
        return True
    if origin == "null" or not host:
        return False
    try:
        o = urlsplit(origin)
        h = urlsplit("//" + host)
        default = {"http": 80, "https": 443}.get(o.scheme)
        if not o.hostname or default is None:
            return False
        same_host = o.hostname.lower() == (h.hostname or "").lower()
        # Behind a TLS proxy the Host header may carry no port while the Origin says https: hosts decide.
        return same_host and (h.port is None or (o.port or default) == h.port)
    except ValueError:
        return False


class EdgeMiddleware:
    """Pure ASGI (streaming-safe), before any route: refuses other sites' browsers (``Origin``), keyless access
    to the protected pages, oversized and stalled bodies; counts requests by path and status."""

    def __init__(self, app, ctx: ServerContext):
        self.app = app
        self.ctx = ctx

    def _origin_ok(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin")
        host = headers.get(b"host")
        return origin_allowed(origin.decode("latin-1") if origin is not None else None,
                              host.decode("latin-1") if host is not None else None, self.ctx.settings.cors_origins)  # fmt: skip

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        label = next((p for p in KNOWN_PATHS if path == p or (p != "/" and path.startswith(p + "/"))), "other")
        if path.startswith("/static/"):
            label = "/static"
        status = {"code": 0}
        settings = self.ctx.settings
        limit = settings.max_body_bytes
        metrics = self.ctx.metrics
        if scope["type"] == "http":
            refusal = None
            if scope.get("method") not in SAFE_METHODS and not self._origin_ok(scope):
                refusal = APIError(403, "requests from this web page's origin are not allowed (start the server with "
                                   "--cors-origin ORIGIN to allow it)", "invalid_request_error", None, "origin_not_allowed")  # fmt: skip
            elif path in PROTECTED_PATHS and settings.api_keys and settings.protect_metrics:
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
                try:
                    self.ctx.check_key(headers)
                except APIError as e:
                    refusal = e
            length = dict(scope.get("headers") or []).get(b"content-length")
            if refusal is None and length is not None and length.isdigit() and int(length) > limit:
                refusal = too_large_error(limit)
            if refusal is not None:
                metrics.inc("thinktalk_http_requests_total", {"path": label, "status": str(refusal.status)})
                metrics.inc("thinktalk_errors_total", {"type": refusal.type})
                return await refusal.response()(scope, receive, send)
            seen = {"bytes": 0, "done": False}

            async def limited_receive():
                if seen["done"]:
                    return await receive()  # the body is in; now only a disconnect can come (no deadline)
                try:
                    message = await asyncio.wait_for(receive(), settings.body_timeout_s)
                except asyncio.TimeoutError:
                    raise BodyTimeout() from None
                if message["type"] == "http.request":
                    seen["bytes"] += len(message.get("body", b""))
                    if seen["bytes"] > limit:
                        raise BodyTooLarge()
                    seen["done"] = not message.get("more_body", False)
                else:
                    seen["done"] = True
                return message

            async def counting_send(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            try:
                await self.app(scope, limited_receive, counting_send)
            finally:
                metrics.inc("thinktalk_http_requests_total", {"path": label, "status": str(status["code"] or 499)})
        else:
            if not self._origin_ok(scope):
                # Refused before the handshake (HTTP 403): a page on another site must not read the answers.
                metrics.inc("thinktalk_http_requests_total", {"path": label, "status": "403"})
                metrics.inc("thinktalk_errors_total", {"type": "invalid_request_error"})
                await receive()  # websocket.connect
                return await send({"type": "websocket.close", "code": 1008, "reason": "origin not allowed"})

            async def ws_send(message):
                if message["type"] == "websocket.accept":
                    status["code"] = 101
                elif message["type"] == "websocket.close" and not status["code"]:
                    status["code"] = 403
                await send(message)

            try:
                await self.app(scope, receive, ws_send)
            finally:
                metrics.inc("thinktalk_http_requests_total", {"path": label, "status": str(status["code"] or 499)})


def too_large_error(limit: int) -> APIError:
    return APIError(413, f"request body is too large (this server accepts at most {limit} bytes)",
                    "invalid_request_error", None, "request_too_large")  # fmt: skip


def too_large(limit: int) -> JSONResponse:
    return too_large_error(limit).response()


def create_app(
    model,
    processor,
    settings: ServeSettings | None = None,
    backend: Backend | None = None,
    model_name: str | None = None,
) -> FastAPI:
    """The server around a loaded model and its processor.

    ``backend`` defaults to the batching engine (:class:`~thinktalk.serve.scheduler.BatchingBackend`), or with
    ``settings.scheduler == "single"`` to :class:`SingleStreamBackend` (one session at a time); pass another
    implementation of :class:`Backend` to change how sessions are scheduled.
    """
    settings = settings or ServeSettings()
    metrics = Metrics()
    if model_name is None:
        model_name = settings.model_name or os.path.basename(os.path.normpath(getattr(model, "checkpoint_dir", "") or "")) or "thinktalk"
    if backend is None:
        if settings.scheduler == "single":
            backend = SingleStreamBackend(model, processor, settings, metrics, model_name)
        else:
            from thinktalk.serve.scheduler import BatchingBackend

            backend = BatchingBackend(model, processor, settings, metrics, model_name)
    ctx = ServerContext(settings=settings, backend=backend, metrics=metrics, transcripts=Transcripts(settings.audio_ttl_s))
    if settings.default_voice and backend.info.voices:
        ctx.default_voice  # noqa: B018 - validates the configured voice now, not on the first request
    metrics.gauge("thinktalk_realtime_connections", lambda: ctx.realtime_connections)
    tp_size = getattr(getattr(model, "tensor_parallel", None), "size", 1)
    tp_driver = getattr(model, "tensor_parallel_driver", None)
    metrics.gauge("thinktalk_tensor_parallel_size", lambda: tp_size)
    metrics.gauge("thinktalk_replicas", lambda: 1)  # thinktalk.serve.replicas says how many there are

    @contextlib.asynccontextmanager
    async def lifespan(app):
        from thinktalk.serve.connections import install_log_redaction, install_quiet_accept_errors

        install_quiet_accept_errors(asyncio.get_running_loop())
        install_log_redaction()
        yield
        await backend.close()

    app = FastAPI(title="thinktalk", version=_version(), lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.ctx = ctx

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.inc("thinktalk_errors_total", {"type": e.type})
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return await _api_error(request, from_validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))  # fmt: skip
        return await _api_error(request, APIError(e.status_code, message, kind, None, None, dict(e.headers or {})))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, e: BodyTooLarge):
        metrics.inc("thinktalk_errors_total", {"type": "invalid_request_error"})
        return too_large(settings.max_body_bytes)

    @app.exception_handler(BodyTimeout)
    async def _body_timeout(request: Request, e: BodyTimeout):
        metrics.inc("thinktalk_errors_total", {"type": "invalid_request_error"})
        return APIError(408, f"the request body stalled for more than {settings.body_timeout_s:g} s",
                        "invalid_request_error", None, "request_timeout", {"Connection": "close"}).response()  # fmt: skip

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone):
        return JSONResponse({"error": {"message": "client disconnected", "type": "client_closed", "param": None,
                                       "code": None}}, status_code=499)  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        metrics.inc("thinktalk_errors_total", {"type": "server_error"})
        return APIError(500, "internal server error; the server logged the details", "server_error").response()

    from thinktalk.serve.openai_api import router as openai_router
    from thinktalk.serve.realtime import router as realtime_router
    from thinktalk.serve.transcriptions import router as transcriptions_router

    app.include_router(openai_router)
    app.include_router(realtime_router)
    app.include_router(transcriptions_router)

    @app.get("/health")
    async def health():
        queued, running = backend.load()
        try:
            backend.check_capacity()
            status, code = "ok", 200
        except APIError as e:
            status, code = ("busy", 200) if e.status == 429 else ("unavailable", 503)
        body = {"status": status, "model": backend.info.name, "queued": queued, "running": running,
                "realtime_connections": ctx.realtime_connections}  # fmt: skip
        dead = tp_driver.dead_ranks() if tp_driver is not None else []
        if dead:  # a tensor-parallel worker exited: this server cannot run the model any more
            body.update(status="unavailable", dead_ranks=dead)
            code = 503
        return JSONResponse(body, status_code=code)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    app.add_middleware(EdgeMiddleware, ctx=ctx)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            allow_credentials="*" not in settings.cors_origins,
            expose_headers=["Retry-After"],
        )
    return app


def _version() -> str:
    from thinktalk import __version__

    return __version__
