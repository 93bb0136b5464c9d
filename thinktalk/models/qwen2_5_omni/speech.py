"""Qwen2.5-Omni speech generation: Thinker → Talker → Token2Wav, offline and streamed.

Both paths run the same stages with explicit state — a :class:`~thinktalk.generation.thinker.ThinkerSession`,
a :class:`ReplyTrack` (the Talker's text track, built from the Thinker's steps), a
:class:`~thinktalk.models.qwen2_5_omni.talker.TalkerState`, and per answer a
:class:`~thinktalk.models.qwen2_5_omni.token2wav.Token2WavStream` when streaming. They differ only in
*when* stages run:

- :func:`generate_with_speech` (the reference's order): the Thinker answers completely, then the
  Talker speaks it, then Token2Wav decodes every utterance at once (the reference's offline DiT).
- :func:`stream_with_speech`: after every Thinker step the Talker runs as many steps as its inputs allow
  — exactly one while the Thinker is generating, because Talker step k reads the Thinker's state of answer
  token k, which exists once the Thinker has produced token k+1 — and Token2Wav decodes block by block.
  The first audio arrives while the Thinker is still writing a long answer.

**Streamed vs offline**: codec ids are identical (same inputs, same arithmetic). The audio relation is
that of :mod:`thinktalk.models.qwen2_5_omni.token2wav`: the vocoder stage is exact; the DiT sliding window
equals offline when the utterance fits in its first window and otherwise stays within a tested SNR bound
of offline, with no clicks at chunk borders.

Reference behaviour matched (transformers 5.23): the Talker prompt of the Thinker's prompt states with
the media placeholders' embeddings zeroed, the speaker's text-bos, R_0 with codec pad/bos; the answer's
text-eos/pad track rewritten per row after its first end token (clamped as the reference clamps it); the
repetition penalty over the codec prompt ids (mask ×T, pad, bos); codec bos suppressed; codec pad *and*
eos ending an utterance; Token2Wav per row, on the codes before the first end token.

Departures, on purpose:

- transformers 5.23's ``generate()`` drops an all-ones attention mask, and its Talker then skips the
  codec pad/bos embeddings and the TMRoPE positions (unpadded prompts only). The checkpoints were trained
  with both, so thinktalk keeps them; ``reference_quirks=True`` reproduces 5.23 exactly (tested).
- An empty answer (the Thinker's first token ends it) gets no speech — empty codes and audio — where the
  reference fails (``torch.cat(): expected a non-empty list``); in a batch, rows with empty answers get none.
- Codec ids outside the DiT's codebook raise a ``ValueError`` (the reference: an index error).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from thinktalk.generation.api import (
    GenerateResult,
    StreamEvent,
    TextDetokenizer,
    decode_text,
    done_event,
    flush_events,
    strip_after_eos,
    thinker_session,
)
from thinktalk.generation.sampling import SamplingParams
from thinktalk.generation.thinker import TextStep, ThinkerSession
from thinktalk.models.qwen2_5_omni import talker as talking
from thinktalk.models.qwen2_5_omni.speakers import speaker_params
from thinktalk.models.qwen2_5_omni.talker import TALKER_DEFAULTS, TalkerState
from thinktalk.models.qwen2_5_omni.token2wav import StreamOptions, Token2WavStream


@dataclass(frozen=True)
class SpeechOptions:
    """The speech arguments of generate()/stream(), with the reference's defaults."""

    speaker: str | None = None  # None: "Chelsie" (the reference's default) or the first voice
    talker: SamplingParams = TALKER_DEFAULTS
    talker_max_new_tokens: int = 4096
    num_steps: int = 10
    guidance_scale: float = 0.5
    sway_coefficient: float | None = -1.0
    noise: torch.Tensor | None = None  # [1|B, ≥ mel frames, mel_dim]: the DiT's starting noise
    seed: int | None = None  # without noise: row r draws its noise from a CPU generator seeded seed + r
    stream: StreamOptions = field(default_factory=StreamOptions)
    reference_quirks: bool = False  # see talker.prompt_embeds: transformers 5.23's unpadded-Talker behaviour


