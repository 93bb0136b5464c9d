"""Qwen3-Omni speech: Thinker → Talker (+ code predictor) → Code2Wav, as one pipeline of explicit stages.

The stages and their state:

* Thinker — :class:`thinktalk.generation.thinker.ThinkerSession` (KV cache, history); its answer
  tokens are collected in an :class:`AnswerFeed`;
* Talker — :class:`TalkerState` (KV cache, codebook-0 history, last hidden state, position). It starts
  once the Thinker has produced the answer's first tokens and then needs one answer token per frame
  (``tts_eos`` after the last one, ``tts_pad`` afterwards);
* code predictor — stateless across frames (its small cache is refilled for every frame); on CUDA
  its fixed 15-step greedy loop is replayed as one CUDA graph (``talker_cuda_graphs=False`` runs it
  eagerly; sampling always does);
* Code2Wav — :class:`~thinktalk.models.qwen3_omni.code2wav.Code2WavState` (left context only), so a
  frame is audible as soon as its codes exist.

:func:`stream_with_speech` interleaves them (the Thinker is kept at least one token ahead of the
Talker) and yields audio after the first codec frame; :func:`generate_with_speech` runs the same
pipeline and decodes the codes at the end. Both match the reference's ``generate`` (greedy: the same
text, the same codes; the waveform of up to 300 frames — see :meth:`Code2Wav.decode`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from thinktalk.generation.api import (
    GenerateResult,
    StreamEvent,
    TextDetokenizer,
    done_event,
    flush_events,
    strip_after_eos,
    thinker_session,
)
from thinktalk.generation.sampling import SamplingParams, choose
from thinktalk.generation.thinker import ThinkerSession
from thinktalk.models.qwen3_omni.code_predictor import SAMPLING as PREDICTOR_SAMPLING
from thinktalk.models.qwen3_omni.talker import ASSISTANT_HEAD, TalkerPrompt, last_assistant_start
from thinktalk.nn.cache import KVCache

MEDIA_KEYS = ("image_grid_thw", "video_grid_thw", "video_second_per_grid", "feature_attention_mask")


@dataclass(frozen=True)
class TalkerOptions:
    speaker_id: int
    sampling: SamplingParams  # codebook 0
    predictor: SamplingParams  # codebooks 1..G-1
    max_frames: int = 4096
    system_ids: torch.Tensor | None = None  # [1, S] token ids of the Talker's own system turn
    cuda_graphs: bool = True  # replay the greedy code predictor as a CUDA graph (CUDA only)


def talker_options(model, rest: dict) -> TalkerOptions:
    """Pop the Talker's arguments (reference defaults: sampling, T 0.9, top-k 50, repetition penalty 1.05)."""
    do_sample = bool(rest.pop("talker_do_sample", True))
    sampling = SamplingParams(
        do_sample=do_sample,
        temperature=float(rest.pop("talker_temperature", 0.9)),
        top_k=int(rest.pop("talker_top_k", 50)),
        top_p=float(rest.pop("talker_top_p", 1.0)),
        repetition_penalty=float(rest.pop("talker_repetition_penalty", 1.05)),
        suppress_tokens=model.talker.suppressed_tokens(),
    )
    system = rest.pop("talker_system_ids", None)
    if system is not None:
        system = torch.as_tensor(system).view(1, -1)
    return TalkerOptions(
        speaker_id=model.speaker_id(rest.pop("speaker", None)),
        sampling=sampling,
        predictor=PREDICTOR_SAMPLING if do_sample else SamplingParams(),
        max_frames=int(rest.pop("talker_max_new_tokens", 4096)),
        system_ids=system,
        cuda_graphs=bool(rest.pop("talker_cuda_graphs", True)),
    )


@dataclass
class AnswerFeed:
    """The assistant turn's token ids — "<|im_start|>assistant\\n" then the answer — as they arrive.

    The Talker's decode step ``s`` reads token ``ASSISTANT_HEAD + 1 + s`` of it. As in the reference,
    the answer's very last token is never read (the Thinker never embedded it): ``tts_eos`` takes its
    place, then ``tts_pad`` forever.
    """

    ids: list[int]
    finished: bool = False

    def text_for_step(self, step: int) -> int | str | None:
        """A token id, ``"eos"``, ``"pad"``, or None while the Thinker has not said enough yet."""
        i = ASSISTANT_HEAD + 1 + step
        if i < len(self.ids) - 1:
            return self.ids[i]
        if not self.finished:
            return None
        return "eos" if i == len(self.ids) - 1 else "pad"

    def can_start(self) -> bool | None:
        """True when the Talker's prompt is complete, False when it never will be, None: wait."""
        if len(self.ids) - 1 > ASSISTANT_HEAD:
            return True
        return False if self.finished else None


