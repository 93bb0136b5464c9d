"""The batching backend: every session of the server runs in one :class:`~thinktalk.generation.engine.Engine`.

    start ─► prepare (processor, limits; a thread pool) ─► inbox ─► engine.submit ─► engine.step … ─► events

One worker thread owns the engine and nothing else touches it: it moves prepared requests from the
inbox into the engine, calls :meth:`Engine.step` — one batched Thinker step and one batched Talker step
for every session at once, prompts read in pieces — and hands each session the events its request
produced. Cancelling a session (the client disconnected, the realtime user barged in) stops its
request at the next step and frees its rows. Admission is bounded by ``max_sessions`` (429 beyond);
the engine's rows are sized from ``batch_rows`` (default ``max_sessions``) and, with ``kv_cache_gb``,
from the memory their KV caches take.

:class:`~thinktalk.serve.backend.SingleStreamBackend` (one session at a time) stays as the plain path
(``thinktalk serve --scheduler single``); the tests compare the two.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time

import torch

from thinktalk.generation.engine import Engine, EngineConfig
from thinktalk.generation.inputs import ModelInputs
from thinktalk.generation.options import GenerateOptions, SpeechParams, TextParams
from thinktalk.generation.sampling import SamplingParams
from thinktalk.serve.backend import Event, GenerationRequest, Session, SingleStreamBackend, Usage
from thinktalk.serve.errors import APIError, invalid, overloaded, server_error
from thinktalk.serve.media import OUTPUT_SAMPLE_RATE, float_to_pcm16, resample

log = logging.getLogger("thinktalk.serve")


class EventTranslator:
    """One session's model events → server events (pcm16 at 24 kHz), with its usage and latency metrics."""

    def __init__(self, session: Session, metrics, prompt_tokens: int):
        self.session, self.metrics = session, metrics
        self.usage = Usage(prompt_tokens=prompt_tokens)
        self.finish = "stop"
        self.first_token_at: float | None = None

    def feed(self, ev) -> None:
        s, now = self.session, time.monotonic()
        if ev.kind == "text":
            self.usage.completion_tokens += len(ev.token_ids)
            if self.first_token_at is None:
                self.first_token_at = now
                s.first_token_s = now - s.created
                self.metrics.observe("thinktalk_first_token_seconds", s.first_token_s)
            if ev.text:
                s.push(Event("text", text=ev.text))
        elif ev.kind == "audio" and ev.audio is not None and ev.audio.numel() > 0:
            wav = ev.audio.detach().float().reshape(-1).cpu().numpy()
            rate = int(ev.sample_rate or OUTPUT_SAMPLE_RATE)
            if rate != OUTPUT_SAMPLE_RATE:
                wav = resample(wav, rate, OUTPUT_SAMPLE_RATE)
            self.usage.audio_seconds += wav.size / OUTPUT_SAMPLE_RATE
            if s.first_audio_s is None:
                s.first_audio_s = now - s.created
                self.metrics.observe("thinktalk_first_audio_seconds", s.first_audio_s)
            s.push(Event("audio", audio=float_to_pcm16(wav)))
        elif ev.kind == "done" and ev.num_tokens:
            self.usage.completion_tokens = ev.num_tokens[0]
            if ev.finish_reasons[0] != "cancelled":
                self.finish = ev.finish_reasons[0]

    def record(self) -> None:
        m, u = self.metrics, self.usage
        if self.first_token_at is not None and u.completion_tokens > 1:
            rate = (u.completion_tokens - 1) / max(time.monotonic() - self.first_token_at, 1e-6)
            m.observe("thinktalk_tokens_per_second", rate)
        m.inc("thinktalk_prompt_tokens_total", value=u.prompt_tokens)
        m.inc("thinktalk_generated_tokens_total", value=u.completion_tokens)
        m.inc("thinktalk_audio_output_seconds_total", value=u.audio_seconds)


def kv_bytes_per_row(model, max_len: int, talker_len: int) -> int:
    """Bytes of one engine row's KV caches (Thinker and, when the model speaks, Talker)."""

    def per_token(decoder) -> int:
        s = decoder.spec
        return 2 * s.num_hidden_layers * s.num_key_value_heads * s.head_dim * decoder.norm.weight.element_size()

    total = per_token(model.thinker.model) * (max_len + 1)
    if getattr(model, "talker", None) is not None:
        total += per_token(model.talker.model) * (talker_len + 1)
    return total