def speech_options(rest: dict, seed: int | None) -> SpeechOptions:
    """Pop the speech keyword arguments from ``rest``; anything left over is an error."""
    d = TALKER_DEFAULTS

    def get(name, default):
        return rest.pop(name, default)

    opts = SpeechOptions(
        speaker=get("speaker", None),
        talker=SamplingParams(
            do_sample=bool(get("talker_do_sample", d.do_sample)),
            temperature=float(get("talker_temperature", d.temperature)),
            top_k=int(get("talker_top_k", d.top_k) or 0),
            top_p=float(get("talker_top_p", d.top_p)),
            repetition_penalty=float(get("talker_repetition_penalty", d.repetition_penalty)),
        ),
        talker_max_new_tokens=int(get("talker_max_new_tokens", 4096)),
        num_steps=int(get("token2wav_num_steps", 10)),
        guidance_scale=float(get("token2wav_guidance_scale", 0.5)),
        sway_coefficient=get("token2wav_sway_coefficient", -1.0),
        noise=get("noise", None),
        seed=seed,
        stream=get("stream_options", None) or StreamOptions(),
        reference_quirks=bool(get("reference_quirks", False)),
    )
    for name in ("return_audio", "use_audio_in_video"):
        rest.pop(name, None)
    if rest:
        raise TypeError(f"unexpected generate()/stream() arguments: {', '.join(sorted(rest))}")
    if opts.talker_max_new_tokens < 1:
        raise ValueError(f"talker_max_new_tokens must be >= 1 (got {opts.talker_max_new_tokens})")
    if opts.num_steps < 2:
        raise ValueError(f"token2wav_num_steps must be >= 2 (got {opts.num_steps})")
    return opts


class ReplyTrack:
    """The Talker's text track R_k of every row, from the Thinker's steps as they arrive.

    R_k is what the Thinker read at answer token k (last hidden state + input embedding), available once
    the Thinker has produced token k+1. A row's track ends at index f: R_f is the text-eos embedding and
    every later R_k the text-pad one, where f is the row's first end token, or its last generated token
    (which the Thinker never reads) when it stopped without one — clamped to f ≥ 1 as the reference does.
    """

    def __init__(self, batch: int, eos_embed: torch.Tensor, pad_embed: torch.Tensor):
        self.batch = batch
        self.eos_embed, self.pad_embed = eos_embed, pad_embed  # [1, E]
        self.reads: list[torch.Tensor] = []  # reads[k]: [B, 1, E]
        self.finished_at: list[int | None] = [None] * batch  # first end token of the row
        self.ended_after: int | None = None  # number of Thinker steps, once it stopped

    def push(self, step: TextStep) -> None:
        if step.index > 0:
            self.reads.append(step.states[-1] + step.states[0])
        for r in range(self.batch):
            if self.finished_at[r] is None and bool(step.finished[r]):
                self.finished_at[r] = step.index

    def end(self, steps: int) -> None:
        self.ended_after = steps

    def end_index(self, row: int) -> int | None:
        f = self.finished_at[row]
        if f is None and self.ended_after is not None:
            f = self.ended_after - 1
        return None if f is None else max(f, 1)

    def empty_answer(self, row: int) -> bool:
        return self.finished_at[row] == 0 or self.ended_after == 1

    def entry(self, k: int) -> torch.Tensor | None:
        """R_k [B, 1, E], or None while some row's R_k is not known yet."""
        rows = []
        for r in range(self.batch):
            f = self.end_index(r)
            if f is not None and k >= f:
                rows.append((self.eos_embed if k == f else self.pad_embed)[None])
            elif k < len(self.reads):
                rows.append(self.reads[k][r : r + 1])
            else:
                return None
        return torch.cat(rows, dim=0)


@dataclass
class SpeechSession:
    """The state of one Thinker → Talker run (all rows of a batch)."""

    thinker: ThinkerSession
    options: SpeechOptions
    speaker: dict
    reply: ReplyTrack | None = None
    talker: TalkerState | None = None
    prompt_states: dict[int, torch.Tensor] | None = None
    first_tokens: torch.Tensor | None = None


def _media(session: ThinkerSession, talker_cfg) -> tuple[torch.Tensor, dict]:
    """Placeholder positions hidden from the Talker, and the media arguments of its positions."""
    inputs = session.inputs
    ids = inputs["input_ids"]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for key, token in (
        ("input_features", talker_cfg.audio_token_index),
        ("pixel_values", talker_cfg.image_token_index),
        ("pixel_values_videos", talker_cfg.video_token_index),
    ):
        if inputs.get(key) is not None:
            mask |= ids == token
    fam = inputs.get("feature_attention_mask")
    media = {
        "image_grid_thw": inputs.get("image_grid_thw"),
        "video_grid_thw": inputs.get("video_grid_thw"),
        "audio_feature_lengths": fam.sum(-1) if fam is not None else None,
        "video_second_per_grid": inputs.get("video_second_per_grid"),
        "use_audio_in_video": session.use_audio_in_video,
    }
    return mask, media


