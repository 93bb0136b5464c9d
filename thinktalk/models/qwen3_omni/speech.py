"""Qwen3-Omni speech as two stages of the shared driver: the Talker (+ code predictor), and Code2Wav.

:class:`TalkerStage` — the Talker speaks codebook 0 of every 80 ms frame; the MTP code predictor
fills in codebooks 1..G-1 of that frame (on CUDA its fixed greedy loop replays as one engine-owned
CUDA graph; sampling always runs eagerly). Talker input ``j`` is answer token j as the Thinker read
it — through ``text_projection`` of its embedding — then ``tts_eos`` once and ``tts_pad`` forever
(see :mod:`thinktalk.generation.reply`); the prompt is :meth:`Talker.build_prompt`. The frame the
Talker chooses last (codec eos, or the one at the length limit) is never decoded: the reference
computes a frame's residual codes only when it feeds that frame back, and so does this stage.

:class:`StreamingCode2Wav` decodes every frame with left context only (audio after the very first
frame); :class:`OfflineCode2Wav` decodes each utterance at its end. Both give the same samples.
Both match the reference's ``generate`` (greedy: the same text, the same codes; the waveform of up
to 300 frames — see :meth:`Code2Wav.decode`).
"""

from __future__ import annotations

import torch

from thinktalk.generation.graphs import graphed_predictor
from thinktalk.generation.inputs import ModelInputs
from thinktalk.generation.options import SpeechParams
from thinktalk.generation.reply import Entry, ReplyTrack
from thinktalk.generation.sampling import SamplingParams, TokenChooser
from thinktalk.generation.stages import TalkerState
from thinktalk.models.qwen3_omni.code_predictor import SAMPLING as PREDICTOR_SAMPLING

MEDIA_KEYS = ("image_grid_thw", "video_grid_thw", "video_second_per_grid", "feature_attention_mask")


