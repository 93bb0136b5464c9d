"""Media items of a prompt: which audio clips, images and videos a stretch of tokens holds.

The processor concatenates every clip's features and every image's patches across the prompt, in
order; each item becomes one contiguous run of placeholder tokens (``<|AUDIO|>``, ``<|IMAGE|>``,
``<|VIDEO|>``; with ``use_audio_in_video`` a video and its audio interleave, each still in order).
Reusing the cache of a prompt's beginning (the engine's prefix reuse) needs the media of the rest only:
:func:`suffix_media` picks the items whose placeholders lie after a token index, and
:func:`item_boundary` moves an index back to where no item is cut. :func:`item_digests` names every
item by its content, so two prompts with the same placeholders but other pictures never share a cache.
Batch 1 only (prefix reuse is per conversation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from thinktalk.positions import TokenIds


@dataclass(frozen=True)
class Layout:
    """How many placeholder tokens each item of a prompt has, per modality (in the processor's order)."""

    audio: list[int]
    image: list[int]
    video: list[int]


def layout(media: dict, audio_tokens: Callable[[int], int], merge: int) -> Layout:
    fam = media.get("feature_attention_mask")
    audio = [audio_tokens(int(n)) for n in fam.sum(-1).tolist()] if fam is not None else []

    def grids(key: str) -> list[int]:
        g = media.get(key)
        return [] if g is None else [int(t * h * w) // merge**2 for t, h, w in g.tolist()]

    return Layout(audio=audio, image=grids("image_grid_thw"), video=grids("video_grid_thw"))


def _before(input_ids: torch.Tensor, start: int, token: int) -> int:
    return int((input_ids[0, :start] == token).sum())


def _items_before(counts: list[int], placeholders: int) -> int | None:
    """How many whole items ``placeholders`` tokens cover, or None when they end inside one."""
    total = 0
    for k, n in enumerate(counts):
        if total == placeholders:
            return k
        total += n
    return len(counts) if total == placeholders else None


def item_boundary(input_ids: torch.Tensor, start: int, ids: TokenIds, lay: Layout) -> int:
    """The largest index <= ``start`` that cuts no item's placeholder run."""
    while start > 0:
        cut = False
        for token, counts in ((ids.audio, lay.audio), (ids.image, lay.image), (ids.video, lay.video)):
            if _items_before(counts, _before(input_ids, start, token)) is None:
                cut = True
        if not cut:
            return start
        start -= 1
    return 0


def suffix_media(input_ids: torch.Tensor, start: int, ids: TokenIds, media: dict, lay: Layout) -> dict:
    """The media arguments of the items whose placeholders lie in ``input_ids[:, start:]`` (``start`` on a boundary)."""
    out = {}
    k = _items_before(lay.audio, _before(input_ids, start, ids.audio))
    if media.get("input_features") is not None and k < len(lay.audio):
        out["input_features"] = media["input_features"][k:]
        out["feature_attention_mask"] = media["feature_attention_mask"][k:]
    for token, counts, pix, grid in ((ids.image, lay.image, "pixel_values", "image_grid_thw"),
                                     (ids.video, lay.video, "pixel_values_videos", "video_grid_thw")):  # fmt: skip
        k = _items_before(counts, _before(input_ids, start, token))
        if media.get(pix) is None or k >= len(counts):
            continue
        g = media[grid]
        patches = int(g[:k].prod(-1).sum()) if k else 0
        out[pix] = media[pix][patches:]
        out[grid] = g[k:]
        if token == ids.video and media.get("video_second_per_grid") is not None:
            out["video_second_per_grid"] = media["video_second_per_grid"][k:]
    return out


def item_digests(media: dict, lay: Layout) -> list[tuple[str, int, str]]:
    """(modality, index, content hash) of every item, audio clips first, then images, then videos."""

    def digest(t: torch.Tensor) -> str:
        return hashlib.blake2b(t.detach().contiguous().cpu().numpy().tobytes(), digest_size=16).hexdigest()

    out = []
    fam = media.get("feature_attention_mask")
    if fam is not None:
        for i, n in enumerate(fam.sum(-1).tolist()):
            out.append(("audio", i, digest(media["input_features"][i][..., : int(n)])))
    for name, pix, grid in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):
        if media.get(pix) is None:
            continue
        offset = 0
        for i, n in enumerate(media[grid].prod(-1).tolist()):
            out.append((name, i, digest(media[pix][offset : offset + int(n)])))
            offset += int(n)
    return out
