"""Connections at the socket level: header-read deadline, connection cap, quiet accept errors, clean logs.

uvicorn (h11) closes a kept-alive connection ``timeout_keep_alive`` seconds after its last response, but
a connection that never sends a complete request line and headers — an idle socket, a slow-header
("slowloris") client — is kept forever, and nothing caps how many are open: a few hundred idle sockets
exhaust the file descriptors and real requests time out. :class:`GuardedH11Protocol` adds what is missing:

* a **header deadline**: from the connection's first byte (or its accept) the request line and headers
  must be complete within ``header_timeout_s``, else the connection gets a 408 and is closed;
* a **connection cap**: past ``max_connections`` open connections, the one that has waited longest for
  its request headers is closed to make room (idle sockets go first, requests in progress never); when
  every connection is busy, the new one gets a 503 and is closed.

Accept errors (``EMFILE``: out of file descriptors) are reported by asyncio once per attempt, and its
accept loop retries up to ``backlog`` times per tick: thousands of identical tracebacks a second.
:func:`install_quiet_accept_errors` logs the first and then one count per minute. :class:`RedactSecrets`
keeps credentials that a client put in a URL out of uvicorn's access log.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import time
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("thinktalk.serve")

FD_RESERVE = 64  # descriptors kept free for files, pipes and the model's own use


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    max_connections: int = 1024


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header-read deadline and a connection cap (see the module docstring).

    Subclassed per server by :func:`guarded_protocol` (uvicorn builds protocols from the class alone).
    """

    limits = ConnectionLimits()
    # Connections waiting for (more of) their request headers, oldest first: the ones shed at the cap.
    waiting: collections.OrderedDict = collections.OrderedDict()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self.waiting[self] = None
        if len(self.connections) > self.limits.max_connections and not self._shed_one():
            _throttled("cap", f"{len(self.connections) - 1} connections are open (the limit is "
                       f"{self.limits.max_connections}) and all are busy: refusing a new one")  # fmt: skip
            self._close_with(503, "Service Unavailable")
            return
        self._start_header_timer()

    def _shed_one(self) -> bool:
        """Close the connection that has waited longest for its headers (never this one)."""
        for other in self.waiting:
            if other is not self:
                _throttled("shed", f"connection limit ({self.limits.max_connections}) reached: closing idle connections")
                other._close_with(None, None)
                return True
        return False

    def _start_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _stop_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self in self.waiting:
            _throttled("header", f"closed a connection that sent no complete request headers in "
                       f"{self.limits.header_timeout_s:g} s")  # fmt: skip
            self._close_with(408, "Request Timeout")

    def _close_with(self, status: int | None, reason: str | None) -> None:
        self.waiting.pop(self, None)
        self._stop_header_timer()
        if self.transport.is_closing():
            return
        if status is not None:
            # Written by hand: h11 can only answer a request it has parsed, and there is none.
            self.transport.write(f"HTTP/1.1 {status} {reason}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n".encode())
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self in self.waiting:
            self._start_header_timer()  # a kept-alive connection starts its next request
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle or self.transport.get_protocol() is not self:
            # The headers of a request are complete (a new cycle), or the connection became a WebSocket.
            self.waiting.pop(self, None)
            self._stop_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.waiting.pop(self, None)
            self.waiting[self] = None  # idle until the next request (newest last); keep-alive closes it

    def connection_lost(self, exc) -> None:
        self.waiting.pop(self, None)
        self._stop_header_timer()
        super().connection_lost(exc)


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass bound to ``limits`` with its own waiting list (one per server)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "waiting": collections.OrderedDict()})


UVICORN_BACKLOG = 2048


def connection_budget(wanted: int, backlog: int = UVICORN_BACKLOG) -> tuple[int, int]:
    """(connection cap, listen backlog) that the process's file-descriptor limit can hold.

    asyncio accepts up to ``backlog`` sockets per event-loop tick before any protocol sees them, and a
    shed socket's descriptor is freed a tick later: so the limit must hold the cap plus two backlogs. The
    soft limit is raised towards the hard one first; if that is still short, backlog and cap shrink (and
    the server says so once).
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return wanted, backlog
    used = _open_fds()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + 2 * backlog + FD_RESERVE + used
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted, backlog
    room = max(8, soft - FD_RESERVE - used)
    backlog = max(4, min(backlog, room // 5))
    cap = max(1, min(wanted, room - 2 * backlog))
    if cap < wanted:
        log.warning("the file-descriptor limit (ulimit -n %d) holds %d connections (listen backlog %d), not %d: "
                    "capping there", soft, cap, backlog, wanted)  # fmt: skip
    return cap, backlog


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 16


# -- logs ------------------------------------------------------------------------------------------------
class Throttle:
    """Logs a message at most once per ``every_s`` per key, with how many were suppressed meanwhile."""

    def __init__(self, every_s: float = 60.0):
        self.every_s = every_s
        self.last: dict[str, float] = {}
        self.suppressed: collections.Counter = collections.Counter()

    def __call__(self, key: str, message: str, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        last = self.last.get(key)
        if last is not None and now - last < self.every_s:
            self.suppressed[key] += 1
            return
        self.last[key] = now
        count = self.suppressed.pop(key, 0)
        log.log(level, "%s%s", message, f" ({count} more since the last report)" if count else "")


_throttled = Throttle()


ACCEPT_ERROR = "socket.accept() out of system resource"


def install_quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio's accept errors (EMFILE, ENFILE, ENOBUFS, ENOMEM) logged once a minute, not once per retry."""
    previous = loop.get_exception_handler()
    if getattr(previous, "thinktalk_quiet", False):
        return

    throttle = Throttle()

    def handler(loop, context):
        if context.get("message") == ACCEPT_ERROR:
            exc = context.get("exception")
            throttle("accept", f"cannot accept connections: {exc} (the server keeps serving the open ones; "
                     "raise `ulimit -n` or lower --max-connections)", logging.ERROR)  # fmt: skip
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.thinktalk_quiet = True
    loop.set_exception_handler(handler)


SECRET_PARAM = re.compile(r"(?i)((?:^|[?&;])[^=&;]*(?:key|token|secret|auth|password|passwd|signature)[^=&;]*=)[^&;]*")
SECRET_PROTOCOL = re.compile(r"(?i)(openai-insecure-api-key\.)[^&;,\s]*")


def redact(text: str) -> str:
    """``/v1/models?api_key=sk-1&x=2`` -> ``/v1/models?api_key=***&x=2`` (and ``openai-insecure-api-key.***``)."""
    if "?" not in text and "insecure-api-key" not in text.lower():
        return text
    path, sep, query = text.partition("?")
    if sep:
        query = SECRET_PARAM.sub(r"\1***", query)
    return SECRET_PROTOCOL.sub(r"\1***", path + sep + query)


class RedactSecrets(logging.Filter):
    """Blanks credentials in logged URLs (uvicorn logs the path with its query string)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def install_log_redaction() -> None:
    """Attach :class:`RedactSecrets` to uvicorn's loggers and their handlers (idempotent)."""
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn"):
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if not any(isinstance(f, RedactSecrets) for f in target.filters):
                target.addFilter(RedactSecrets())
