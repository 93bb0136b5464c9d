"""Images: smart resize, rescale/normalise, and patchify into ``pixel_values`` + ``image_grid_thw``.

This is the Qwen2-VL image processor the Omni checkpoints name in ``preprocessor_config.json``:

1. :func:`smart_resize` picks a size whose sides are multiples of ``patch_size * merge_size`` (28 for
   Qwen2.5-Omni, 32 for Qwen3-Omni) with ``min_pixels <= h * w <= max_pixels``, keeping the aspect ratio.
2. Bicubic resize. Two kernels, both from the reference: ``"torch"`` (default) is what
   ``AutoProcessor`` uses whenever torchvision is installed - torchvision's antialiased bicubic, which on
   CPU runs ``torch.nn.functional.interpolate`` directly on the uint8 image; ``"pil"`` is Pillow's
   bicubic, as in ``Qwen2VLImageProcessorPil`` and in the official ``qwen-omni-utils`` (which resizes with
   Pillow before the processor).
3. ``(x / 255 - mean) / std`` with the CLIP mean/std, float32 (the torch kernel fuses it into
   ``(x - 255 mean) / (255 std)`` like the reference's torchvision backend).
4. :func:`patchify`: an image is repeated ``temporal_patch_size`` (2) times in time, cut into
   ``patch_size`` squares, and ordered so that each ``merge_size x merge_size`` group of patches (one LLM
   token after the merger) is contiguous: rows of ``(merged_row, merged_col, row_in_group, col_in_group)``
   with columns ``(channel, time, y, x)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Patch geometry and pixel range of an image (or video) processor."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, config: dict[str, Any], default: VisionConfig | None = None) -> VisionConfig:
        """From a ``preprocessor_config.json`` (``min_pixels``/``max_pixels`` or ``size`` edges)."""
        base = default or cls()
        size = config.get("size") or {}
        min_pixels = config.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", base.min_pixels)))
        max_pixels = config.get("max_pixels", size.get("longest_edge", size.get("max_pixels", base.max_pixels)))
        return cls(
            patch_size=int(config.get("patch_size", base.patch_size)),
            temporal_patch_size=int(config.get("temporal_patch_size", base.temporal_patch_size)),
            merge_size=int(config.get("merge_size", base.merge_size)),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            image_mean=tuple(config.get("image_mean", base.image_mean)),
            image_std=tuple(config.get("image_std", base.image_std)),
        )


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """The size a ``height x width`` image is resized to.

    Both sides become multiples of ``factor``; the area is brought inside ``[min_pixels, max_pixels]``
    by scaling both sides by the same factor (floor when shrinking, ceil when growing).

    >>> smart_resize(70, 100)
    (56, 112)
    >>> smart_resize(1080, 1920, max_pixels=768 * 28 * 28)
    (560, 1008)
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image):
    """A PIL image in RGB; transparency is composited over white (as the reference and qwen-omni-utils do)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def image_to_uint8_chw(image) -> torch.Tensor:
    """PIL image / HWC or CHW array / tensor -> uint8 ``[3, H, W]`` tensor (RGB)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        arr = np.array(to_rgb(image))
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    t = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise ValueError(f"an image array must be HxW, HxWxC or CxHxW, got shape {tuple(t.shape)}")
    if t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        t = t.permute(2, 0, 1)
    if t.is_floating_point():
        # Floats in [0, 1] are taken as scaled pixels (the reference rescales them to 0..255 too).
        t = (t * 255).round() if float(t.max()) <= 1.0 else t.round()
        t = t.clamp(0, 255)
    t = t.to(torch.uint8)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        rgba = t.float() / 255.0
        rgb = rgba[:3] * rgba[3:] + (1.0 - rgba[3:])
        t = (rgb * 255).round().to(torch.uint8)
    return t.contiguous()


def resize_uint8_torch(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of uint8 ``[..., C, H, W]`` exactly as torchvision 0.28's ``resize``.

    On CPU the uint8 tensor goes straight into ``interpolate`` (torch's native uint8 kernel); elsewhere it
    goes through float32 and is clamped and rounded back. Same size: returned unchanged.
    """
    shape = images.shape
    c, h, w = shape[-3:]
    if (h, w) == (height, width):
        return images
    x = images.reshape(-1, c, h, w)
    if x.device.type == "cpu":
        out = F.interpolate(x, size=[height, width], mode="bicubic", align_corners=False, antialias=True)
    else:
        out = F.interpolate(x.float(), size=[height, width], mode="bicubic", align_corners=False, antialias=True)
        out = out.clamp_(0, 255).round_().to(torch.uint8)
    return out.reshape(shape[:-3] + (c, height, width))


def resize_uint8_pil(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pillow bicubic resize of a uint8 ``[C, H, W]`` tensor (as ``Qwen2VLImageProcessorPil``)."""
    from PIL import Image

    if tuple(image.shape[-2:]) == (height, width):
        return image
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    out = pil.resize((width, height), resample=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1).contiguous()


def normalize_torch(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``[..., C, H, W]`` -> float32 ``(x - 255 mean) / (255 std)`` (the torchvision backend's fused form)."""
    scale = 1.0 / (1 / 255)
    m = (torch.tensor(mean) * scale).view(-1, 1, 1)
    s = (torch.tensor(std) * scale).view(-1, 1, 1)
    return (images.to(torch.float32) - m) / s


def normalize_pil(image: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``[C, H, W]`` -> float32 ``(x * (1/255) - mean) / std`` (the PIL backend: rescale in float64)."""
    x = (image.to(torch.float64) * (1 / 255)).to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s


def patchify(frames: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """``[T, C, H, W]`` float -> ``[grid_t * grid_h * grid_w, C * temporal_patch_size * patch_size**2]``.

    ``T`` must be a multiple of ``temporal_patch_size`` (repeat an image, pad a video with its last frame).
    """
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(
        gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size
    )
    # -> (gt, gh/m, gw/m, m, m, C, T, p, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)


def preprocess_image(
    image,
    config: VisionConfig,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    resample: str = "torch",
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One image -> ``(patches [grid_h * grid_w, C * T * p * p] float32, (1, grid_h, grid_w))``."""
    chw = image_to_uint8_chw(image)
    height, width = chw.shape[-2:]
    new_h, new_w = smart_resize(
        height,
        width,
        factor=config.factor,
        min_pixels=config.min_pixels if min_pixels is None else min_pixels,
        max_pixels=config.max_pixels if max_pixels is None else max_pixels,
    )
    if resample == "torch":
        x = normalize_torch(resize_uint8_torch(chw, new_h, new_w), config.image_mean, config.image_std)
    elif resample == "pil":
        x = normalize_pil(resize_uint8_pil(chw, new_h, new_w), config.image_mean, config.image_std)
    else:
        raise ValueError(f"resample must be 'torch' or 'pil', not {resample!r}")
    frames = x[None].expand(config.temporal_patch_size, -1, -1, -1)
    patches = patchify(frames, config.patch_size, config.merge_size, config.temporal_patch_size)
    return patches, (1, new_h // config.patch_size, new_w // config.patch_size)
