"""OpenAI-compatible HTTP endpoints: chat completions (text + audio, streamed or not), models, speech.

Shapes follow OpenAI's audio chat API: with ``modalities: ["text", "audio"]`` the answer text is
``message.audio.transcript`` (``content`` is null) and ``message.audio.data`` is base64 audio in
``audio.format``; streamed, ``delta.audio`` carries ``transcript`` deltas and ``data`` deltas (pcm16,
24 kHz mono). Extensions, all optional: ``video_url`` and ``audio_url`` content parts (data URLs, as
vLLM accepts them), and a top-level ``use_audio_in_video`` flag.

**Tools** (checkpoints whose chat template describes them, e.g. Qwen3-Omni): ``tools`` (function tools)
and ``tool_choice`` ``"auto"`` / ``"none"``; the answer's ``<tool_call>`` blocks become ``message.tool_calls``
(``finish_reason: "tool_calls"``), and ``tool`` messages (``tool_call_id``) and assistant ``tool_calls`` continue
the conversation. A malformed call is never dropped: its text stays in ``content`` and the message carries
``tool_call_errors`` (a thinktalk extension) saying what is wrong. **Reasoning**: a ``<think>...</think>``
block is returned apart, as ``reasoning_content`` (as vLLM does), streamed as ``delta.reasoning_content``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import threading
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from thinktalk.serve import limits, media
from thinktalk.serve.backend import Event, GenerationRequest, Session, Usage
from thinktalk.serve.errors import APIError, from_validation_error, invalid
from thinktalk.serve.limits import MediaBudget
from thinktalk.serve.toolcalls import AnswerStream, parse_answer

router = APIRouter()


# -- request bodies ----------------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class URLRef(_Model):
    url: str
    detail: str | None = None


class TextPart(_Model):
    type: Literal["text", "input_text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: URLRef | str


class InputAudio(_Model):
    data: str
    format: str | None = None


class AudioPart(_Model):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURLPart(_Model):
    type: Literal["audio_url"]
    audio_url: URLRef | str


class VideoPart(_Model):
    type: Literal["video_url"]
    video_url: URLRef | str


Part = Annotated[TextPart | ImagePart | AudioPart | AudioURLPart | VideoPart, Field(discriminator="type")]


class AudioRef(_Model):
    id: str


class FunctionCall(_Model):
    name: str = Field(min_length=1, max_length=64)
    arguments: str


class ToolCallIn(_Model):
    id: str = Field(min_length=1, max_length=64)
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str = ""
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDef(_Model):
    type: Literal["function"]
    function: FunctionDef


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    audio: AudioRef | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class AudioOptions(_Model):
    voice: str | None = None
    format: str = "wav"


class StreamOptions(_Model):
    include_usage: bool = False


class ChatRequest(_Model):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # and 0 or >= limits.MIN_TEMPERATURE (checked below)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    # Outside [0.01, 100] the penalty overflows float32 logits (1e-300 divides them to inf: NaN probabilities).
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    seed: int | None = Field(None, ge=limits.SEED_RANGE[0], le=limits.SEED_RANGE[1])
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["auto", "none"] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    use_audio_in_video: bool = False


class SpeechRequest(_Model):
    model: str | None = None
    input: str = Field(min_length=1, max_length=4096)
    voice: str | None = None
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    instructions: str | None = None
    stream_format: Literal["audio", "sse"] = "audio"


def parse_body(raw: bytes, model: type[BaseModel], settings):
    """Body bytes -> validated ``model``, with bounded work (run it off the event loop; see limits.py).

    Chat messages are validated one by one (a single pydantic call over a million messages holds the GIL
    for seconds) and their text is measured against ``prompt_chars_limit`` before anything is tokenized.
    """
    if not raw.strip():
        raise invalid("the request body is empty; send a JSON object", None, "invalid_json")
    data = limits.parse_json(raw, settings.max_json_values, settings.max_json_depth)
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_json")
    if model is ChatRequest and isinstance(data.get("messages"), list):
        messages = [_validate(Message, m, ("messages", i)) for i, m in enumerate(data["messages"])]
        check_text_size(messages, settings)
        data = {**data, "messages": messages}
    body = _validate(model, data, ())
    if isinstance(body, ChatRequest) and body.temperature is not None:
        limits.check_temperature(body.temperature, "temperature")
    if isinstance(body, SpeechRequest) and len(body.input) > settings.prompt_chars_limit:
        raise limits.text_too_long(len(body.input), settings.prompt_chars_limit, "input")
    return body


def _validate(model: type[BaseModel], data, loc: tuple):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = [{**err, "loc": (*loc, *err.get("loc", ()))} for err in e.errors(include_url=False)]
        raise from_validation_error(errors) from None


def check_text_size(messages: list[Message], settings) -> None:
    """The messages' text against ``prompt_chars_limit`` (characters bound the tokenizer's work; a text over
    the limit is refused here, before it is tokenized)."""
    total = 0
    for i, msg in enumerate(messages):
        if isinstance(msg.content, str):
            total += len(msg.content)
        elif isinstance(msg.content, list):
            total += sum(len(p.text) for p in msg.content if isinstance(p, TextPart))
        if total > settings.prompt_chars_limit:
            raise limits.text_too_long(total, settings.prompt_chars_limit, f"messages[{i}].content")


INLINE_BODY_BYTES = 65536  # bodies up to this size are parsed on the event loop (a few ms at most)


async def read_body(request: Request, model: type[BaseModel]):
    """The request body parsed and validated — in a worker thread when it is large, so /health and other
    requests stay fast (small ones inline: they do not wait behind large ones for a worker)."""
    raw = await request.body()
    ctx = request.app.state.ctx
    if len(raw) <= INLINE_BODY_BYTES:
        return parse_body(raw, model, ctx.settings)
    return await ctx.offload(parse_body, raw, model, ctx.settings)


async def require_json(request: Request) -> None:
    """Endpoints that take a JSON body refuse other content types (a browser's cross-site form or ``fetch``
    can send ``text/plain`` without asking first; ``application/json`` needs CORS approval). Per route:
    multipart endpoints declare their own check."""
    kind = request.headers.get("content-type", "")
    if kind.split(";", 1)[0].strip().lower() != "application/json":
        got = f"got '{kind[:100]}'" if kind else "the request has none"
        raise APIError(415, f"Content-Type must be application/json ({got})", "invalid_request_error", None,
                       "unsupported_media_type")  # fmt: skip


# -- shared state ------------------------------------------------------------------------------------
class Transcripts:
    """Answer transcripts by audio id, so a later turn can refer to an answer as ``{"audio": {"id"}}``."""

    def __init__(self, ttl_s: int, capacity: int = 4096):
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._items: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, text: str, audio_id: str | None = None) -> tuple[str, int]:
        audio_id = audio_id or f"audio_{uuid.uuid4().hex[:24]}"
        expires = time.time() + self.ttl_s
        with self._lock:
            self._items[audio_id] = (text, expires)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return audio_id, int(expires)

    def get(self, audio_id: str) -> str | None:
        with self._lock:
            item = self._items.get(audio_id)
        if item is None or item[1] < time.time():
            return None
        return item[0]


def ctx_of(request: Request):
    return request.app.state.ctx


async def authorized(request: Request) -> None:
    # Headers only: a key in the query string would end up in access logs, proxies and browser history.
    request.app.state.ctx.check_key(request.headers)


def check_model(ctx, name: str | None, param: str = "model") -> None:
    if name is None or name == "" or name.lower() == ctx.info.name.lower():
        return
    raise APIError(404, f"the model '{name}' does not exist; this server serves '{ctx.info.name}'", "invalid_request_error",
                   param, "model_not_found")  # fmt: skip


# -- conversation building -------------------------------------------------------------------------
def _url(ref: URLRef | str) -> str:
    return ref if isinstance(ref, str) else ref.url


def read_audio_part(url_or_b64: str, fmt: str | None, param: str, settings, budget: MediaBudget, is_url: bool):
    if is_url and url_or_b64.startswith("data:"):
        mime, data = media.parse_data_url(url_or_b64, param)
        fmt = fmt or media.MIME_TO_AUDIO.get(mime)
    elif is_url:
        path = media.local_path(url_or_b64, param, settings.allow_local_media, settings.local_media_dirs)
        with open(path, "rb") as fh:
            data = fh.read()
    else:
        data = media.b64decode(url_or_b64, param)
    left = max(budget.audio_left(), 0.0)
    audio = media.decode_audio(data, fmt, param, left,
                               lambda seconds, exact: budget.audio_too_long(seconds, param, exact))  # fmt: skip
    budget.add_audio(audio.size / media.MODEL_SAMPLE_RATE, param)
    return audio


def read_image_part(url: str, param: str, settings, budget: MediaBudget):
    budget.check_image_count(1, param)
    if url.startswith("data:"):
        mime, data = media.parse_data_url(url, param)
        if not mime.startswith("image/"):
            raise invalid(f"expected an image data URL, got '{mime}'", param, "invalid_image")
    else:
        path = media.local_path(url, param, settings.allow_local_media, settings.local_media_dirs)
        with open(path, "rb") as fh:
            data = fh.read()
    return media.open_image(data, param, settings.max_image_pixels, budget)


def read_video_part(url: str, param: str, settings, budget: MediaBudget, with_audio: bool, temp_files: list[str]):
    if url.startswith("data:"):
        mime, data = media.parse_data_url(url, param)
        if not mime.startswith("video/"):
            raise invalid(f"expected a video data URL, got '{mime}'", param, "invalid_video")
        path = media.write_temp(data, media.video_suffix(mime))
        temp_files.append(path)
    else:
        path = media.local_path(url, param, settings.allow_local_media, settings.local_media_dirs)
    frames, audio_seconds = media.probe_video(path, param, settings.video_fps)
    budget.add_video(frames, param)
    if with_audio:
        budget.add_audio(audio_seconds, param)
    return path


def build_conversation(messages: list[Message], ctx, use_audio_in_video: bool) -> tuple[list[dict], list[str]]:
    """OpenAI messages -> the DESIGN.md §2 conversation (media decoded and checked) + temp files to delete."""
    settings = ctx.settings
    budget = MediaBudget(settings)
    temp_files: list[str] = []
    conversation: list[dict] = []
    try:
        for i, msg in enumerate(messages):
            role = "system" if msg.role == "developer" else msg.role
            base = f"messages[{i}]"
            if msg.role == "assistant":
                text = msg.content if isinstance(msg.content, str) else None
                if isinstance(msg.content, list):
                    text = "".join(p.text for p in msg.content if isinstance(p, TextPart))
                if text is None and msg.audio is not None:
                    text = ctx.transcripts.get(msg.audio.id)
                    if text is None:
                        raise invalid(
                            f"unknown or expired audio id '{msg.audio.id}'", f"{base}.audio.id", "audio_not_found"
                        )
                turn = {"role": "assistant", "content": [{"type": "text", "text": text or ""}]}
                if msg.tool_calls:
                    turn["tool_calls"] = [
                        _tool_call_in(c, f"{base}.tool_calls[{k}]") for k, c in enumerate(msg.tool_calls)
                    ]
                conversation.append(turn)
                continue
            if msg.role == "tool":
                if not isinstance(msg.content, (str, list)):
                    raise invalid("a tool message needs its content (the function's output)", f"{base}.content")
                text = msg.content if isinstance(msg.content, str) else "".join(
                    p.text for p in msg.content if isinstance(p, TextPart))  # fmt: skip
                conversation.append({"role": "tool", "content": [{"type": "text", "text": text}]})
                continue
            if msg.content is None:
                raise invalid("content is required for this role", f"{base}.content")
            if isinstance(msg.content, str):
                conversation.append({"role": role, "content": [{"type": "text", "text": msg.content}]})
                continue
            items = []
            for j, part in enumerate(msg.content):
                param = f"{base}.content[{j}]"
                if isinstance(part, TextPart):
                    items.append({"type": "text", "text": part.text})
                    continue
                if role == "system":
                    raise invalid("system messages may only contain text", param)
                if isinstance(part, AudioPart):
                    audio = read_audio_part(part.input_audio.data, part.input_audio.format, f"{param}.input_audio.data",
                                            settings, budget, is_url=False)  # fmt: skip
                    items.append({"type": "audio", "audio": audio})
                elif isinstance(part, AudioURLPart):
                    audio = read_audio_part(_url(part.audio_url), None, f"{param}.audio_url", settings, budget, True)
                    items.append({"type": "audio", "audio": audio})
                elif isinstance(part, ImagePart):
                    image = read_image_part(_url(part.image_url), f"{param}.image_url", settings, budget)
                    items.append({"type": "image", "image": image})
                elif isinstance(part, VideoPart):
                    path = read_video_part(_url(part.video_url), f"{param}.video_url", settings, budget,
                                           use_audio_in_video, temp_files)  # fmt: skip
                    items.append({"type": "video", "video": path})
            if not items:
                raise invalid("content is empty", f"{base}.content")
            conversation.append({"role": role, "content": items})
        if not any(m["role"] == "user" for m in conversation):
            raise invalid("the conversation needs at least one user message", "messages")
    except BaseException:
        media.remove_files(temp_files)
        raise
    if settings.system_prompt and conversation[0]["role"] != "system":
        conversation.insert(0, {"role": "system", "content": [{"type": "text", "text": settings.system_prompt}]})
    return conversation, temp_files


def _tool_call_in(call: ToolCallIn, param: str) -> dict:
    try:
        args = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        raise invalid("'arguments' is not valid JSON", f"{param}.function.arguments", "invalid_tool_call") from None
    return {"type": "function", "id": call.id, "function": {"name": call.function.name, "arguments": args}}


def template_tools(ctx, tools: list[ToolDef] | None, tool_choice: str | None) -> list[dict] | None:
    """``tools`` as the chat template takes them, or None; a 400 when the checkpoint's template has no tools."""
    if not tools or tool_choice == "none":
        return None
    template = getattr(getattr(ctx.backend, "processor", None), "chat_template", None) or ""
    if "tools" not in template:
        raise invalid("this checkpoint's chat template does not describe tools to the model (the Qwen3-Omni "
                      "templates do)", "tools", "tools_not_supported")  # fmt: skip
    return [{"type": "function", "function": t.function.model_dump()} for t in tools]


