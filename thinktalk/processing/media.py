"""Media loading at the boundary: a conversation's content items -> arrays, with clear errors.

A content item is ``{"type": "audio" | "image" | "video", <type>: source, **options}`` where the source is
a path, a ``file://`` URL, raw bytes, a numpy array / torch tensor, or (images) a PIL image. The
official keys ``"url"`` and ``"path"`` are accepted too, and ``"image_url"`` (OpenAI style).

Options (as ``qwen-omni-utils`` takes them):

* image: ``min_pixels``, ``max_pixels``
* video: ``fps``, ``nframes``, ``min_frames``, ``max_frames``, ``video_start``, ``video_end`` (seconds),
  ``min_pixels``, ``max_pixels``; frame arrays also take ``fps`` (the rate they were sampled at)
* audio: ``sampling_rate`` (of an array; arrays are taken as 16 kHz otherwise), ``audio_start``,
  ``audio_end`` (seconds)

Every failure raises a :class:`MediaError` subclass whose message names the file (or the item) and
says what is wrong; nothing is silently cut or skipped.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from thinktalk.processing.audio import SAMPLING_RATE, AudioTooLongError, decode_audio, resample, to_mono

__all__ = [
    "MediaError",
    "AudioDecodeError",
    "EmptyAudioError",
    "AudioTooLongError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "VideoDecodeError",
    "load_audio",
    "load_image",
    "load_video",
    "LoadedVideo",
    "DEFAULT_MAX_IMAGE_PIXELS",
]

# Input images larger than this are refused before decoding (Pillow's own "decompression bomb" guard
# only warns between 89M and 179M pixels).
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024


class MediaError(ValueError):
    """A media input that cannot be used; the message names it."""


class AudioDecodeError(MediaError):
    """An audio input that no decoder can read (corrupt, truncated, or not audio)."""


class EmptyAudioError(MediaError):
    """An audio input with no samples."""


class ImageDecodeError(MediaError):
    """An image input that cannot be decoded."""


class ImageTooLargeError(MediaError):
    """An image whose pixel count or aspect ratio is over the limit."""


class VideoDecodeError(MediaError):
    """A video input that cannot be decoded or sampled (corrupt, unsupported, no video stream, too short)."""


# AudioTooLongError (a ValueError) lives in audio.py, where the features are padded; it is re-exported here.


def describe(source: Any) -> str:
    """A short name for an input in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    shape = getattr(source, "shape", None)
    if shape is not None:
        return f"<{type(source).__name__} of shape {tuple(shape)}>"
    size = getattr(source, "size", None)
    return f"<{type(source).__name__}{' ' + str(size) if size is not None else ''}>"


def local_path(source: str | os.PathLike) -> str:
    """A filesystem path from a path or a ``file://`` URL. Remote URLs are refused."""
    source = os.fspath(source)
    if source.startswith("file://"):
        from urllib.parse import unquote, urlparse

        parsed = urlparse(source)
        return unquote(parsed.path if not parsed.netloc else f"//{parsed.netloc}{parsed.path}")
    if source.startswith(("http://", "https://", "data:")):
        raise MediaError(f"{source[:80]!r}: only local files, file:// URLs, bytes and arrays are accepted")
    return source


def _is_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


def _check_file(path: str, error: type[MediaError], kind: str) -> None:
    if not os.path.exists(path):
        raise error(f"{kind} file {path!r} does not exist")
    if os.path.isdir(path):
        raise error(f"{kind} path {path!r} is a directory")
    if os.path.getsize(path) == 0:
        raise (EmptyAudioError if kind == "audio" else error)(f"{kind} file {path!r} is empty (0 bytes)")


# ---------------------------------------------------------------------------------------------
# Audio


def load_audio(
    source: Any,
    sampling_rate: int | None = None,
    start: float | None = None,
    end: float | None = None,
    target_rate: int = SAMPLING_RATE,
) -> np.ndarray:
    """Any audio input -> mono float32 at ``target_rate`` (16 kHz).

    ``sampling_rate`` is the rate of an array input (default: already ``target_rate``). Files are
    decoded with libsndfile (wav, flac, ogg, mp3...) or FFmpeg (m4a, aac, webm, mp4...), averaged over
    channels and resampled with soxr HQ.
    """
    name = describe(source)
    if _is_path(source) or isinstance(source, bytes):
        if _is_path(source):
            source = local_path(source)
            _check_file(source, AudioDecodeError, "audio")
        try:
            data, rate = decode_audio(source)
        except Exception as e:
            raise AudioDecodeError(f"cannot decode audio file {name}: {type(e).__name__}: {e}") from e
        wave = to_mono(data)
    else:
        try:
            import torch

            if isinstance(source, torch.Tensor):
                source = source.detach().cpu().float().numpy()
            wave = np.asarray(source, dtype=np.float32)
        except Exception as e:
            raise AudioDecodeError(f"audio input {name} is not a path, bytes or an array of samples: {e}") from e
        if wave.ndim == 2:
            # [channels, N] or [N, channels]: average the short axis
            wave = wave.mean(axis=0) if wave.shape[0] <= wave.shape[1] else wave.mean(axis=1)
        elif wave.ndim != 1:
            raise AudioDecodeError(f"audio array {name} must be 1-D (or channels x samples), got {wave.ndim} dims")
        rate = target_rate if sampling_rate is None else int(sampling_rate)
    if start is not None or end is not None:
        a = int(round((start or 0.0) * rate))
        b = wave.shape[-1] if end is None else int(round(end * rate))
        wave = wave[a:b]
    if wave.shape[-1] == 0:
        raise EmptyAudioError(f"audio input {name} has no samples")
    if not np.isfinite(wave).all():
        raise AudioDecodeError(f"audio input {name} contains NaN or infinite samples")
    return resample(wave, rate, target_rate)


