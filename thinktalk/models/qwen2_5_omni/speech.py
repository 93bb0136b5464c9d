"""Qwen2.5-Omni speech as two stages of the shared driver: the Talker, and Token2Wav (streamed or offline).

:class:`TalkerStage` — Talker input ``j`` is R_j, what the Thinker read at answer token j (its last
hidden state plus the token's embedding), then the text-eos embedding once and the text-pad one
forever (see :mod:`thinktalk.generation.reply`); the prompt and the dual-track layout are those of
:mod:`thinktalk.models.qwen2_5_omni.talker`. :class:`StreamingToken2Wav` decodes block by block while
the codes arrive; :class:`OfflineToken2Wav` decodes each utterance at its end (the reference's
computation: one ODE over the whole utterance).

**Streamed vs offline**: codec ids are identical (the driver runs the same stages either way). The
audio relation is that of :mod:`thinktalk.models.qwen2_5_omni.token2wav`: the vocoder stage is exact;
the DiT sliding window equals offline when the utterance fits in its first window and otherwise stays
within a tested SNR bound of offline, with no clicks at chunk borders.

Reference behaviour matched (transformers 5.23): the Talker prompt of the Thinker's prompt states with
the media placeholders' embeddings zeroed, the speaker's text-bos, R_0 with codec pad/bos; the answer's
text-eos/pad track rewritten per row after its end; the repetition penalty over the codec prompt ids
(mask ×T, pad, bos); codec bos suppressed; codec pad *and* eos ending an utterance; Token2Wav per row,
on the codes before the first end token.

Departures, on purpose:

- transformers 5.23's ``generate()`` drops an all-ones attention mask, and its Talker then skips the
  codec pad/bos embeddings and the TMRoPE positions (unpadded prompts only). The checkpoints were trained
  with both, so thinktalk keeps them; ``reference_quirks=True`` reproduces 5.23 exactly (tested).
- An empty answer (the Thinker's first token ends it) gets no speech — empty codes and audio — where the
  reference fails (``torch.cat(): expected a non-empty list``); in a batch, rows with empty answers get none.
- Codec ids outside the DiT's codebook raise a ``ValueError`` (the reference: an index error).
"""

from __future__ import annotations

import dataclasses

import torch

from thinktalk.generation.inputs import ModelInputs
from thinktalk.generation.options import SpeechParams
from thinktalk.generation.reply import Entry, ReplyTrack
from thinktalk.generation.sampling import TokenChooser
from thinktalk.generation.stages import TalkerState
from thinktalk.models.qwen2_5_omni.talker import prompt_embeds
from thinktalk.models.qwen2_5_omni.token2wav import StreamOptions


def media_for_talker(inputs: ModelInputs, cfg) -> tuple[torch.Tensor, dict]:
    """Placeholder positions hidden from the Talker, and the media arguments of its positions."""
    ids = inputs.input_ids
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for present, token in (
        (inputs.input_features, cfg.audio_token_index),
        (inputs.pixel_values, cfg.image_token_index),
        (inputs.pixel_values_videos, cfg.video_token_index),
    ):
        if present is not None:
            mask |= ids == token
    media = {
        "image_grid_thw": inputs.image_grid_thw,
        "video_grid_thw": inputs.video_grid_thw,
        "audio_feature_lengths": inputs.audio_lengths(),
        "video_second_per_grid": inputs.video_second_per_grid,
        "use_audio_in_video": inputs.use_audio_in_video,
    }
    return mask, media


