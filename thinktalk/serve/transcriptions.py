"""OpenAI's audio transcription and translation endpoints, answered by the loaded omni model.

``POST /v1/audio/transcriptions`` and ``POST /v1/audio/translations`` take OpenAI's multipart form
(``file``, ``model``, ``language``, ``prompt``, ``temperature``, ``response_format``, ``stream``). The upload
is decoded and checked like chat audio (``media.decode_audio``: any format libav reads, at most
``max_audio_seconds``), turned into the family's speech-recognition conversation (:mod:`thinktalk.asr`,
the prompts of the official cookbooks) and run as an ordinary text-only :class:`GenerationRequest`
through the backend — the same Thinker, scheduler, limits and cancellation as chat, no second model.

The model writes its transcript after reading the whole audio; it has no alignment of words to time.
So there are no ``segments``/``words`` in ``verbose_json``, and ``srt``/``vtt`` (which are made of
timed segments) and ``timestamp_granularities`` are refused with a 400 that says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from thinktalk import asr
from thinktalk.serve import media
from thinktalk.serve.backend import Event, GenerationRequest, Session, Usage
from thinktalk.serve.errors import invalid
from thinktalk.serve.openai_api import authorized, check_model, ctx_of, next_event, sse, start_session

router = APIRouter()

FORMATS = ("json", "text", "verbose_json")
NO_TIMINGS = (
    "this model writes its transcript after reading the whole audio and has no timing for its words, so there "
    "are no timed segments"
)
# Fields of OpenAI's form this server cannot honour, and why (a 400, never silently ignored). The SDK
# sends list fields with a "[]" suffix.
UNSUPPORTED = {
    "timestamp_granularities": f"{NO_TIMINGS} or words to give timestamps for",
    "include": "logprobs are not returned by this server",
    "chunking_strategy": "the audio is transcribed as one block (up to the server's max_audio_seconds); "
    "server-side chunking is not implemented",
    "known_speaker_names": "speaker diarization is not supported",
    "known_speaker_references": "speaker diarization is not supported",
    "keywords": "keywords are not supported; put the words into `prompt`",
    "languages": "give one `language` (the spoken language, a hint in the prompt)",
}
FIELDS = ("file", "model", "language", "prompt", "temperature", "response_format", "stream")


@dataclass
class ASRForm:
    """The validated form of one transcription/translation request."""

    data: bytes  # the uploaded file, undecoded
    model: str | None
    language: str | None  # as given (checked to be a known language)
    prompt: str | None
    temperature: float  # 0: greedy
    response_format: str  # json | text | verbose_json
    stream: bool


async def read_form(request: Request) -> ASRForm:
    """The multipart form, every field checked; unsupported OpenAI fields are 400s naming the reason."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise invalid(f"send the audio as multipart/form-data (a `file` field), not '{content_type or 'no content type'}'",
                      None, "invalid_content_type")  # fmt: skip
    limit = request.app.state.ctx.settings.max_body_bytes
    form = await request.form(max_files=1, max_fields=32, max_part_size=limit)
    try:
        for key in form.keys():
            name = key[:-2] if key.endswith("[]") else key
            if name in UNSUPPORTED:
                raise invalid(f"'{name}' is not supported: {UNSUPPORTED[name]}", name, "unsupported_parameter")
            if name not in FIELDS:
                raise invalid(f"unknown parameter '{key}' (this endpoint takes {', '.join(FIELDS)})", key,
                              "unknown_parameter")  # fmt: skip
            if len(form.getlist(key)) > 1:
                raise invalid(f"'{key}' is given more than once", key)
        upload = form.get("file")
        if upload is None:
            raise invalid("the audio 'file' field is required", "file", "missing_file")
        if not isinstance(upload, UploadFile):
            raise invalid("'file' must be an uploaded file (multipart with a filename), not a text field", "file",
                          "invalid_file")  # fmt: skip
        data = await upload.read()
        fmt = _text(form, "response_format") or "json"
        if fmt in ("srt", "vtt"):
            raise invalid(f"response_format '{fmt}' is not supported: {NO_TIMINGS} to write. Use json, text or "
                          "verbose_json", "response_format", "unsupported_response_format")  # fmt: skip
        if fmt == "diarized_json":
            raise invalid("response_format 'diarized_json' is not supported: speaker diarization is not implemented",
                          "response_format", "unsupported_response_format")  # fmt: skip
        if fmt not in FORMATS:
            raise invalid(f"unknown response_format '{fmt}' (supported: {', '.join(FORMATS)})", "response_format",
                          "unsupported_response_format")  # fmt: skip
        stream = _bool(form, "stream")
        if stream and fmt != "json":
            raise invalid(f"stream=true sends transcript.text.delta/done events; response_format '{fmt}' cannot be "
                          "streamed (leave it at json or turn stream off)", "response_format")  # fmt: skip
        language = _text(form, "language")
        try:
            asr.language_name(language)
        except ValueError as e:
            raise invalid(str(e), "language", "unsupported_language") from None
        return ASRForm(data, _text(form, "model"), language, _text(form, "prompt"), _temperature(form), fmt, stream)
    finally:
        await form.close()