# ---------------------------------------------------------------------------------------------
# Images


def load_image(source: Any, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """Any image input -> an RGB PIL image (arrays and tensors are returned as they are, checked).

    Raises :class:`ImageDecodeError` for unreadable data and :class:`ImageTooLargeError` above
    ``max_image_pixels`` input pixels or an aspect ratio over 200.
    """
    from PIL import Image

    from thinktalk.processing.image import to_rgb

    name = describe(source)
    if isinstance(source, dict) and "url" in source:  # OpenAI-style {"url": ...}
        source = source["url"]
    if _is_path(source) or isinstance(source, bytes):
        if _is_path(source):
            source = local_path(source)
            _check_file(source, ImageDecodeError, "image")
        try:
            import io

            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            width, height = img.size
        except Exception as e:
            raise ImageDecodeError(f"cannot read image file {name}: {type(e).__name__}: {e}") from e
        _check_image_size(name, width, height, max_image_pixels)
        try:
            img.load()
            return to_rgb(img)
        except Exception as e:
            raise ImageDecodeError(f"cannot decode image file {name}: {type(e).__name__}: {e}") from e
    if isinstance(source, Image.Image):
        _check_image_size(name, source.size[0], source.size[1], max_image_pixels)
        return to_rgb(source)
    shape = getattr(source, "shape", None)
    if shape is None or len(shape) not in (2, 3):
        raise ImageDecodeError(f"image input {name} is not a path, bytes, PIL image or HxWxC array")
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        height, width = shape[1], shape[2]
    else:
        height, width = shape[0], shape[1]
    _check_image_size(name, int(width), int(height), max_image_pixels)
    return source


def _check_image_size(name: str, width: int, height: int, max_image_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image {name} is empty ({width}x{height})")
    if width * height > max_image_pixels:
        raise ImageTooLargeError(
            f"image {name} is {width}x{height} = {width * height} pixels, over the limit of {max_image_pixels} "
            "(raise max_image_pixels to accept it)"
        )
    if max(width, height) / min(width, height) > 200:
        raise ImageTooLargeError(f"image {name} is {width}x{height}: aspect ratio over 200 is not supported")


# ---------------------------------------------------------------------------------------------
# Video


@dataclasses.dataclass
class LoadedVideo:
    """Sampled frames ``[T, H, W, 3]`` uint8, the fps they were sampled at, and (optionally) the audio track."""

    frames: Any
    fps: float
    audio: np.ndarray | None = None
    name: str = "<video>"


VIDEO_OPTIONS = ("fps", "nframes", "min_frames", "max_frames", "video_start", "video_end")


def load_video(source: Any, with_audio: bool = False, default_fps: float = 2.0, **options) -> LoadedVideo:
    """A video file (sampled per ``options``) or frames -> :class:`LoadedVideo`.

    With ``with_audio``, the audio track is decoded too (``audio`` is ``None`` for a silent file, like the
    reference, which then gives the video no audio tokens).
    """
    from thinktalk.processing import video as V

    name = describe(source)
    if _is_path(source) or isinstance(source, bytes):
        if isinstance(source, bytes):
            import tempfile

            with tempfile.NamedTemporaryFile(suffix=".video", delete=False) as f:
                f.write(source)
            path = f.name
        else:
            path = local_path(source)
            _check_file(path, VideoDecodeError, "video")
        try:
            decoded = V.read_video(path, **{k: v for k, v in options.items() if k in VIDEO_OPTIONS})
        except Exception as e:
            raise VideoDecodeError(f"cannot decode video file {name}: {type(e).__name__}: {e}") from e
        audio = None
        if with_audio:
            try:
                audio = V.read_audio_track(
                    path,
                    SAMPLING_RATE,
                    decoded.start_seconds if options.get("video_start") is not None else None,
                    decoded.end_seconds if options.get("video_end") is not None else None,
                )
            except Exception as e:
                raise AudioDecodeError(f"cannot decode the audio track of video file {name}: {e}") from e
            if audio is not None and audio.shape[-1] == 0:
                raise EmptyAudioError(f"the audio track of video file {name} has no samples")
        if isinstance(source, bytes):
            os.unlink(path)
        return LoadedVideo(decoded.frames, decoded.fps, audio, name)
    # Frames given directly: already sampled, at ``fps`` (default 2).
    frames = source
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise VideoDecodeError(f"video input {name} has no frames")
    else:
        shape = getattr(frames, "shape", None)
        if shape is None or len(shape) != 4 or shape[0] == 0:
            raise VideoDecodeError(f"video input {name} must be a path or frames [T, H, W, C], got {name}")
    fps = float(options.get("fps", default_fps))
    return LoadedVideo(frames, fps, None, name)