# -- waiting on a session while watching the client --------------------------------------------------
class ClientGone(Exception):
    pass


async def next_event(session: Session, request: Request, poll_s: float = 0.25) -> Event:
    """The session's next event; cancels the session if the client disconnects meanwhile.

    The client is checked at least every ``poll_s``, whether events are flowing or not.
    """
    while True:
        now = time.monotonic()
        if now - getattr(request.state, "checked_at", now) >= poll_s or not hasattr(request.state, "checked_at"):
            request.state.checked_at = now
            if await request.is_disconnected():
                session.cancel()
                raise ClientGone()
        try:
            return await asyncio.wait_for(session.__anext__(), poll_s)
        except asyncio.TimeoutError:
            continue


async def start_session(ctx, gen: GenerationRequest) -> Session:
    try:
        return await ctx.backend.start(gen)
    except BaseException:
        media.remove_files(gen.temp_files)
        raise


def sampling_fields(body) -> dict:
    return {
        "temperature": 0.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": body.top_k or 0,
        "repetition_penalty": body.repetition_penalty or 1.0,
        "seed": body.seed,
    }


# -- endpoints -----------------------------------------------------------------------------------------
@router.get("/v1/models", dependencies=[Depends(authorized)])
async def list_models(request: Request):
    return {"object": "list", "data": [model_card(ctx_of(request))]}


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
async def get_model(model_id: str, request: Request):
    ctx = ctx_of(request)
    check_model(ctx, model_id, "model_id")
    return model_card(ctx)


