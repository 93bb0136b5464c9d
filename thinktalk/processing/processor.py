"""The Processor: conversations (DESIGN.md section 2) -> the tensors the Thinker takes.

``Processor.__call__`` renders each conversation with the checkpoint's chat template, loads its media
(:mod:`thinktalk.processing.media`), and calls :meth:`Processor.process`, the equivalent of the
reference processor's ``__call__``: it turns the media into features, expands each placeholder token
into as many tokens as the encoders will produce, tokenizes, and pads (left by default).

Placeholder expansion (both families, as the reference):

* image: ``prod(image_grid_thw) / merge_size**2`` image tokens;
* video: ``prod(video_grid_thw) / merge_size**2`` video tokens;
* audio: the audio encoder's output length for the frames in ``feature_attention_mask``
  (:func:`~thinktalk.positions.audio_token_count`,
  :func:`~thinktalk.positions.aut_token_count`);
* video with its audio track (``use_audio_in_video``): ``<audio_bos>`` + video and audio tokens
  interleaved on a shared clock + ``<audio_eos>``, inside the template's vision bos/eos.
  Qwen2.5-Omni cuts both streams into 2-second chunks (50 positions at 25 per second) and emits
  video chunk 1, audio chunk 1, video chunk 2...; Qwen3-Omni merges token by token: a video token (at
  ``t * seconds_per_grid * 13`` positions) goes before an audio token (one position each) when its time
  is not later. The audio track's features are part of ``input_features``, at the video's place in the
  order of audio slots.

Choices where the reference leaves room (each documented where it is made):

* ``video_second_per_grid`` uses the fps the frames were sampled at (``fps`` option, default 2). The
  reference uses the fps it is *told* and, when not told, assumes 2.0 (Qwen2.5-Omni) or 1.0 (Qwen3-Omni),
  although the official ``qwen-omni-utils`` samples at 2 fps; :meth:`Processor.process` with frame
  arrays and no ``fps`` follows the reference's assumption.
* The per-frame video pixel cap over the whole clip (``cap_video_pixels``, on by default) is the
  reference's ``cap_pixels_per_frame=True``, i.e. what ``qwen-omni-utils`` does.
* Audio longer than Qwen2.5-Omni's 300 s window raises instead of being cut.
* A video without an audio track gets plain video tokens with ``use_audio_in_video`` (as the reference).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from thinktalk.families import FAMILIES as REGISTRY
from thinktalk.positions import audio_token_count, aut_token_count
from thinktalk.processing.audio import (
    AudioFeatureConfig,
    extract_features,
)
from thinktalk.processing.image import VisionConfig, preprocess_image
from thinktalk.processing.media import (
    DEFAULT_MAX_IMAGE_PIXELS,
    LoadedVideo,
    MediaError,
    load_audio,
    load_image,
    load_video,
)
from thinktalk.processing.tokenizer import ChatTemplate, Tokenizer, load_chat_template
from thinktalk.processing.video import FPS, preprocess_video

FAMILIES = tuple(REGISTRY)  # the model_types this processor knows (thinktalk.families)


@dataclasses.dataclass(frozen=True)
class FamilySettings:
    """What differs between the two families' processors."""

    audio_padding: str  # "max_length" (pad to chunk_length, Qwen2.5) or "longest" (Qwen3)
    position_id_per_seconds: float
    seconds_per_chunk: float
    default_video_fps: float  # the reference's fps when it is not told (only for frames given to process())
    video_factor: int  # patch_size * merge_size, for the default per-frame pixel range


FAMILY_SETTINGS = {
    "qwen2_5_omni": FamilySettings("max_length", 25, 2.0, 2.0, 28),
    "qwen3_omni_moe": FamilySettings("longest", 13.0, 2.0, 1.0, 32),
}


# ---------------------------------------------------------------------------------------------
# Placeholder expansion (pure functions)