def _start(model, kwargs: dict) -> SpeechSession:
    if not model.has_speech:
        raise ValueError(
            "this checkpoint has no Talker/Token2Wav weights (or enable_audio_output is false): "
            "it can answer in text only; call generate() without return_audio"
        )
    session, rest = thinker_session(model, kwargs, keep_layers=(0, -1))
    opts = speech_options(rest, kwargs.get("seed"))
    _, params = speaker_params(model.speakers, opts.speaker, getattr(model, "checkpoint_dir", None))
    return SpeechSession(thinker=session, options=opts, speaker=params)


def _advance_talker(model, sp: SpeechSession) -> Iterator[torch.Tensor]:
    """Run every Talker step whose text-track input exists; yield each step's codes [B]."""
    talker = model.talker
    while sp.talker is None or not sp.talker.done:
        k = 0 if sp.talker is None else sp.talker.steps
        r_k = sp.reply.entry(k)
        if r_k is None:
            return
        if sp.talker is None:
            media_mask, media = _media(sp.thinker, talker.cfg)
            mask = sp.thinker.inputs.get("attention_mask")
            device = r_k.device
            prompt = talking.prompt_embeds(
                talker,
                model.thinker.model.embed_tokens,
                sp.thinker.inputs["input_ids"].to(device),
                sp.prompt_states,
                media_mask,
                r_k,
                sp.first_tokens,
                sp.speaker["bos_token"],
                None if mask is None else mask.to(device),
                sp.options.reference_quirks,
                **media,
            )
            gen = None
            if sp.options.seed is not None:
                gen = torch.Generator(device=device).manual_seed(int(sp.options.seed) + 1)
            sp.talker = talking.prefill(talker, prompt, sp.options.talker, sp.options.talker_max_new_tokens, gen)
        else:
            talking.step(talker, sp.talker, r_k)
        yield sp.talker.last_codes


@torch.inference_mode()
def run_stages(model, sp: SpeechSession, interleave: bool) -> Iterator[tuple[str, object]]:
    """Drive the Thinker and the Talker; yields ("text", TextStep) and ("codes", [B] tensor) in order."""
    emb = model.thinker.model.embed_tokens
    device = emb.weight.device
    cfg = model.talker.cfg
    special = emb(torch.tensor([cfg.tts_text_end_token_id, cfg.tts_text_pad_token_id], device=device))
    b = sp.thinker.inputs["input_ids"].shape[0]
    sp.reply = ReplyTrack(b, special[0:1], special[1:2])
    steps = 0
    for step in sp.thinker:
        steps += 1
        if step.index == 0:
            sp.prompt_states, sp.first_tokens = step.states, step.tokens
        sp.reply.push(step)
        yield "text", step
        if interleave:
            for codes in _advance_talker(model, sp):
                yield "codes", codes
    sp.reply.end(steps)
    if steps < 2:
        return  # an empty answer: nothing to say (the reference fails on it)
    for codes in _advance_talker(model, sp):
        yield "codes", codes


def _speaks(sp: SpeechSession, row: int) -> bool:
    return sp.talker is not None and not sp.reply.empty_answer(row)


def noise_generator(opts: SpeechOptions, row: int) -> torch.Generator | None:
    if opts.seed is None:
        return None
    return torch.Generator().manual_seed(int(opts.seed) + row)


def _row_noise(opts: SpeechOptions, row: int) -> torch.Tensor | None:
    if opts.noise is None:
        return None
    noise = opts.noise if opts.noise.dim() == 3 else opts.noise[None]
    return noise[row if noise.shape[0] > 1 else 0]


