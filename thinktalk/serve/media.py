"""Media at the server's edge: base64 / data URLs / local files in, checked against the limits; PCM out.

Everything here validates *before* the model sees anything: a corrupt file, a format that is not the
announced one, an image too large or audio too long becomes a 400 naming the offending field.
Audio is decoded and resampled with PyAV (libav's decoders and libswresample), already a dependency.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import tempfile
import wave
from urllib.parse import unquote, urlparse

import numpy as np

from thinktalk.serve.errors import invalid

MODEL_SAMPLE_RATE = 16000  # what the audio encoders read
OUTPUT_SAMPLE_RATE = 24000  # pcm16 in OpenAI's audio APIs, and what the vocoders produce

# Announced format -> libav demuxer names that may carry it.
AUDIO_CONTAINERS = {
    "wav": {"wav"},
    "mp3": {"mp3"},
    "flac": {"flac"},
    "ogg": {"ogg"},
    "opus": {"ogg"},
    "webm": {"matroska,webm"},
    "m4a": {"mov,mp4,m4a,3gp,3g2,mj2"},
    "mp4": {"mov,mp4,m4a,3gp,3g2,mj2"},
    "aac": {"aac"},
}
OUTPUT_FORMATS = ("wav", "pcm16", "flac", "mp3", "opus", "aac")
MIME_TO_AUDIO = {
    "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
    "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/flac": "flac", "audio/x-flac": "flac",
    "audio/ogg": "ogg", "audio/opus": "opus", "audio/webm": "webm", "audio/mp4": "m4a", "audio/aac": "aac",
}  # fmt: skip


# -- base64 and URLs ---------------------------------------------------------------------------------
def b64decode(data: str, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise invalid("expected a non-empty base64 string", param, "invalid_base64")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("is not valid base64 (standard alphabet, with padding)", param, "invalid_base64") from None


MIME_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}$")  # RFC 6838 names


def parse_data_url(url: str, param: str) -> tuple[str, bytes]:
    """``data:<mime>;base64,<payload>`` -> (mime, bytes); the MIME type must be a well-formed ``type/subtype``."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise invalid("expected a data URL of the form data:<mime type>;base64,<data>", param, "invalid_data_url")
    mime = head[5:-7].split(";")[0].strip().lower()
    if not MIME_TYPE.match(mime) or ".." in mime:
        raise invalid(f"the data URL's MIME type {mime[:80]!r} is not of the form type/subtype", param,
                      "invalid_data_url")  # fmt: skip
    return mime, b64decode(payload, param)


VIDEO_SUFFIXES = {"mp4": ".mp4", "webm": ".webm", "quicktime": ".mov", "x-matroska": ".mkv", "ogg": ".ogv",
                  "mpeg": ".mpg", "x-msvideo": ".avi", "avi": ".avi", "3gpp": ".3gp", "x-flv": ".flv",
                  "mp2t": ".ts"}  # fmt: skip


def video_suffix(mime: str) -> str:
    """A temp-file suffix for a video MIME type: from a fixed table, never from the client's text
    (libav finds the format from the content; the suffix is only a hint)."""
    return VIDEO_SUFFIXES.get(mime.split("/", 1)[-1].split("+")[0], ".video")


def local_path(url: str, param: str, allow: bool, dirs: list[str]) -> str:
    """A local media path (``file://`` URL or plain path) after the server's policy allows it."""
    if not allow:
        raise invalid(
            "only data: URLs (base64) are accepted; the server does not read local files or fetch remote URLs "
            "(start it with --allow-local-media to accept paths)",
            param,
            "unsupported_url",
        )
    if url.startswith("file://"):
        path = unquote(urlparse(url).path)
    elif "://" in url:
        raise invalid("remote URLs are not fetched; send the media as a data: URL", param, "unsupported_url")
    else:
        path = url
    path = os.path.realpath(path)
    if dirs and not any(path == d or path.startswith(os.path.realpath(d) + os.sep) for d in dirs):
        raise invalid("this path is outside the directories the server may read", param, "forbidden_path")
    if not os.path.isfile(path):
        raise invalid(f"no such file: {path}", param, "file_not_found")
    return path


# -- audio -----------------------------------------------------------------------------------------
def resample(x: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 resampling with libswresample (band-limited, not linear interpolation)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if source_rate == target_rate or x.size == 0:
        return x
    import av

    frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
    frame.sample_rate = source_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def decode_audio(data: bytes, fmt: str | None, param: str, max_seconds: float, too_long_error=None) -> np.ndarray:
    """Encoded audio (wav/mp3/flac/ogg/...) -> mono float32 at 16 kHz; checks format and duration.

    Longer than ``max_seconds`` is refused before decoding when the container declares its duration, else
    as soon as decoding passes the limit. ``too_long_error(seconds, exact)`` builds that error (default:
    :func:`too_long` against ``max_seconds``); ``exact`` is False when only a lower bound is known.
    """
    import av

    if too_long_error is None:

        def too_long_error(seconds: float, exact: bool):
            return too_long(seconds, max_seconds, param, exact)

    fmt = (fmt or "").lower() or None
    if fmt is not None and fmt not in AUDIO_CONTAINERS:
        raise invalid(
            f"unsupported audio format '{fmt}' (supported: {', '.join(AUDIO_CONTAINERS)})", param, "unsupported_format"
        )
    if not data:
        raise invalid("audio data is empty", param, "invalid_audio")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise invalid(f"could not read the audio ({_av_reason(e)})", param, "invalid_audio") from None
    with container:
        found = container.format.name
        if fmt is not None and found not in AUDIO_CONTAINERS[fmt]:
            raise invalid(f"the data is not {fmt} audio (it looks like '{found}')", param, "audio_format_mismatch")
        if not container.streams.audio:
            raise invalid("the data has no audio stream", param, "invalid_audio")
        declared = _declared_seconds(container)
        if declared is not None and declared > 1.1 * max_seconds + 1:  # clearly over (estimates can be a bit off)
            raise too_long_error(declared, True)
        limit = int(max_seconds * MODEL_SAMPLE_RATE)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=MODEL_SAMPLE_RATE)
        chunks, total = [], 0
        try:
            for frame in container.decode(audio=0):
                frame.pts = None
                for f in resampler.resample(frame):
                    chunks.append(f.to_ndarray().reshape(-1))
                    total += chunks[-1].size
                if total > limit:
                    raise too_long_error(total / MODEL_SAMPLE_RATE, False)
            for f in resampler.resample(None):
                chunks.append(f.to_ndarray().reshape(-1))
        except av.error.FFmpegError as e:
            raise invalid(f"could not decode the audio ({_av_reason(e)})", param, "invalid_audio") from None
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if audio.size == 0:
        raise invalid("the audio has no samples", param, "invalid_audio")
    if audio.size > limit:
        raise too_long_error(audio.size / MODEL_SAMPLE_RATE, True)
    return audio


