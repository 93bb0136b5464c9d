"""Training data: JSONL conversation rows -> encoded examples -> (bucketed, packed, mixed) batches.

A row is one JSON object per line with the conversation of DESIGN.md section 2 under ``messages``::

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/cat.png"},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}]}

Media paths are absolute or relative to the JSONL file. Recipes may read more keys of a row
(``answer`` for GSPO rewards). Every row is checked and encoded before training starts, so a malformed
row, a missing media file or a row longer than ``max_length`` stops the run with the file and line
(``skip_bad_rows: true`` skips them instead, and the count goes into the metrics).

Batches are planned by :class:`BatchPlan`, a pure function of the seed: rows are drawn from the
sources by weight (each source reshuffled every pass), sorted by length within a window of
``bucket_batches`` global batches (length bucketing), or packed first-fit-decreasing into sequences
of at most ``max_length`` tokens. Resuming replays the plan up to the saved position.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")
MEDIA_KINDS = ("image", "audio", "video")
SOURCE_KEYS = {
    "image": ("image", "url", "path", "image_url"),
    "audio": ("audio", "url", "path", "audio_url", "audio_track"),
    "video": ("video", "url", "path", "video_url", "audio_track"),
}
MEDIA_KEYS = (
    "input_features",
    "feature_attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "video_second_per_grid",
)


class RowError(ValueError):
    """One row that cannot be used; the message starts with ``file:line``."""


class DataError(ValueError):
    """The data of a run cannot be used (bad rows without ``skip_bad_rows``, an empty source...)."""


@dataclass
class Row:
    path: str  # the JSONL file
    line: int  # 1-based
    data: dict
    source: int = 0  # index of the file in the mixture

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def error(self, problem: str) -> RowError:
        return RowError(f"{self.where}: {problem}")


@dataclass
class Example:
    """An encoded row: token ids, labels (-100 = no loss), TMRoPE positions and media tensors."""

    input_ids: torch.Tensor  # [T]
    labels: torch.Tensor  # [T]
    position_ids: torch.Tensor  # [3, T]
    media: dict[str, torch.Tensor]
    row: Row
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_targets(self) -> int:
        """Tokens the loss is computed on (label t is predicted at position t - 1)."""
        return int((self.labels[1:] != IGNORE).sum())


# -- rows ---------------------------------------------------------------------------------------------


def read_rows(path: str, source: int = 0) -> tuple[list[Row], list[RowError]]:
    """The rows of a JSONL file (blank lines skipped) and the errors of lines that are not rows."""
    if not os.path.exists(path):
        raise DataError(f"data file '{path}' does not exist")
    rows, errors = [], []
    with open(path, encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                errors.append(RowError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})"))
                continue
            row = Row(path=path, line=number, data=data, source=source)
            if not isinstance(data, dict):
                errors.append(row.error(f"a row is a JSON object, got {type(data).__name__}"))
                continue
            rows.append(row)
    return rows, errors


def conversation(row: Row) -> list[dict]:
    """The row's messages, checked, with media paths resolved against the JSONL file's directory."""
    messages = row.data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise row.error("'messages' must be a non-empty list of {'role', 'content'} objects")
    base = os.path.dirname(os.path.abspath(row.path))
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise row.error(f"messages[{i}] is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise row.error(f"messages[{i}].role is {role!r} (expected one of {', '.join(ROLES)})")
        content = m.get("content")
        if isinstance(content, str):
            out.append(dict(m))
            continue
        if not isinstance(content, list):
            raise row.error(f"messages[{i}].content must be a string or a list of items")
        items = []
        for j, item in enumerate(content):
            if not isinstance(item, dict):
                raise row.error(f"messages[{i}].content[{j}] is not an object")
            kind = item.get("type") or next((k for k in ("text", *MEDIA_KINDS) if k in item), None)
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    raise row.error(f"messages[{i}].content[{j}]: a text item needs a string 'text'")
                items.append(item)
            elif kind in MEDIA_KINDS:
                items.append(_resolve_media(row, item, kind, base, f"messages[{i}].content[{j}]"))
            else:
                raise row.error(f"messages[{i}].content[{j}].type is {kind!r} (expected text, image, audio or video)")
        out.append({**m, "content": items})
    return out


def _resolve_media(row: Row, item: dict, kind: str, base: str, where: str) -> dict:
    item = dict(item)
    item["type"] = kind
    found = False
    for key in SOURCE_KEYS[kind]:
        value = item.get(key)
        if value is None:
            continue
        found = True
        if not isinstance(value, str):
            raise row.error(f"{where}: '{key}' must be a file path (got {type(value).__name__})")
        if value.startswith("data:"):
            continue
        path = value[len("file://") :] if value.startswith("file://") else value
        if "://" in path:
            raise row.error(f"{where}: only local files can be trained on, got the URL '{value}'")
        resolved = path if os.path.isabs(path) else os.path.join(base, path)
        if not os.path.exists(resolved):
            raise row.error(f"{where}: {kind} file '{value}' not found (looked for {resolved})")
        item[key] = resolved
    if not found:
        raise row.error(f"{where}: a {kind} item needs a file under '{kind}'")
    return item


def split_prompt(messages: list[dict]) -> tuple[list[dict], dict | None]:
    """(the prompt, the final assistant message or None): rows for sampling recipes may carry an answer turn."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]
    return messages, None