def model_card(ctx) -> dict:
    info = ctx.info
    return {
        "id": info.name,
        "object": "model",
        "created": info.created,
        "owned_by": "thinktalk",
        "family": info.family,
        "voices": info.voices,
        "default_voice": (ctx.default_voice if info.has_speech else None),
        "modalities": {
            "input": ["text", "audio", "image", "video"],
            "output": ["text", "audio"] if info.has_speech else ["text"],
        },
        "audio_sample_rate": media.OUTPUT_SAMPLE_RATE,
    }


@router.post("/v1/chat/completions", dependencies=[Depends(authorized), Depends(require_json)])
async def chat_completions(request: Request):
    ctx = ctx_of(request)
    body: ChatRequest = await read_body(request, ChatRequest)
    check_model(ctx, body.model)
    if body.n not in (None, 1):
        raise invalid("only n=1 is supported", "n")
    if body.stop:
        raise invalid("stop sequences are not supported by this server", "stop", "unsupported_parameter")
    tools = template_tools(ctx, body.tools, body.tool_choice)
    if body.logprobs:
        raise invalid("logprobs are not supported by this server", "logprobs", "unsupported_parameter")
    max_tokens = body.max_completion_tokens or body.max_tokens or ctx.settings.default_max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    if max_tokens > ctx.settings.max_tokens:
        raise invalid(f"{param} is {max_tokens}; this server allows at most {ctx.settings.max_tokens}", param)
    context = ctx.info.context_length
    if context is not None and max_tokens >= context:  # no prompt fits (the exact check follows tokenization)
        raise limits.context_exceeded(None, max_tokens, context, param)
    modalities = body.modalities or ["text"]
    voice = None
    fmt = None
    if "audio" in modalities:
        opts = body.audio or AudioOptions()
        voice = ctx.info.voice(opts.voice, ctx.default_voice, "audio.voice")
        fmt = opts.format.lower()
        if fmt not in media.OUTPUT_FORMATS:
            raise invalid(f"unsupported audio.format '{opts.format}' (supported: {', '.join(media.OUTPUT_FORMATS)})",
                          "audio.format", "unsupported_format")  # fmt: skip
        if body.stream and fmt != "pcm16":
            raise invalid("streamed audio output requires audio.format 'pcm16'", "audio.format", "unsupported_format")
    elif body.audio is not None and body.audio.voice:
        ctx.info.voice(body.audio.voice, ctx.default_voice, "audio.voice")  # still reject unknown voices
    ctx.backend.check_capacity()  # refuse before decoding media when full
    has_media = any(isinstance(m.content, list) and any(not isinstance(p, TextPart) for p in m.content)
                    for m in body.messages)  # fmt: skip
    if has_media:  # decoding: in a worker thread
        conversation, temp_files = await ctx.offload(build_conversation, body.messages, ctx, body.use_audio_in_video)
    else:
        conversation, temp_files = build_conversation(body.messages, ctx, body.use_audio_in_video)
    gen = GenerationRequest(conversation=conversation, max_tokens=max_tokens, voice=voice,
                            use_audio_in_video=body.use_audio_in_video, temp_files=temp_files, tools=tools,
                            **sampling_fields(body))  # fmt: skip
    session = await start_session(ctx, gen)
    try:
        first = await next_event(session, request)
    except BaseException:
        session.cancel()
        raise
    if first.kind == "error":
        return first.error.response()
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            stream_chunks(ctx, session, first, completion_id, voice is not None, include_usage, tools is not None),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        events = [first]
        while events[-1].kind not in ("done", "error"):
            events.append(await next_event(session, request))
    except BaseException:
        session.cancel()
        raise
    if events[-1].kind == "error":
        return events[-1].error.response()
    return await completion_response(ctx, events, completion_id, fmt, tools is not None)


