"""The one driver: runs the Thinker stage and, for speech, a family's Talker and vocoder stages.

    prefill ─► choose token 0 ─► step (read token 0) ─► choose token 1 ─► step ─► …     Thinker
                                      │ reply track: what the Thinker read
                                      ▼
                          Talker prefill ─► choose frame 0 ─► step ─► choose frame 1 ─► …   (input j = answer token j)
                                      │ codes
                                      ▼
                          vocoder push ─► audio chunks                                     (streamed or offline)

After every Thinker step the Talker runs every step whose input exists — one per Thinker step while
the Thinker writes, the rest once it has stopped — and the vocoder decodes what it can. Every stage
keeps its own explicit state and its own random generator, so *when* a stage runs never changes
what it produces: streamed and offline runs give the same tokens and codes, and :func:`generate` is
:func:`stream` drained (with the offline vocoder).

Text-to-speech is the same driver with the Thinker's tokens given (``forced``): it reads the text as
its answer, and the unchanged Talker speaks what it read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from thinktalk.generation.events import (
    GenerateResult,
    StreamEvent,
    TextDetokenizer,
    flush_events,
    strip_after_eos,
)
from thinktalk.generation.inputs import ModelInputs
from thinktalk.generation.options import GenerateOptions
from thinktalk.generation.reply import ReplyTrack
from thinktalk.generation.sampling import TokenChooser
from thinktalk.generation.thinker import ThinkerStage, ThinkerState


def _generator(device: torch.device, seed: int | None, offset: int) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed + offset)


@dataclass
class Run:
    """One prepared run: its stages, states and options (built, and checked, before the first event)."""

    model: object
    options: GenerateOptions
    stage: ThinkerStage
    state: ThinkerState
    chooser: TokenChooser
    speech: _Speech | None
    eos: tuple[int, ...]


def run(
    model,
    inputs: ModelInputs,
    options: GenerateOptions,
    streaming_audio: bool = True,
    forced: list[int] | None = None,
) -> Iterator[StreamEvent]:
    """Events as they are produced: text deltas, audio chunks, then one ``done`` event with the results.

    ``forced``: the Thinker's answer token ids (its end token included), read instead of chosen.
    Everything that can be wrong with the arguments raises here, not at the first event.
    """
    with torch.inference_mode():
        prepared = prepare(model, inputs, options, streaming_audio, forced)
    return events(prepared)


def prepare(model, inputs: ModelInputs, options: GenerateOptions, streaming_audio: bool, forced: list[int] | None) -> Run:
    speech = None
    if options.speech is not None:
        speech = model.speech_stages(options.speech, options.seed, streaming_audio)
    talker, vocoder = speech if speech is not None else (None, None)
    stage = ThinkerStage(model.thinker, talker.keep_layers if talker is not None else ())
    text = options.text
    eos = tuple(text.eos_token_ids if text.eos_token_ids is not None else model.eos_token_ids)
    if forced is not None:
        eos = (forced[-1],)
    max_new = len(forced) if forced is not None else text.max_new_tokens
    state = stage.new_state(inputs, max_new)
    chooser = TokenChooser(
        text.sampling,
        eos,
        text.pad_token_id if text.pad_token_id is not None else (eos[0] if eos else 0),
        max_new,
        text.min_new_tokens,
        _generator(stage.device, options.seed, 0),
        history=state.inputs.input_ids,
        vocab_size=model.thinker.lm_head.out_features,
        forced=forced,
    )
    speaking = None
    if talker is not None:
        speaking = _Speech(talker, vocoder, state.inputs, _generator(stage.device, options.seed, 1))
    return Run(model, options, stage, state, chooser, speaking, eos)


@torch.inference_mode()
def events(r: Run) -> Iterator[StreamEvent]:
    start = time.perf_counter()
    stage, state, chooser, speaking = r.stage, r.state, r.chooser, r.speech
    batch = state.inputs.batch
    tokenizer = getattr(r.model, "tokenizer", None)
    detok = [TextDetokenizer(tokenizer, r.eos) for _ in range(batch)]
    cancel = r.options.cancel
    cancelled = False

    def now() -> float:
        return time.perf_counter() - start

    read = stage.prefill(state)
    if speaking is not None:
        speaking.begin(ReplyTrack(batch, read), now)
    while True:
        if cancel is not None and cancel.is_set():
            cancelled = True
            break
        tokens = chooser.choose(read.logits)
        state.active = ~chooser.finished
        row_tokens = tokens.tolist()
        for row in range(batch):
            delta = detok[row].push(row_tokens[row])
            if detok[row].should_emit(delta):
                yield StreamEvent(kind="text", text=delta, token_ids=detok[row].take_ids(), time=now(), row=row)
        if speaking is not None:
            speaking.reply.push_token(tokens, chooser.finished)
        if chooser.done:
            break
        read = stage.step(state, tokens)
        if speaking is not None:
            speaking.reply.push_read(read)
            yield from speaking.advance()
    if speaking is not None and not cancelled:
        speaking.reply.stop()
        yield from speaking.advance()
    yield from flush_events(detok, start)
    yield StreamEvent(
        kind="done",
        time=now(),
        finish_reasons=[d.finish_reason(cancelled) for d in detok],
        num_tokens=[len(d.ids) for d in detok],
        text_ids=chooser.sequences(),
        codes=speaking.codes() if speaking is not None else None,
    )


class _Speech:
    """The Talker and vocoder part of one run: started once the Thinker has read answer token 0."""

    def __init__(self, talker, vocoder, inputs: ModelInputs, generator):
        self.talker, self.vocoder, self.inputs, self.generator = talker, vocoder, inputs, generator
        self.reply: ReplyTrack | None = None
        self.state = None
        self.voice = vocoder.new_state(inputs.batch)
        self.now = time.perf_counter

    def begin(self, reply: ReplyTrack, now) -> None:
        self.reply, self.now = reply, now

    def advance(self) -> Iterator[StreamEvent]:
        """Run every Talker step whose input exists; push each frame to the vocoder."""
        talker, reply = self.talker, self.reply
        while self.state is None or not self.state.done:
            j = 0 if self.state is None else self.state.steps
            entries = reply.entries(j)
            if entries is None:
                return
            if self.state is None:
                if all(reply.empty(r) for r in range(reply.batch)):
                    return  # nothing to say (the reference fails on an empty answer)
                self.state = talker.new_state(reply, self.inputs, self.generator)
                logits = talker.prefill(self.state, reply, self.inputs, entries)
            else:
                logits = talker.step(self.state, reply, entries)
            codes = talker.choose(self.state, logits)
            chunks = self.vocoder.push(self.voice, codes, self.state.ended, self.state.done, self.state.speaking)
            for row, chunk in enumerate(chunks):
                if chunk is not None and chunk.numel():
                    yield StreamEvent(kind="audio", audio=chunk.float().cpu(), sample_rate=self.vocoder.sample_rate,
                                      time=self.now(), row=row)  # fmt: skip

    def codes(self) -> list[torch.Tensor]:
        out = []
        for row in range(self.reply.batch):
            if self.state is None or not bool(self.state.speaking[row]):
                out.append(torch.zeros(0, dtype=torch.long))
                continue
            codes = self.state.codes(row, self.talker.end_ids)
            out.append(codes[:, 0] if codes.shape[1] == 1 else codes)
        return out


def collect(model, events: Iterator[StreamEvent], eos: tuple[int, ...], sample_rate: int | None) -> GenerateResult:
    """Drain a run into a :class:`GenerateResult` (text, codes and audio per row, timings)."""
    first_token = first_audio = None
    audio: dict[int, list[torch.Tensor]] = {}
    done = None
    rate = sample_rate or 24000
    for ev in events:
        if ev.kind == "text" and first_token is None:
            first_token = ev.time
        elif ev.kind == "audio":
            first_audio = ev.time if first_audio is None else first_audio
            audio.setdefault(ev.row, []).append(ev.audio)
            rate = ev.sample_rate
        elif ev.kind == "done":
            done = ev
    ids = done.text_ids
    texts = None
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        texts = [tokenizer.decode(strip_after_eos(row, eos), skip_special_tokens=True) for row in ids.tolist()]
    waves = None
    if done.codes is not None:
        waves = [torch.cat(audio[r]) if r in audio else torch.zeros(0) for r in range(ids.shape[0])]
    timings = {"first_token_s": first_token or 0.0, "total_s": done.time}
    if done.codes is not None:
        timings["first_audio_s"] = first_audio if first_audio is not None else done.time
    return GenerateResult(text_ids=ids, text=texts, codes=done.codes, audio=waves, sample_rate=rate, timings=timings)