# -- encoding ------------------------------------------------------------------------------------------

PositionsFn = Callable[[torch.Tensor, dict, bool], torch.Tensor]


def encode_chat(
    processor,
    row: Row,
    positions: PositionsFn,
    max_length: int,
    loss_on: str = "assistant",
    use_audio_in_video: bool = False,
) -> Example:
    """A conversation row -> an Example with labels on the assistant turns (or on every token)."""
    messages = conversation(row)
    if loss_on == "assistant" and not any(m["role"] == "assistant" for m in messages):
        raise row.error("no assistant turn to learn from")
    out = _process(processor, row, messages, add_generation_prompt=False, use_audio_in_video=use_audio_in_video)
    ids = out["input_ids"][0]
    if ids.shape[0] > max_length:
        raise row.error(f"{ids.shape[0]} tokens, longer than max_length={max_length} (rows are never truncated)")
    if loss_on == "assistant":
        keep = processor.assistant_mask(ids)
    elif loss_on == "all":
        keep = torch.ones_like(ids, dtype=torch.bool)
    else:
        raise ValueError(f"loss_on must be 'assistant' or 'all' (got {loss_on!r})")
    media_tokens = torch.tensor([processor.audio_token_id, processor.image_token_id, processor.video_token_id])
    keep &= ~torch.isin(ids, media_tokens)
    labels = torch.where(keep, ids, torch.full_like(ids, IGNORE))
    media = {k: v for k, v in out.items() if k in MEDIA_KEYS}
    ex = Example(ids, labels, positions(ids[None], media, use_audio_in_video), media, row)
    if ex.num_targets == 0:
        raise row.error("no tokens to learn from (the assistant turns are empty)")
    return ex


def encode_prompt(processor, row: Row, positions: PositionsFn, max_length: int, use_audio_in_video: bool = False) -> Example:
    """A prompt row (a final assistant turn, if any, is dropped) -> an Example ending in the generation prompt."""
    messages, _ = split_prompt(conversation(row))
    if not messages:
        raise row.error("the row has no prompt before its answer")
    out = _process(processor, row, messages, add_generation_prompt=True, use_audio_in_video=use_audio_in_video)
    ids = out["input_ids"][0]
    if ids.shape[0] >= max_length:
        raise row.error(f"the prompt has {ids.shape[0]} tokens, max_length={max_length} leaves no room to answer")
    media = {k: v for k, v in out.items() if k in MEDIA_KEYS}
    return Example(ids, torch.full_like(ids, IGNORE), positions(ids[None], media, use_audio_in_video), media, row)


