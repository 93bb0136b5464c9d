"""``/v1/realtime``: a WebSocket speaking a useful subset of OpenAI's Realtime API (beta event names).

Client events: ``session.update``, ``input_audio_buffer.append`` / ``commit`` / ``clear``,
``conversation.item.create``, ``response.create``, ``response.cancel``.
Server events: ``session.created``, ``session.updated``, ``input_audio_buffer.committed`` / ``cleared``,
``conversation.item.created``, ``response.created``, ``response.output_item.added``,
``response.content_part.added``, ``response.text.delta``, ``response.audio.delta``,
``response.audio_transcript.delta`` and their ``.done`` events, ``response.done``, ``error``.

Audio is pcm16 mono at 24 kHz both ways (resampled to 16 kHz for the audio encoder). Turns are
committed by the client (``turn_detection`` is ``null``: push-to-talk). Barge-in: a new user turn
(commit, or a user item) cancels the response in progress. Beyond OpenAI's item content types,
``input_image`` (``image_url``: a data URL) and ``input_video`` (``video_url``: a data URL) are accepted.

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

SCOPE = "per realtime conversation"
INLINE_PARSE_CHARS = 65536  # events up to this size are parsed on the event loop (a few ms at most)

router = APIRouter()
log = logging.getLogger("thinktalk.serve")
INPUT_RATE = media.OUTPUT_SAMPLE_RATE  # pcm16 24 kHz, OpenAI's default input_audio_format


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
        self.text: list[str] = []
        self.after_item_id: str | None = None  # the answer's place in the conversation (barge-in adds items)

    def cancel(self) -> None:
        self.cancelled = True
        if self.session is not None:
            self.session.cancel()


class RealtimeConnection:
    def __init__(self, ws: WebSocket, ctx):
        self.ws = ws
        self.ctx = ctx
        self.settings = ctx.settings
        self.send_lock = asyncio.Lock()
        self.buffer = bytearray()  # pcm16 at INPUT_RATE
        # {"id", "role", "content": [DESIGN.md §2 items], "public": item for clients, "usage": MediaUsage}
        self.items: list[dict] = []
        self.held = MediaUsage()  # what the items hold in all (kept within the request limits)
        self.graveyard: list[str] = []  # temp files of dropped items, removed once no response reads them
        self.response: Response | None = None
        self.session_config = {
            "id": new_id("sess"),
            "object": "realtime.session",
            "model": ctx.info.name,
            "modalities": ["text", "audio"] if ctx.info.has_speech else ["text"],
            "instructions": self.settings.system_prompt or "",
            "voice": ctx.default_voice,
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "input_audio_transcription": None,
            "turn_detection": None,
            "tools": [],
            "tool_choice": "none",
            "temperature": 0.0,
            "max_response_output_tokens": self.settings.default_max_tokens,
        }

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

    # -- the loop --------------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.send({"type": "session.created", "session": self.session_config})
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
            "response.create": self.response_create,
            "response.cancel": self.response_cancel,
        }.get(kind)
        if handler is None:
            raise invalid(f"unsupported event type '{kind}'", "type", "invalid_event")
        await handler(event)

    # -- session ---------------------------------------------------------------------------------------
    async def session_update(self, event: dict) -> None:
        update = event.get("session")
        if not isinstance(update, dict):
            raise invalid("'session' must be an object", "session")
        new = dict(self.session_config)
        for key, value in update.items():
            param = f"session.{key}"
            if key == "voice":
                new["voice"] = self.ctx.info.voice(value, self.ctx.default_voice, param)
            elif key == "modalities":
                new["modalities"] = self._modalities(value, param)
            elif key == "instructions":
                if not isinstance(value, str):
                    raise invalid("must be a string", param)
                if len(value) > self.settings.prompt_chars_limit:
                    raise limits.text_too_long(len(value), self.settings.prompt_chars_limit, param, SCOPE)
                new["instructions"] = value
            elif key in ("input_audio_format", "output_audio_format"):
                if value != "pcm16":
                    raise invalid("only 'pcm16' (24 kHz mono) is supported", param, "unsupported_format")
            elif key == "turn_detection":
                if value is not None:
                    raise invalid("server-side turn detection is not supported; set it to null and commit turns with "
                                  "input_audio_buffer.commit", param, "unsupported_parameter")  # fmt: skip
            elif key == "temperature":
                new["temperature"] = self._temperature(value, param)
            elif key == "max_response_output_tokens":
                new["max_response_output_tokens"] = self._max_tokens(value, param)
            elif key in ("tools", "tool_choice", "input_audio_transcription", "model", "input_audio_noise_reduction"):
                pass  # accepted and ignored: no tools, no separate transcription model
            else:
                raise invalid(f"unknown session field '{key}'", param, "unknown_parameter")
        self.session_config = new
        await self.send({"type": "session.updated", "session": self.session_config})

    def _modalities(self, value, param: str) -> list[str]:
        if not isinstance(value, list) or not value or any(m not in ("text", "audio") for m in value):
            raise invalid("must be a list of 'text' and/or 'audio'", param)
        if "audio" in value and not self.ctx.info.has_speech:
            raise invalid("this model has no speech output", param, "audio_not_supported")
        return [m for m in ("text", "audio") if m in value]

    def _temperature(self, value, param: str) -> float:
        return limits.check_temperature(value, param)

    def _max_tokens(self, value, param: str) -> int:
        if value == "inf":
            return self.settings.max_tokens
        if not isinstance(value, int) or value < 1:
            raise invalid("must be a positive integer or 'inf'", param)
        if value > self.settings.max_tokens:
            raise invalid(f"at most {self.settings.max_tokens} on this server", param)
        return value

    # -- input audio -------------------------------------------------------------------------------------
    async def buffer_append(self, event: dict) -> None:
        pcm = _b64(event.get("audio"), "audio")
        limit = int(self.settings.max_audio_seconds * INPUT_RATE) * 2
        if len(self.buffer) + len(pcm) > limit:
            held, more = len(self.buffer) / 2 / INPUT_RATE, len(pcm) / 2 / INPUT_RATE
            raise invalid(f"the input audio buffer would be too long ({held:.1f} s + {more:.1f} s = {held + more:.1f} s); "
                          f"it holds at most {self.settings.max_audio_seconds:g} s (commit or clear it)", "audio",
                          "audio_too_long")  # fmt: skip
        self.buffer += pcm

    async def buffer_clear(self, event: dict) -> None:
        self.buffer.clear()
        await self.send({"type": "input_audio_buffer.cleared"})

    async def buffer_commit(self, event: dict) -> None:
        if len(self.buffer) < 2:
            raise invalid("the input audio buffer is empty", None, "input_audio_buffer_commit_empty")
        pcm = bytes(self.buffer)
        self.buffer.clear()
        audio = await self.ctx.offload(_pcm_to_model_rate, pcm)
        usage = MediaUsage(audio_seconds=audio.size / media.MODEL_SAMPLE_RATE)
        item_id = new_id("item")
        public = {"id": item_id, "object": "realtime.item", "type": "message", "status": "completed", "role": "user",
                  "content": [{"type": "input_audio", "transcript": None}]}  # fmt: skip
        await self.barge_in()
        previous = await self._store({"id": item_id, "role": "user", "content": [{"type": "audio", "audio": audio}],
                                      "public": public, "usage": usage})  # fmt: skip
        await self.send({"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item_id})
        await self.send({"type": "conversation.item.created", "previous_item_id": previous, "item": public})

    # -- conversation items ------------------------------------------------------------------------------
    async def item_create(self, event: dict) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            raise invalid("'item' must be an object", "item")
        if item.get("type", "message") != "message":
            raise invalid("only items of type 'message' are supported", "item.type", "unsupported_item")
        role = item.get("role")
        if role not in ("user", "assistant", "system"):
            raise invalid("role must be 'user', 'assistant' or 'system'", "item.role")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise invalid("content must be a non-empty list", "item.content")
        item_id = item.get("id") or new_id("item")
        if not isinstance(item_id, str) or len(item_id) > 64:
            raise invalid("'id' must be a string of at most 64 characters", "item.id")
        if any(it["id"] == item_id for it in self.items):
            raise invalid(f"the conversation already has an item '{item_id}'", "item.id", "duplicate_item_id")
        items, public, temp_files, usage = await self.ctx.offload(self._convert_content, role, content)
        public_item = {"id": item_id, "object": "realtime.item", "type": "message", "status": "completed", "role": role,
                       "content": public}  # fmt: skip
        if role == "user":
            await self.barge_in()
        previous = await self._store({"id": item_id, "role": role, "content": items, "public": public_item,
                                      "temp_files": temp_files, "usage": usage})  # fmt: skip
        await self.send({"type": "conversation.item.created", "previous_item_id": previous, "item": public_item})

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
        """Items -> processor conversation: same-role neighbours merged, oldest turns dropped over the audio limit."""
        keep, seconds = [], 0.0
        for item in reversed(self.items):
            seconds += _audio_seconds(item)
            if seconds > self.settings.max_audio_seconds and keep:
                break
            keep.append(item)
        keep.reverse()
        while keep and keep[0]["role"] == "assistant":
            keep.pop(0)
        messages: list[dict] = []
        for item in keep:
            if messages and messages[-1]["role"] == item["role"]:
                messages[-1]["content"] = messages[-1]["content"] + item["content"]
            else:
                messages.append({"role": item["role"], "content": list(item["content"])})
        instructions = self.session_config.get("instructions")
        if instructions and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": instructions}]})
        return messages

    # -- responses ---------------------------------------------------------------------------------------
    async def barge_in(self) -> None:
        """A new user turn interrupts the answer being spoken."""
        if self.response is not None and not self.response.cancelled:
            self.response.cancel()

    async def response_cancel(self, event: dict) -> None:
        if self.response is None or self.response.cancelled:
            raise invalid("there is no response in progress to cancel", None, "response_cancel_not_active")
        self.response.cancel()

    async def response_create(self, event: dict) -> None:
        opts = event.get("response") or {}
        if not isinstance(opts, dict):
            raise invalid("'response' must be an object", "response")
        if self.response is not None:
            if not self.response.cancelled:
                raise invalid("the conversation already has a response in progress; cancel it first", None,
                              "conversation_already_has_active_response")  # fmt: skip
            await asyncio.shield(self.response.task)  # a cancelled one finishes within a step
        modalities = self._modalities(opts["modalities"], "response.modalities") if "modalities" in opts else \
            self.session_config["modalities"]  # fmt: skip
        voice = self.session_config["voice"]
        if "voice" in opts:
            voice = self.ctx.info.voice(opts["voice"], self.ctx.default_voice, "response.voice")
        temperature = self.session_config["temperature"]
        if "temperature" in opts:
            temperature = self._temperature(opts["temperature"], "response.temperature")
        max_tokens = self.session_config["max_response_output_tokens"]
        for key in ("max_output_tokens", "max_response_output_tokens"):
            if key in opts:
                max_tokens = self._max_tokens(opts[key], f"response.{key}")
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
        gen = GenerationRequest(conversation=conversation, max_tokens=max_tokens, voice=voice if speak else None,
                                temperature=temperature, kind="realtime")  # fmt: skip
        response = Response(modalities, voice if speak else None)
        response.after_item_id = self.items[-1]["id"] if self.items else None
        self.response = response
        response.task = asyncio.create_task(self._respond(response, gen))

    async def _respond(self, response: Response, gen: GenerationRequest) -> None:
        r = {"response_id": response.id, "item_id": response.item_id, "output_index": 0, "content_index": 0}
        speak = response.voice is not None
        status, usage, error = "completed", Usage(), None
        resp_obj = {"id": response.id, "object": "realtime.response", "status": "in_progress", "output": [],
                    "modalities": response.modalities, "voice": response.voice, "output_audio_format": "pcm16"}  # fmt: skip
        item = {"id": response.item_id, "object": "realtime.item", "type": "message", "status": "in_progress",
                "role": "assistant", "content": []}  # fmt: skip
        part = {"type": "audio", "transcript": ""} if speak else {"type": "text", "text": ""}
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
                        kind = "response.audio_transcript.delta" if speak else "response.text.delta"
                        await self.send({"type": kind, **r, "delta": ev.text})
                    elif ev.kind == "audio":
                        await self.send({"type": "response.audio.delta", **r,
                                         "delta": base64.b64encode(ev.audio).decode()})  # fmt: skip
            if response.cancelled:
                status = "cancelled"
            text = "".join(response.text)
            if error is not None:
                status = "failed"
                await self.send_error(error)
            else:
                if speak:
                    await self.send({"type": "response.audio.done", **r})
                    await self.send({"type": "response.audio_transcript.done", **r, "transcript": text})
                    part = {"type": "audio", "transcript": text}
                else:
                    await self.send({"type": "response.text.done", **r, "text": text})
                    part = {"type": "text", "text": text}
                item = {**item, "status": "completed" if status == "completed" else "incomplete", "content": [part]}
                await self.send({"type": "response.content_part.done", **r, "part": part})
                await self.send({"type": "response.output_item.done", "response_id": response.id, "output_index": 0,
                                 "item": item})  # fmt: skip
                if text:
                    await self._store({"id": response.item_id, "role": "assistant",
                                       "content": [{"type": "text", "text": text}], "public": item,
                                       "usage": MediaUsage(chars=len(text))}, after_id=response.after_item_id)  # fmt: skip
            details = None
            if status == "cancelled":
                details = {"type": "cancelled", "reason": "client_cancelled"}
            elif status == "failed":
                details = {"type": "failed", "error": error.body()["error"] if error else None}
            elif status == "incomplete":
                details = {"type": "incomplete", "reason": "max_output_tokens"}
            await self.send({"type": "response.done", "response": {
                **resp_obj, "status": status, "status_details": details, "output": [item] if error is None else [],
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
                media.remove_files(self.graveyard)
                self.graveyard.clear()


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
