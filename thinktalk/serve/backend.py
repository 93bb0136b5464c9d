"""The one interface between the HTTP/WebSocket layer and the model: ``Backend.start(request) -> Session``.

A :class:`Session` is an async iterator of :class:`Event` (text deltas, pcm16 audio chunks, then one
``done`` or ``error``) with ``cancel()``. The API code knows nothing else about how the model runs,
so a batching scheduler that multiplexes many sessions onto one model can replace
:class:`SingleStreamBackend` without touching it.

:class:`SingleStreamBackend` is the plain path: one worker thread runs the blocking ``model.stream``
for one session at a time; admitted sessions wait in a FIFO bounded by ``max_sessions``; a full queue
is refused at once (429 + Retry-After). Cancelling a queued session removes it; cancelling the running
one closes its generator at the next event, which drops its KV caches and stream states.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from thinktalk.serve.errors import APIError, invalid, overloaded, server_error
from thinktalk.serve.media import OUTPUT_SAMPLE_RATE, float_to_pcm16, remove_files, resample
from thinktalk.serve.metrics import Metrics
from thinktalk.serve.settings import ServeSettings

log = logging.getLogger("thinktalk.serve")


@dataclass
class GenerationRequest:
    """What a client asked for, validated, with media decoded (the DESIGN.md §2 conversation format)."""

    conversation: list[dict]
    max_tokens: int
    voice: str | None = None  # a key of model.speakers: answer with speech; None: text only
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    use_audio_in_video: bool = False
    # Text-to-speech: the answer is this text, teacher-forced through the Thinker (see tts.py).
    speak_text: str | None = None
    kind: str = "chat"  # metrics label: chat | speech | realtime
    tools: list[dict] | None = None  # function tools for the chat template ({"type": "function", "function": {...}})
    # Read the prompt and stop, keeping it for a later prompt that starts the same way (realtime: the turn so far
    # while the user speaks). Only backends with ``supports_prefill_only`` take it.
    prefill_only: bool = False
    # max_tokens is a ceiling the server chose, not the client's ask (transcriptions): when the prompt leaves less
    # room in the model's context, the answer may use what is left instead of being refused.
    up_to_context: bool = False
    temp_files: list[str] = field(default_factory=list)  # removed when the session ends


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    audio_seconds: float = 0.0


@dataclass
class Event:
    kind: str  # "text" | "audio" | "done" | "error"
    text: str = ""
    audio: bytes = b""  # pcm16 little-endian mono at sample_rate
    sample_rate: int = OUTPUT_SAMPLE_RATE
    finish_reason: str | None = None  # done: "stop" | "length" | "cancelled"
    usage: Usage | None = None  # done
    error: APIError | None = None  # error


@dataclass
class ModelInfo:
    name: str
    family: str
    voices: list[str]
    has_speech: bool
    created: int = field(default_factory=lambda: int(time.time()))
    context_length: int | None = None  # the Thinker's max_position_embeddings: prompt + answer must fit

    def voice(self, asked: str | None, default: str | None, param: str) -> str:
        """The checkpoint's speaker name for ``asked`` (case-insensitive), or a 400 listing the voices."""
        if not self.has_speech or not self.voices:
            raise invalid("this model has no speech output (the checkpoint has no talker/speakers)", param,
                          "audio_not_supported")  # fmt: skip
        if asked is None or asked == "":
            asked = default or self.voices[0]
        for v in self.voices:
            if v.lower() == str(asked).lower():
                return v
        raise invalid(f"unknown voice '{asked}'; this model's voices: {', '.join(self.voices)}", param, "unknown_voice")


def context_length_of(model) -> int | None:
    """The Thinker's context (``thinker_config.text_config.max_position_embeddings``), when the model says."""
    cfg = getattr(model, "cfg", None)
    value = getattr(getattr(getattr(cfg, "thinker", None), "text", None), "max_position_embeddings", None)
    return value if isinstance(value, int) else None


