"""Family-independent generation entry points: results, stream events, text generation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from thinktalk.generation.sampling import SamplingParams
from thinktalk.generation.thinker import ThinkerSession

INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "input_features",
    "feature_attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "video_second_per_grid",
)


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
    kind: str  # "text" | "audio" | "done"
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


def split_inputs(kwargs: dict) -> tuple[dict, dict]:
    inputs = {k: kwargs.pop(k) for k in list(kwargs) if k in INPUT_KEYS and kwargs[k] is not None}
    if "input_ids" not in inputs:
        raise ValueError("generate/stream need input_ids (pass the processor's output: model.generate(**inputs))")
    return inputs, kwargs


def sampling_from(kwargs: dict, prefix: str = "") -> SamplingParams:
    def get(name, default):
        return kwargs.pop(prefix + name, default)

    return SamplingParams(
        do_sample=bool(get("do_sample", False)),
        temperature=float(get("temperature", 1.0)),
        top_k=int(get("top_k", 0) or 0),
        top_p=float(get("top_p", 1.0)),
        repetition_penalty=float(get("repetition_penalty", 1.0)),
    )


def thinker_session(model, kwargs: dict, keep_layers: tuple[int, ...] = ()) -> tuple[ThinkerSession, dict]:
    """A ThinkerSession from generate()/stream() keyword arguments; returns the unused arguments."""
    inputs, rest = split_inputs(dict(kwargs))
    max_new = int(rest.pop("max_new_tokens", rest.pop("thinker_max_new_tokens", 256)))
    sampling = sampling_from(rest)
    eos = rest.pop("eos_token_id", None)
    eos = tuple(model.eos_token_ids) if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    seed = rest.pop("seed", None)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=model.thinker.lm_head.weight.device).manual_seed(int(seed))
    session = ThinkerSession(
        model.thinker,
        inputs,
        max_new_tokens=max_new,
        sampling=sampling,
        eos_token_ids=eos,
        pad_token_id=rest.pop("pad_token_id", None),
        keep_layers=keep_layers,
        use_audio_in_video=bool(rest.pop("use_audio_in_video", False)),
        generator=gen,
    )
    return session, rest


def decode_text(model, ids: list[int]) -> str | None:
    tok = getattr(model, "tokenizer", None)
    return None if tok is None else tok.decode(ids, skip_special_tokens=True)


def strip_after_eos(ids: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def generate_text(model, **kwargs) -> GenerateResult:
    start = time.perf_counter()
    session, rest = thinker_session(model, kwargs)
    rest.pop("speaker", None)
    if rest:
        raise TypeError(f"unexpected generate() arguments: {', '.join(sorted(rest))}")
    first = None
    for _ in session:
        if first is None:
            first = time.perf_counter() - start
    ids = session.sequences()
    texts = None
    if getattr(model, "tokenizer", None) is not None:
        texts = [decode_text(model, strip_after_eos(row, session.eos.tolist())) for row in ids.tolist()]
    total = time.perf_counter() - start
    return GenerateResult(text_ids=ids, text=texts, timings={"first_token_s": first or 0.0, "total_s": total})


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


def stream_text(model, **kwargs) -> Iterator[StreamEvent]:
    start = time.perf_counter()
    session, rest = thinker_session(model, kwargs)
    rest.pop("speaker", None)
    if rest:
        raise TypeError(f"unexpected stream() arguments: {', '.join(sorted(rest))}")
    b = session.inputs["input_ids"].shape[0]
    eos = tuple(session.eos.tolist())
    detok = [TextDetokenizer(getattr(model, "tokenizer", None), eos) for _ in range(b)]
    for step in session:
        for row in range(b):
            delta = detok[row].push(int(step.tokens[row]))
            if detok[row].should_emit(delta):
                ids = detok[row].take_ids()
                yield StreamEvent(kind="text", text=delta, token_ids=ids, time=time.perf_counter() - start, row=row)
    yield from flush_events(detok, start)
    yield done_event(detok, start, cancelled=session.cancelled)


def flush_events(detoks: list[TextDetokenizer], start: float) -> Iterator[StreamEvent]:
    """Final text events for tokens that have not been reported yet (no text of their own, or held back)."""
    for row, d in enumerate(detoks):
        delta = d.flush()
        if delta or d.pending():
            yield StreamEvent(kind="text", text=delta, token_ids=d.take_ids(), time=time.perf_counter() - start, row=row)