@dataclass
class TalkerState:
    cache: KVCache
    predictor_cache: KVCache
    position: torch.Tensor  # [3, 1, 1] position of the last input
    history: torch.Tensor  # [1, n] codebook-0 ids so far (the repetition penalty's history)
    hidden: torch.Tensor  # [1, 1, D] last normed hidden state (the code predictor's first input)
    done: bool = False

    @property
    def steps(self) -> int:
        """Decode steps taken after the prefill."""
        return self.history.shape[1] - 1


class TalkerRun:
    """The Talker stage of one conversation: prefill, per-frame residual codes, decode steps."""

    def __init__(self, model, opts: TalkerOptions, generator: torch.Generator | None = None):
        self.model, self.talker, self.thinker = model, model.talker, model.thinker
        self.opts = opts
        self.generator = generator
        cfg = model.cfg
        embed = self.thinker.model.embed_tokens
        w = embed.weight
        specials = torch.tensor([[cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id]], device=w.device)
        self.special_embeds = tuple(embed(specials).split(1, dim=1))  # (bos, eos, pad), Thinker width
        self.tts_eos = self.talker.text_projection(self.special_embeds[1])
        self.tts_pad = self.talker.text_projection(self.special_embeds[2])

    def text_embed(self, text: int | str) -> torch.Tensor:
        if text == "eos":
            return self.tts_eos
        if text == "pad":
            return self.tts_pad
        tok = torch.tensor([[text]], device=self.tts_pad.device)
        return self.talker.text_projection(self.thinker.model.embed_tokens(tok))

    def prompt(self, session: ThinkerSession, states: dict[int, torch.Tensor], feed: AnswerFeed) -> TalkerPrompt:
        cfg = self.model.cfg
        inputs = session.inputs
        device = self.tts_pad.device
        input_ids = inputs["input_ids"].to(device)
        mask = inputs.get("attention_mask")
        start = last_assistant_start(input_ids, cfg.im_start_token_id, cfg.assistant_token_id)
        answer = torch.tensor([feed.ids[input_ids.shape[1] - start :]], dtype=torch.long, device=device)
        embed = self.thinker.model.embed_tokens
        system = None if self.opts.system_ids is None else embed(self.opts.system_ids.to(device))
        return self.talker.build_prompt(
            input_ids=input_ids,
            attention_mask=None if mask is None else mask.to(device),
            thinker_embeds=states[0],
            thinker_hidden=states[self.talker.cfg.accept_hidden_layer],
            answer_embeds=embed(answer),
            special_embeds=self.special_embeds,
            speaker_id=self.opts.speaker_id,
            ids={"im_start": cfg.im_start_token_id, "user": cfg.user_token_id, "assistant": cfg.assistant_token_id,
                 "tts_pad": cfg.tts_pad_token_id},
            media={k: inputs[k] for k in MEDIA_KEYS if inputs.get(k) is not None},
            n_window=self.thinker.cfg.audio.n_window,
            system_embeds=system,
        )

    def start(self, prompt: TalkerPrompt) -> TalkerState:
        """Prefill the prompt and choose the first frame's codebook 0."""
        p = prompt.embeds.shape[1]
        cache = self.talker.new_cache(1, p + self.opts.max_frames)
        logits, hidden = self.talker.decode(prompt.embeds, prompt.position_ids, None, cache)
        history = torch.zeros(1, 0, dtype=torch.long, device=logits.device)
        code = choose(logits, history, self.opts.sampling, self.generator)
        state = TalkerState(
            cache=cache,
            predictor_cache=self.talker.code_predictor.new_cache(1),
            position=prompt.position_ids[:, :, -1:],
            history=code[:, None],
            hidden=hidden,
        )
        self._check_done(state)
        return state

    def _check_done(self, state: TalkerState) -> None:
        last = int(state.history[0, -1])
        state.done = last == self.talker.cfg.codec_eos_token_id or state.history.shape[1] >= self.opts.max_frames

    def frame(self, state: TalkerState) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes of the frame whose codebook 0 was just chosen [1, G], and its summed embedding [1, 1, D]."""
        code0 = state.history[:, -1]
        code0_embed = self.talker.model.codec_embedding(code0)[:, None]
        predictor = self.talker.code_predictor
        if self.opts.cuda_graphs and not self.opts.predictor.do_sample and code0.device.type == "cuda":
            rest, embeds = predictor.graphed(code0.shape[0])(state.hidden, code0_embed)
        else:
            rest, embeds = predictor.predict(state.hidden, code0_embed, self.opts.predictor, self.generator, state.predictor_cache)
        codes = torch.cat([code0[:, None], rest], dim=1)
        return codes, torch.cat([code0_embed, embeds], dim=1).sum(1, keepdim=True)

    def advance(self, state: TalkerState, frame_embed: torch.Tensor, text: int | str) -> None:
        """One decode step: read (frame embedding + answer text) and choose the next codebook 0."""
        x = frame_embed + self.text_embed(text)
        state.position = state.position + 1
        logits, state.hidden = self.talker.decode(x, state.position, None, state.cache)
        code = choose(logits, state.history, self.opts.sampling, self.generator)
        state.history = torch.cat([state.history, code[:, None]], dim=1)
        self._check_done(state)


def _pipeline(model, session: ThinkerSession, opts: TalkerOptions, generator) -> Iterator[tuple[str, object]]:
    """("text", TextStep) and ("frame", codes [1, G]) items, in the order they are produced."""
    if session.inputs["input_ids"].shape[0] != 1:
        raise ValueError("speech generation handles one conversation at a time (batch size 1); call it per row")
    steps = iter(session)
    run = TalkerRun(model, opts, generator)
    first = next(steps)
    yield "text", first
    cfg = model.cfg
    input_ids = session.inputs["input_ids"]
    start = last_assistant_start(input_ids, cfg.im_start_token_id, cfg.assistant_token_id)
    feed = AnswerFeed(ids=input_ids[0, start:].tolist() + [int(first.tokens[0])], finished=bool(first.finished[0]))
    states = first.states

    def pull():
        step = next(steps, None)
        if step is None:
            feed.finished = True
            return None
        feed.ids.append(int(step.tokens[0]))
        feed.finished = bool(step.finished[0])
        return step

    while feed.can_start() is None:
        step = pull()
        if step is not None:
            yield "text", step
    if feed.can_start():
        state = run.start(run.prompt(session, states, feed))
        while not state.done:
            codes, frame_embed = run.frame(state)
            yield "frame", codes
            if not feed.finished:  # keep the Thinker ahead of the Talker
                step = pull()
                if step is not None:
                    yield "text", step
            text = feed.text_for_step(state.steps)
            while text is None:
                step = pull()
                if step is not None:
                    yield "text", step
                text = feed.text_for_step(state.steps)
            run.advance(state, frame_embed, text)
    while not feed.finished:
        step = pull()
        if step is not None:
            yield "text", step


def _start(model, kwargs: dict) -> tuple[ThinkerSession, TalkerOptions, torch.Generator | None]:
    accept = model.talker.cfg.accept_hidden_layer
    session, rest = thinker_session(model, kwargs, keep_layers=tuple(sorted({0, accept})))
    seed = kwargs.get("seed")
    opts = talker_options(model, rest)
    if rest:
        raise TypeError(f"unexpected arguments: {', '.join(sorted(rest))}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.thinker.lm_head.weight.device).manual_seed(int(seed) + 1)
    return session, opts, generator


@torch.inference_mode()
def generate_with_speech(model, **kwargs) -> GenerateResult:
    """Text, codec frames [frames, G] and the 24 kHz waveform of one conversation."""
    t0 = time.perf_counter()
    session, opts, generator = _start(model, kwargs)
    frames, first_token, first_frame = [], None, None
    for kind, item in _pipeline(model, session, opts, generator):
        if kind == "text" and first_token is None:
            first_token = time.perf_counter() - t0
        if kind == "frame":
            frames.append(item)
            if first_frame is None:
                first_frame = time.perf_counter() - t0
    ids = session.sequences()
    g = model.cfg.talker.num_code_groups
    codes = torch.cat(frames, dim=0) if frames else torch.zeros(0, g, dtype=torch.long, device=ids.device)
    audio = model.code2wav.decode(codes.T[None])[0, 0] if frames else torch.zeros(0)
    text = None
    if getattr(model, "tokenizer", None) is not None:
        eos = tuple(session.eos.tolist())
        text = [model.tokenizer.decode(strip_after_eos(row, eos), skip_special_tokens=True) for row in ids.tolist()]
    timings = {"first_token_s": first_token or 0.0, "first_frame_s": first_frame or 0.0, "total_s": time.perf_counter() - t0}
    return GenerateResult(
        text_ids=ids, text=text, codes=[codes], audio=[audio.float().cpu()], sample_rate=model.cfg.code2wav.sample_rate,
        timings=timings,
    )


def stream_with_speech(model, **kwargs) -> Iterator[StreamEvent]:
    """Text deltas and audio chunks (one per codec frame, from the first frame on), then "done"."""
    t0 = time.perf_counter()
    session, opts, generator = _start(model, kwargs)
    rate = model.cfg.code2wav.sample_rate

    @torch.inference_mode()
    def events() -> Iterator[StreamEvent]:
        detok = TextDetokenizer(getattr(model, "tokenizer", None), tuple(session.eos.tolist()))
        state = model.code2wav.new_state()
        for kind, item in _pipeline(model, session, opts, generator):
            if kind == "text":
                tok = int(item.tokens[0])
                delta = detok.push(tok)
                if detok.should_emit(delta):
                    yield StreamEvent(kind="text", text=delta, token_ids=detok.take_ids(), time=time.perf_counter() - t0)
                continue
            wav, state = model.code2wav.stream(item.T[None], state)
            if wav.shape[-1]:
                yield StreamEvent(kind="audio", audio=wav[0, 0].float().cpu(), sample_rate=rate, time=time.perf_counter() - t0)
        yield from flush_events([detok], t0)
        yield done_event([detok], t0, cancelled=session.cancelled)

    return events()
