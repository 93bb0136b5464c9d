"""Audio for codec training: files, directories or JSONL lists → 24 kHz mono clips → random segments.

Sources (a path or a list of them):
* an audio file (wav, flac, ogg, mp3, m4a, ... — anything thinktalk's audio decoder reads),
* a directory (its audio files, recursively, in sorted order),
* a ``.jsonl`` file whose rows are ``{"audio": "path"}`` or conversations (a list of messages, or
  ``{"messages": [...]}``) whose ``{"type": "audio", "audio": "path"}`` items are used; paths are absolute
  or relative to the JSONL file.

A missing file, an unreadable one, or a row without audio is an error naming the file (and line);
``skip_bad_rows=True`` skips such rows and files instead and counts them (:attr:`AudioCorpus.skipped`).

Clips are decoded once, averaged to mono and resampled with soxr (HQ) to the codec rate, then kept
in memory (float32: about 350 MB per hour of audio). Batch ``i`` is a pure function of (seed, i):
clips drawn in proportion to their length, a uniform random offset in each, clips shorter than a
segment padded with zeros on the right — so the data position of a run is just its batch counter.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".aif", ".aiff", ".webm")


class CodecDataError(ValueError):
    """Training audio that cannot be used (missing, unreadable, malformed list)."""


@dataclass
class AudioCorpus:
    paths: list[str]
    clips: list[np.ndarray]  # float32 mono at sample_rate
    sample_rate: int
    skipped: list[str] = field(default_factory=list)  # "where: why" for every skipped row or file

    @property
    def seconds(self) -> float:
        return sum(len(c) for c in self.clips) / self.sample_rate


def _audio_items(row, where: str) -> list[str]:
    if isinstance(row, dict) and isinstance(row.get("audio"), str):
        return [row["audio"]]
    messages = row.get("messages", row.get("conversation")) if isinstance(row, dict) else row
    if not isinstance(messages, list):
        raise CodecDataError(f"{where}: a row must be {{\"audio\": path}} or a conversation (a list of messages)")
    found = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for item in content if isinstance(content, list) else []:
            if isinstance(item, dict) and item.get("type") == "audio":
                value = item.get("audio")
                if not isinstance(value, str):
                    raise CodecDataError(f"{where}: an audio item needs a path (got {type(value).__name__})")
                found.append(value)
    if not found:
        raise CodecDataError(f"{where}: the row has no audio")
    return found


def collect_audio_paths(sources: str | os.PathLike | list, skip_bad_rows: bool = False) -> tuple[list[str], list[str]]:
    """(audio file paths, skipped "where: why") for the sources described in the module docstring."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths, skipped = [], []
    for src in sources:
        src = os.fspath(src)
        if os.path.isdir(src):
            found = sorted(
                os.path.join(root, f) for root, _, files in os.walk(src) for f in files if f.lower().endswith(AUDIO_EXTENSIONS)
            )
            if not found:
                raise CodecDataError(f"data directory '{src}' holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
            paths += found
        elif src.endswith(".jsonl"):
            if not os.path.exists(src):
                raise CodecDataError(f"data file '{src}' does not exist")
            base = os.path.dirname(os.path.abspath(src))
            with open(src, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    where = f"{src}:{lineno}"
                    try:
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise CodecDataError(f"{where}: not valid JSON ({e.msg})") from None
                        items = [p if os.path.isabs(p) else os.path.join(base, p) for p in _audio_items(row, where)]
                        for p in items:
                            if not os.path.exists(p):
                                raise CodecDataError(f"{where}: audio file '{p}' does not exist")
                    except CodecDataError as e:
                        if not skip_bad_rows:
                            raise
                        skipped.append(str(e))
                        continue
                    paths += items
        elif os.path.exists(src):
            paths.append(src)
        else:
            raise CodecDataError(f"data source '{src}' does not exist")
    return paths, skipped


def load_clip(path: str, sample_rate: int) -> np.ndarray:
    from thinktalk.processing.audio import decode_audio, resample, to_mono

    try:
        wav, rate = decode_audio(path)
    except Exception as e:
        raise CodecDataError(f"cannot decode audio file '{path}': {type(e).__name__}: {e}") from None
    return resample(to_mono(wav), rate, sample_rate)


def load_corpus(sources, sample_rate: int = 24000, skip_bad_rows: bool = False) -> AudioCorpus:
    paths, skipped = collect_audio_paths(sources, skip_bad_rows)
    kept, clips = [], []
    for p in paths:
        try:
            clip = load_clip(p, sample_rate)
            if clip.size == 0:
                raise CodecDataError(f"audio file '{p}' is empty")
        except CodecDataError as e:
            if not skip_bad_rows:
                raise
            skipped.append(str(e))
            continue
        kept.append(p)
        clips.append(clip)
    if not clips:
        raise CodecDataError(f"no usable audio in {sources}" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return AudioCorpus(kept, clips, sample_rate, skipped)


class SegmentSampler:
    """Batch ``i`` = ``batch_size`` random segments of ``segment_samples``, a pure function of (seed, salt, i)
    (``salt`` separates streams, e.g. the fixed evaluation batches from the training ones)."""

    def __init__(self, corpus: AudioCorpus, segment_samples: int, batch_size: int, seed: int, salt: int = 0):
        self.corpus, self.segment, self.batch_size, self.seed, self.salt = corpus, segment_samples, batch_size, seed, salt
        lengths = torch.tensor([len(c) for c in corpus.clips], dtype=torch.float64)
        self.weights = lengths / lengths.sum()
        self.short = sum(1 for c in corpus.clips if len(c) < segment_samples)  # zero-padded when drawn

    def batch(self, index: int) -> torch.Tensor:
        """[batch_size, 1, segment_samples] float32."""
        g = torch.Generator().manual_seed(hash((self.seed, self.salt, index)) & (2**63 - 1))  # int tuples hash stably
        picks = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g).tolist()
        out = torch.zeros(self.batch_size, 1, self.segment)
        for row, k in enumerate(picks):
            clip = self.corpus.clips[k]
            room = len(clip) - self.segment
            start = int(torch.randint(0, room + 1, (1,), generator=g)) if room > 0 else 0
            piece = clip[start : start + self.segment]
            out[row, 0, : len(piece)] = torch.from_numpy(np.ascontiguousarray(piece))
        return out
