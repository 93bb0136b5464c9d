"""What generation returns: stream events, the drained result, and incremental detokenization."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class GenerateResult:
    text_ids: torch.Tensor  # [B, new tokens] (after the prompt; end tokens included, padding after them)
    text: list[str] | None = None  # decoded answers (when a tokenizer is attached)
    codes: list[torch.Tensor] | None = None  # per row: speech codec ids ([frames] or [frames, codebooks])
    audio: list[torch.Tensor] | None = None  # per row: float waveform in [-1, 1]
    sample_rate: int = 24000
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class StreamEvent:
    kind: str  # "text" | "audio" | "done" | "error" (engine-internal: the Python API raises it)
    text: str = ""  # text delta (kind == "text")
    token_ids: list[int] = field(default_factory=list)  # the tokens of this delta
    audio: torch.Tensor | None = None  # float waveform chunk (kind == "audio")
    sample_rate: int = 24000
    time: float = 0.0  # seconds since the request started
    row: int = 0  # batch row
    # kind == "done": per row, why it ended ("stop" at an end token, "length" at max_new_tokens,
    # "cancelled") and how many tokens it generated (end token excluded).
    finish_reasons: list[str] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    # kind == "done": the whole answer — token ids [B, N] (end tokens included, padding after them) and,
    # with speech, each row's codec ids ([codes] for Qwen2.5, [frames, codebooks] for Qwen3).
    text_ids: torch.Tensor | None = None
    codes: list[torch.Tensor] | None = None
    error: BaseException | None = None  # kind == "error": why the request failed (the engine went on)


def strip_after_eos(ids: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


class TextDetokenizer:
    """Incremental detokenization: emits only text that can no longer change (no half UTF-8 characters).

    Every token is accounted for: :meth:`take_ids` returns the ids pushed since it was last called,
    so an event can carry the tokens behind its text even when some produced no text of their own.
    """

    def __init__(self, tokenizer, eos: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.eos = eos
        self.ids: list[int] = []
        self.emitted = ""
        self.done = False
        self.stopped = False  # ended on an end token (not by length or cancel)
        self._taken = 0

    def push(self, token: int) -> str:
        if self.done:
            return ""
        if token in self.eos:
            self.done = self.stopped = True
            return ""
        self.ids.append(token)
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta

    def flush(self) -> str:
        """The text still held back at the end (e.g. an incomplete character), emitted as is."""
        if self.tokenizer is None or not self.ids:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta

    def pending(self) -> bool:
        return self._taken < len(self.ids)

    def should_emit(self, delta: str) -> bool:
        """An event is due: new text, or (without a tokenizer) every new token on its own."""
        return bool(delta) or (self.tokenizer is None and self.pending())

    def take_ids(self) -> list[int]:
        out = self.ids[self._taken :]
        self._taken = len(self.ids)
        return out

    def finish_reason(self, cancelled: bool = False) -> str:
        return "stop" if self.stopped else ("cancelled" if cancelled else "length")


def done_event(detoks: list[TextDetokenizer], start: float, cancelled: bool = False) -> StreamEvent:
    return StreamEvent(
        kind="done",
        time=time.perf_counter() - start,
        finish_reasons=[d.finish_reason(cancelled) for d in detoks],
        num_tokens=[len(d.ids) for d in detoks],
    )


def flush_events(detoks: list[TextDetokenizer], start: float) -> Iterator[StreamEvent]:
    """Final text events for tokens that have not been reported yet (no text of their own, or held back)."""
    for row, d in enumerate(detoks):
        delta = d.flush()
        if delta or d.pending():
            yield StreamEvent(kind="text", text=delta, token_ids=d.take_ids(), time=time.perf_counter() - start, row=row)