def chunk_boundaries(token_times: np.ndarray, tokens_per_chunk: int) -> list[tuple[int, int]]:
    """Split increasing token times into ``[k * tokens_per_chunk, (k + 1) * tokens_per_chunk)`` chunks.

    Returns ``(start, end)`` index pairs. Like the reference, the chunk counter advances by one per
    boundary found, even when a time jumps over several chunks.

    >>> chunk_boundaries(np.array([0, 25, 50, 75, 100]), 50)
    [(0, 2), (2, 4), (4, 5)]
    """
    out, start, chunk = [], 0, 1
    for i, t in enumerate(token_times):
        if t >= chunk * tokens_per_chunk:
            out.append((start, i))
            start = i
            chunk += 1
    out.append((start, len(token_times)))
    return out


def video_token_times(
    grid_thw: Sequence[int], merge_size: int, second_per_grid: float, position_id_per_seconds: float
) -> np.ndarray:
    """Temporal position of each video token (one per merged patch, frame-major)."""
    t, h, w = (int(x) for x in grid_thw)
    per_frame = (h // merge_size) * (w // merge_size)
    return np.repeat(np.arange(t), per_frame) * second_per_grid * position_id_per_seconds


def interleave_qwen2_5(video_times: np.ndarray, num_audio: int, tokens_per_chunk: int) -> list[tuple[str, int]]:
    """Qwen2.5-Omni: alternate 2-second chunks, video first. Returns runs ``[("video", n), ("audio", m), ...]``."""
    v = chunk_boundaries(video_times, tokens_per_chunk)
    a = chunk_boundaries(np.arange(num_audio), tokens_per_chunk)
    runs = []
    for j in range(max(len(v), len(a))):
        if j < len(v):
            runs.append(("video", v[j][1] - v[j][0]))
        if j < len(a):
            runs.append(("audio", a[j][1] - a[j][0]))
    return runs


def interleave_qwen3(video_times: np.ndarray, num_audio: int) -> list[tuple[str, int]]:
    """Qwen3-Omni: merge by time, one audio token per position; a video token wins ties."""
    runs: list[tuple[str, int]] = []

    def push(kind: str, n: int = 1) -> None:
        if n <= 0:
            return
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1] + n)
        else:
            runs.append((kind, n))

    vi = ai = 0
    while vi < len(video_times) and ai < num_audio:
        if video_times[vi] <= ai:
            push("video")
            vi += 1
        else:
            push("audio")
            ai += 1
    push("video", len(video_times) - vi)
    push("audio", num_audio - ai)
    return runs