async def completion_response(ctx, events: list[Event], completion_id: str, fmt: str | None,
                              tools: bool = False) -> JSONResponse:  # fmt: skip
    answer = parse_answer("".join(e.text for e in events if e.kind == "text"), tools=tools)
    text = answer.content
    done = events[-1]
    usage = done.usage or Usage()
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if answer.reasoning is not None:
        message["reasoning_content"] = answer.reasoning
    finish = finish_reason(done)
    if answer.tool_calls:
        message["tool_calls"] = [c.chat() for c in answer.tool_calls]
        message["content"] = text or None
        finish = "tool_calls" if finish == "stop" else finish
    if answer.errors:
        message["tool_call_errors"] = answer.errors
        message["content"] = "".join(e.text for e in events if e.kind == "text").split("</think>")[-1].lstrip("\n")
    if fmt is not None:
        pcm = b"".join(e.audio for e in events if e.kind == "audio")
        data = await ctx.offload(media.encode_audio, pcm, media.OUTPUT_SAMPLE_RATE, fmt)
        audio_id, expires = ctx.transcripts.add(text)
        message["content"] = None
        message["audio"] = {"id": audio_id, "data": base64.b64encode(data).decode(), "expires_at": expires,
                            "transcript": text}  # fmt: skip
    return JSONResponse({
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": ctx.info.name,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": usage_dict(usage),
    })  # fmt: skip