class Session:
    """One generation: async-iterate its events; ``cancel()`` stops it (idempotent, thread-safe)."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, on_cancel=None):
        self.id = f"sess_{uuid.uuid4().hex[:16]}"
        self.request = request
        self.created = time.monotonic()
        self.started: float | None = None  # when the model began (queue wait = started - created)
        self.first_token_s: float | None = None
        self.first_audio_s: float | None = None
        self.finished = False
        self.ended = False  # the final event was pushed (set by the backend, under its lock)
        self._cancelled = threading.Event()
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._on_cancel = on_cancel

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    # Called from the worker thread.
    def push(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self.finished:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event.kind in ("done", "error"):
            self.finished = True
        return event


class Backend(abc.ABC):
    """Runs generation requests. Implementations: :class:`SingleStreamBackend` (a batching one later)."""

    info: ModelInfo
    supports_prefill_only: bool = False

    @abc.abstractmethod
    async def start(self, request: GenerationRequest) -> Session:
        """Admit ``request`` and return its session, or raise :class:`APIError` (429/503) when full."""

    @abc.abstractmethod
    def check_capacity(self) -> None:
        """Raise the same 429/503 ``start`` would, before the caller spends work on decoding media."""

    @abc.abstractmethod
    def load(self) -> tuple[int, int]:
        """(queued, running) sessions."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Cancel everything and stop."""