def assistant_token_mask(input_ids: torch.Tensor, header: Sequence[int], end_id: int) -> torch.Tensor:
    """Which tokens an assistant wrote: after each ``header`` (``<|im_start|>assistant\\n``) up to and
    including the turn's ``end_id`` (``<|im_end|>``), the tokens a model learns to produce.

    ``input_ids`` [T] or [B, T] -> bool mask of the same shape. A turn cut off before its end token is
    marked to the end of the row.

    >>> assistant_token_mask(torch.tensor([7, 1, 2, 5, 6, 9, 3, 7, 1, 2, 8, 9]), header=[7, 1, 2], end_id=9).int().tolist()
    [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    header = list(header)
    n = len(header)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for b, row in enumerate(ids.tolist()):
        inside = False
        i = 0
        while i < len(row):
            if not inside and row[i : i + n] == header:
                inside = True
                i += n
                continue
            if inside:
                mask[b, i] = True
                if row[i] == end_id:
                    inside = False
            i += 1
    mask = mask.to(input_ids.device)
    return mask if input_ids.dim() == 2 else mask[0]


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Image:
    source: Any
    min_pixels: int | None = None
    max_pixels: int | None = None


@dataclasses.dataclass
class _Video:
    video: LoadedVideo
    min_pixels: int | None = None
    max_pixels: int | None = None


class Processor:
    """Tokenizer + chat template + audio features + image/video patches of one checkpoint.

    >>> proc = Processor.from_pretrained(path)                      # doctest: +SKIP
    >>> inputs = proc([{"role": "user", "content": [{"type": "audio", "audio": "q.wav"},
    ...                                             {"type": "text", "text": "Answer it."}]}])  # doctest: +SKIP
    """

    def __init__(
        self,
        family: str,
        tokenizer: Tokenizer,
        chat_template: str | None,
        audio_config: AudioFeatureConfig,
        image_config: VisionConfig,
        video_config: VisionConfig,
        image_resample: str = "torch",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        n_window: int = 50,
        cap_video_pixels: bool = True,
    ):
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
        if image_resample not in ("torch", "pil"):
            raise ValueError(f"image_resample must be 'torch' or 'pil', not {image_resample!r}")
        self.family = family
        self.settings = FAMILY_SETTINGS[family]
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._template = ChatTemplate(chat_template, tokenizer.special_tokens) if chat_template else None
        self.audio_config = audio_config
        self.image_config = image_config
        self.video_config = video_config
        self.image_resample = image_resample
        self.max_image_pixels = max_image_pixels
        self.n_window = n_window
        self.cap_video_pixels = cap_video_pixels
        mm = tokenizer.mm_tokens
        self.image_token, self.audio_token, self.video_token = mm["image_token"], mm["audio_token"], mm["video_token"]
        self.image_token_id = tokenizer.mm_token_id("image_token")
        self.audio_token_id = tokenizer.mm_token_id("audio_token")
        self.video_token_id = tokenizer.mm_token_id("video_token")
        self.audio_bos_token_id = tokenizer.mm_token_id("audio_bos_token")
        self.audio_eos_token_id = tokenizer.mm_token_id("audio_eos_token")

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **options: Any) -> Processor:
        """Load from a checkpoint directory; the family comes from ``config.json``'s ``model_type``.

        ``options``: ``image_resample`` ("torch" or "pil"), ``max_image_pixels``, ``n_window``,
        ``cap_video_pixels``.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path!r} is not a checkpoint directory")
        family = _family_of(path)
        tokenizer = Tokenizer.from_pretrained(path, family=family)
        pre_path = os.path.join(path, "preprocessor_config.json")
        pre = json.load(open(pre_path, encoding="utf-8")) if os.path.exists(pre_path) else {}
        audio_config = AudioFeatureConfig.from_dict(pre)
        patch = 14 if family == "qwen2_5_omni" else 16
        image_config = VisionConfig.from_dict(pre, VisionConfig(patch_size=patch))
        f = FAMILY_SETTINGS[family].video_factor
        video_default = dataclasses.replace(image_config, min_pixels=128 * f * f, max_pixels=768 * f * f)
        vid_path = os.path.join(path, "video_preprocessor_config.json")
        if os.path.exists(vid_path):
            video_config = VisionConfig.from_dict(json.load(open(vid_path, encoding="utf-8")), video_default)
        else:
            video_config = video_default
        if "n_window" not in options:
            options["n_window"] = _audio_n_window(path, default=50)
        return cls(family, tokenizer, load_chat_template(path), audio_config, image_config, video_config, **options)

    # -- text ----------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str | list[str]:
        """Render one conversation (-> str) or a batch (-> list of str) with the checkpoint's template.

        ``kwargs`` are template variables (``tools``, ``add_vision_id``, ``add_audio_id``, ``enable_thinking``...).
        """
        if self._template is None:
            raise ValueError("this checkpoint has no chat template (chat_template.json / .jinja)")
        conversations, batched = _as_batch(conversation)
        texts = [self._template.render(c, add_generation_prompt=add_generation_prompt, **kwargs) for c in conversations]
        return texts if batched else texts[0]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def assistant_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of the assistant-written tokens of ``input_ids`` ([T] or [B, T]): each assistant turn's
        text and its ``<|im_end|>``, not the ``<|im_start|>assistant\\n`` header (the training labels)."""
        end_id = self.tokenizer.token_to_id("<|im_end|>")
        if end_id is None:
            raise ValueError("the tokenizer has no <|im_end|> token: cannot find where assistant turns end")
        return assistant_token_mask(input_ids, self.tokenizer.encode("<|im_start|>assistant\n"), end_id)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    # -- conversations -------------------------------------------------------------------------------

    def __call__(
        self,
        conversation: list[dict] | list[list[dict]],
        use_audio_in_video: bool = False,
        add_generation_prompt: bool = True,
        padding_side: str = "left",
        escape_special_tokens: bool = False,
        **template_kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Conversation(s) -> model inputs. A list of conversations is a batch, padded on ``padding_side``.

        ``escape_special_tokens``: special tokens *written in the conversation's text* (``"<|im_end|>"``,
        ``"<|IMAGE|>"``) are tokenized as plain text, so text cannot fake a turn, a system message or a
        media placeholder; the chat template's own control tokens are unchanged. The default (``False``)
        is the reference's behaviour, where such text becomes the control tokens; the server always
        escapes, because its text comes from clients. Text without special-token strings gives the same
        ids either way.
        """
        conversations, _ = _as_batch(conversation)
        restore: dict[str, str] = {}
        if escape_special_tokens:
            conversations, restore = escape_text(conversations, self.tokenizer.special_token_strings,
                                                 self.chat_template or "")  # fmt: skip
        audios: list[np.ndarray] = []
        images: list[_Image] = []
        videos: list[_Video] = []
        for c in conversations:
            for item in _media_items(c):
                kind = item["type"]
                source = _item_source(item, kind)
                if kind == "audio":
                    audios.append(
                        load_audio(
                            source,
                            sampling_rate=item.get("sampling_rate"),
                            start=item.get("audio_start"),
                            end=item.get("audio_end"),
                        )
                    )
                elif kind == "image":
                    images.append(
                        _Image(
                            load_image(source, self.max_image_pixels), item.get("min_pixels"), item.get("max_pixels")
                        )
                    )
                else:
                    options = {
                        k: item[k]
                        for k in ("fps", "nframes", "min_frames", "max_frames", "video_start", "video_end")
                        if item.get(k) is not None
                    }
                    video = load_video(source, with_audio=use_audio_in_video, default_fps=FPS, **options)
                    if use_audio_in_video and video.audio is None and item.get("audio_track") is not None:
                        video.audio = load_audio(item["audio_track"], sampling_rate=item.get("sampling_rate"))
                    videos.append(_Video(video, item.get("min_pixels"), item.get("max_pixels")))
        texts = self.apply_chat_template(conversations, add_generation_prompt=add_generation_prompt, **template_kwargs)
        return self._build(texts, audios, images, videos, use_audio_in_video, padding_side, restore)

    def process(
        self,
        text: str | list[str],
        audio: Sequence[Any] | Any | None = None,
        images: Sequence[Any] | Any | None = None,
        videos: Sequence[Any] | Any | None = None,
        use_audio_in_video: bool = False,
        padding_side: str = "left",
        fps: float | Sequence[float] | None = None,
        video_audio: Sequence[Any] | None = None,
        sampling_rate: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The reference processor's ``__call__``: text with one placeholder per item -> model inputs.

        ``audio``: standalone audios, in the order of the audio placeholders (arrays at ``sampling_rate``,
        default 16 kHz, or files). ``images``: PIL images, arrays or files. ``videos``: frame arrays
        ``[T, H, W, C]`` (already sampled, at ``fps``; default as the reference: 2.0 for Qwen2.5-Omni, 1.0
        for Qwen3-Omni) or files (sampled at ``fps``, default 2). With ``use_audio_in_video``, each
        video's audio track comes from ``video_audio`` (one entry per video, ``None`` for silent) or,
        for files, from the file.
        """
        texts = [text] if isinstance(text, str) else list(text)
        audios = [load_audio(a, sampling_rate=sampling_rate) for a in _as_list(audio)]
        image_items = [_Image(load_image(i, self.max_image_pixels)) for i in _as_list(images)]
        video_list = _as_list(videos)
        fps_list = list(fps) if isinstance(fps, Sequence) else [fps] * len(video_list)
        if len(fps_list) != len(video_list):
            raise ValueError(f"got {len(fps_list)} fps values for {len(video_list)} videos")
        if video_audio is not None and len(video_audio) != len(video_list):
            raise ValueError(f"got {len(video_audio)} video_audio entries for {len(video_list)} videos")
        video_items = []
        for i, (v, f) in enumerate(zip(video_list, fps_list)):
            is_file = isinstance(v, (str, os.PathLike, bytes))
            default = FPS if is_file else self.settings.default_video_fps
            options = {"fps": f} if f is not None else {}
            loaded = load_video(
                v, with_audio=use_audio_in_video and is_file and video_audio is None, default_fps=default, **options
            )
            if use_audio_in_video and video_audio is not None and video_audio[i] is not None:
                loaded.audio = load_audio(video_audio[i], sampling_rate=sampling_rate)
            video_items.append(_Video(loaded))
        return self._build(texts, audios, image_items, video_items, use_audio_in_video, padding_side)

    # -- the work ------------------------------------------------------------------------------------

    def _build(
        self,
        texts: list[str],
        audios: list[np.ndarray],
        images: list[_Image],
        videos: list[_Video],
        use_audio_in_video: bool,
        padding_side: str,
        restore: dict[str, str] | None = None,
    ) -> dict[str, torch.Tensor]:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        pattern = re.compile("|".join(re.escape(t) for t in (self.audio_token, self.image_token, self.video_token)))
        kind_of = {self.audio_token: "audio", self.image_token: "image", self.video_token: "video"}
        order = [[kind_of[m.group(0)] for m in pattern.finditer(t)] for t in texts]
        counts = {k: sum(o.count(k) for o in order) for k in ("audio", "image", "video")}
        for kind, items in (("audio", audios), ("image", images), ("video", videos)):
            if counts[kind] != len(items):
                token = {"audio": self.audio_token, "image": self.image_token, "video": self.video_token}[kind]
                raise ValueError(
                    f"the text has {counts[kind]} {token} placeholder(s) but {len(items)} {kind} input(s) were given"
                )
        interleave = use_audio_in_video and len(videos) > 0

        # Audio slots in text order: standalone audios, and the tracks of videos when interleaving.
        slot_audio: list[np.ndarray] = []
        audio_slot_of: list[int] = []
        video_slot_of: list[int | None] = []
        audio_iter, video_iter = iter(audios), iter(videos)
        for kinds in order:
            for kind in kinds:
                if kind == "audio":
                    audio_slot_of.append(len(slot_audio))
                    slot_audio.append(next(audio_iter))
                elif kind == "video":
                    v = next(video_iter)
                    if interleave and v.video.audio is not None:
                        video_slot_of.append(len(slot_audio))
                        slot_audio.append(v.video.audio)
                    else:
                        video_slot_of.append(None)

        out: dict[str, torch.Tensor] = {}
        extra: dict[str, torch.Tensor] = {}
        audio_lengths: list[int] = []
        if slot_audio:
            features, mask = extract_features(slot_audio, self.audio_config, self.settings.audio_padding)
            frames = mask.sum(-1).tolist()
            if self.family == "qwen2_5_omni":
                audio_lengths = [audio_token_count(n) for n in frames]
            else:
                audio_lengths = [aut_token_count(n, self.n_window) for n in frames]
            extra["input_features"] = features
            extra["feature_attention_mask"] = mask

        image_grids: list[tuple[int, int, int]] = []
        if images:
            patches = []
            for im in images:
                try:
                    p, grid = preprocess_image(
                        im.source, self.image_config, im.min_pixels, im.max_pixels, self.image_resample
                    )
                except ValueError as e:
                    raise MediaError(f"image input {_describe(im.source)}: {e}") from e
                patches.append(p)
                image_grids.append(grid)
            out["pixel_values"] = torch.cat(patches, dim=0)
            out["image_grid_thw"] = torch.tensor(image_grids, dtype=torch.long)

        video_grids: list[tuple[int, int, int]] = []
        seconds_per_grid: list[float] = []
        if videos:
            patches = []
            for v in videos:
                try:
                    p, grid = preprocess_video(
                        v.video.frames,
                        self.video_config,
                        v.min_pixels,
                        v.max_pixels,
                        cap_total_pixels=self.cap_video_pixels,
                    )
                except ValueError as e:
                    raise MediaError(f"video input {v.video.name}: {e}") from e
                patches.append(p)
                video_grids.append(grid)
                seconds_per_grid.append(self.video_config.temporal_patch_size / v.video.fps)
            out["pixel_values_videos"] = torch.cat(patches, dim=0)
            out["video_grid_thw"] = torch.tensor(video_grids, dtype=torch.long)
            out["video_second_per_grid"] = torch.tensor(seconds_per_grid, dtype=torch.float32)

        # Replacement ids per placeholder, in text order.
        merge2 = self.image_config.merge_size**2
        vmerge = self.video_config.merge_size
        replacements: list[list[int]] = []
        ai = ii = vi = 0
        for kinds in order:
            for kind in kinds:
                if kind == "audio":
                    replacements.append([self.audio_token_id] * audio_lengths[audio_slot_of[ai]])
                    ai += 1
                elif kind == "image":
                    t, h, w = image_grids[ii]
                    replacements.append([self.image_token_id] * (t * h * w // merge2))
                    ii += 1
                else:
                    replacements.append(
                        self._video_replacement(
                            video_grids[vi], seconds_per_grid[vi], vmerge, video_slot_of[vi], audio_lengths
                        )
                    )
                    vi += 1

        sequences = []
        placeholder_ids = {self.audio_token_id, self.image_token_id, self.video_token_id}
        rep_iter = iter(replacements)
        if restore:
            encoded = [self.tokenizer.encode_rendered(t, restore) for t in texts]
        else:
            encoded = self.tokenizer.encode_batch(texts)
        for ids in encoded:
            expanded: list[int] = []
            for token in ids:
                if token in placeholder_ids:
                    expanded.extend(next(rep_iter))
                else:
                    expanded.append(token)
            sequences.append(expanded)

        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has no pad token")
        longest = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for i, s in enumerate(sequences):
            if padding_side == "left":
                input_ids[i, longest - len(s) :] = torch.tensor(s, dtype=torch.long)
                attention_mask[i, longest - len(s) :] = 1
            else:
                input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                attention_mask[i, : len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out, **extra}

    def _video_replacement(
        self, grid, second_per_grid: float, merge_size: int, audio_slot: int | None, audio_lengths: list[int]
    ) -> list[int]:
        t, h, w = grid
        n_video = t * h * w // (merge_size * merge_size)
        if audio_slot is None:
            return [self.video_token_id] * n_video
        times = video_token_times(grid, merge_size, second_per_grid, self.settings.position_id_per_seconds)
        n_audio = audio_lengths[audio_slot]
        if self.family == "qwen2_5_omni":
            per_chunk = int(self.settings.position_id_per_seconds * self.settings.seconds_per_chunk)
            runs = interleave_qwen2_5(times, n_audio, per_chunk)
        else:
            runs = interleave_qwen3(times, n_audio)
        ids = [self.audio_bos_token_id]
        for kind, n in runs:
            ids.extend([self.video_token_id if kind == "video" else self.audio_token_id] * n)
        ids.append(self.audio_eos_token_id)
        return ids


# ---------------------------------------------------------------------------------------------
# Helpers


def _family_of(path: str) -> str:
    config_path = os.path.join(path, "config.json")
    if os.path.exists(config_path):
        model_type = json.load(open(config_path, encoding="utf-8")).get("model_type")
        if model_type in FAMILIES:
            return model_type
        raise ValueError(f"{config_path}: model_type {model_type!r} is not one of {FAMILIES}")
    for name in ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json"):
        p = os.path.join(path, name)
        if os.path.exists(p):
            cls = json.load(open(p, encoding="utf-8")).get("processor_class", "")
            if cls.startswith("Qwen2_5Omni"):
                return "qwen2_5_omni"
            if cls.startswith("Qwen3OmniMoe"):
                return "qwen3_omni_moe"
    raise ValueError(f"cannot tell the model family of {path!r}: no config.json with a model_type")


def _audio_n_window(path: str, default: int) -> int:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        return default
    config = json.load(open(config_path, encoding="utf-8"))
    audio = (config.get("thinker_config") or {}).get("audio_config") or {}
    return int(audio.get("n_window", default)) if config.get("model_type") == "qwen3_omni_moe" else default


PLACEHOLDER_BASE = 0x100000  # Supplementary Private Use Area-B: characters no tokenizer gives a meaning


def escape_text(
    conversations: list[list[dict]], specials: Sequence[str], avoid: str = ""
) -> tuple[list[list[dict]], dict[str, str]]:
    """Copies of ``conversations`` whose text has every special-token string replaced by a placeholder
    character, and the map placeholder -> string (empty when no text holds a special-token string).

    The chat template renders the placeholders like any character, so after rendering the only special
    tokens left are the template's own; :meth:`Tokenizer.encode_rendered` puts the strings back as
    plain text. Placeholders are private-use characters that appear neither in the text nor in ``avoid``
    (the template).
    """
    if not specials:
        return conversations, {}
    pattern = re.compile("|".join(re.escape(t) for t in specials))
    texts = [t for c in conversations for t in _texts(c)]
    found = {m.group(0) for t in texts for m in pattern.finditer(t)}
    if not found:
        return conversations, {}
    used = set("".join(texts)) | set(avoid)
    placeholder: dict[str, str] = {}
    code = PLACEHOLDER_BASE
    for token in sorted(found):
        while chr(code) in used:
            code += 1
        placeholder[token] = chr(code)
        code += 1

    def sub(text: str) -> str:
        return pattern.sub(lambda m: placeholder[m.group(0)], text)

    escaped = []
    for c in conversations:
        messages = []
        for m in c:
            content = m.get("content")
            if isinstance(content, str):
                m = {**m, "content": sub(content)}
            elif isinstance(content, (list, tuple)):
                m = {**m, "content": [
                    {**item, "text": sub(item["text"])} if isinstance(item, dict) and isinstance(item.get("text"), str)
                    and item.get("type", "text") == "text" else item for item in content]}  # fmt: skip
            messages.append(m)
        escaped.append(messages)
    return escaped, {ch: token for token, ch in placeholder.items()}


def _texts(conversation: list[dict]):
    for m in conversation:
        content = m.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, (list, tuple)):
            for item in content:
                if isinstance(item, dict) and isinstance(item.get("text"), str) and item.get("type", "text") == "text":
                    yield item["text"]


def _as_batch(conversation) -> tuple[list[list[dict]], bool]:
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("a conversation is a non-empty list of {'role', 'content'} messages (or a list of those)")
    if isinstance(conversation[0], (list, tuple)):
        batch = [list(c) for c in conversation]
        batched = True
    else:
        batch = [list(conversation)]
        batched = False
    for c in batch:
        if not c:
            raise ValueError("a conversation in the batch is empty")
        for m in c:
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"a message must be a dict with a 'role', got {m!r:.100}")
            content = m.get("content")
            if content is not None and not isinstance(content, (str, list, tuple)):
                raise ValueError(f"message content must be a string or a list of items, got {type(content).__name__}")
    return batch, batched


_SOURCE_KEYS = {
    "image": ("image", "url", "path", "image_url"),
    "audio": ("audio", "url", "path", "audio_url"),
    "video": ("video", "url", "path", "video_url"),
}


def _media_items(conversation: list[dict]):
    for m in conversation:
        content = m.get("content")
        if not isinstance(content, (list, tuple)):
            continue
        for item in content:
            if not isinstance(item, dict):
                raise ValueError(f"a content item must be a dict, got {type(item).__name__}")
            kind = item.get("type")
            if kind is None:
                kind = next((k for k in ("image", "audio", "video", "text") if k in item), None)
                item = {**item, "type": kind}
            if kind in ("image", "audio", "video"):
                yield item
            elif kind == "image_url":
                yield {**item, "type": "image"}
            elif kind != "text":
                raise ValueError(f"unknown content item type {kind!r}; expected text, image, audio or video")


def _item_source(item: dict, kind: str) -> Any:
    for key in _SOURCE_KEYS[kind]:
        if item.get(key) is not None:
            value = item[key]
            if isinstance(value, dict) and "url" in value:
                value = value["url"]
            return value
    raise ValueError(f"a {kind} item needs a source under {_SOURCE_KEYS[kind][0]!r}: {item!r:.100}")


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _describe(source: Any) -> str:
    from thinktalk.processing.media import describe

    return describe(source)