def finish_reason(done: Event) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def usage_dict(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}  # fmt: skip


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def stream_chunks(ctx, session: Session, first: Event, completion_id: str, with_audio: bool, include_usage: bool,
                        tools: bool = False):  # fmt: skip
    created = int(time.time())
    audio_id = f"audio_{uuid.uuid4().hex[:24]}"
    transcript: list[str] = []
    raw: list[str] = []
    split = AnswerStream(tools=tools)

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> bytes:
        out = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": ctx.info.name,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []}  # fmt: skip
        if usage is not None:
            out["usage"] = usage
        return sse(out)

    try:
        yield chunk({"role": "assistant", "content": None if with_audio else "", "refusal": None})
        event = first
        while True:
            if event.kind == "text":
                raw.append(event.text)
                for channel, text in split.feed(event.text):
                    if channel == "reasoning":
                        yield chunk({"reasoning_content": text})
                    elif channel == "content":
                        transcript.append(text)
                        yield chunk(
                            {"audio": {"id": audio_id, "transcript": text}} if with_audio else {"content": text}
                        )
            elif event.kind == "audio":
                yield chunk({"audio": {"id": audio_id, "data": base64.b64encode(event.audio).decode()}})
            elif event.kind == "error":
                yield sse(event.error.body())
                break
            elif event.kind == "done":
                for channel, text in split.feed("", final=True):
                    if channel != "tool":
                        transcript.append(text)
                        key = "reasoning_content" if channel == "reasoning" else "content"
                        yield chunk({key: text})
                finish = finish_reason(event)
                answer = parse_answer("".join(raw), tools=tools)
                if answer.tool_calls:
                    calls = [{"index": k, **c.chat()} for k, c in enumerate(answer.tool_calls)]
                    yield chunk({"tool_calls": calls})
                    finish = "tool_calls" if finish == "stop" else finish
                if answer.errors:  # the malformed call's text (withheld while streaming), and what is wrong
                    bad = "".join(raw).split("</think>")[-1]
                    yield chunk({"content": bad[bad.find("<tool_call>") :], "tool_call_errors": answer.errors})
                if with_audio:
                    _, expires = ctx.transcripts.add("".join(transcript), audio_id)
                    yield chunk({"audio": {"id": audio_id, "expires_at": expires}})
                yield chunk({}, finish)
                if include_usage:
                    yield chunk({}, usage=usage_dict(event.usage or Usage()), choices=False)
                break
            event = await session.__anext__()
        yield sse("[DONE]")
    finally:
        if not session.finished:
            session.cancel()  # the client went away (or the stream was closed): stop the model