def _text(form, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"'{name}' must be a text field, not a file", name)
    return value.strip() or None


def _bool(form, name: str) -> bool:
    value = _text(form, name)
    if value is None:
        return False
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise invalid(f"'{name}' must be true or false, not '{value}'", name)


def _temperature(form) -> float:
    value = _text(form, "temperature")
    if value is None:
        return 0.0
    try:
        t = float(value)
    except ValueError:
        raise invalid(f"'temperature' must be a number, not '{value}'", "temperature") from None
    if not 0.0 <= t <= 1.0:
        raise invalid(f"'temperature' must be between 0 and 1 (got {value}); 0 is greedy decoding", "temperature")
    return t


@router.post("/v1/audio/transcriptions", dependencies=[Depends(authorized)])
async def transcriptions(request: Request):
    return await recognize(request, "transcribe")


@router.post("/v1/audio/translations", dependencies=[Depends(authorized)])
async def translations(request: Request):
    return await recognize(request, "translate")


async def recognize(request: Request, task: str):
    ctx = ctx_of(request)
    form = await read_form(request)
    check_model(ctx, form.model)
    if not form.data:
        raise invalid("the uploaded file is empty (0 bytes)", "file", "invalid_audio")
    ctx.backend.check_capacity()  # refuse before decoding when full
    settings = ctx.settings
    audio = await run_in_threadpool(media.decode_audio, form.data, None, "file", settings.max_audio_seconds)
    duration = audio.size / media.MODEL_SAMPLE_RATE
    conversation = asr.asr_conversation(ctx.info.family, audio, task, form.language, form.prompt)
    gen = GenerationRequest(conversation=conversation, max_tokens=settings.max_tokens, temperature=form.temperature,
                            kind="transcription" if task == "transcribe" else "translation", up_to_context=True)  # fmt: skip
    session = await start_session(ctx, gen)
    try:
        first = await next_event(session, request)
    except BaseException:
        session.cancel()
        raise
    if first.kind == "error":
        return first.error.response()
    if form.stream:
        return StreamingResponse(stream_events(session, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
    try:
        events = [first]
        while events[-1].kind not in ("done", "error"):
            events.append(await next_event(session, request))
    except BaseException:
        session.cancel()
        raise
    done = events[-1]
    if done.kind == "error":
        return done.error.response()
    text = "".join(e.text for e in events if e.kind == "text")
    # OpenAI's shapes have no finish reason; a transcript cut at the server's max_tokens says so here.
    headers = {"X-Finish-Reason": "length" if done.finish_reason == "length" else "stop"}
    if form.response_format == "text":
        return PlainTextResponse(text, headers=headers)
    if form.response_format == "verbose_json":
        name = "English" if task == "translate" else asr.language_name(form.language)
        body = {"task": task, "language": (name or "unknown").lower(), "duration": round(duration, 3), "text": text}
        if task == "transcribe":
            body["usage"] = {"type": "duration", "seconds": round(duration, 3)}
        return JSONResponse(body, headers=headers)
    body = {"text": text}
    if task == "transcribe":
        body["usage"] = token_usage(done.usage)
    return JSONResponse(body, headers=headers)


def token_usage(u: Usage | None) -> dict:
    u = u or Usage()
    return {"type": "tokens", "input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}  # fmt: skip


async def stream_events(session: Session, first: Event):
    """OpenAI's transcription stream: ``transcript.text.delta`` per text delta, then ``transcript.text.done``."""
    parts: list[str] = []
    try:
        event = first
        while True:
            if event.kind == "text" and event.text:
                parts.append(event.text)
                yield sse({"type": "transcript.text.delta", "delta": event.text})
            elif event.kind == "error":
                yield sse(event.error.body())  # the SDK raises it as an APIError
                break
            elif event.kind == "done":
                yield sse({"type": "transcript.text.done", "text": "".join(parts), "usage": token_usage(event.usage)})
                break
            event = await session.__anext__()
    finally:
        if not session.finished:
            session.cancel()  # the client went away: stop the model