class TalkerStage:
    def __init__(self, model, params: SpeechParams, speaker: dict):
        self.keep_layers = model.talker_reads  # the Thinker's input embeddings and last hidden states
        self.talker = model.talker
        self.thinker_embed = model.thinker.model.embed_tokens
        self.params = params
        self.speaker = speaker
        cfg = self.talker.cfg
        self.end_ids = tuple(params.eos_token_ids or self.talker.eos_token_ids)
        device = self.thinker_embed.weight.device
        special = self.thinker_embed(torch.tensor([cfg.tts_text_end_token_id, cfg.tts_text_pad_token_id], device=device))
        self.text_eos, self.text_pad = special[0:1], special[1:2]  # [1, E]

    def cache_length(self, inputs: ModelInputs) -> int:
        """KV slots a row needs: the prompt (T + 2) and every code."""
        return inputs.length + 2 + self.params.max_new_tokens

    def new_cache(self, batch: int, max_len: int):
        return self.talker.model.new_cache(batch, max_len)

    def new_state(self, reply: ReplyTrack, inputs: ModelInputs, generator: torch.Generator | None, cache) -> TalkerState:
        cfg, p = self.talker.cfg, self.params
        b = inputs.batch
        device = self.talker.codec_head.weight.device
        # The repetition penalty's history starts with the prompt's codec ids: mask ×T, pad, bos.
        history = torch.tensor([[cfg.tts_codec_mask_token_id, cfg.tts_codec_pad_token_id, cfg.tts_codec_start_token_id]],
                               device=device).expand(b, -1)  # fmt: skip
        suppress = tuple(sorted(set(p.sampling.suppress_tokens) | {cfg.tts_codec_start_token_id}))
        chooser = TokenChooser(
            dataclasses.replace(p.sampling, suppress_tokens=suppress),
            self.end_ids,
            cfg.tts_codec_pad_token_id,
            p.max_new_tokens,
            p.min_new_tokens,
            generator,
            history=history,
            vocab_size=cfg.vocab_size,
        )
        speaking = torch.tensor([not reply.empty(r) for r in range(b)], device=device)
        cache.reset()
        return TalkerState(cache=cache, chooser=chooser, speaking=speaking)

    def text_track(self, reply: ReplyTrack, entries: list[Entry], j: int) -> torch.Tensor:
        """R_j of every row [B, 1, E]."""
        if all(e.kind == "token" for e in entries):
            return reply.state(j, -1) + reply.state(j, 0)
        rows = []
        for r, e in enumerate(entries):
            if e.kind == "token":
                rows.append(reply.state(j, -1)[r : r + 1] + reply.state(j, 0)[r : r + 1])
            else:
                rows.append((self.text_eos if e.kind == "eos" else self.text_pad)[None])
        return torch.cat(rows, dim=0)

    def prefill(self, state: TalkerState, reply: ReplyTrack, inputs: ModelInputs, entries: list[Entry]) -> torch.Tensor:
        talker = self.talker
        media_mask, media = media_for_talker(inputs, talker.cfg)
        prompt = prompt_embeds(
            talker,
            self.thinker_embed,
            inputs.input_ids,
            reply.prompt_states,
            media_mask,
            self.text_track(reply, entries, 0),
            reply.tokens[0],
            self.speaker["bos_token"],
            inputs.attention_mask,
            self.params.reference_quirks,
            **media,
        )
        logits = talker(prompt.inputs_embeds, prompt.position_ids, prompt.attention_mask, state.cache)
        state.position = prompt.position_ids[:, :, -1:]
        return logits[:, -1]

    def step_input(self, state: TalkerState, reply: ReplyTrack, entries: list[Entry]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ``state.steps`` of every row: the last code's embedding + R_j; and its position."""
        r = self.text_track(reply, entries, state.steps)
        state.position = state.position + 1
        return state.codec_embed + r.to(state.codec_embed.dtype), state.position

    def forward(self, cache, embeds: torch.Tensor, positions: torch.Tensor, active=None) -> tuple[torch.Tensor, None]:
        """One batched decode step of any rows of a Talker cache → codec logits [B, V]."""
        return self.talker(embeds, positions, None, cache, active=active)[:, -1], None

    def choose(self, state: TalkerState, logits: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        code = state.chooser.choose(logits)
        state.codec_embed = self.talker.embed_codes(code[:, None])
        state.ended = state.chooser.finished
        state.frames.append(code[:, None])
        return code[:, None]


def noise_generator(params: SpeechParams, seed: int | None, row: int) -> torch.Generator | None:
    """Without explicit noise, row r's DiT noise comes from a CPU generator seeded seed + r (or the global RNG)."""
    return None if seed is None else torch.Generator().manual_seed(int(seed) + row)


def row_noise(params: SpeechParams, row: int) -> torch.Tensor | None:
    if params.noise is None:
        return None
    noise = params.noise if params.noise.dim() == 3 else params.noise[None]
    return noise[row if noise.shape[0] > 1 else 0]


class StreamingToken2Wav:
    """Token2Wav decoding while the codes arrive: one :class:`Token2WavStream` per row."""

    def __init__(self, token2wav, params: SpeechParams, speaker: dict, seed: int | None):
        self.t2w, self.params, self.speaker, self.seed = token2wav, params, speaker, seed
        self.sample_rate = token2wav.sample_rate

    def new_state(self, batch: int) -> dict:
        return {"streams": [None] * batch, "closed": [False] * batch}

    def _stream(self, state: dict, row: int):
        if state["streams"][row] is None:
            p = self.params
            state["streams"][row] = self.t2w.stream_start(
                self.speaker["cond"], self.speaker["ref_mel"], p.num_steps, p.guidance_scale, row_noise(p, row),
                p.sway_coefficient, noise_generator(p, self.seed, row), p.stream_options or StreamOptions(),
            )
        return state["streams"][row]

    def push(self, state: dict, codes, ended, final: bool, speaking) -> list[torch.Tensor | None]:
        """The audio of each row that became final (None: a row that is not speaking or has ended)."""
        return type(self).push_many([(self, state, codes, ended, final, speaking)])[0]

    @staticmethod
    def push_many(items: list[tuple]) -> list[list[torch.Tensor | None]]:
        """:meth:`push` of several requests (``(stage, state, codes, ended, final, speaking)`` each, stages on
        the same Token2Wav) in one :meth:`Token2Wav.stream_push_many`: their DiT windows and vocoder pieces
        are batched across requests."""
        outs: list[list[torch.Tensor | None]] = []
        work = []  # (item, row, stream, piece, final)
        for k, (stage, state, codes, ended, final, speaking) in enumerate(items):
            ended, speaking = ended.tolist(), speaking.tolist()
            outs.append([None] * len(ended))
            for row in range(len(ended)):
                if state["closed"][row] or not speaking[row]:
                    continue
                piece = None if ended[row] else codes[row : row + 1, 0]
                work.append((k, row, stage._stream(state, row), piece, ended[row] or final))
        if not work:
            return outs
        t2w = items[0][0].t2w
        audio = t2w.stream_push_many([w[2] for w in work], [w[3] for w in work], [w[4] for w in work])
        for (k, row, _, _, closing), a in zip(work, audio):
            outs[k][row] = a
            items[k][1]["closed"][row] = closing
        return outs


class OfflineToken2Wav(StreamingToken2Wav):
    """The reference's Token2Wav: each utterance decoded at once (one ODE, then BigVGAN) when it ends."""

    def new_state(self, batch: int) -> dict:
        return {"codes": [[] for _ in range(batch)], "closed": [False] * batch}

    @staticmethod
    def push_many(items: list[tuple]) -> list[list[torch.Tensor | None]]:
        return [stage.push(state, codes, ended, final, speaking) for stage, state, codes, ended, final, speaking in items]

    def push(self, state: dict, codes, ended, final: bool, speaking) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        ended, speaking = ended.tolist(), speaking.tolist()
        for row in range(len(ended)):
            if state["closed"][row] or not speaking[row]:
                out.append(None)
                continue
            if not ended[row]:
                state["codes"][row].append(codes[row : row + 1, 0])
            if not (ended[row] or final):
                out.append(None)
                continue
            state["closed"][row] = True
            if not state["codes"][row]:
                out.append(None)
                continue
            p = self.params
            wav = self.t2w(
                torch.stack(state["codes"][row], dim=1), self.speaker["cond"], self.speaker["ref_mel"],
                num_steps=p.num_steps, guidance_scale=p.guidance_scale, noise=row_noise(p, row),
                sway_coefficient=p.sway_coefficient, generator=noise_generator(p, self.seed, row),
            )
            out.append(wav[0])
        return out