@router.post("/v1/audio/speech", dependencies=[Depends(authorized), Depends(require_json)])
async def speech(request: Request):
    """Text-to-speech through the Talker: the text is teacher-forced as the Thinker's answer (see tts.py)."""
    ctx = ctx_of(request)
    body: SpeechRequest = await read_body(request, SpeechRequest)
    check_model(ctx, body.model)
    voice = ctx.info.voice(body.voice, ctx.default_voice, "voice")
    if body.speed != 1.0:
        raise invalid("only speed 1.0 is supported (the Talker has no rate control)", "speed", "unsupported_parameter")
    if body.instructions:
        raise invalid("instructions are not supported for speech (the text is spoken as given)", "instructions",
                      "unsupported_parameter")  # fmt: skip
    ctx.backend.check_capacity()
    from thinktalk.serve.tts import tts_conversation

    gen = GenerationRequest(conversation=tts_conversation(body.input, ctx.settings.system_prompt),
                            max_tokens=ctx.settings.max_tokens, voice=voice, speak_text=body.input, kind="speech")  # fmt: skip
    session = await start_session(ctx, gen)
    try:
        first = await next_event(session, request)
    except BaseException:
        session.cancel()
        raise
    if first.kind == "error":
        return first.error.response()
    fmt = body.response_format
    if body.stream_format == "sse":
        return StreamingResponse(speech_sse(session, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip
    if fmt == "pcm":  # raw pcm16 streams as it is made; containers are written once complete
        return StreamingResponse(speech_raw(session, first), media_type=AUDIO_MIME[fmt])
    try:
        events = [first]
        while events[-1].kind not in ("done", "error"):
            events.append(await next_event(session, request))
    except BaseException:
        session.cancel()
        raise
    if events[-1].kind == "error":
        return events[-1].error.response()
    pcm = b"".join(e.audio for e in events if e.kind == "audio")
    data = await ctx.offload(media.encode_audio, pcm, media.OUTPUT_SAMPLE_RATE, fmt)
    return Response(data, media_type=AUDIO_MIME[fmt])


AUDIO_MIME = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac", "wav": "audio/wav",
              "pcm": "audio/pcm"}  # fmt: skip


async def speech_raw(session: Session, first: Event):
    try:
        event = first
        while event.kind not in ("done", "error"):
            if event.kind == "audio":
                yield event.audio
            event = await session.__anext__()
    finally:
        if not session.finished:
            session.cancel()


async def speech_sse(session: Session, first: Event):
    try:
        event = first
        while True:
            if event.kind == "audio":
                yield sse({"type": "speech.audio.delta", "audio": base64.b64encode(event.audio).decode()})
            elif event.kind == "error":
                yield sse(event.error.body())
                break
            elif event.kind == "done":
                u = event.usage or Usage()
                yield sse({"type": "speech.audio.done", "usage": {"input_tokens": u.prompt_tokens, "output_tokens": 0,
                                                                  "total_tokens": u.prompt_tokens}})  # fmt: skip
                break
            event = await session.__anext__()
    finally:
        if not session.finished:
            session.cancel()
