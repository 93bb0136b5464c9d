"""Qwen2.5-Omni Token2Wav: codec ids → mel (flow-matching DiT) → 24 kHz waveform (BigVGAN), offline or streamed.

Offline (:meth:`Token2Wav.forward`) is the reference computation: one ODE over the whole utterance,
then the vocoder over the whole mel. It equals the reference to float rounding given the same noise.

Streaming (:meth:`Token2Wav.stream_start`, then :meth:`Token2Wav.stream_push` per code or batch of
codes) decodes while the codes arrive, in two stages whose state the caller owns
(:class:`Token2WavStream` = :class:`DiTStreamState` + :class:`VocoderStreamState`; options in
:class:`StreamOptions`):

1. **DiT sliding window** (:func:`dit_stream_chunk`). The mel is produced in chunks of ``chunk_blocks``
   DiT blocks (the first one ``first_chunk_blocks``; a block is ``block_size`` = 24 frames = 12 codes =
   0.24 s). Chunk ``[s, e)`` is the part ``[s, e)`` of an ODE solved on the window
   ``[s − past_blocks·24, e + future_blocks·24)`` (clipped to the utterance), started from the *same noise
   frames* as offline, with blocks and rotary positions counted from the utterance start. It is emitted
   once the codes of its whole window exist, or the utterance has ended (the last chunk then runs to the end).
2. **Incremental vocoder** (default; :func:`~thinktalk.models.qwen2_5_omni.bigvgan.incremental_push`).
   BigVGAN is a stack of non-causal convolutions with a bounded receptive field R
   (:func:`~thinktalk.models.qwen2_5_omni.bigvgan.receptive_field`: 36 mel frames for the 7B vocoder, 28
   for the tiny test one). It is cut in pieces (conv_pre, each upsampling stage, the output layers) whose
   own reach is small; each piece keeps the inputs its next outputs need and computes only outputs it has
   not given out, so a mel frame is vocoded about once (the tiny vocoder in the DiT's pieces: 1.3-1.5x the
   offline work, against 2.2-2.6x for the window vocoder; ``bench/vocoder_stream.py``). Exact: the audio
   is BigVGAN of the whole mel to float rounding (tested with pieces down to one frame).
   **Window vocoder** (:func:`vocoder_stream_push`, ``StreamOptions(incremental_vocoder=False)`` or any
   ``vocoder_context``/``vocoder_lookahead``): audio of the mel frames ``[v, m − lookahead)`` is emitted
   by vocoding ``[v − context, m)`` again; ``context = lookahead = R`` make it exact too.
3. **Several utterances at once** (:meth:`Token2Wav.stream_push_many`, what the engine calls with every
   request that spoke in a step): DiT windows of the same length are solved as one batch (each row at its
   own place in its utterance) and the vocoder pieces of all of them run as one batch; each utterance gets
   what it gets alone (tested).

**Streamed vs offline audio** — what holds, and what the tests check (tests/test_qwen25_token2wav.py,
tests/test_qwen25_speech.py):

- Codec ids are identical: the streamed Talker reads exactly the offline inputs. Hence the streamed
  waveform has the offline length, ``codes × 480`` samples.
- The vocoder stage is exact: streamed audio = BigVGAN(the whole streamed mel) to float rounding
  (tested ≤ 1e-5 with uneven pieces, both vocoders; the window one without context, or the incremental
  one with its pieces' reach ignored, fail the same test by > 1e-3).
- The DiT stage is exact when the utterance fits in the first window (fewer than
  ``(first_chunk_blocks + future_blocks)·12`` codes = 36 by default): streamed audio = offline to float
  rounding (tested). Longer utterances differ from offline, because the ODE evaluates the DiT
  ``3·(num_steps − 1) + 1`` times and each evaluation carries information one look-back/look-ahead block
  further, so an offline frame depends (weakly) on the whole utterance while a window sees its
  neighbourhood only. This is bounded by measurement, not algebra. On the tiny random-weight model with
  the default options: waveform SNR against offline 65–74 dB (3 s utterances; seeds 0–2; 4 and 10 ODE
  steps) and 65 dB end to end (3 steps); the tests require > 50 dB. Dropping the look-ahead
  (``future_blocks=0``) gives 32–38 dB.
- No clicks: within ±10 ms of every border — DiT chunks and emitted audio pieces — the stream matches
  offline as well as anywhere (measured 64–72 dB there; the test requires > 40 dB; a vocoder cut without
  context scores about 1 dB and fails it).

**Latency and cost.** The first audio needs the codes of ``first_chunk_blocks + future_blocks`` blocks
(36 codes = 0.72 s of speech by default) and is the first chunk minus the vocoder's look-ahead (48 − 36
= 12 frames with the 7B vocoder for the window vocoder; the incremental one holds back the sum of its
pieces' reaches, 39 frames, so 9); the window vocoder's ``vocoder_lookahead`` < R trades stage 2's exactness for latency. Each
chunk re-solves the ODE on its window: on an H200 at the 7B shapes one DiT solve (10 steps) costs about
0.85 s whatever the window length (kernel-launch bound), so larger ``chunk_blocks`` raise throughput and
only the first chunk's size sets latency.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from thinktalk.models.qwen2_5_omni.bigvgan import BigVGAN, UnitState, incremental_push, receptive_field, stream_units
from thinktalk.models.qwen2_5_omni.config import Token2WavConfig
from thinktalk.models.qwen2_5_omni.dit import DiT, solve


class NoiseSource:
    """The ODE's initial noise [1, frames, mel_dim], identical however the frames are requested.

    Either an explicit tensor (sliced; an error if too short) or a generator (drawn block by block, so
    offline and streamed decoding of the same seed start from the same noise).
    """

    def __init__(
        self,
        mel_dim: int,
        block: int,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ):
        self.mel_dim, self.block, self.device = mel_dim, block, device
        self.generator = generator
        self.drawn = noise.float() if noise is not None else torch.zeros(1, 0, mel_dim)
        if self.drawn.dim() == 2:
            self.drawn = self.drawn[None]
        self.fixed = noise is not None

    def take(self, start: int, end: int) -> torch.Tensor:
        while self.drawn.shape[1] < end:
            if self.fixed:
                raise ValueError(f"noise has {self.drawn.shape[1]} frames, {end} needed (one per mel frame: 2 per code)")
            more = torch.randn(1, self.block, self.mel_dim, generator=self.generator, device=self.drawn.device)
            self.drawn = torch.cat([self.drawn, more], dim=1)
        return self.drawn[:, start:end].to(self.device)


@dataclass(frozen=True)
class StreamOptions:
    """How streamed Token2Wav cuts the work; see the module docstring for what each costs and buys."""

    first_chunk_blocks: int = 2
    chunk_blocks: int = 4
    past_blocks: int = 2
    future_blocks: int = 1
    incremental_vocoder: bool = True  # False: the window vocoder (re-vocodes its context every piece)
    vocoder_context: int | None = None  # window vocoder: mel frames left of the emitted audio; None = the receptive field
    vocoder_lookahead: int | None = None  # window vocoder: mel frames held back; None = the receptive field

    def __post_init__(self):
        if min(self.first_chunk_blocks, self.chunk_blocks) < 1 or min(self.past_blocks, self.future_blocks) < 0:
            raise ValueError("StreamOptions: chunks need >= 1 block, contexts >= 0 blocks")

    @property
    def windowed_vocoder(self) -> bool:
        """The window vocoder runs when asked for, or when its context/look-ahead is set (they mean nothing to
        the incremental one, which is exact and holds back only what it must)."""
        return not self.incremental_vocoder or self.vocoder_context is not None or self.vocoder_lookahead is not None


@dataclass
class DiTStreamState:
    """Sliding-window DiT state of one utterance: the speaker, the noise, the codes so far and what was emitted."""

    cond: torch.Tensor  # [1, enc_emb_dim]
    reference_mel: torch.Tensor  # [1, T_ref, mel_dim]
    noise: NoiseSource
    num_steps: int
    guidance_scale: float
    sway_coefficient: float | None
    codes: torch.Tensor  # [1, N] all codes received
    emitted: int = 0  # mel frames emitted
    chunks: int = 0
    finished: bool = False
    borders: list[int] = field(default_factory=list)  # mel frame index of every chunk start after the first


@dataclass
class VocoderStreamState:
    """Vocoder state of one utterance. Incremental (``units`` set): each piece of BigVGAN keeps the inputs its
    next outputs need (:func:`~thinktalk.models.qwen2_5_omni.bigvgan.incremental_push`). Window (``units``
    None): the mel not yet vocoded plus ``context`` frames before it, vocoded again with every piece."""

    context: int
    lookahead: int
    mel: torch.Tensor  # [1, mel_dim, frames kept]
    start: int = 0  # utterance frame index of mel[..., 0]
    emitted: int = 0  # frames whose audio was emitted
    units: list[UnitState] | None = None


@dataclass
class Token2WavStream:
    dit: DiTStreamState
    vocoder: VocoderStreamState
    options: StreamOptions
    samples: int = 0  # audio samples emitted so far


class Token2Wav(nn.Module):
    def __init__(self, cfg: Token2WavConfig):
        super().__init__()
        self.cfg = cfg
        self.code2wav_dit_model = DiT(cfg.dit)
        self.code2wav_bigvgan_model = BigVGAN(cfg.bigvgan)

    @property
    def hop_length(self) -> int:
        return self.code2wav_bigvgan_model.hop_length

    @property
    def sample_rate(self) -> int:
        return 24000

    def _check_codes(self, codes: torch.Tensor) -> None:
        n = self.code2wav_dit_model.num_codes
        if codes.numel() and (int(codes.max()) >= n or int(codes.min()) < 0):
            bad = codes[(codes >= n) | (codes < 0)].unique().tolist()[:8]
            raise ValueError(f"codec ids {bad} are outside the DiT's codebook (0..{n - 1}); end tokens must be cut first")

    def _noise(self, noise, generator, frames: int, device) -> torch.Tensor:
        return NoiseSource(self.cfg.dit.mel_dim, self.cfg.dit.block_size, noise, generator, device).take(0, frames)

    def mel(
        self,
        codes: torch.Tensor,
        conditioning: torch.Tensor,
        reference_mel: torch.Tensor,
        num_steps: int = 10,
        guidance_scale: float = 0.5,
        noise: torch.Tensor | None = None,
        sway_coefficient: float | None = -1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """codes [B, N] → log-mel [B, mel_dim, N·repeats] (one ODE over the whole utterance)."""
        self._check_codes(codes)
        dit = self.code2wav_dit_model
        frames = codes.shape[1] * self.cfg.dit.repeats
        if frames > self.cfg.dit.max_position_embeddings:
            raise ValueError(f"{codes.shape[1]} codes need {frames} mel frames; the DiT allows {self.cfg.dit.max_position_embeddings}")
        device = dit.proj_out.weight.device
        b = codes.shape[0]
        if noise is None:
            noise = torch.cat([self._noise(None, generator, frames, device) for _ in range(b)])
        else:
            noise = noise.to(device).float()
            if noise.dim() == 2:
                noise = noise[None]
            if noise.shape[1] < frames:
                raise ValueError(f"noise has {noise.shape[1]} frames, {frames} needed (one per mel frame: 2 per code)")
            noise = noise[:, :frames].expand(b, -1, -1)
        x = solve(
            dit, noise, codes.to(device), conditioning.to(device).float().expand(b, -1),
            reference_mel.to(device).float().expand(b, -1, -1), num_steps, guidance_scale, sway_coefficient,
        )
        return x.transpose(1, 2)

    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        """log-mel [B, mel_dim, frames] → waveform [B, frames · 240]."""
        return self.code2wav_bigvgan_model(mel.float())

    def forward(
        self,
        codes: torch.Tensor,
        conditioning: torch.Tensor,
        reference_mel: torch.Tensor,
        num_steps: int = 10,
        guidance_scale: float = 0.5,
        noise: torch.Tensor | None = None,
        sway_coefficient: float | None = -1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """codes [B, N] + speaker (``cond`` [1|B, enc_emb_dim], ``ref_mel`` [1|B, T, mel]) → waveform [B, N·480].

        ``noise`` [1|B, ≥ N·2, mel_dim] is the ODE's starting point (drawn from ``generator`` when None).
        """
        mel = self.mel(codes, conditioning, reference_mel, num_steps, guidance_scale, noise, sway_coefficient, generator)
        return self.vocode(mel)

    # -- streaming ------------------------------------------------------------------------------------
    def stream_start(
        self,
        conditioning: torch.Tensor,
        reference_mel: torch.Tensor,
        num_steps: int = 10,
        guidance_scale: float = 0.5,
        noise: torch.Tensor | None = None,
        sway_coefficient: float | None = -1.0,
        generator: torch.Generator | None = None,
        options: StreamOptions | None = None,
    ) -> Token2WavStream:
        """A fresh stream state for one utterance (batch 1); feed it codes with :meth:`stream_push`."""
        options = options or StreamOptions()
        device = self.code2wav_dit_model.proj_out.weight.device
        dit = DiTStreamState(
            cond=conditioning.to(device).float().reshape(1, -1),
            reference_mel=reference_mel.to(device).float().reshape(1, -1, self.cfg.dit.mel_dim),
            noise=NoiseSource(self.cfg.dit.mel_dim, self.cfg.dit.block_size, noise, generator, device),
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            sway_coefficient=sway_coefficient,
            codes=torch.zeros(1, 0, dtype=torch.long, device=device),
        )
        rf = receptive_field(self.cfg.bigvgan)
        voc = VocoderStreamState(
            context=rf if options.vocoder_context is None else options.vocoder_context,
            lookahead=rf if options.vocoder_lookahead is None else options.vocoder_lookahead,
            mel=torch.zeros(1, self.cfg.dit.mel_dim, 0, device=device),
            units=None if options.windowed_vocoder else [UnitState() for _ in stream_units(self.code2wav_bigvgan_model)],
        )
        return Token2WavStream(dit=dit, vocoder=voc, options=options)

    def stream_push(self, state: Token2WavStream, codes: torch.Tensor | None = None, final: bool = False) -> torch.Tensor:
        """Add codes ([N] or [1, N]; may be empty) and return the audio that became final ([samples], maybe empty).

        ``final=True`` says no more codes will come: everything left is decoded and returned.
        """
        return self.stream_push_many([state], [codes], [final])[0]

    def stream_push_many(
        self, states: list[Token2WavStream], codes: list[torch.Tensor | None], finals: list[bool]
    ) -> list[torch.Tensor]:
        """:meth:`stream_push` for several utterances at once: their DiT windows of the same length are solved
        as one batch, and their vocoder pieces run as one batch. Each utterance gets what it would alone (to
        float rounding; tested)."""
        codes = [None if c is None or not c.numel() else c.reshape(1, -1).to(st.dit.codes.device) for st, c in zip(states, codes)]
        for c in codes:  # every check before any state changes: a bad request leaves the others as they were
            if c is not None:
                self._check_codes(c)
        for st, c, final in zip(states, codes, finals):
            if c is not None:
                st.dit.codes = torch.cat([st.dit.codes, c], dim=1)
            st.dit.finished = st.dit.finished or final
        mels = dit_stream_chunks(self.code2wav_dit_model, [st.dit for st in states], [st.options for st in states])
        bigvgan = self.code2wav_bigvgan_model
        audio: list[torch.Tensor | None] = [None] * len(states)
        incremental = [i for i, st in enumerate(states) if st.vocoder.units is not None]
        if incremental:
            pieces = incremental_push(
                bigvgan,
                [states[i].vocoder.units for i in incremental],
                [torch.cat(mels[i], dim=2)[0] if mels[i] else None for i in incremental],
                [finals[i] for i in incremental],
            )
            for i, a in zip(incremental, pieces):
                audio[i] = a
        for i, st in enumerate(states):
            if st.vocoder.units is None:
                audio[i] = vocoder_stream_push(bigvgan, st.vocoder, torch.cat(mels[i], dim=2) if mels[i] else None, finals[i])
            st.samples += audio[i].shape[-1]
        return audio


def _next_window(dit: DiT, st: DiTStreamState, opt: StreamOptions) -> tuple[int, int, int, int] | None:
    """The next chunk ``[s, e)`` and its ODE window ``[ws, we)`` (mel frames), or None until its codes exist."""
    bs, reps = dit.cfg.block_size, dit.cfg.repeats
    total = st.codes.shape[1] * reps
    if st.emitted >= total and (st.finished or total == 0):
        return None
    s = st.emitted
    e = s + (opt.first_chunk_blocks if st.chunks == 0 else opt.chunk_blocks) * bs
    we = e + opt.future_blocks * bs
    if not st.finished and total < we:
        return None
    if st.finished and we >= total:
        e = we = total  # the last chunk runs to the end of the utterance
    ws = max(0, s - opt.past_blocks * bs)
    return s, e, ws, we


def _take_chunk(st: DiTStreamState, x: torch.Tensor, window: tuple[int, int, int, int]) -> torch.Tensor:
    s, e, ws, _ = window
    if s > 0:
        st.borders.append(s)
    st.emitted = e
    st.chunks += 1
    return x[:, s - ws : e - ws].transpose(1, 2)


def dit_stream_chunk(dit: DiT, st: DiTStreamState, opt: StreamOptions) -> torch.Tensor | None:
    """The next mel chunk [1, mel_dim, frames] of the sliding-window DiT, or None until its window's codes exist."""
    window = _next_window(dit, st, opt)
    if window is None:
        return None
    _, _, ws, we = window
    reps = dit.cfg.repeats
    # Windows start on block borders and end on code borders (blocks hold a whole number of codes).
    x = solve(
        dit,
        st.noise.take(ws, we),
        st.codes[:, ws // reps : we // reps],
        st.cond,
        st.reference_mel,
        st.num_steps,
        st.guidance_scale,
        st.sway_coefficient,
        start=ws,
    )
    return _take_chunk(st, x, window)


def dit_stream_chunks(dit: DiT, states: list[DiTStreamState], options: list[StreamOptions]) -> list[list[torch.Tensor]]:
    """Every mel chunk that became ready, per utterance. Windows of several utterances with the same length and
    ODE settings are solved as one batch (rows at their own places: ``solve(start=tensor)``); one alone runs
    :func:`dit_stream_chunk`'s solve."""
    out: list[list[torch.Tensor]] = [[] for _ in states]
    reps = dit.cfg.repeats
    while True:
        ready = [(i, w) for i, st in enumerate(states) if (w := _next_window(dit, st, options[i])) is not None]
        if not ready:
            return out
        groups: dict = {}
        for i, w in ready:
            st = states[i]
            key = (w[3] - w[2], st.num_steps, st.guidance_scale, st.sway_coefficient, tuple(st.reference_mel.shape))
            groups.setdefault(key, []).append((i, w))
        for group in groups.values():
            if len(group) == 1:
                i, _ = group[0]
                out[i].append(dit_stream_chunk(dit, states[i], options[i]))
                continue
            sts = [states[i] for i, _ in group]
            x = solve(
                dit,
                torch.cat([st.noise.take(w[2], w[3]) for st, (_, w) in zip(sts, group)]),
                torch.cat([st.codes[:, w[2] // reps : w[3] // reps] for st, (_, w) in zip(sts, group)]),
                torch.cat([st.cond for st in sts]),
                torch.cat([st.reference_mel for st in sts]),
                sts[0].num_steps,
                sts[0].guidance_scale,
                sts[0].sway_coefficient,
                start=torch.tensor([w[2] for _, w in group]),  # on the CPU: DiT.forward reads it without a sync
            )
            for b, (st, (i, w)) in enumerate(zip(sts, group)):
                out[i].append(_take_chunk(st, x[b : b + 1], w))


def vocoder_stream_push(bigvgan: BigVGAN, st: VocoderStreamState, mel: torch.Tensor | None, final: bool) -> torch.Tensor:
    """Append mel frames [1, mel_dim, n]; return the audio of every frame that has ``lookahead`` frames after it
    (all of them when ``final``), vocoded with ``context`` frames before it."""
    if mel is not None:
        st.mel = torch.cat([st.mel, mel.to(st.mel.dtype)], dim=2)
    available = st.start + st.mel.shape[2]
    end = available if final else available - st.lookahead
    if end <= st.emitted:
        return st.mel.new_zeros(0)
    hop = bigvgan.hop_length
    audio = bigvgan(st.mel)[0]  # the window [st.start, available)
    out = audio[(st.emitted - st.start) * hop : (end - st.start) * hop]
    st.emitted = end
    keep_from = max(st.start, end - st.context)  # the next window's left context
    st.mel = st.mel[:, :, keep_from - st.start :]
    st.start = keep_from
    return out