def _process(processor, row: Row, messages, add_generation_prompt: bool, use_audio_in_video: bool) -> dict:
    try:
        return processor(
            messages, add_generation_prompt=add_generation_prompt, padding_side="right", use_audio_in_video=use_audio_in_video
        )
    except RowError:
        raise
    except Exception as e:  # media that does not decode, a template error, placeholder mismatches ...
        raise row.error(f"{type(e).__name__}: {e}") from e


# -- datasets -------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    examples: list[Example]
    sources: list[list[int]]  # example indices per source file
    bad_rows: int = 0
    errors: list[RowError] = field(default_factory=list)

    def lengths(self) -> list[int]:
        return [e.length for e in self.examples]


def build_dataset(
    paths: Sequence[str], encode: Callable[[Row], Example], skip_bad_rows: bool, progress: bool = False
) -> Dataset:
    """Encode every row of every source; bad rows raise (listing up to 20) unless ``skip_bad_rows``."""
    examples: list[Example] = []
    sources: list[list[int]] = []
    errors: list[RowError] = []
    for s, path in enumerate(paths):
        rows, bad = read_rows(path, source=s)
        errors.extend(bad)
        mine = []
        iterator = rows
        if progress:
            from tqdm import tqdm

            iterator = tqdm(rows, desc=f"encoding {os.path.basename(path)}", leave=False)
        for row in iterator:
            try:
                ex = encode(row)
            except RowError as e:
                errors.append(e)
                continue
            mine.append(len(examples))
            examples.append(ex)
        sources.append(mine)
    if errors and not skip_bad_rows:
        shown = "\n  ".join(str(e) for e in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(f"{len(errors)} bad row(s) (set skip_bad_rows: true to skip them):\n  {shown}{more}")
    for path, mine in zip(paths, sources):
        if not mine:
            raise DataError(f"data file '{path}' has no usable rows")
    return Dataset(examples, sources, bad_rows=len(errors), errors=errors)


# -- batches ------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Collated items: ``inputs`` under the processor's key names (``attention_mask`` holds segment ids
    1, 2, ... when rows are packed), labels, TMRoPE positions, and the examples behind each row."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [3, B, T]
    items: list[list[Example]]
    packed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device) -> Batch:
        self.inputs = {k: v.to(device) for k, v in self.inputs.items()}
        self.labels = self.labels.to(device)
        self.position_ids = self.position_ids.to(device)
        return self

    @property
    def num_targets(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def collate(items: list[list[Example]], pad_id: int, packed: bool = False) -> Batch:
    """Right-pad items into one batch; an item of several examples is one packed row."""
    rows_ids, rows_labels, rows_pos, rows_seg = [], [], [], []
    for item in items:
        if len(item) > 1 and not packed:
            raise ValueError("several examples in one row need packed=True")
        ids = torch.cat([e.input_ids for e in item])
        labels = torch.cat([e.labels for e in item]).clone()
        start = 0
        for e in item:
            labels[start] = IGNORE  # never predict a row's first token from the previous row
            start += e.length
        seg = torch.cat([torch.full((e.length,), i + 1, dtype=torch.long) for i, e in enumerate(item)])
        rows_ids.append(ids)
        rows_labels.append(labels)
        rows_pos.append(torch.cat([e.position_ids for e in item], dim=1))
        rows_seg.append(seg if packed else torch.ones_like(seg))
    longest = max(r.shape[0] for r in rows_ids)
    b = len(items)
    input_ids = torch.full((b, longest), pad_id, dtype=torch.long)
    labels = torch.full((b, longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((b, longest), dtype=torch.long)
    pos_dtype = rows_pos[0].dtype
    position_ids = torch.ones((3, b, longest), dtype=pos_dtype)
    for i in range(b):
        n = rows_ids[i].shape[0]
        input_ids[i, :n] = rows_ids[i]
        labels[i, :n] = rows_labels[i]
        mask[i, :n] = rows_seg[i]
        position_ids[:, i, :n] = rows_pos[i].to(pos_dtype)
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    inputs.update(collate_media([e for item in items for e in item]))
    return Batch(inputs, labels, position_ids, items, packed=packed)


def collate_media(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Media tensors of examples in order (the order of their placeholders in the batch)."""
    out: dict[str, torch.Tensor] = {}
    feats = [e.media["input_features"] for e in examples if "input_features" in e.media]
    if feats:
        frames = max(f.shape[-1] for f in feats)
        out["input_features"] = torch.cat([torch.nn.functional.pad(f, (0, frames - f.shape[-1])) for f in feats])
        masks = [e.media["feature_attention_mask"] for e in examples if "input_features" in e.media]
        out["feature_attention_mask"] = torch.cat([torch.nn.functional.pad(m, (0, frames - m.shape[-1])) for m in masks])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"):
        parts = [e.media[key] for e in examples if key in e.media]
        if parts:
            out[key] = torch.cat(parts)
    return out


def pack_first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bins of indices whose lengths sum to at most ``capacity``.

    >>> pack_first_fit([5, 3, 4, 2, 6], capacity=8)
    [[4, 3], [0, 1], [2]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@dataclass
class BatchPlan:
    """Which examples make up each global batch: a deterministic stream given the seed.

    ``sources``: example indices per data file; ``weights``: sampling weight per file; ``items``:
    rows (or packed rows) per global batch. A pass over a source is a fresh permutation of it.
    """

    sources: list[list[int]]
    weights: list[float]
    lengths: list[int]
    items: int
    seed: int
    bucketing: bool = True
    bucket_batches: int = 16
    packing: bool = False
    max_length: int = 4096

    def __iter__(self) -> Iterator[list[list[int]]]:
        gen = torch.Generator().manual_seed(self.seed)
        weights = torch.tensor(self.weights, dtype=torch.float64)
        perms: list[list[int]] = [[] for _ in self.sources]
        pos = [0] * len(self.sources)
        passes = [0] * len(self.sources)

        def draw() -> int:
            s = 0 if len(self.sources) == 1 else int(torch.multinomial(weights, 1, generator=gen))
            if pos[s] >= len(perms[s]):
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + s * 10_007 + passes[s])
                perms[s] = [self.sources[s][i] for i in torch.randperm(len(self.sources[s]), generator=g).tolist()]
                pos[s] = 0
                passes[s] += 1
            pos[s] += 1
            return perms[s][pos[s] - 1]

        # A window longer than the data would put copies of a row side by side in one batch.
        total = sum(len(s) for s in self.sources)
        window = max(1, min(self.bucket_batches, total // self.items)) if (self.bucketing or self.packing) else 1
        queue: list[list[int]] = []
        while True:
            drawn = [draw() for _ in range(self.items * window)]
            if self.packing:
                bins = pack_first_fit([self.lengths[i] for i in drawn], self.max_length)
                packs = [[drawn[j] for j in b] for b in bins]
                order = torch.randperm(len(packs), generator=gen).tolist()
                queue.extend(packs[j] for j in order)
            else:
                if self.bucketing:
                    drawn.sort(key=lambda i: self.lengths[i])
                batches = [drawn[k : k + self.items] for k in range(0, len(drawn), self.items)]
                order = torch.randperm(len(batches), generator=gen).tolist() if self.bucketing else range(len(batches))
                for j in order:
                    queue.extend([i] for i in batches[j])
            while len(queue) >= self.items:
                yield queue[: self.items]
                del queue[: self.items]


def micro_batches(global_batch: list, batch_size: int, grad_accum: int, rank: int, world: int) -> list[list]:
    """This process's micro-batches of a global batch: micro-batch a of rank r is slice a * world + r."""
    out = []
    for a in range(grad_accum):
        k = a * world + rank
        out.append(global_batch[k * batch_size : (k + 1) * batch_size])
    return out