def _declared_seconds(container) -> float | None:
    """The duration the container header declares (None when it declares none)."""
    stream = container.streams.audio[0]
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1e6
    return None


def too_long(seconds: float, max_seconds: float, param: str | None, exact: bool = True):
    at_least = "" if exact else "at least "
    return invalid(f"audio is too long ({at_least}{seconds:.1f} s); this server accepts at most {max_seconds:g} s per "
                   "request", param, "audio_too_long")  # fmt: skip


def pcm16_to_float(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(x) -> bytes:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def encode_audio(pcm16: bytes, rate: int, fmt: str) -> bytes:
    """Mono pcm16 -> the container OpenAI's ``audio.format`` names."""
    if fmt == "pcm16":
        return pcm16
    if fmt == "wav":
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm16)
        return buf.getvalue()
    if fmt in ("flac", "mp3", "opus", "aac"):
        return _encode_with_av(pcm16, rate, fmt)
    raise ValueError(f"unsupported output format {fmt}")


def _encode_with_av(pcm16: bytes, rate: int, fmt: str) -> bytes:
    import av

    codec, container_fmt, codec_rate = {"flac": ("flac", "flac", rate), "mp3": ("libmp3lame", "mp3", rate),
                                        "opus": ("libopus", "ogg", 48000), "aac": ("aac", "adts", rate)}[fmt]  # fmt: skip
    samples = np.frombuffer(pcm16, dtype="<i2")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_fmt) as out:
        stream = out.add_stream(codec, rate=codec_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=codec_rate)
        frames = ([*resampler.resample(frame), *resampler.resample(None)]) if samples.size else []
        for f in frames:
            f.pts = None
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _av_reason(e: Exception) -> str:
    # libav messages look like "[Errno 1094995529] Invalid data found when processing input: '<none>'".
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(e)).split(": '")[0].strip()
    return text or type(e).__name__


# -- images ------------------------------------------------------------------------------------------
def open_image(data: bytes, param: str, max_pixels: int, budget=None):
    """Bytes -> RGB PIL image, refusing undecodable data and images above ``max_pixels`` before decoding.

    ``budget`` (a :class:`~thinktalk.serve.limits.MediaBudget`) counts the image and its pixels, also
    before decoding.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise invalid("the data is not an image format the server can read", param, "invalid_image") from None
    except Image.DecompressionBombError:
        raise invalid(f"image is too large (this server accepts at most {max_pixels} pixels)", param, "image_too_large") from None
    w, h = img.size
    if w * h > max_pixels:
        raise invalid(
            f"image is too large ({w}x{h} = {w * h} pixels; this server accepts at most {max_pixels})",
            param,
            "image_too_large",
        )
    if w < 1 or h < 1:
        raise invalid("image is empty", param, "invalid_image")
    if budget is not None:
        budget.add_image(w, h, param)
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise invalid(f"could not decode the image ({e})", param, "invalid_image") from None
    try:
        return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise invalid(f"could not convert the image to RGB ({e})", param, "invalid_image") from None


# -- video -------------------------------------------------------------------------------------------
def write_temp(data: bytes, suffix: str) -> str:
    fd, path = tempfile.mkstemp(prefix="thinktalk-", suffix=suffix)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def remove_files(paths: list[str]) -> None:
    for path in paths:
        try:
            os.remove(path)
        except OSError:
            pass


def probe_video(path: str, param: str, fps: float) -> tuple[int, float]:
    """(frames the processor will sample at ``fps``, seconds of audio track) of a video file."""
    import av

    try:
        with av.open(path, mode="r") as container:
            if not container.streams.video:
                raise invalid("the data has no video stream", param, "invalid_video")
            stream = container.streams.video[0]
            seconds = None
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                seconds = container.duration / 1e6
            if not seconds or seconds <= 0:
                seconds = sum(1 for _ in container.decode(video=0)) / float(stream.average_rate or 25)
            audio_seconds = 0.0
            if container.streams.audio:
                a = container.streams.audio[0]
                if a.duration is not None and a.time_base is not None:
                    audio_seconds = float(a.duration * a.time_base)
                else:
                    audio_seconds = seconds
    except av.error.FFmpegError as e:
        raise invalid(f"could not read the video ({_av_reason(e)})", param, "invalid_video") from None
    # Qwen's frame sampling: duration x fps rounded to an even count, at least 4 (qwen-omni-utils).
    frames = max(4, 2 * round(seconds * fps / 2))
    return int(math.ceil(frames)), audio_seconds
