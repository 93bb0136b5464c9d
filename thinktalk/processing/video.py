"""Video: frame sampling, decoding with PyAV, the audio track, and patchify into ``pixel_values_videos``.

Sampling follows the official ``qwen-omni-utils`` (``smart_nframes``): ``fps`` frames per second
(default 2), at least 4 and at most 768 frames, an even number of frames (two frames make one temporal
patch), spread evenly over the clip with ``round(linspace(first, last, n))``; ``video_start`` /
``video_end`` (seconds) cut a range first, ``nframes`` asks for a count instead of a rate.

Each frame is then resized like the reference ``Qwen2VLVideoProcessor``: :func:`smart_resize` between
``128`` and ``768`` merged tokens' worth of pixels per frame (``min_pixels``/``max_pixels``), capped
so that the whole clip stays within 90% of 128k tokens (the per-frame cap of ``qwen-omni-utils``, which
the reference applies with ``cap_pixels_per_frame=True``), torchvision's antialiased bicubic, CLIP
normalisation, and the patch order of :func:`thinktalk.processing.image.patchify`.

``video_second_per_grid`` is ``temporal_patch_size / fps``: the seconds one temporal patch spans, with
the fps the frames were sampled at.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import torch

from thinktalk.processing.image import VisionConfig, normalize_torch, patchify, resize_uint8_torch, smart_resize

FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
MAX_VIDEO_TOKENS = 128000


def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_nframes(
    total_frames: int,
    video_fps: float,
    fps: float | None = None,
    nframes: int | None = None,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int | None = None,
) -> int:
    """How many frames to sample from a clip of ``total_frames`` at ``video_fps`` (qwen-omni-utils' rule).

    >>> smart_nframes(100, 25.0)        # 4 s at 2 fps
    8
    >>> smart_nframes(30, 10.0)         # 3 s: 6 frames
    6
    >>> smart_nframes(10, 10.0)         # 1 s would give 2 frames; at least 4
    4
    """
    if fps is not None and nframes is not None:
        raise ValueError("give either fps or nframes for a video, not both")
    if nframes is not None:
        n = round_by_factor(nframes, FRAME_FACTOR)
    else:
        fps = FPS if fps is None else fps
        lo = ceil_by_factor(min_frames, FRAME_FACTOR)
        hi = floor_by_factor(max_frames if max_frames is not None else min(FPS_MAX_FRAMES, total_frames), FRAME_FACTOR)
        n = total_frames / video_fps * fps
        n = min(min(max(n, lo), hi), total_frames)
        n = floor_by_factor(n, FRAME_FACTOR)
    if not (FRAME_FACTOR <= n <= total_frames):
        raise ValueError(f"cannot sample {n} frames from a video of {total_frames} frames (need 2 <= n <= total)")
    return int(n)


def frame_range(total_frames: int, video_fps: float, start: float | None, end: float | None) -> tuple[int, int]:
    """First and last frame index of ``[start, end]`` seconds (the whole clip when both are ``None``)."""
    if start is None and end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    start = 0.0 if start is None else max(0.0, float(start))
    end = duration if end is None else min(float(end), duration)
    if start >= end:
        raise ValueError(f"video_start ({start}) must be before video_end ({end}) and inside the {duration:.2f} s clip")
    first = min(math.ceil(start * video_fps), total_frames - 1)
    last = max(first, min(math.floor(end * video_fps), total_frames - 1))
    return first, last


def frame_indices(first: int, last: int, nframes: int) -> list[int]:
    """``round(linspace(first, last, nframes))`` (round half to even, like ``torch.round``)."""
    return torch.linspace(first, last, nframes).round().long().tolist()


@dataclasses.dataclass
class DecodedVideo:
    """Sampled frames (``[T, H, W, 3]`` uint8), the fps they were sampled at, and the clip's facts."""

    frames: np.ndarray
    fps: float
    video_fps: float
    total_frames: int
    start_seconds: float = 0.0
    end_seconds: float | None = None


def _video_fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    raise ValueError("the video stream has no frame rate")


def _decode_selected(path: str, indices: list[int]) -> tuple[list[np.ndarray], int]:
    """Decode the whole stream, keep the frames at ``indices``; return them and the true frame count."""
    import av

    wanted = set(indices)
    kept: dict[int, np.ndarray] = {}
    count = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
            count = i + 1
    return [kept[i] for i in indices if i in kept], count


def read_video(
    path: str | os.PathLike,
    fps: float | None = None,
    nframes: int | None = None,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int | None = None,
    video_start: float | None = None,
    video_end: float | None = None,
) -> DecodedVideo:
    """Decode and sample a video file with PyAV. Raises the decoder's exceptions (media.py names the file)."""
    import av

    path = os.fspath(path)
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("the file has no video stream")
        stream = container.streams.video[0]
        video_fps = _video_fps(stream)
        total = int(stream.frames or 0)
    if total <= 0:
        _, total = _decode_selected(path, [])
    if total <= 0:
        raise ValueError("the video stream has no frames")

    def plan(total_frames: int) -> tuple[list[int], float, int, int]:
        first, last = frame_range(total_frames, video_fps, video_start, video_end)
        count = last - first + 1
        n = smart_nframes(
            count,
            video_fps,
            fps=fps if nframes is None else None,
            nframes=nframes,
            min_frames=min_frames,
            max_frames=max_frames,
        )
        sample_fps = fps if fps is not None else (FPS if nframes is None else n / max(count, 1e-6) * video_fps)
        return frame_indices(first, last, n), sample_fps, first, last

    indices, sample_fps, first, last = plan(total)
    frames, decoded = _decode_selected(path, indices)
    if decoded != total:
        # The container's frame count was wrong: sample again with the count the decoder saw.
        total = decoded
        if total <= 0:
            raise ValueError("the video stream has no frames")
        indices, sample_fps, first, last = plan(total)
        frames, _ = _decode_selected(path, indices)
    return DecodedVideo(
        frames=np.stack(frames),
        fps=float(sample_fps),
        video_fps=video_fps,
        total_frames=total,
        start_seconds=first / video_fps,
        end_seconds=(last + 1) / video_fps,
    )


def has_audio_track(path: str | os.PathLike) -> bool:
    import av

    with av.open(os.fspath(path)) as container:
        return bool(container.streams.audio)


def read_audio_track(
    path: str | os.PathLike,
    sampling_rate: int = 16000,
    start: float | None = None,
    end: float | None = None,
) -> np.ndarray | None:
    """The first audio stream of a video file, mono float32 at ``sampling_rate`` (``None`` if silent).

    Decoded with PyAV, averaged over channels and resampled with soxr HQ, like any audio file;
    ``start``/``end`` (seconds) cut the same range as the sampled frames.
    """
    from thinktalk.processing.audio import decode_with_av, resample, to_mono

    try:
        data, rate = decode_with_av(os.fspath(path))
    except LookupError:
        return None
    wave = to_mono(data)
    if start is not None or end is not None:
        a = int(round((start or 0.0) * rate))
        b = len(wave) if end is None else int(round(end * rate))
        wave = wave[a:b]
    return resample(wave, rate, sampling_rate)


def video_max_pixels(
    config: VisionConfig,
    num_frames: int,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
    max_video_tokens: int = MAX_VIDEO_TOKENS,
) -> int:
    """Per-frame pixel cap: ``max_pixels``, lowered so the clip fits 90% of ``max_video_tokens`` tokens,
    but never below 1.05 ``min_pixels`` (the reference's ``cap_pixels_per_frame`` / qwen-omni-utils).
    """
    max_pixels = config.max_pixels if max_pixels is None else max_pixels
    min_pixels = config.min_pixels if min_pixels is None else min_pixels
    total_pixels = int(max_video_tokens * config.factor * config.factor * 0.9)
    return max(min(max_pixels, total_pixels * config.temporal_patch_size // num_frames), int(min_pixels * 1.05))


def frames_to_uint8_tchw(frames) -> torch.Tensor:
    """``[T, H, W, C]`` / ``[T, C, H, W]`` array or tensor, or a list of PIL frames -> uint8 ``[T, 3, H, W]``."""
    from thinktalk.processing.image import image_to_uint8_chw

    if isinstance(frames, (list, tuple)):
        return torch.stack([image_to_uint8_chw(f) for f in frames])
    t = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
    if t.dim() != 4:
        raise ValueError(f"video frames must be [T, H, W, C] or [T, C, H, W], got shape {tuple(t.shape)}")
    if t.shape[1] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        t = t.permute(0, 3, 1, 2)
    return torch.stack([image_to_uint8_chw(f) for f in t]) if t.dtype != torch.uint8 or t.shape[1] != 3 else t


def preprocess_video(
    frames,
    config: VisionConfig,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    cap_total_pixels: bool = True,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Sampled frames -> ``(patches [grid_t * grid_h * grid_w, C * T * p * p] float32, (grid_t, grid_h, grid_w))``."""
    video = frames_to_uint8_tchw(frames).contiguous()
    num_frames, _, height, width = video.shape
    lo = config.min_pixels if min_pixels is None else min_pixels
    hi = config.max_pixels if max_pixels is None else max_pixels
    if cap_total_pixels:
        hi = video_max_pixels(config, num_frames, max_pixels=hi, min_pixels=lo)
    new_h, new_w = smart_resize(height, width, factor=config.factor, min_pixels=lo, max_pixels=hi)
    x = normalize_torch(resize_uint8_torch(video, new_h, new_w), config.image_mean, config.image_std)
    if pad := -num_frames % config.temporal_patch_size:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)], dim=0)
    patches = patchify(x, config.patch_size, config.merge_size, config.temporal_patch_size)
    grid = (x.shape[0] // config.temporal_patch_size, new_h // config.patch_size, new_w // config.patch_size)
    return patches, grid
