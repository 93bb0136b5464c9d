"""``/v1/realtime``: a WebSocket speaking OpenAI's Realtime API — the GA protocol (what the ``openai`` SDK's
``client.realtime.connect`` speaks) and the beta event names (older clients) — with server-side VAD.

**Dialects.** A connection speaks the beta names until the client shows it speaks GA: a ``session.update``
whose session has ``type: "realtime"`` (or GA fields: ``output_modalities``, ``audio``), or a GA-only event
(``output_audio_buffer.clear``). A client sending ``OpenAI-Beta: realtime=v1`` stays beta. ``session.created``
(sent before the client has said anything) carries the session in both shapes' fields. The GA names:

=================================== ========================================
beta                                GA
=================================== ========================================
``response.audio.delta/done``       ``response.output_audio.delta/done``
``response.audio_transcript.*``     ``response.output_audio_transcript.*``
``response.text.delta/done``        ``response.output_text.delta/done``
``conversation.item.created``       ``conversation.item.added`` + ``conversation.item.done``
=================================== ========================================

Client events: ``session.update``, ``input_audio_buffer.append`` / ``commit`` / ``clear``,
``conversation.item.create`` (messages, ``function_call``, ``function_call_output``), ``conversation.item.delete``,
``conversation.item.truncate``, ``conversation.item.retrieve``, ``response.create``, ``response.cancel``, ``output_audio_buffer.clear``.

**Turns.** ``turn_detection: null`` is push-to-talk (the client commits). ``server_vad`` runs the Silero
VAD model (:mod:`thinktalk.serve.vad`) over the appended audio as it arrives: ``speech_started`` /
``speech_stopped``, the turn committed by the server, and (``create_response``) a response started.
Speech during an answer (``interrupt_response``) cancels it — the engine drops it at its next step —
and sends ``output_audio_buffer.cleared``; ``conversation.item.truncate`` with ``audio_end_ms`` then cuts the
assistant item's transcript to the share of its audio that was played. ``idle_timeout_ms``: that much audio
with no speech after an answer sends ``input_audio_buffer.timeout_triggered`` and asks for a response.

**Tools.** ``tools`` (function tools) go to the chat template; the answer's ``<tool_call>`` blocks become
``function_call`` output items (``response.function_call_arguments.delta/done``); a malformed call is an
``error`` event (``invalid_tool_call``, with the raw text) and the response ends ``failed``, never silently.
``function_call_output`` items continue the turn. ``<think>`` reasoning is never in the transcript; it is
sent as ``response.reasoning_text.delta/done`` (a thinktalk extension).

**Input transcription** (``input_audio_transcription`` / ``audio.input.transcription`` not null): every
committed audio turn is transcribed by the loaded model with its ASR prompt (:mod:`thinktalk.asr`) and sent
as ``conversation.item.input_audio_transcription.completed``.

Audio is pcm16 mono at 24 kHz both ways (``audio/pcm``, rate 24000; resampled to 16 kHz for the audio
encoder). Beyond OpenAI's item content types, ``input_image`` (``image_url``: a data URL) and
``input_video`` (``video_url``: a data URL) are accepted.

The conversation as a whole keeps within the request limits (images, their pixels, audio seconds, video
frames, text characters — a :class:`~thinktalk.serve.limits.MediaBudget`), which bounds the decoded media
one connection holds. An item that alone is over a limit is refused (``error``); one that fits alone
makes room by dropping the oldest items, each announced with ``conversation.item.deleted`` — the same
sliding window as ``realtime_max_items``. ``conversation.item.delete`` frees room explicitly.

Errors never close the session: a bad event, or a failure inside the server while handling one, is an
``error`` event and the loop goes on. Only the transport ends it (a disconnect, or uvicorn's close 1009
for a message over ``max_body_bytes``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from thinktalk.serve import limits, media
from thinktalk.serve.backend import GenerationRequest, Session, Usage
from thinktalk.serve.errors import APIError, invalid, overloaded, server_error
from thinktalk.serve.limits import MediaBudget, MediaUsage, budget_from
from thinktalk.serve.toolcalls import AnswerStream, parse_answer
from thinktalk.serve.vad import TurnDetection, VoiceActivity

SCOPE = "per realtime conversation"
INLINE_PARSE_CHARS = 65536  # events up to this size are parsed on the event loop (a few ms at most)
# Server VAD runs the Silero model over every appended window (~1 ms each): audio may arrive ahead of real time
# by a burst of VAD_BURST_S, then at most VAD_PACE times real time (a file streamed fast, not a CPU flood).
VAD_BURST_S, VAD_PACE = 30.0, 4.0

router = APIRouter()
log = logging.getLogger("thinktalk.serve")
INPUT_RATE = media.OUTPUT_SAMPLE_RATE  # pcm16 24 kHz, OpenAI's default input_audio_format
BYTES_PER_MS = INPUT_RATE * 2 // 1000
PCM_FORMAT = {"type": "audio/pcm", "rate": INPUT_RATE}
GA_NAMES = {
    "response.audio.delta": "response.output_audio.delta",
    "response.audio.done": "response.output_audio.done",
    "response.audio_transcript.delta": "response.output_audio_transcript.delta",
    "response.audio_transcript.done": "response.output_audio_transcript.done",
    "response.text.delta": "response.output_text.delta",
    "response.text.done": "response.output_text.done",
}
GA_SESSION_FIELDS = ("type", "output_modalities", "audio", "max_output_tokens", "tracing", "truncation", "prompt",
                     "include")  # fmt: skip


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class Response:
    """One ``response.create``: its backend session and the text said so far."""

    def __init__(self, modalities: list[str], voice: str | None):
        self.id = new_id("resp")
        self.item_id = new_id("item")
        self.modalities = modalities
        self.voice = voice
        self.session: Session | None = None
        self.task: asyncio.Task | None = None
        self.cancelled = False
        self.reason = "client_cancelled"
        self.text: list[str] = []  # the answer as the model wrote it
        self.audio_bytes = 0  # pcm16 sent
        self.after_item_id: str | None = None  # the answer's place in the conversation (barge-in adds items)
        self.truncate_ms: int | None = None  # conversation.item.truncate arrived before the item was stored
        self.speech_stopped_at: float | None = None  # monotonic time of the speech_stopped that started it
        self.first_audio_s: float | None = None  # from speech_stopped (or response.create) to the first audio
        self.tools = False  # the prompt offered tools: parse <tool_call> blocks
        self.max_tokens = 0

    def cancel(self, reason: str = "client_cancelled") -> None:
        if not self.cancelled:
            self.reason = reason
        self.cancelled = True
        if self.session is not None:
            self.session.cancel()


class RealtimeConnection:
    def __init__(self, ws: WebSocket, ctx):
        self.ws = ws
        self.ctx = ctx
        self.settings = ctx.settings
        self.send_lock = asyncio.Lock()
        beta = ws.headers.get("openai-beta", "").lower().replace(" ", "")
        self.ga: bool | None = False if "realtime=v1" in beta else None  # None: not known yet (beta names)
        self.buffer = bytearray()  # pcm16 at INPUT_RATE, since the last commit (trimmed while nobody speaks)
        self.buffer_start_ms = 0.0  # session audio clock at buffer[0]
        self.audio_ms = 0.0  # audio appended since the session began
        self.vad: VoiceActivity | None = None
        self.vad_since: tuple[float, float] = (0.0, 0.0)  # (monotonic time, audio_ms) when the VAD started
        self.turn_item_id: str | None = None  # the item the speech in progress becomes
        self.idle_since_ms: float | None = None  # for idle_timeout_ms: audio clock when the last answer ended
        self.last_speech_stopped: float | None = None
        # {"id", "role", "content": [DESIGN.md §2 items], "public": item for clients, "usage": MediaUsage,
        #  "type": "message" | "function_call" | "function_call_output", "audio_ms": (assistant) audio sent}
        self.items: list[dict] = []
        self.held = MediaUsage()  # what the items hold in all (kept within the request limits)
        self.graveyard: list[str] = []  # temp files of dropped items, removed once no response reads them
        self.response: Response | None = None
        self.last_response: Response | None = None
        self.background: set[asyncio.Task] = set()  # input transcriptions
        self.latencies: list[float] = []  # first audio after speech_stopped, per VAD turn (seconds)
        # server VAD: the turn in progress, resampled to 16 kHz as it arrives (a prefix of it is exactly what the
        # whole turn starts with), and read into the engine ahead of its end (prefill_only requests)
        self.turn_resampler = None
        self.turn_audio16: list[np.ndarray] = []
        self.turn_start_ms = 0.0
        self.speculation: asyncio.Task | None = None
        self.speculated = 0  # 16 kHz samples of the turn sent ahead
        self.spec_sessions: set[Session] = set()
        self.cfg = {
            "id": new_id("sess"),
            "modalities": ["text", "audio"] if ctx.info.has_speech else ["text"],
            "instructions": self.settings.system_prompt or "",
            "voice": ctx.default_voice,
            "turn_detection": None,  # TurnDetection | None
            "transcription": None,  # the client's transcription object, or None
            "tools": [],  # [{"type": "function", "name", "description", "parameters"}]
            "tool_choice": "auto",
            "temperature": 0.0,
            "max_tokens": self.settings.default_max_tokens,
        }

    # -- the session object, in the connection's dialect -------------------------------------------------
    def session_object(self) -> dict:
        c = self.cfg
        td = c["turn_detection"].to_json() if c["turn_detection"] is not None else None
        beta = {"input_audio_format": "pcm16", "output_audio_format": "pcm16", "modalities": c["modalities"],
                "voice": c["voice"], "turn_detection": td, "input_audio_transcription": c["transcription"],
                "temperature": c["temperature"], "max_response_output_tokens": c["max_tokens"]}  # fmt: skip
        ga = {"type": "realtime", "output_modalities": ["audio"] if "audio" in c["modalities"] else ["text"],
              "audio": {"input": {"format": PCM_FORMAT, "transcription": c["transcription"], "noise_reduction": None,
                                  "turn_detection": td},
                        "output": {"format": PCM_FORMAT, "voice": c["voice"], "speed": 1.0}},
              "max_output_tokens": c["max_tokens"], "tracing": None, "truncation": "auto", "prompt": None,
              "include": None}  # fmt: skip
        common = {"id": c["id"], "object": "realtime.session", "model": self.ctx.info.name,
                  "instructions": c["instructions"], "tools": c["tools"], "tool_choice": c["tool_choice"]}  # fmt: skip
        if self.ga is None:
            return {**common, **beta, **ga}
        return {**common, **(ga if self.ga else beta)}

    def name(self, beta: str) -> str:
        return GA_NAMES.get(beta, beta) if self.ga else beta

    # -- sending ---------------------------------------------------------------------------------------
    async def send(self, event: dict) -> None:
        event = {"event_id": new_id("event"), **event}
        async with self.send_lock:
            await self.ws.send_text(json.dumps(event, separators=(",", ":")))

    async def send_error(self, err: APIError, client_event_id: str | None = None) -> None:
        self.ctx.metrics.inc("thinktalk_errors_total", {"type": err.type})
        body = err.body()["error"]
        body["event_id"] = client_event_id
        await self.send({"type": "error", "error": body})

    async def item_added(self, previous: str | None, item: dict) -> None:
        """A finished item joined the conversation: ``conversation.item.created`` (beta) or ``added`` + ``done``."""
        if self.ga:
            await self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
            await self.send({"type": "conversation.item.done", "previous_item_id": previous, "item": item})
        else:
            await self.send({"type": "conversation.item.created", "previous_item_id": previous, "item": item})

    # -- the loop --------------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.send({"type": "session.created", "session": self.session_object()})
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text")
                if raw is None:
                    raw = (message.get("bytes") or b"").decode("utf-8", "replace")
                event_id = None
                try:
                    if len(raw) > self.settings.max_body_bytes:
                        raise invalid(f"event too large ({len(raw):,} characters; at most {self.settings.max_body_bytes:,})",
                                      None, "event_too_large")  # fmt: skip
                    event = await self.parse(raw)
                    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                        raise invalid("an event must be a JSON object with a string 'type'", "type", "invalid_event")
                    event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
                    await self.handle(event)
                except APIError as e:
                    await self.send_error(e, event_id)
                except WebSocketDisconnect:
                    raise
                except Exception:  # a bug or an input nobody foresaw: report it, keep the session
                    log.exception("realtime event failed")
                    # If the socket is what failed, this send fails too and ends the loop below.
                    await self.send_error(server_error("internal error while handling the event; the server logged "
                                                       "the details"), event_id)  # fmt: skip
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client went away (sending to it failed): nothing to tell it
        finally:
            if self.response is not None:
                self.response.cancel()
            for task in self.background:
                task.cancel()
            for session in list(self.spec_sessions):
                session.cancel()

    async def parse(self, raw: str):
        """The event's JSON, with the body limits (values, depth); large events off the event loop."""
        args = (raw, self.settings.max_json_values, self.settings.max_json_depth, "the event")
        if len(raw) <= INLINE_PARSE_CHARS:
            return limits.parse_json(*args)
        return await self.ctx.offload(limits.parse_json, *args)

    async def handle(self, event: dict) -> None:
        kind = event["type"]
        handler = {
            "session.update": self.session_update,
            "input_audio_buffer.append": self.buffer_append,
            "input_audio_buffer.commit": self.buffer_commit,
            "input_audio_buffer.clear": self.buffer_clear,
            "conversation.item.create": self.item_create,
            "conversation.item.delete": self.item_delete,
            "conversation.item.truncate": self.item_truncate,
            "conversation.item.retrieve": self.item_retrieve,
            "response.create": self.response_create,
            "response.cancel": self.response_cancel,
            "output_audio_buffer.clear": self.output_clear,
        }.get(kind)
        if handler is None:
            raise invalid(f"unsupported event type '{kind}'", "type", "invalid_event")
        await handler(event)

    # -- session ---------------------------------------------------------------------------------------
    async def session_update(self, event: dict) -> None:
        update = event.get("session")
        if not isinstance(update, dict):
            raise invalid("'session' must be an object", "session")
        ga = any(k in update for k in GA_SESSION_FIELDS)
        if ga and self.ga is False and "type" in update:
            raise invalid("this connection speaks the beta protocol (OpenAI-Beta: realtime=v1); 'session.type' is GA",
                          "session.type", "unknown_parameter")  # fmt: skip
        new = dict(self.cfg)
        for key, value in update.items():
            param = f"session.{key}"
            if key == "type":
                if value != "realtime":
                    raise invalid(f"only 'realtime' sessions are served here (got {str(value)[:40]!r}; transcription "
                                  "sessions: use /v1/audio/transcriptions)", param, "unsupported_parameter")  # fmt: skip
            elif key == "voice":
                new["voice"] = self.ctx.info.voice(value, self.ctx.default_voice, param)
            elif key == "modalities":
                new["modalities"] = self._modalities(value, param)
            elif key == "output_modalities":
                new["modalities"] = self._modalities(value, param, ga=True)
            elif key == "instructions":
                if not isinstance(value, str):
                    raise invalid("must be a string", param)
                if len(value) > self.settings.prompt_chars_limit:
                    raise limits.text_too_long(len(value), self.settings.prompt_chars_limit, param, SCOPE)
                new["instructions"] = value
            elif key in ("input_audio_format", "output_audio_format"):
                if value != "pcm16":
                    raise invalid("only 'pcm16' (24 kHz mono) is supported", param, "unsupported_format")
            elif key == "audio":
                self._audio_config(value, param, new)
            elif key == "turn_detection":
                new["turn_detection"] = TurnDetection.parse(value, param)
            elif key == "input_audio_transcription":
                new["transcription"] = self._transcription(value, param)
            elif key == "temperature":
                new["temperature"] = self._temperature(value, param)
            elif key in ("max_response_output_tokens", "max_output_tokens"):
                new["max_tokens"] = self._max_tokens(value, param)
            elif key == "tools":
                new["tools"] = self._tools(value, param)
            elif key == "tool_choice":
                new["tool_choice"] = self._tool_choice(value, param)
            elif key in ("model", "input_audio_noise_reduction", "tracing", "truncation", "prompt", "include",
                         "speed"):  # fmt: skip
                pass  # accepted and ignored: one model, no noise reduction, no tracing
            else:
                raise invalid(f"unknown session field '{key}'", param, "unknown_parameter")
        if ga and self.ga is None:
            self.ga = True
        await self._set_turn_detection(new["turn_detection"])
        self.cfg = new
        await self.send({"type": "session.updated", "session": self.session_object()})

    def _audio_config(self, value, param: str, new: dict) -> None:
        if not isinstance(value, dict):
            raise invalid("must be an object", param)
        for side, conf in value.items():
            p = f"{param}.{side}"
            if side not in ("input", "output"):
                raise invalid(f"unknown audio field '{side}'", p, "unknown_parameter")
            if not isinstance(conf, dict):
                raise invalid("must be an object", p)
            for key, v in conf.items():
                q = f"{p}.{key}"
                if key == "format":
                    _check_format(v, q)
                elif side == "input" and key == "turn_detection":
                    new["turn_detection"] = TurnDetection.parse(v, q)
                elif side == "input" and key == "transcription":
                    new["transcription"] = self._transcription(v, q)
                elif side == "input" and key == "noise_reduction":
                    pass
                elif side == "output" and key == "voice":
                    new["voice"] = self.ctx.info.voice(v, self.ctx.default_voice, q)
                elif side == "output" and key == "speed":
                    if v not in (None, 1, 1.0):
                        raise invalid("only speed 1.0 is supported", q, "unsupported_parameter")
                else:
                    raise invalid(f"unknown audio.{side} field '{key}'", q, "unknown_parameter")

    async def _set_turn_detection(self, td: TurnDetection | None) -> None:
        if td is None:
            self.vad = None
            return
        if self.vad is None:
            self.vad = await self.ctx.offload(VoiceActivity, td)
            self.vad_since = (time.monotonic(), self.audio_ms)
            self.buffer.clear()  # VAD positions start at the session clock from here
            self.buffer_start_ms = self.audio_ms
            self.vad.position_ms = self.audio_ms
        else:
            self.vad.config = td

    def _transcription(self, value, param: str):
        if value is None:
            return None
        if not isinstance(value, dict):
            raise invalid("must be null or an object", param)
        lang = value.get("language")
        if lang is not None and (not isinstance(lang, str) or len(lang) > 16):
            raise invalid("must be a language code", f"{param}.language")
        prompt = value.get("prompt")
        if prompt is not None and (not isinstance(prompt, str) or len(prompt) > 2000):
            raise invalid("must be a string of at most 2000 characters", f"{param}.prompt")
        return {"model": self.ctx.info.name, "language": lang, "prompt": prompt}

    def _tools(self, value, param: str) -> list[dict]:
        if not isinstance(value, list) or len(value) > 128:
            raise invalid("must be a list of at most 128 tools", param)
        out = []
        for i, tool in enumerate(value):
            p = f"{param}[{i}]"
            if not isinstance(tool, dict) or tool.get("type", "function") != "function":
                raise invalid("only function tools ({'type': 'function', 'name': ...}) are supported", p,
                              "unsupported_tool")  # fmt: skip
            fn = tool.get("function", tool)  # the chat-completions shape is accepted too
            name = fn.get("name") if isinstance(fn, dict) else None
            from thinktalk.serve.toolcalls import NAME

            if not isinstance(name, str) or not NAME.match(name):
                raise invalid("a function tool needs a 'name' of letters, digits, '_', '-', '.' (at most 64)",
                              f"{p}.name")  # fmt: skip
            params = fn.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(params, dict):
                raise invalid("must be a JSON schema object", f"{p}.parameters")
            desc = fn.get("description", "")
            if not isinstance(desc, str):
                raise invalid("must be a string", f"{p}.description")
            out.append({"type": "function", "name": name, "description": desc, "parameters": params})
        template = getattr(getattr(self.ctx.backend, "processor", None), "chat_template", None) or ""
        if out and "tools" not in template:
            raise invalid("this checkpoint's chat template does not describe tools to the model (the Qwen3-Omni "
                          "templates do)", param, "tools_not_supported")  # fmt: skip
        return out

    def _tool_choice(self, value, param: str) -> str:
        if value in ("auto", "none"):
            return value
        raise invalid("only 'auto' and 'none' are supported (the model decides; forcing a call is not)", param,
                      "unsupported_parameter")  # fmt: skip

    def _modalities(self, value, param: str, ga: bool = False) -> list[str]:
        if not isinstance(value, list) or not value or any(m not in ("text", "audio") for m in value):
            raise invalid("must be a list of 'text' and/or 'audio'", param)
        if "audio" in value and not self.ctx.info.has_speech:
            raise invalid("this model has no speech output", param, "audio_not_supported")
        if ga and "audio" in value:
            return ["text", "audio"]  # GA "audio" includes its transcript
        return [m for m in ("text", "audio") if m in value]

    def _temperature(self, value, param: str) -> float:
        return limits.check_temperature(value, param)

    def _max_tokens(self, value, param: str) -> int:
        if value == "inf":
            return self.settings.max_tokens
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise invalid("must be a positive integer or 'inf'", param)
        if value > self.settings.max_tokens:
            raise invalid(f"at most {self.settings.max_tokens} on this server", param)
        return value

    # -- input audio -------------------------------------------------------------------------------------
    async def buffer_append(self, event: dict) -> None:
        pcm = _b64(event.get("audio"), "audio")
        if len(pcm) % 2:
            raise invalid(f"pcm16 audio has 2 bytes per sample; this chunk has {len(pcm)} bytes", "audio",
                          "invalid_audio")  # fmt: skip
        limit = int(self.settings.max_audio_seconds * INPUT_RATE) * 2
        if self.vad is None and len(self.buffer) + len(pcm) > limit:
            held, more = len(self.buffer) / 2 / INPUT_RATE, len(pcm) / 2 / INPUT_RATE
            raise invalid(f"the input audio buffer would be too long ({held:.1f} s + {more:.1f} s = {held + more:.1f} s); "
                          f"it holds at most {self.settings.max_audio_seconds:g} s (commit or clear it)", "audio",
                          "audio_too_long")  # fmt: skip
        if self.vad is not None and len(pcm) > limit:
            raise invalid(f"an append of {len(pcm) / 2 / INPUT_RATE:.1f} s is over the {self.settings.max_audio_seconds:g} s "
                          "a turn may hold", "audio", "audio_too_long")  # fmt: skip
        if self.vad is not None:
            t0, ms0 = self.vad_since
            allowed = (VAD_BURST_S + VAD_PACE * (time.monotonic() - t0)) * 1000
            if self.audio_ms - ms0 + len(pcm) / BYTES_PER_MS > allowed:
                raise invalid(f"audio arrives faster than {VAD_PACE:g}x real time (after a {VAD_BURST_S:g} s burst); "
                              "server VAD is for live audio — send files with turn_detection null and commit",
                              "audio", "rate_limit_exceeded")  # fmt: skip
        self.buffer += pcm
        self.audio_ms += len(pcm) / BYTES_PER_MS
        if self.vad is not None:
            await self.detect(pcm, limit)

    async def detect(self, pcm: bytes, limit: int) -> None:
        """Run the VAD over the new audio; act on what it finds (speech start, end, idle timeout)."""
        vad, td = self.vad, self.cfg["turn_detection"]
        events = await self.ctx.offload(_vad_feed, vad, pcm)
        if self.turn_resampler is not None:
            self._turn_feed(pcm)
        for kind, ms in events:
            if kind == "speech_started":
                self.turn_item_id = new_id("item")
                self.idle_since_ms = None
                self._turn_begin(max(vad.start_ms - td.prefix_padding_ms, self.buffer_start_ms))
                await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": ms,
                                 "item_id": self.turn_item_id})  # fmt: skip
                if td.interrupt_response:
                    await self.interrupt("turn_detected")
            else:
                await self.end_turn(ms)
        if vad.speaking and vad.probs and vad.probs[-1] >= td.threshold:
            self._speculate()  # not once silence has begun: the turn may be ending, and its answer would wait
        if vad.speaking and len(self.buffer) >= limit:  # a turn as long as the limit: end it here
            await self.end_turn(int(self.audio_ms))
            vad.reset()
        elif not vad.speaking:
            keep = int((td.prefix_padding_ms + 1000) * BYTES_PER_MS) // 2 * 2
            if len(self.buffer) > keep:  # nobody speaks: keep only what a turn's prefix padding may need
                cut = len(self.buffer) - keep
                del self.buffer[:cut]
                self.buffer_start_ms += cut / BYTES_PER_MS
            if (td.idle_timeout_ms is not None and self.idle_since_ms is not None and self.response is None
                    and self.audio_ms - self.idle_since_ms >= td.idle_timeout_ms):  # fmt: skip
                start = int(self.idle_since_ms)
                self.idle_since_ms = None
                item_id = new_id("item")
                await self.send({"type": "input_audio_buffer.timeout_triggered", "audio_start_ms": start,
                                 "audio_end_ms": int(self.audio_ms), "item_id": item_id})  # fmt: skip
                await self.commit(bytes(self.buffer), item_id)
                self.buffer.clear()
                self.buffer_start_ms = self.audio_ms
                if td.create_response:
                    await self.response_create({})

    async def end_turn(self, end_ms: int) -> None:
        """Speech stopped at ``end_ms``: commit its audio (with the prefix padding), maybe answer."""
        td = self.cfg["turn_detection"]
        item_id = self.turn_item_id or new_id("item")
        self.turn_item_id = None
        self.last_speech_stopped = time.monotonic()
        await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": end_ms, "item_id": item_id})
        start_ms = max(self.vad.start_ms - td.prefix_padding_ms, self.buffer_start_ms)
        a = int((start_ms - self.buffer_start_ms) * BYTES_PER_MS) // 2 * 2
        b = int((end_ms - self.buffer_start_ms) * BYTES_PER_MS) // 2 * 2
        pcm = bytes(self.buffer[a:b])
        del self.buffer[:b]
        self.buffer_start_ms += b / BYTES_PER_MS
        audio16 = self._turn_end(start_ms, end_ms)
        if len(pcm) < 2:
            return
        if self.speculation is not None and not self.speculation.done():  # its row is the answer's head start
            await asyncio.wait([self.speculation], timeout=2.0)
        await self.commit(pcm, item_id, audio16)
        busy = self.response is not None and not self.response.cancelled  # interrupt_response false: let it finish
        if td.create_response and not busy:
            await self.response_create({}, speech_stopped_at=self.last_speech_stopped)

    async def buffer_clear(self, event: dict) -> None:
        self.buffer.clear()
        self.buffer_start_ms = self.audio_ms
        if self.vad is not None:
            self.vad.speaking = False
        self.turn_resampler = None
        await self.send({"type": "input_audio_buffer.cleared"})

    async def buffer_commit(self, event: dict) -> None:
        if len(self.buffer) < 2:
            raise invalid("the input audio buffer is empty", None, "input_audio_buffer_commit_empty")
        pcm = bytes(self.buffer)
        self.buffer.clear()
        self.buffer_start_ms = self.audio_ms
        item_id = self.turn_item_id or new_id("item")
        self.turn_item_id = None
        if self.vad is not None:
            self.vad.speaking = False
        self.turn_resampler = None
        await self.interrupt("turn_detected")
        await self.commit(pcm, item_id)

    # -- the turn while it is spoken ---------------------------------------------------------------------
    def _turn_begin(self, start_ms: float) -> None:
        import soxr

        self.turn_resampler = soxr.ResampleStream(INPUT_RATE, media.MODEL_SAMPLE_RATE, 1, dtype="float32",
                                                  quality="HQ")  # fmt: skip
        self.turn_audio16, self.turn_start_ms, self.speculated = [], start_ms, 0
        a = int((start_ms - self.buffer_start_ms) * BYTES_PER_MS) // 2 * 2
        self._turn_feed(bytes(self.buffer[a:]))

    def _turn_feed(self, pcm: bytes) -> None:
        if pcm:
            self.turn_audio16.append(self.turn_resampler.resample_chunk(media.pcm16_to_float(pcm)))

    def _turn_end(self, start_ms: float, end_ms: int) -> np.ndarray | None:
        """The turn's audio at 16 kHz from the stream (None when it did not start where the turn does)."""
        if self.turn_resampler is None:
            return None
        self.turn_resampler = None
        if abs(start_ms - self.turn_start_ms) > 1:
            return None
        audio = np.concatenate(self.turn_audio16) if self.turn_audio16 else np.zeros(0, np.float32)
        n = int(round((end_ms - start_ms) * media.MODEL_SAMPLE_RATE / 1000))
        return audio[:n] if len(audio) >= n else None

    def _speculate(self) -> None:
        """While the user speaks, send the turn so far (whole encoder windows) as a ``prefill_only`` request: the
        engine keeps it, and the answer's prompt then reads only the turn's last window and the prompt tail."""
        block = getattr(getattr(self.ctx.backend, "model", None), "thinker", None)
        block = getattr(block, "audio_block", None)
        if (not self.settings.realtime_prefill_while_speaking or block is None or self.response is not None
                or not getattr(self.ctx.backend, "supports_prefill_only", False)
                or (self.speculation is not None and not self.speculation.done())):  # fmt: skip
            return
        window = block[0] * media.MODEL_SAMPLE_RATE // 100  # samples per encoder window (mel hop: 10 ms)
        step = max(window, media.MODEL_SAMPLE_RATE // 2)  # at most every 0.5 s
        have = sum(len(a) for a in self.turn_audio16)
        usable = (have - window // 2) // window * window  # whole windows, away from the stream's filter tail
        if usable < self.speculated + step:
            return
        self.speculated = usable
        part = {"type": "audio", "audio": np.concatenate(self.turn_audio16)[:usable]}
        conversation = self.conversation()
        if conversation and conversation[-1]["role"] == "user":
            conversation[-1]["content"] = conversation[-1]["content"] + [part]
        else:
            conversation.append({"role": "user", "content": [part]})
        tools = self._template_tools(self.cfg["tools"], self.cfg["tool_choice"])
        gen = GenerationRequest(conversation=conversation, max_tokens=1, kind="realtime", tools=tools,
                                prefill_only=True)  # fmt: skip
        self.speculation = asyncio.create_task(self._read_ahead(gen))

    async def _read_ahead(self, gen: GenerationRequest) -> None:
        session = None
        try:
            session = await self.ctx.backend.start(gen)
            self.spec_sessions.add(session)
            async for _ in session:
                pass
        except APIError:
            pass  # the server is full: the answer reads the turn at its end instead
        finally:
            if session is not None:
                self.spec_sessions.discard(session)
                if not session.finished:
                    session.cancel()

    async def commit(self, pcm: bytes, item_id: str, audio16: np.ndarray | None = None) -> None:
        """``pcm`` (or its 16 kHz ``audio16``) becomes a user item: ``input_audio_buffer.committed`` and the item
        events."""
        audio = audio16 if audio16 is not None else await self.ctx.offload(_pcm_to_model_rate, pcm)
        usage = MediaUsage(audio_seconds=audio.size / media.MODEL_SAMPLE_RATE)
        public = {"id": item_id, "object": "realtime.item", "type": "message", "status": "completed", "role": "user",
                  "content": [{"type": "input_audio", "transcript": None}]}  # fmt: skip
        previous = await self._store({"id": item_id, "role": "user", "content": [{"type": "audio", "audio": audio}],
                                      "public": public, "usage": usage})  # fmt: skip
        await self.send({"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item_id})
        await self.item_added(previous, public)
        if self.cfg["transcription"] is not None:
            task = asyncio.create_task(self.transcribe(item_id, audio))
            self.background.add(task)
            task.add_done_callback(self.background.discard)

    async def transcribe(self, item_id: str, audio: np.ndarray) -> None:
        """The turn's transcript, by the loaded model with its ASR prompt (a text-only session of its own)."""
        from thinktalk import asr

        conf = self.cfg["transcription"] or {}
        conversation = asr.asr_conversation(self.ctx.info.family, audio, "transcribe", conf.get("language"),
                                            conf.get("prompt"))  # fmt: skip
        gen = GenerationRequest(conversation=conversation, max_tokens=self.settings.max_tokens, kind="realtime")
        try:
            session = await self.ctx.backend.start(gen)
            text, error = [], None
            async for ev in session:
                if ev.kind == "text":
                    text.append(ev.text)
                elif ev.kind == "error":
                    error = ev.error
            if error is not None:
                await self.send({"type": "conversation.item.input_audio_transcription.failed", "item_id": item_id,
                                 "content_index": 0, "error": error.body()["error"]})  # fmt: skip
                return
            transcript = "".join(text).strip()
            for item in self.items:
                if item["id"] == item_id:
                    item["public"]["content"][0]["transcript"] = transcript
            await self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
                             "content_index": 0, "transcript": transcript,
                             "usage": {"type": "tokens", "input_tokens": 0, "output_tokens": 0, "total_tokens": 0}})  # fmt: skip
        except APIError as e:
            await self.send({"type": "conversation.item.input_audio_transcription.failed", "item_id": item_id,
                             "content_index": 0, "error": e.body()["error"]})  # fmt: skip
        except (WebSocketDisconnect, RuntimeError, OSError, asyncio.CancelledError):
            pass

    # -- output audio ------------------------------------------------------------------------------------
    async def interrupt(self, reason: str) -> None:
        """A new user turn interrupts the answer being spoken (barge-in): it stops at the engine's next step,
        and the client is told to drop the audio it has not played (``output_audio_buffer.cleared``)."""
        r = self.response
        if r is not None and not r.cancelled:
            r.cancel(reason)
            await self.send({"type": "output_audio_buffer.cleared", "response_id": r.id})

    async def output_clear(self, event: dict) -> None:
        if self.ga is None:
            self.ga = True
        r = self.response or self.last_response
        if self.response is not None and not self.response.cancelled:
            self.response.cancel("client_cancelled")
        await self.send({"type": "output_audio_buffer.cleared", "response_id": r.id if r else None})

    async def item_truncate(self, event: dict) -> None:
        item_id, index, end_ms = event.get("item_id"), event.get("content_index", 0), event.get("audio_end_ms")
        if isinstance(end_ms, bool) or not isinstance(end_ms, int) or end_ms < 0:
            raise invalid("must be a non-negative integer (milliseconds of the item's audio played)", "audio_end_ms")
        if index != 0:
            raise invalid("an assistant item has one content part (index 0)", "content_index")
        r = self.response
        if r is not None and r.item_id == item_id:  # still being generated: stop it, cut it when it is stored
            if end_ms > r.audio_bytes / BYTES_PER_MS:
                raise invalid(f"audio_end_ms {end_ms} is past the audio sent so far ({r.audio_bytes / BYTES_PER_MS:.0f} ms)",
                              "audio_end_ms", "invalid_value")  # fmt: skip
            r.truncate_ms = end_ms
            r.cancel("client_cancelled")
        else:
            item = next((it for it in self.items if it["id"] == item_id), None)
            if item is None:
                raise invalid(f"the conversation has no item '{str(item_id)[:64]}'", "item_id", "item_not_found")
            if item["role"] != "assistant" or "audio_ms" not in item:
                raise invalid("only assistant items with audio can be truncated", "item_id", "invalid_value")
            if end_ms > item["audio_ms"]:
                raise invalid(f"audio_end_ms {end_ms} is past the item's audio ({item['audio_ms']:.0f} ms)",
                              "audio_end_ms", "invalid_value")  # fmt: skip
            _truncate(item, end_ms)
        await self.send({"type": "conversation.item.truncated", "item_id": item_id, "content_index": 0,
                         "audio_end_ms": end_ms})  # fmt: skip

    # -- conversation items ------------------------------------------------------------------------------
    async def item_create(self, event: dict) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            raise invalid("'item' must be an object", "item")
        kind = item.get("type", "message")
        item_id = item.get("id") or new_id("item")
        if not isinstance(item_id, str) or len(item_id) > 64:
            raise invalid("'id' must be a string of at most 64 characters", "item.id")
        if any(it["id"] == item_id for it in self.items):
            raise invalid(f"the conversation already has an item '{item_id}'", "item.id", "duplicate_item_id")
        after = event.get("previous_item_id")
        if kind in ("function_call", "function_call_output"):
            stored = self._tool_item(item, kind, item_id)
            previous = await self._store(stored, after_id=after)
            await self.item_added(previous, stored["public"])
            return
        if kind != "message":
            raise invalid("items are of type 'message', 'function_call' or 'function_call_output'", "item.type",
                          "unsupported_item")  # fmt: skip
        role = item.get("role")
        if role not in ("user", "assistant", "system"):
            raise invalid("role must be 'user', 'assistant' or 'system'", "item.role")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise invalid("content must be a non-empty list", "item.content")
        items, public, temp_files, usage = await self.ctx.offload(self._convert_content, role, content)
        public_item = {"id": item_id, "object": "realtime.item", "type": "message", "status": "completed", "role": role,
                       "content": public}  # fmt: skip
        if role == "user":
            await self.interrupt("turn_detected")
        previous = await self._store({"id": item_id, "role": role, "content": items, "public": public_item,
                                      "temp_files": temp_files, "usage": usage}, after_id=after)  # fmt: skip
        await self.item_added(previous, public_item)

    def _tool_item(self, item: dict, kind: str, item_id: str) -> dict:
        call_id = item.get("call_id")
        if not isinstance(call_id, str) or not call_id or len(call_id) > 64:
            raise invalid("'call_id' must be a string of at most 64 characters", "item.call_id")
        public = {"id": item_id, "object": "realtime.item", "type": kind, "status": "completed", "call_id": call_id}
        if kind == "function_call":
            name, args = item.get("name"), item.get("arguments", "{}")
            if not isinstance(name, str) or not name:
                raise invalid("a function_call item needs its function's 'name'", "item.name")
            if not isinstance(args, str):
                raise invalid("'arguments' must be a string of JSON", "item.arguments")
            try:
                parsed = json.loads(args)
            except json.JSONDecodeError:
                raise invalid("'arguments' is not valid JSON", "item.arguments", "invalid_tool_call") from None
            public.update(name=name, arguments=args)
            call = {"type": "function", "id": call_id, "function": {"name": name, "arguments": parsed}}
            return {"id": item_id, "role": "assistant", "content": [], "tool_calls": [call], "public": public,
                    "usage": MediaUsage(chars=len(args))}  # fmt: skip
        output = item.get("output")
        if not isinstance(output, str):
            raise invalid("'output' must be a string", "item.output")
        if len(output) > self.settings.prompt_chars_limit:
            raise limits.text_too_long(len(output), self.settings.prompt_chars_limit, "item.output", SCOPE)
        public["output"] = output
        return {"id": item_id, "role": "tool", "content": [{"type": "text", "text": output}], "public": public,
                "usage": MediaUsage(chars=len(output))}  # fmt: skip

    async def item_retrieve(self, event: dict) -> None:
        item_id = event.get("item_id")
        item = next((it for it in self.items if it["id"] == item_id), None)
        if item is None:
            raise invalid(f"the conversation has no item '{str(item_id)[:64]}'", "item_id", "item_not_found")
        await self.send({"type": "conversation.item.retrieved", "item": item["public"]})

    async def item_delete(self, event: dict) -> None:
        item_id = event.get("item_id")
        index = next((i for i, it in enumerate(self.items) if it["id"] == item_id), None)
        if index is None:
            raise invalid(f"the conversation has no item '{str(item_id)[:64]}'", "item_id", "item_not_found")
        self._drop(index)
        await self.send({"type": "conversation.item.deleted", "item_id": item_id})

    def _convert_content(self, role: str, content: list) -> tuple[list[dict], list[dict], list[str], MediaUsage]:
        """Item content -> processor items, checked against the limits as if the item were the whole
        conversation (an item over them is refused before its media are decoded, where the headers tell)."""
        items, public, temp_files = [], [], []
        budget = MediaBudget(self.settings, SCOPE)
        images = sum(1 for p in content if isinstance(p, dict) and p.get("type") == "input_image")
        budget.check_image_count(images, "item.content")
        try:
            for j, part in enumerate(content):
                param = f"item.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("input_text", "text"):
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise invalid("'text' must be a string", f"{param}.text")
                    budget.add_text(len(text), f"{param}.text")
                    items.append({"type": "text", "text": text})
                    public.append({"type": kind, "text": text})
                elif role != "user":
                    raise invalid(f"{role} items may only contain text", f"{param}.type")
                elif kind == "input_audio":
                    pcm = _b64(part.get("audio"), f"{param}.audio")
                    budget.add_audio(len(pcm) / 2 / INPUT_RATE, f"{param}.audio")
                    audio = _pcm_to_model_rate(pcm)
                    items.append({"type": "audio", "audio": audio})
                    public.append({"type": "input_audio", "transcript": None})
                elif kind == "input_image":
                    url = part.get("image_url")
                    if not isinstance(url, str) or not url.startswith("data:"):
                        raise invalid("'image_url' must be a data URL", f"{param}.image_url", "invalid_data_url")
                    mime, data = media.parse_data_url(url, f"{param}.image_url")
                    image = media.open_image(data, f"{param}.image_url", self.settings.max_image_pixels, budget)
                    items.append({"type": "image", "image": image})
                    public.append({"type": "input_image"})
                elif kind == "input_video":
                    url = part.get("video_url")
                    if not isinstance(url, str) or not url.startswith("data:"):
                        raise invalid("'video_url' must be a data URL", f"{param}.video_url", "invalid_data_url")
                    mime, data = media.parse_data_url(url, f"{param}.video_url")
                    if not mime.startswith("video/"):
                        raise invalid(f"expected a video data URL, got '{mime}'", f"{param}.video_url", "invalid_video")
                    path = media.write_temp(data, media.video_suffix(mime))
                    temp_files.append(path)
                    frames, _ = media.probe_video(path, f"{param}.video_url", self.settings.video_fps)
                    budget.add_video(frames, f"{param}.video_url")
                    items.append({"type": "video", "video": path})
                    public.append({"type": "input_video"})
                else:
                    raise invalid(f"unsupported content type '{kind}'", f"{param}.type", "unsupported_content")
        except BaseException:
            media.remove_files(temp_files)
            raise
        return items, public, temp_files, budget.usage()

    async def _store(self, item: dict, after_id: str | None = None) -> str | None:
        """Add ``item`` (after ``after_id``, default last), first dropping the oldest items while the conversation
        would be over its limits or ``realtime_max_items``; announces each drop. Returns the previous item's id."""
        usage = item.setdefault("usage", MediaUsage())
        dropped = []
        while self.items and (not budget_from(self.settings, self.held, SCOPE).fits(usage)
                              or len(self.items) >= self.settings.realtime_max_items):  # fmt: skip
            dropped.append(self.items[0]["id"])
            self._drop(0)
        index = next((i + 1 for i, it in enumerate(self.items) if it["id"] == after_id), len(self.items))
        previous = self.items[index - 1]["id"] if index > 0 else None
        self.items.insert(index, item)
        self.held = self.held + usage
        for item_id in dropped:
            await self.send({"type": "conversation.item.deleted", "item_id": item_id})
        return previous

    def _drop(self, index: int) -> None:
        item = self.items.pop(index)
        self.held = self.held - item.get("usage", MediaUsage())
        files = item.get("temp_files", [])
        if self.response is not None:
            self.graveyard += files  # the response in progress may still read them
        else:
            media.remove_files(files)

    def conversation(self) -> list[dict]:
        """Items -> processor conversation: same-role neighbours merged (a function_call joins its assistant
        message as ``tool_calls``; each function_call_output is a ``tool`` message), oldest turns dropped over
        the audio limit."""
        keep, seconds = [], 0.0
        for item in reversed(self.items):
            seconds += _audio_seconds(item)
            if seconds > self.settings.max_audio_seconds and keep:
                break
            keep.append(item)
        keep.reverse()
        while keep and keep[0]["role"] in ("assistant", "tool"):
            keep.pop(0)
        messages: list[dict] = []
        for item in keep:
            last = messages[-1] if messages else None
            if last is not None and last["role"] == item["role"] != "tool" and not (last.get("tool_calls")
                                                                                    and item["content"]):  # fmt: skip
                last["content"] = last["content"] + item["content"]
                if item.get("tool_calls"):
                    last["tool_calls"] = last.get("tool_calls", []) + item["tool_calls"]
            else:
                message = {"role": item["role"], "content": list(item["content"])}
                if item.get("tool_calls"):
                    message["tool_calls"] = list(item["tool_calls"])
                messages.append(message)
        instructions = self.cfg.get("instructions")
        if instructions and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": instructions}]})
        return messages

    # -- responses ---------------------------------------------------------------------------------------
    async def response_cancel(self, event: dict) -> None:
        if self.response is None or self.response.cancelled:
            raise invalid("there is no response in progress to cancel", None, "response_cancel_not_active")
        self.response.cancel("client_cancelled")

    async def response_create(self, event: dict, speech_stopped_at: float | None = None) -> None:
        opts = event.get("response") or {}
        if not isinstance(opts, dict):
            raise invalid("'response' must be an object", "response")
        if self.response is not None:
            if not self.response.cancelled:
                raise invalid("the conversation already has a response in progress; cancel it first", None,
                              "conversation_already_has_active_response")  # fmt: skip
            await asyncio.shield(self.response.task)  # a cancelled one finishes within a step
        modalities = self.cfg["modalities"]
        if "modalities" in opts:
            modalities = self._modalities(opts["modalities"], "response.modalities")
        if "output_modalities" in opts:
            modalities = self._modalities(opts["output_modalities"], "response.output_modalities", ga=True)
        voice = self.cfg["voice"]
        if "voice" in opts:
            voice = self.ctx.info.voice(opts["voice"], self.ctx.default_voice, "response.voice")
        audio = opts.get("audio")
        if isinstance(audio, dict) and isinstance(audio.get("output"), dict) and "voice" in audio["output"]:
            voice = self.ctx.info.voice(audio["output"]["voice"], self.ctx.default_voice, "response.audio.output.voice")
        temperature = self.cfg["temperature"]
        if "temperature" in opts:
            temperature = self._temperature(opts["temperature"], "response.temperature")
        max_tokens = self.cfg["max_tokens"]
        for key in ("max_output_tokens", "max_response_output_tokens"):
            if key in opts:
                max_tokens = self._max_tokens(opts[key], f"response.{key}")
        tools = self._tools(opts["tools"], "response.tools") if "tools" in opts else self.cfg["tools"]
        tool_choice = self._tool_choice(opts["tool_choice"], "response.tool_choice") if "tool_choice" in opts else \
            self.cfg["tool_choice"]  # fmt: skip
        conversation = self.conversation()
        if "instructions" in opts and isinstance(opts["instructions"], str) and opts["instructions"]:
            if conversation and conversation[0]["role"] == "system":
                conversation = conversation[1:]
            conversation.insert(0, {"role": "system", "content": [{"type": "text", "text": opts["instructions"]}]})
        if not any(m["role"] == "user" for m in conversation):
            raise invalid("the conversation has no user input yet", None, "empty_conversation")
        chars = sum(len(c["text"]) for m in conversation for c in m["content"] if c.get("type") == "text")
        if chars > self.settings.prompt_chars_limit:
            raise limits.text_too_long(chars, self.settings.prompt_chars_limit, "response.instructions", SCOPE)
        speak = "audio" in modalities
        template_tools = self._template_tools(tools, tool_choice)
        gen = GenerationRequest(conversation=conversation, max_tokens=max_tokens, voice=voice if speak else None,
                                temperature=temperature, kind="realtime", tools=template_tools)  # fmt: skip
        response = Response(modalities, voice if speak else None)
        response.speech_stopped_at = speech_stopped_at
        response.tools = template_tools is not None
        response.max_tokens = max_tokens
        response.after_item_id = self.items[-1]["id"] if self.items else None
        self.response = response
        response.task = asyncio.create_task(self._respond(response, gen))

    @staticmethod
    def _template_tools(tools: list[dict], tool_choice: str) -> list[dict] | None:
        if not tools or tool_choice == "none":
            return None
        return [
            {"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")}} for t in tools
        ]

    def _response_object(self, response: Response, status: str = "in_progress") -> dict:
        if self.ga:
            fmt = {"format": PCM_FORMAT, "voice": response.voice}
            return {"id": response.id, "object": "realtime.response", "status": status, "status_details": None,
                    "output": [], "conversation_id": self.cfg["id"], "metadata": None,
                    "output_modalities": ["audio"] if response.voice else ["text"], "audio": {"output": fmt},
                    "max_output_tokens": response.max_tokens, "usage": None}  # fmt: skip
        return {"id": response.id, "object": "realtime.response", "status": status, "output": [],
                "modalities": response.modalities, "voice": response.voice, "output_audio_format": "pcm16"}  # fmt: skip

    async def _respond(self, response: Response, gen: GenerationRequest) -> None:
        r = {"response_id": response.id, "item_id": response.item_id, "output_index": 0, "content_index": 0}
        speak = response.voice is not None
        status, usage, error = "completed", Usage(), None
        resp_obj = self._response_object(response)
        item = {"id": response.item_id, "object": "realtime.item", "type": "message", "status": "in_progress",
                "role": "assistant", "content": []}  # fmt: skip
        part = {"type": "audio", "transcript": ""} if speak else {"type": "text", "text": ""}
        stream = AnswerStream(tools=response.tools)
        said: list[str] = []  # the transcript: the answer without reasoning and tool calls
        reasoning: list[str] = []
        started = response.speech_stopped_at or time.monotonic()
        outputs: list[dict] = []
        try:
            await self.send({"type": "response.created", "response": resp_obj})
            try:
                response.session = await self.ctx.backend.start(gen)
            except APIError as e:
                error = e
            if response.session is not None and response.cancelled:
                response.session.cancel()
            if error is None:
                await self.send({"type": "response.output_item.added", "response_id": response.id, "output_index": 0,
                                 "item": item})  # fmt: skip
                if self.ga:
                    await self.send({"type": "conversation.item.added", "previous_item_id": response.after_item_id,
                                     "item": item})  # fmt: skip
                await self.send({"type": "response.content_part.added", **r, "part": part})
                async for ev in response.session:
                    if ev.kind == "error":
                        error = ev.error
                    elif ev.kind == "done":
                        usage = ev.usage or usage
                        if ev.finish_reason == "cancelled":
                            status = "cancelled"
                        elif ev.finish_reason == "length":
                            status = "incomplete"
                    elif response.cancelled:
                        continue  # drain quietly: the client asked us to stop talking
                    elif ev.kind == "text":
                        response.text.append(ev.text)
                        for channel, text in stream.feed(ev.text):
                            await self._say(r, channel, text, speak, said, reasoning)
                    elif ev.kind == "audio":
                        if response.first_audio_s is None:
                            response.first_audio_s = time.monotonic() - started
                            if response.speech_stopped_at is not None:
                                self.latencies.append(response.first_audio_s)
                                self.ctx.metrics.observe("thinktalk_realtime_first_audio_after_speech_seconds",
                                                         response.first_audio_s)  # fmt: skip
                        response.audio_bytes += len(ev.audio)
                        await self.send({"type": self.name("response.audio.delta"), **r,
                                         "delta": base64.b64encode(ev.audio).decode()})  # fmt: skip
                if not response.cancelled:
                    for channel, text in stream.feed("", final=True):
                        await self._say(r, channel, text, speak, said, reasoning)
            if response.cancelled:
                status = "cancelled"
            parsed = parse_answer("".join(response.text), tools=response.tools)
            text = "".join(said)
            tool_error = None
            if status == "completed" and parsed.errors:
                tool_error = invalid("the model wrote a malformed tool call: " + "; ".join(parsed.errors), None,
                                     "invalid_tool_call")  # fmt: skip
            if reasoning:
                await self.send({"type": "response.reasoning_text.done", **r, "text": "".join(reasoning)})
            if error is not None:  # the backend refused or failed: nothing of the answer is kept
                status = "failed"
                await self.send_error(error)
            else:
                if speak:
                    await self.send({"type": self.name("response.audio.done"), **r})
                    await self.send({"type": self.name("response.audio_transcript.done"), **r, "transcript": text})
                    part = {"type": "audio", "transcript": text}
                    content = {"type": "output_audio" if self.ga else "audio", "transcript": text}
                else:
                    await self.send({"type": self.name("response.text.done"), **r, "text": text})
                    part = {"type": "text", "text": text}
                    content = {"type": "output_text" if self.ga else "text", "text": text}
                item = {**item, "status": "completed" if status == "completed" else "incomplete", "content": [content]}
                await self.send({"type": "response.content_part.done", **r, "part": part})
                await self.send({"type": "response.output_item.done", "response_id": response.id, "output_index": 0,
                                 "item": item})  # fmt: skip
                outputs.append(item)
                if text or response.audio_bytes:
                    stored = {"id": response.item_id, "role": "assistant", "content": [{"type": "text", "text": text}],
                              "public": item, "usage": MediaUsage(chars=len(text)),
                              "audio_ms": response.audio_bytes / BYTES_PER_MS}  # fmt: skip
                    if response.truncate_ms is not None:
                        _truncate(stored, response.truncate_ms)
                    previous = await self._store(stored, after_id=response.after_item_id)
                    if self.ga:
                        await self.send({"type": "conversation.item.done", "previous_item_id": previous, "item": item})
                if tool_error is not None:  # a malformed tool call: the message stays, the call is reported
                    status, error = "failed", tool_error
                    await self.send_error(error)
                elif status == "completed":
                    for call in parsed.tool_calls:
                        outputs.append(await self._function_call(response, call, len(outputs)))
            details = None
            if status == "cancelled":
                details = {"type": "cancelled", "reason": response.reason}
            elif status == "failed":
                details = {"type": "failed", "error": error.body()["error"] if error else None}
            elif status == "incomplete":
                details = {"type": "incomplete", "reason": "max_output_tokens"}
            await self.send({"type": "response.done", "response": {
                **resp_obj, "status": status, "status_details": details, "output": outputs,
                "usage": {"total_tokens": usage.prompt_tokens + usage.completion_tokens,
                          "input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}}})  # fmt: skip
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the socket closed under us; run()'s cleanup cancels the session
        except Exception:
            log.exception("realtime response %s failed", response.id)
            try:  # tell the client; the session stays open
                err = server_error()
                await self.send_error(err)
                await self.send({"type": "response.done", "response": {
                    **resp_obj, "status": "failed", "status_details": {"type": "failed", "error": err.body()["error"]},
                    "output": [], "usage": None}})  # fmt: skip
            except Exception:  # the socket is gone too
                pass
        finally:
            if response.session is not None and not response.session.finished:
                response.session.cancel()
            if self.response is response:
                self.response = None
                self.last_response = response
                self.idle_since_ms = self.audio_ms
                media.remove_files(self.graveyard)
                self.graveyard.clear()

    async def _say(self, r: dict, channel: str, text: str, speak: bool, said: list, reasoning: list) -> None:
        if channel == "content":
            said.append(text)
            kind = "response.audio_transcript.delta" if speak else "response.text.delta"
            await self.send({"type": self.name(kind), **r, "delta": text})
        elif channel == "reasoning":
            reasoning.append(text)
            await self.send({"type": "response.reasoning_text.delta", **r, "delta": text})
        # "tool": the call's text is sent as function_call_arguments once it is parsed

    async def _function_call(self, response: Response, call, index: int) -> dict:
        """One parsed tool call -> a ``function_call`` output item, stored in the conversation."""
        item_id = new_id("item")
        base = {"id": item_id, "object": "realtime.item", "type": "function_call", "call_id": call.id,
                "name": call.name}  # fmt: skip
        ev = {"response_id": response.id, "item_id": item_id, "output_index": index, "call_id": call.id}
        await self.send({"type": "response.output_item.added", "response_id": response.id, "output_index": index,
                         "item": {**base, "status": "in_progress", "arguments": ""}})  # fmt: skip
        await self.send({"type": "response.function_call_arguments.delta", **ev, "delta": call.arguments})
        await self.send({"type": "response.function_call_arguments.done", **ev, "name": call.name,
                         "arguments": call.arguments})  # fmt: skip
        done = {**base, "status": "completed", "arguments": call.arguments}
        await self.send({"type": "response.output_item.done", "response_id": response.id, "output_index": index,
                         "item": done})  # fmt: skip
        entry = {
            "type": "function",
            "id": call.id,
            "function": {"name": call.name, "arguments": json.loads(call.arguments)},
        }
        after = self.items[-1]["id"] if self.items else None
        previous = await self._store({"id": item_id, "role": "assistant", "content": [], "tool_calls": [entry],
                                      "public": done, "usage": MediaUsage(chars=len(call.arguments))}, after)  # fmt: skip
        if self.ga:
            await self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": done})
            await self.send({"type": "conversation.item.done", "previous_item_id": previous, "item": done})
        return done


def _truncate(item: dict, end_ms: int) -> None:
    """Keep the share of the assistant item's transcript that ``end_ms`` of its audio covers (cut at a word):
    the conversation then holds what the user heard. The text-to-audio alignment is not known, so the share
    is proportional to time."""
    total = item.get("audio_ms") or 0.0
    text = "".join(c.get("text", "") for c in item["content"])
    keep = len(text) if total <= 0 else int(round(len(text) * min(1.0, end_ms / total)))
    if keep < len(text):
        cut = text.rfind(" ", 0, keep + 1)
        keep = cut if cut > 0 else keep
    text = text[:keep].rstrip()
    item["content"] = [{"type": "text", "text": text}]
    item["audio_ms"] = float(end_ms)
    for c in item["public"].get("content", []):
        if "transcript" in c:
            c["transcript"] = text
        elif "text" in c:
            c["text"] = text


def _vad_feed(vad: VoiceActivity, pcm: bytes) -> list[tuple[str, int]]:
    return vad.feed(media.resample(media.pcm16_to_float(pcm), INPUT_RATE, media.MODEL_SAMPLE_RATE))


def _check_format(value, param: str) -> None:
    if value in ("pcm16", None):
        return
    if not isinstance(value, dict) or value.get("type") != "audio/pcm" or value.get("rate", INPUT_RATE) != INPUT_RATE:
        raise invalid("only {'type': 'audio/pcm', 'rate': 24000} (pcm16 mono) is supported", param,
                      "unsupported_format")  # fmt: skip


def _pcm_to_model_rate(pcm: bytes) -> np.ndarray:
    return media.resample(media.pcm16_to_float(pcm), INPUT_RATE, media.MODEL_SAMPLE_RATE)


def _b64(value, param: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise invalid("expected base64-encoded pcm16 audio", param, "invalid_base64")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("is not valid base64", param, "invalid_base64") from None


def _audio_seconds(item: dict) -> float:
    return sum(c["audio"].size / media.MODEL_SAMPLE_RATE for c in item["content"] if c["type"] == "audio"
               and isinstance(c.get("audio"), np.ndarray))  # fmt: skip


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket):
    ctx = ws.app.state.ctx
    offered = list(ws.scope.get("subprotocols") or [])
    subprotocol = "realtime" if "realtime" in offered else None
    try:
        ctx.check_key(ws.headers, offered)
    except APIError as err:
        # Accept, then explain and close: browsers see only "1006" when a handshake is refused.
        await ws.accept(subprotocol=subprotocol)
        ctx.metrics.inc("thinktalk_errors_total", {"type": err.type})
        await ws.send_text(json.dumps({"type": "error", "event_id": new_id("event"), "error": err.body()["error"]}))
        await ws.close(code=1008, reason="invalid or missing API key")
        return
    replica = ctx.extras.get("replica")  # behind --replicas: the one this session lives on, for the client
    await ws.accept(subprotocol=subprotocol, headers=[(b"x-thinktalk-replica", replica.encode())] if replica else None)
    if ctx.realtime_connections >= ctx.settings.max_realtime_connections:
        err = overloaded(f"too many realtime connections (at most {ctx.settings.max_realtime_connections})", 5)
        ctx.metrics.inc("thinktalk_errors_total", {"type": err.type})
        await ws.send_text(json.dumps({"type": "error", "event_id": new_id("event"), "error": err.body()["error"]}))
        await ws.close(code=1013, reason="try again later")
        return
    ctx.realtime_connections += 1
    conn = RealtimeConnection(ws, ctx)
    started = time.monotonic()
    try:
        await conn.run()
    finally:
        ctx.realtime_connections -= 1
        task = conn.response.task if conn.response is not None else None
        if task is not None:
            with_timeout = asyncio.wait_for(asyncio.shield(task), 5)
            try:
                await with_timeout
            except (asyncio.TimeoutError, Exception):
                pass
        for item in conn.items:
            media.remove_files(item.get("temp_files", []))
        media.remove_files(conn.graveyard)
        log.debug("realtime connection closed after %.1f s", time.monotonic() - started)