class SingleStreamBackend(Backend):
    def __init__(self, model, processor, settings: ServeSettings, metrics: Metrics, model_name: str):
        self.model = model
        self.processor = processor
        self.settings = settings
        self.metrics = metrics
        speakers = getattr(model, "speakers", None) or {}
        has_speech = bool(getattr(model, "has_speech", False)) and bool(speakers)
        self.info = ModelInfo(model_name, getattr(model, "family", "unknown"), list(speakers), has_speech,
                              context_length=context_length_of(model))  # fmt: skip
        self._pending: collections.deque[Session] = collections.deque()
        self._running: Session | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mean_session_s = 2.0  # running estimate, for Retry-After
        metrics.gauge("thinktalk_queue_depth", lambda: self.load()[0])
        metrics.gauge("thinktalk_running_sessions", lambda: self.load()[1])
        metrics.gauge("thinktalk_active_sessions", lambda: sum(self.load()))

    # -- admission (event loop) ----------------------------------------------------------------------
    def load(self) -> tuple[int, int]:
        with self._cond:
            return len(self._pending), int(self._running is not None)

    def _retry_after(self) -> int:
        queued, running = self.load()
        return max(1, round(self._mean_session_s * (queued + running) / 2))

    def check_capacity(self) -> None:
        if self._closing:
            raise overloaded("the server is shutting down", 5, status=503)
        if self._thread is not None and not self._thread.is_alive():
            raise overloaded("the model worker stopped; the server needs a restart", 30, status=503)
        queued, running = self.load()
        if queued + running >= self.settings.max_sessions:
            raise overloaded(
                f"the server is at its limit of {self.settings.max_sessions} concurrent sessions; retry later",
                self._retry_after(),
            )

    async def start(self, request: GenerationRequest) -> Session:
        self.check_capacity()
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._worker, name="thinktalk-model", daemon=True)
            self._thread.start()
        session = Session(request, self._loop, on_cancel=self._dequeue)
        with self._cond:
            self._pending.append(session)
            self._cond.notify()
        return session

    def _dequeue(self, session: Session) -> None:
        with self._cond:
            try:
                self._pending.remove(session)
            except ValueError:
                return  # running (the worker notices) or already finished
        self._finish(session, Event("done", finish_reason="cancelled", usage=Usage()), outcome="cancelled")

    async def close(self) -> None:
        with self._cond:
            self._closing = True
            pending = list(self._pending)
            running = self._running
            self._cond.notify_all()
        for s in pending:
            s.cancel()
        if running is not None:
            running.cancel()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # -- the worker thread -----------------------------------------------------------------------------
    def _worker(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing and not self._pending:
                    return
                session = self._pending.popleft()
                self._running = session
            try:
                self._run(session)
            except Exception:  # never let one request kill the worker
                log.exception("session %s failed", session.id)
                self._finish(session, Event("error", error=server_error()), outcome="failed")
            finally:
                with self._cond:
                    self._running = None

    def _finish(self, session: Session, event: Event, outcome: str) -> None:
        with self._cond:
            if session.ended:
                return
            session.ended = True
        remove_files(session.request.temp_files)
        session.push(event)
        self.metrics.inc("thinktalk_sessions_total", {"kind": session.request.kind, "outcome": outcome})
        if event.error is not None:
            self.metrics.inc("thinktalk_errors_total", {"type": event.error.type})

    def _run(self, session: Session) -> None:
        req = session.request
        session.started = time.monotonic()
        waited = session.started - session.created
        self.metrics.observe("thinktalk_queue_wait_seconds", waited)
        if session.cancelled:
            self._finish(session, Event("done", finish_reason="cancelled", usage=Usage()), "cancelled")
            return
        if waited > self.settings.queue_timeout_s:
            err = overloaded(f"the request waited {waited:.0f} s for the model; retry later", self._retry_after(), 503)
            self._finish(session, Event("error", error=err), "rejected")
            return
        try:
            inputs, answer_ids = self._prepare(req)
        except APIError as e:
            self._finish(session, Event("error", error=e), "rejected")
            return
        usage = Usage(prompt_tokens=int(inputs["input_ids"].shape[-1]))
        events = self._model_events(req, inputs, answer_ids)
        deadline = session.started + self.settings.max_session_seconds
        finish = "stop"
        first_token_at = None
        try:
            for ev in events:
                if session.cancelled:
                    finish = "cancelled"
                    break
                now = time.monotonic()
                if ev.kind == "text":
                    usage.completion_tokens += len(ev.token_ids)
                    if first_token_at is None:
                        first_token_at = now
                        session.first_token_s = now - session.created
                        self.metrics.observe("thinktalk_first_token_seconds", session.first_token_s)
                    if ev.text:
                        session.push(Event("text", text=ev.text))
                elif ev.kind == "audio" and ev.audio is not None and ev.audio.numel() > 0:
                    wav = ev.audio.detach().float().reshape(-1).cpu().numpy()
                    rate = int(ev.sample_rate or OUTPUT_SAMPLE_RATE)
                    if rate != OUTPUT_SAMPLE_RATE:
                        wav = resample(wav, rate, OUTPUT_SAMPLE_RATE)
                    usage.audio_seconds += wav.size / OUTPUT_SAMPLE_RATE
                    if session.first_audio_s is None:
                        session.first_audio_s = now - session.created
                        self.metrics.observe("thinktalk_first_audio_seconds", session.first_audio_s)
                    session.push(Event("audio", audio=float_to_pcm16(wav)))
                elif ev.kind == "done":
                    if ev.num_tokens:
                        usage.completion_tokens = ev.num_tokens[0]
                        finish = ev.finish_reasons[0] if ev.finish_reasons[0] != "cancelled" else finish
                    break
                if now > deadline:
                    finish = "length"
                    break
        except torch.cuda.OutOfMemoryError:
            log.warning("session %s: out of memory", session.id)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            err = overloaded("the model ran out of memory for this request; retry later or send less", 10, 503)
            self._finish(session, Event("error", error=err), "failed")
            return
        except Exception as e:  # inputs were validated: a failure here is the server's, not the client's
            log.exception("session %s: generation failed", session.id)
            self._finish(session, Event("error", error=server_error(f"generation failed ({type(e).__name__}: {e})")),
                         "failed")  # fmt: skip
            return
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # runs the generator's cleanup: its KV caches and stream states go with it
        elapsed = time.monotonic() - session.started
        if first_token_at is not None and usage.completion_tokens > 1:
            rate = (usage.completion_tokens - 1) / max(time.monotonic() - first_token_at, 1e-6)
            self.metrics.observe("thinktalk_tokens_per_second", rate)
        self._mean_session_s = 0.8 * self._mean_session_s + 0.2 * elapsed
        self.metrics.inc("thinktalk_prompt_tokens_total", value=usage.prompt_tokens)
        self.metrics.inc("thinktalk_generated_tokens_total", value=usage.completion_tokens)
        self.metrics.inc("thinktalk_audio_output_seconds_total", value=usage.audio_seconds)
        outcome = "cancelled" if finish == "cancelled" else "completed"
        self._finish(session, Event("done", finish_reason=finish, usage=usage), outcome)

    def _prepare(self, req: GenerationRequest) -> tuple[dict, list[int] | None]:
        """Processor inputs (and, for text-to-speech, the answer's token ids) with the prompt limits applied.

        Client text is tokenized as plain text (``escape_special_tokens``): ``<|im_end|>`` written in a
        message cannot end the turn or fake a system message. Prompt plus answer must fit the model's context.
        """
        from thinktalk.serve.limits import context_exceeded, prompt_too_long

        try:
            extra = {"tools": req.tools} if req.tools else {}
            inputs = self.processor(req.conversation, use_audio_in_video=req.use_audio_in_video,
                                    escape_special_tokens=True, **extra)  # fmt: skip
        except APIError:
            raise
        except (ValueError, TypeError, OSError, RuntimeError) as e:
            raise invalid(f"could not prepare the inputs: {e}", None, "invalid_input") from None
        n = int(inputs["input_ids"].shape[-1])
        if n > self.settings.max_prompt_tokens:
            raise prompt_too_long(n, self.settings.max_prompt_tokens)
        answer_ids = None
        answer, param = req.max_tokens, "max_response_output_tokens" if req.kind == "realtime" else "max_tokens"
        if req.speak_text is not None:
            answer_ids = self.processor.tokenizer.encode(req.speak_text, split_special_tokens=True)
            if not answer_ids:
                raise invalid("the text has no tokens to speak", "input", "input_too_short")
            if len(answer_ids) > req.max_tokens:
                raise invalid(f"the text is {len(answer_ids)} tokens; at most {req.max_tokens} can be spoken", "input",
                              "input_too_long")  # fmt: skip
            answer, param = len(answer_ids) + 1, "input"  # the forced answer and its end token
        context = self.info.context_length
        if context is not None and n + answer > context:
            if not (req.up_to_context and answer_ids is None and n < context):
                raise context_exceeded(n, answer, context, param)
            req.max_tokens = context - n  # the server's ceiling, cut to the room the prompt leaves
        return inputs, answer_ids

    def _model_events(self, req: GenerationRequest, inputs: dict, answer_ids: list[int] | None) -> Iterator:
        sampling = {
            "do_sample": req.temperature > 0,
            "temperature": req.temperature if req.temperature > 0 else 1.0,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "repetition_penalty": req.repetition_penalty,
        }
        if req.seed is not None:
            sampling["seed"] = req.seed
        if answer_ids is not None:
            from thinktalk.serve.tts import speak

            hz = getattr(self.model, "codec_rate_hz", None)  # Talker steps per second of speech
            max_codes = None if hz is None else max(1, int(self.settings.max_speech_seconds * hz))
            return speak(self.model, inputs, answer_ids, req.voice, req.seed, max_codes)
        kwargs = dict(inputs, max_new_tokens=req.max_tokens, **sampling)
        if req.use_audio_in_video:
            kwargs["use_audio_in_video"] = True
        if req.voice is not None:
            hz = getattr(self.model, "codec_rate_hz", None)  # Talker steps per second of speech
            if hz is not None:
                kwargs["talker_max_new_tokens"] = max(1, int(self.settings.max_speech_seconds * hz))
            return self.model.stream(**kwargs, speaker=req.voice, return_audio=True)
        return self.model.stream(**kwargs, return_audio=False)