class TalkerStage:
    def __init__(self, model, params: SpeechParams, speaker_id: int):
        self.model, self.talker, self.thinker = model, model.talker, model.thinker
        self.params = params
        self.speaker_id = speaker_id
        self.keep_layers = model.talker_reads
        self.end_ids = (self.talker.cfg.codec_eos_token_id,)
        # The reference samples the residual codebooks (top-k 50, top-p 0.8) whenever the Talker samples.
        self.predictor_sampling = PREDICTOR_SAMPLING if params.sampling.do_sample else SamplingParams()
        cfg = model.cfg
        embed = self.thinker.model.embed_tokens
        specials = torch.tensor([[cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id]], device=embed.weight.device)
        self.special_embeds = tuple(embed(specials).split(1, dim=1))  # (bos, eos, pad), Thinker width
        self.tts_eos = self.talker.text_projection(self.special_embeds[1])
        self.tts_pad = self.talker.text_projection(self.special_embeds[2])

    def cache_length(self, inputs: ModelInputs) -> int:
        """KV slots a row needs: an upper bound of the prompt (user turns + the assistant head + the system
        turn) and every frame."""
        system = 0 if self.params.system_ids is None else self.params.system_ids.shape[-1]
        return inputs.length + 9 + system + self.params.max_new_tokens

    def new_cache(self, batch: int, max_len: int):
        return self.talker.new_cache(batch, max_len)

    def new_state(self, reply: ReplyTrack, inputs: ModelInputs, generator: torch.Generator | None, cache) -> TalkerState:
        if inputs.batch != 1:
            raise ValueError("Qwen3-Omni speech handles one conversation at a time (batch size 1); call it per row")
        p, device = self.params, self.tts_pad.device
        suppress = tuple(sorted(set(p.sampling.suppress_tokens) | set(self.talker.suppressed_tokens())))
        chooser = TokenChooser(
            SamplingParams(p.sampling.do_sample, p.sampling.temperature, p.sampling.top_k, p.sampling.top_p,
                           p.sampling.repetition_penalty, suppress),  # fmt: skip
            self.end_ids,
            self.talker.cfg.codec_pad_id,
            p.max_new_tokens,
            p.min_new_tokens,
            generator,
            history=torch.zeros(inputs.batch, 0, dtype=torch.long, device=device),
            vocab_size=self.talker.cfg.text.vocab_size,
        )
        speaking = torch.tensor([not reply.empty(r) for r in range(inputs.batch)], device=device)
        cache.reset()
        return TalkerState(cache=cache, chooser=chooser, speaking=speaking,
                           predictor_cache=self.talker.code_predictor.new_cache(inputs.batch))  # fmt: skip

    def text_embed(self, reply: ReplyTrack, entry: Entry) -> torch.Tensor:
        if entry.kind == "eos":
            return self.tts_eos
        if entry.kind == "pad":
            return self.tts_pad
        return self.talker.text_projection(reply.state(entry.index, 0))  # the token's Thinker embedding

    def prefill(self, state: TalkerState, reply: ReplyTrack, inputs: ModelInputs, entries: list[Entry]) -> torch.Tensor:
        cfg, talker = self.model.cfg, self.talker
        embed = self.thinker.model.embed_tokens
        system = None if self.params.system_ids is None else embed(self.params.system_ids.to(self.tts_pad.device))
        prompt = talker.build_prompt(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            thinker_embeds=reply.prompt_states[0],
            thinker_hidden=reply.prompt_states[talker.cfg.accept_hidden_layer],
            answer_embeds=reply.state(0, 0),
            special_embeds=self.special_embeds,
            speaker_id=self.speaker_id,
            ids={"im_start": cfg.im_start_token_id, "user": cfg.user_token_id, "assistant": cfg.assistant_token_id,
                 "tts_pad": cfg.tts_pad_token_id},  # fmt: skip
            media={k: getattr(inputs, k) for k in MEDIA_KEYS if getattr(inputs, k) is not None},
            n_window=self.thinker.cfg.audio.n_window,
            system_embeds=system,
        )
        logits, state.hidden = talker.decode(prompt.embeds, prompt.position_ids, None, state.cache)
        state.position = prompt.position_ids[:, :, -1:]
        return logits

    def step_input(self, state: TalkerState, reply: ReplyTrack, entries: list[Entry]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ``state.steps``: the last frame's summed code embeddings + the answer track; and its position."""
        state.position = state.position + 1
        return state.codec_embed + self.text_embed(reply, entries[0]), state.position

    def forward(self, cache, embeds: torch.Tensor, positions: torch.Tensor, active=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched decode step of any rows of a Talker cache → (codebook-0 logits [B, V], hidden [B, 1, D])."""
        return self.talker.decode(embeds, positions, None, cache, active)

    def choose(self, state: TalkerState, logits: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Codebook 0, then (unless the utterance just ended) the code predictor's codebooks 1..G-1."""
        codes = type(self).choose_many([(self, state, logits, hidden)])[0]
        if isinstance(codes, Exception):
            raise codes
        return codes

    @staticmethod
    def choose_many(items: list[tuple]) -> list[torch.Tensor]:
        """:meth:`choose` for several requests' stages at once: ``items`` = [(stage, state, logits, hidden)].
        Codebook 0 is chosen for all at once (:meth:`TokenChooser.choose_many`: each request's own chooser); the code predictor runs once for every request
        whose stage shares the Talker and the predictor's sampling (each request's rows sampled with its own
        generator), so a step of many conversations is one predictor loop, not one per conversation.

        Returns each request's codes [B, G] (or [B, 1] once it ended) — or the exception that request raised
        (a failing request fails alone: if the batched predictor fails, each request's rows run alone)."""
        out: list = [None] * len(items)
        pending: dict = {}
        # codebook 0 of every request at once (each request's own chooser and generator)
        chosen = TokenChooser.choose_many([state.chooser for _, state, _, _ in items], [logits for _, _, logits, _ in items])
        for k, ((stage, state, _logits, hidden), code0) in enumerate(zip(items, chosen)):
            try:
                if isinstance(code0, Exception):
                    raise code0
                if hidden is not None:
                    state.hidden = hidden
                state.ended = state.chooser.finished | state.chooser.done
                if bool(state.ended.all()):
                    out[k] = code0[:, None]
                    continue
                code0_embed = stage.talker.model.codec_embedding(code0)[:, None]
            except Exception as e:  # noqa: BLE001 - this request's failure, returned as its result
                out[k] = e
                continue
            key = (id(stage.talker), stage.predictor_sampling)
            pending.setdefault(key, []).append((k, stage, state, code0, code0_embed))
        for group in pending.values():
            try:
                TalkerStage._predict(group, out)
            except Exception:  # noqa: BLE001 - find whose: each request alone
                for member in group:
                    try:
                        TalkerStage._predict([member], out)
                    except Exception as e:  # noqa: BLE001
                        out[member[0]] = e
        return out

    @staticmethod
    def _predict(group: list[tuple], out: list) -> None:
        """Codebooks 1..G-1 for the requests of ``group`` (one Talker, one sampling), as one batch."""
        stage = group[0][1]
        predictor, sampling = stage.talker.code_predictor, stage.predictor_sampling
        if len(group) == 1:
            _, _, state, code0, code0_embed = group[0]
            hidden, cache, generator = state.hidden, state.predictor_cache, state.chooser.generator
        else:
            hidden = torch.cat([g[2].hidden for g in group])
            code0_embed = torch.cat([g[4] for g in group])
            cache = None  # a fresh one for the whole batch (a frame's few positions)
            generator = [(g[3].shape[0], g[2].chooser.generator) for g in group]
        if stage.params.cuda_graphs and not sampling.do_sample and code0_embed.device.type == "cuda":
            rest, embeds = graphed_predictor(predictor, code0_embed.shape[0])(hidden, code0_embed)
        else:
            rest, embeds = predictor.predict(hidden, code0_embed, sampling, generator, cache)
        lo = 0
        for k, _, state, code0, c0_embed in group:
            b = code0.shape[0]
            codes = torch.cat([code0[:, None], rest[lo : lo + b]], dim=1)
            state.codec_embed = torch.cat([c0_embed, embeds[lo : lo + b]], dim=1).sum(1, keepdim=True)
            state.frames.append(codes)
            out[k] = codes
            lo += b


class StreamingCode2Wav:
    """Code2Wav frame by frame with left context only (:meth:`Code2Wav.stream`), one state per row."""

    def __init__(self, code2wav):
        self.code2wav = code2wav
        self.sample_rate = code2wav.cfg.sample_rate

    def new_state(self, batch: int) -> dict:
        return {"states": [self.code2wav.new_state() for _ in range(batch)], "closed": [False] * batch}

    def push(self, state: dict, codes, ended, final: bool, speaking) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        ended, speaking = ended.tolist(), speaking.tolist()
        for row in range(len(ended)):
            if state["closed"][row] or not speaking[row] or ended[row]:
                state["closed"][row] = state["closed"][row] or ended[row]
                out.append(None)
                continue
            wav, state["states"][row] = self.code2wav.stream(codes[row : row + 1].T[None], state["states"][row])
            out.append(wav[0, 0])
        return out

    @staticmethod
    def push_many(items: list[tuple]) -> list[list[torch.Tensor | None]]:
        """:meth:`push` of several requests whose stages share one Code2Wav (the engine's ``_vocode``): every
        speaking row's next frame is decoded in one :meth:`Code2Wav.stream_many` batch. ``items``: (stage,
        state, codes, ended, final, speaking) per request; returns each request's chunks per row."""
        out: list[list[torch.Tensor | None]] = []
        work = []  # (request, row, its frame [1, G, 1])
        for k, (_, state, codes, ended, _final, speaking) in enumerate(items):
            ended, speaking = ended.tolist(), speaking.tolist()
            out.append([None] * len(ended))
            for row in range(len(ended)):
                if state["closed"][row] or not speaking[row] or ended[row]:
                    state["closed"][row] = state["closed"][row] or ended[row]
                    continue
                work.append((k, row, codes[row : row + 1].T[None]))
        if work:
            code2wav = items[0][0].code2wav
            if any(item[0].code2wav is not code2wav for item in items):
                raise ValueError("push_many: the requests' stages must share one Code2Wav")
            done = code2wav.stream_many([w[2] for w in work], [items[k][1]["states"][row] for k, row, _ in work])
            for (k, row, _), (wav, st) in zip(work, done):
                items[k][1]["states"][row] = st
                out[k][row] = wav[0, 0]
        return out


class OfflineCode2Wav(StreamingCode2Wav):
    """Each utterance decoded at once when it ends (:meth:`Code2Wav.decode`)."""

    push_many = None  # whole utterances, one by one

    def new_state(self, batch: int) -> dict:
        return {"frames": [[] for _ in range(batch)], "closed": [False] * batch}

    def push(self, state: dict, codes, ended, final: bool, speaking) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        ended, speaking = ended.tolist(), speaking.tolist()
        for row in range(len(ended)):
            if state["closed"][row] or not speaking[row]:
                out.append(None)
                continue
            if not ended[row]:
                state["frames"][row].append(codes[row : row + 1])
            if not (ended[row] or final) or not state["frames"][row]:
                state["closed"][row] = ended[row] or final
                out.append(None)
                continue
            state["closed"][row] = True
            frames = torch.cat(state["frames"][row], dim=0)  # [n, G]
            out.append(self.code2wav.decode(frames.T[None])[0, 0])
        return out