def generate_with_speech(model, **kwargs) -> GenerateResult:
    """Text and speech for processor inputs, equal to the reference's ``generate`` (greedy, same noise).

    Keyword arguments: those of :func:`thinktalk.generation.api.generate_text`, plus ``speaker``,
    ``talker_do_sample``, ``talker_top_k``, ``talker_top_p``, ``talker_temperature``,
    ``talker_repetition_penalty``, ``talker_max_new_tokens``, ``token2wav_num_steps``,
    ``token2wav_guidance_scale``, ``token2wav_sway_coefficient``, ``noise`` and ``seed``.
    """
    start = time.perf_counter()
    sp = _start(model, kwargs)
    first = None
    thinker_done = talker_done = 0.0
    for kind, _ in run_stages(model, sp, interleave=False):
        now = time.perf_counter() - start
        if kind == "text":
            first = now if first is None else first
            thinker_done = now
        else:
            talker_done = now
    ids = sp.thinker.sequences()
    b = ids.shape[0]
    eos = model.talker.eos_token_ids
    all_codes = sp.talker.sequences() if sp.talker is not None else None
    codes, audio = [], []
    t2w = model.token2wav
    for row in range(b):
        if not _speaks(sp, row):
            codes.append(torch.zeros(0, dtype=torch.long))
            audio.append(torch.zeros(0))
            continue
        n = talking.utterance_lengths(all_codes[row : row + 1], eos)[0]
        row_codes = all_codes[row : row + 1, :n]
        codes.append(row_codes[0].cpu())
        if n == 0:
            audio.append(torch.zeros(0))
            continue
        wav = t2w(
            row_codes,
            sp.speaker["cond"],
            sp.speaker["ref_mel"],
            num_steps=sp.options.num_steps,
            guidance_scale=sp.options.guidance_scale,
            noise=_row_noise(sp.options, row),
            sway_coefficient=sp.options.sway_coefficient,
            generator=noise_generator(sp.options, row),
        )
        audio.append(wav[0].float().cpu())
    total = time.perf_counter() - start
    texts = None
    if getattr(model, "tokenizer", None) is not None:
        stop = tuple(sp.thinker.eos.tolist())
        texts = [decode_text(model, strip_after_eos(row, stop)) for row in ids.tolist()]
    timings = {
        "first_token_s": first or 0.0,
        "thinker_s": thinker_done,
        "talker_s": max(0.0, talker_done - thinker_done),
        "token2wav_s": total - max(thinker_done, talker_done),
        "first_audio_s": total,
        "total_s": total,
    }
    return GenerateResult(text_ids=ids, text=texts, codes=codes, audio=audio, sample_rate=t2w.sample_rate, timings=timings)


def stream_with_speech(model, **kwargs) -> Iterator[StreamEvent]:
    """Events as they are produced: text deltas and audio chunks, interleaved; "done" last.

    Same arguments as :func:`generate_with_speech`, plus ``stream_options``
    (:class:`~thinktalk.models.qwen2_5_omni.token2wav.StreamOptions`). The concatenated audio of a row
    relates to the offline waveform as described in the module docstring.
    """
    start = time.perf_counter()
    sp = _start(model, kwargs)
    b = sp.thinker.inputs["input_ids"].shape[0]
    tok = getattr(model, "tokenizer", None)
    eos_text = tuple(sp.thinker.eos.tolist())
    detok = [TextDetokenizer(tok, eos_text) for _ in range(b)]
    t2w = model.token2wav
    talker_eos = model.talker.eos_token_ids
    streams: list[Token2WavStream | None] = [None] * b
    open_rows = [True] * b

    def now() -> float:
        return time.perf_counter() - start

    def audio_event(row: int, chunk: torch.Tensor) -> StreamEvent:
        return StreamEvent(kind="audio", audio=chunk.float().cpu(), sample_rate=t2w.sample_rate, time=now(), row=row)

    def stream_of(row: int) -> Token2WavStream:
        if streams[row] is None:
            streams[row] = t2w.stream_start(
                sp.speaker["cond"], sp.speaker["ref_mel"], sp.options.num_steps, sp.options.guidance_scale,
                _row_noise(sp.options, row), sp.options.sway_coefficient, noise_generator(sp.options, row),
                sp.options.stream,
            )
        return streams[row]

    for kind, item in run_stages(model, sp, interleave=True):
        if kind == "text":
            step: TextStep = item
            for row in range(b):
                token = int(step.tokens[row])
                delta = detok[row].push(token)
                if detok[row].should_emit(delta):
                    yield StreamEvent(kind="text", text=delta, token_ids=detok[row].take_ids(), time=now(), row=row)
            continue
        codes: torch.Tensor = item
        talker_done = sp.talker.done
        for row in range(b):
            if not open_rows[row]:
                continue
            code = int(codes[row])
            # An empty answer's speech is dropped, but only once the Thinker has said it is empty.
            if sp.reply.finished_at[row] == 0:
                open_rows[row] = False
                continue
            ended = code in talker_eos
            piece = None if ended else codes[row : row + 1]
            chunk = t2w.stream_push(stream_of(row), piece, final=ended or talker_done)
            if ended or talker_done:
                open_rows[row] = False
            if chunk.numel():
                yield audio_event(row, chunk)
    yield from flush_events(detok, start)
    yield done_event(detok, start, cancelled=sp.thinker.cancelled)