def default_kv_budget(model) -> float:
    """Bytes the engine's KV caches may take when ``--kv-cache-gb`` is not given: 80 % of the free memory
    of the model's GPU, or a quarter of the machine's memory on the CPU."""
    device = model.thinker.lm_head.weight.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.8 * free
    import os

    return 0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class BatchingBackend(SingleStreamBackend):
    """Continuous batching behind the server's :class:`~thinktalk.serve.backend.Backend` interface."""

    def __init__(self, model, processor, settings, metrics, model_name: str):
        super().__init__(model, processor, settings, metrics, model_name)
        rate = getattr(model, "codec_rate_hz", 50.0)
        self._max_codes = max(1, int(settings.max_speech_seconds * rate))
        max_len = settings.max_prompt_tokens + settings.max_tokens + 1
        talker_len = max_len + 16 + self._max_codes if self.info.has_speech else 0
        rows = settings.batch_rows or settings.max_sessions
        per_row = kv_bytes_per_row(model, max_len, talker_len)
        budget = settings.kv_cache_gb * 2**30 if settings.kv_cache_gb else default_kv_budget(model)
        fit = int(budget // per_row)
        if fit < 1:
            raise ValueError(f"{budget / 2**30:.2f} GiB of KV cache does not hold one conversation ({per_row / 2**30:.2f} "
                             f"GiB for {max_len} tokens): lower --max-prompt-tokens / --max-tokens or raise --kv-cache-gb")  # fmt: skip
        rows = min(rows, fit)
        self.config = EngineConfig(
            rows=rows, max_len=max_len, talker_max_len=talker_len, prefill_chunk=settings.prefill_chunk,
            prefix_reuse=settings.prefix_reuse, keep_layers=model.talker_reads if self.info.has_speech else (),
            encode_async=settings.encode_async,
            short_first=settings.prefill_short_first,
        )
        log.info("engine: %d rows of %d tokens (%.2f GiB of KV cache)", rows, max_len,
                 rows * kv_bytes_per_row(model, max_len, talker_len) / 2**30)  # fmt: skip
        self.engine = Engine(model, self.config)
        self.engine.allocate(self._talker_stage())
        self._prep = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="thinktalk-prepare")
        self._inbox: collections.deque = collections.deque()  # (session, inputs, options, forced)
        self._preparing = 0
        self._live: dict[Session, tuple] = {}  # session -> (request, translator)
        # the engine keeps prompts read ahead (prefix reuse) and extends a growing audio clip's reuse window by window
        self.supports_prefill_only = settings.prefix_reuse and getattr(model.thinker, "audio_block", None) is not None

    def _talker_stage(self):
        if not self.info.has_speech:
            return None
        params = SpeechParams(speaker=self.info.voices[0], sampling=self.model.keywords.talker_sampling,
                              max_new_tokens=self._max_codes)  # fmt: skip
        return self.model.speech_stages(params, None, True)[0]

    # -- admission (event loop) ----------------------------------------------------------------------
    def load(self) -> tuple[int, int]:
        with self._cond:
            # counted from the backend's own sessions: a request the engine has finished stays running here
            # until its last event is dispatched and its session finished (metrics are recorded by then)
            queued = sum(1 for request, _ in self._live.values() if request.rows is None and not request.done)
            return self._preparing + len(self._inbox) + queued, len(self._live) - queued

    async def start(self, request: GenerationRequest) -> Session:
        import asyncio

        self.check_capacity()
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._worker, name="thinktalk-engine", daemon=True)
            self._thread.start()
        session = Session(request, self._loop, on_cancel=self._cancelled)
        with self._cond:
            self._preparing += 1
        self._prep.submit(self._prepare_job, session)
        return session

    def _prepare_job(self, session: Session) -> None:
        try:
            if session.cancelled:
                self._finish(session, Event("done", finish_reason="cancelled", usage=Usage()), "cancelled")
                return
            inputs, answer_ids = self._prepare(session.request)
            options, forced = self._options(session.request, answer_ids)
            item = (session, ModelInputs.from_dict(inputs, session.request.use_audio_in_video), options, forced)
        except APIError as e:
            self._finish(session, Event("error", error=e), "rejected")
            return
        except Exception as e:
            log.exception("session %s: preparing failed", session.id)
            self._finish(session, Event("error", error=server_error(f"preparing the request failed ({e})")), "failed")
            return
        finally:
            with self._cond:
                self._preparing -= 1
        with self._cond:
            self._inbox.append(item)
            self._cond.notify()

    def _options(self, req: GenerationRequest, answer_ids: list[int] | None) -> tuple[GenerateOptions, list[int] | None]:
        sampling = SamplingParams(
            do_sample=req.temperature > 0,
            temperature=req.temperature if req.temperature > 0 else 1.0,
            top_k=req.top_k,
            top_p=req.top_p,
            repetition_penalty=req.repetition_penalty,
        )
        speech = None
        if req.voice is not None:
            speech = SpeechParams(speaker=req.voice, sampling=self.model.keywords.talker_sampling,
                                  max_new_tokens=self._max_codes)  # fmt: skip
        forced = None
        if answer_ids is not None:
            forced = [*answer_ids, int(self.model.eos_token_ids[0])]  # the text, then <|im_end|>
        max_new = len(forced) if forced is not None else req.max_tokens
        return GenerateOptions(text=TextParams(max_new_tokens=max_new, sampling=sampling), speech=speech,
                               seed=req.seed), forced  # fmt: skip

    def _cancelled(self, session: Session) -> None:
        with self._cond:
            for i, item in enumerate(self._inbox):
                if item[0] is session:
                    del self._inbox[i]
                    break
            else:
                live = self._live.get(session)
                if live is not None:
                    live[0].cancel()  # the engine stops it at its next step
                self._cond.notify()
                return
        self._finish(session, Event("done", finish_reason="cancelled", usage=Usage()), outcome="cancelled")

    async def close(self) -> None:
        with self._cond:
            self._closing = True
            live = list(self._live)
            self._cond.notify_all()
        for s in live:
            s.cancel()
        self._prep.shutdown(wait=False, cancel_futures=True)
        if self._thread is not None:
            import asyncio

            await asyncio.to_thread(self._thread.join, 10)
        self.engine.close()

    # -- the worker thread -----------------------------------------------------------------------------
    def _worker(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._inbox and self.engine.idle and not self._closing:
                    self._cond.wait(timeout=1.0)
                if self._closing and self.engine.idle and not self._inbox:
                    return
                arrived = list(self._inbox)
                self._inbox.clear()
            for session, inputs, options, forced in arrived:
                self._submit(session, inputs, options, forced)
            self._expire()
            try:
                self.engine.step()
            except torch.cuda.OutOfMemoryError:
                log.warning("engine step: out of memory; failing the running sessions")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self._fail_all(overloaded("the model ran out of memory; retry later or send less", 10, 503))
            except Exception as e:  # a failure of the batched step is the server's: everyone running fails
                log.exception("engine step failed")
                self._fail_all(server_error(f"generation failed ({type(e).__name__}: {e})"))
            self._dispatch()

    def _submit(self, session: Session, inputs: ModelInputs, options: GenerateOptions, forced) -> None:
        if session.cancelled:
            self._finish(session, Event("done", finish_reason="cancelled", usage=Usage()), "cancelled")
            return
        try:
            request = self.engine.submit(inputs, options, forced=forced, streaming_audio=True,
                                         prefill_only=session.request.prefill_only)  # fmt: skip
        except (ValueError, TypeError) as e:
            self._finish(session, Event("error", error=invalid(str(e), None, "invalid_request")), "rejected")
            return
        session.started = time.monotonic()
        self.metrics.observe("thinktalk_queue_wait_seconds", session.started - session.created)
        with self._cond:
            self._live[session] = (request, EventTranslator(session, self.metrics, inputs.length))

    def _expire(self) -> None:
        """Sessions past ``max_session_seconds`` stop with finish "length"; requests waiting for rows past
        ``queue_timeout_s`` are refused with 503."""
        now = time.monotonic()
        for session, (request, tr) in list(self._live.items()):
            if request.rows is None and not request.done and now - session.created > self.settings.queue_timeout_s:
                request.cancel()
                self._drop(session)
                err = overloaded(f"the request waited {now - session.created:.0f} s for the model; retry later",
                                 self._retry_after(), 503)  # fmt: skip
                self._finish(session, Event("error", error=err), "rejected")
            elif session.started is not None and now - session.started > self.settings.max_session_seconds:
                tr.finish = "length"
                request.cancel()

    def _drop(self, session: Session) -> None:
        with self._cond:
            self._live.pop(session, None)

    def _dispatch(self) -> None:
        for session, (request, tr) in list(self._live.items()):
            while request.events:
                ev = request.events.popleft()
                if ev.kind == "error":
                    log.error("session %s failed: %r", session.id, ev.error)
                    self._drop(session)
                    self._finish(session, Event("error", error=server_error(f"generation failed ({ev.error})")), "failed")
                    break
                tr.feed(ev)
                if ev.kind == "done":
                    self.metrics.inc("thinktalk_prompt_tokens_reused_total", value=request.reused)
                    self._drop(session)
                    cancelled = session.cancelled and tr.finish != "length"
                    finish = "cancelled" if cancelled else tr.finish
                    tr.record()
                    elapsed = time.monotonic() - (session.started or session.created)
                    self._mean_session_s = 0.8 * self._mean_session_s + 0.2 * elapsed
                    self._finish(session, Event("done", finish_reason=finish, usage=tr.usage),
                                 "cancelled" if cancelled else "completed")  # fmt: skip
                    break

    def _fail_all(self, error) -> None:
        for session, (request, _) in list(self._live.items()):
            request.cancel()
            self._drop(session)
            self._finish(session, Event("error", error=error), "failed")
        self.engine = Engine(self.model, self.config)  # a fresh engine: nothing half-done survives a failed step
        self.engine.allocate(self._talker_stage())
