"""Teacher-forced Talker training: the Talker's inputs built from what the Thinker read, as at inference.

At inference (:mod:`thinktalk.generation.reply`) Talker input ``j`` is answer token ``j`` as the Thinker read
it; after the ``A`` answer tokens it reads the family's text-end embedding once and its text-pad embedding
forever. Training rebuilds exactly that sequence from a data row: the prompt (``add_generation_prompt``)
followed by the answer's text tokens is run once through the frozen Thinker (its hidden states at every
position are those the generation's prefill and decode steps report: the computation is causal), then:

* **Qwen2.5-Omni** (:mod:`thinktalk.models.qwen2_5_omni.talker`): the prompt of
  :func:`~thinktalk.models.qwen2_5_omni.talker.prompt_embeds` (T + 2 positions, the last predicting code 0),
  then step ``k`` = 1 .. N reads ``embed(code_{k-1}) + R_k``. Targets: code 0 .. N-1, then codec eos.
* **Qwen3-Omni** (:mod:`thinktalk.models.qwen3_omni.talker`): the prompt of :meth:`Talker.build_prompt`, then
  step ``j`` = 1 .. N reads the sum of frame ``j-1``'s G code embeddings plus ``text_projection`` of answer
  token ``j`` (``tts_eos`` / ``tts_pad`` past the answer). Targets: codebook 0 of frames 0 .. N-1, then codec
  eos; the code predictor is teacher-forced on every frame from the Talker's hidden state that predicted
  its codebook 0 (:meth:`CodePredictor.forward`), codebooks 1 .. G-1.

Targets are the row's codec ids: Qwen2.5 ``codes`` = [N] ids of the Talker's codebook; Qwen3 ``codes`` =
[N][16] frames, or (without ``codes``) ``speech`` = an audio file encoded by a Mimi checkpoint or the
project's codec (``codec_model``); DPO's ``chosen``/``rejected`` take either form. :func:`sequence_logprobs` returns per-target log-probabilities, so the losses
(cross-entropy, DPO) are sums over them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from thinktalk.train.data import IGNORE, MEDIA_KEYS, Batch, Example, Row, conversation, encode_prompt, split_prompt


@dataclass
class SpeechRow:
    """What a row adds to its Example for Talker training (``Example.extra["speech"]``)."""

    prompt_len: int  # T: tokens of the prompt (ending with the generation prompt)
    answer_len: int  # A: answer tokens the Thinker reads
    codes: dict[str, torch.Tensor]  # name ("codes", "chosen", "rejected") -> [N] (Qwen2.5) or [N, G] (Qwen3)


# -- target codes ------------------------------------------------------------------------------------


class CodeSource:
    """Turns a row's codec field (ids, or an audio file for Qwen3) into checked codes of the model's shape."""

    def __init__(self, model, codec_model: str = "", speech_key: str = "speech"):
        self.family = model.family
        self.speech_key = speech_key or "speech"
        talker = model.talker
        if talker is None:
            raise ValueError("Talker training needs a checkpoint with a Talker (enable_audio_output / talker weights)")
        if self.family == "qwen2_5_omni":
            c = talker.cfg
            self.groups = 1
            # The codec ids the DiT decodes; the special ids (pad, bos, eos, mask ...) sit above them.
            self.vocab = min(c.tts_codec_pad_token_id, c.tts_codec_start_token_id, c.tts_codec_end_token_id,
                             c.tts_codec_mask_token_id)  # fmt: skip
            if model.cfg.token2wav is not None:  # and those Token2Wav can decode
                self.vocab = min(self.vocab, model.cfg.token2wav.dit.num_embeds)
        else:
            self.groups = talker.cfg.code_predictor.num_code_groups
            self.vocab = talker.cfg.code_predictor.vocab_size
        self.codec_model = codec_model
        self._encoder = None

    def _encode_audio(self, row: Row, value, key: str) -> torch.Tensor:
        if self.family != "qwen3_omni_moe":
            raise row.error(f"'{key}' as audio needs a Qwen3-Omni model (Qwen2.5-Omni's codec encoder is not "
                            "released): give the Talker's codec ids as a list")  # fmt: skip
        if not self.codec_model:
            raise row.error(
                f"'{key}' is an audio file: set codec_model to a Mimi checkpoint or a codec of thinktalk.codec"
            )
        path = value if os.path.isabs(value) else os.path.join(os.path.dirname(os.path.abspath(row.path)), value)
        if not os.path.exists(path):
            raise row.error(f"'{key}': audio file '{value}' not found (looked for {path})")
        from thinktalk.processing.media import load_audio

        encoder = self.encoder()
        if encoder[0] == "mimi":
            from thinktalk.codec import qwen3_codes

            wav = load_audio(path, target_rate=encoder[1].cfg.sampling_rate)
            codes = qwen3_codes(encoder[1], wav, encoder[1].cfg.sampling_rate)  # [16, frames]
        else:
            codec = encoder[1]
            wav = torch.as_tensor(load_audio(path, target_rate=codec.cfg.sample_rate), dtype=torch.float32)
            codes = codec.encode(wav.reshape(1, 1, -1))[0]
        return codes.T.contiguous()

    def encoder(self):
        if self._encoder is None:
            import json

            with open(os.path.join(self.codec_model, "config.json"), encoding="utf-8") as fh:
                kind = json.load(fh).get("model_type")
            if kind == "mimi":
                from thinktalk.codec import load_mimi

                self._encoder = ("mimi", load_mimi(self.codec_model))
            else:
                from thinktalk.codec import load_codec

                self._encoder = ("codec", load_codec(self.codec_model).eval())
        return self._encoder

    def __call__(self, row: Row, key: str) -> torch.Tensor:
        value = row.data.get(key)
        sk = self.speech_key
        if value is None and key == "codes" and isinstance(row.data.get(sk), str):
            key, value = sk, row.data[sk]  # the recording, encoded
        if value is None:
            hint = f" or '{sk}' (an audio file)" if key == "codes" else " (or an audio file)"
            raise row.error(f"the row needs '{key}': the target codec ids{hint}")
        if isinstance(value, str):
            codes = self._encode_audio(row, value, key)
        else:
            try:
                codes = torch.tensor(value, dtype=torch.long)
            except (TypeError, ValueError):
                raise row.error(f"'{key}' must be a list of codec ids (integers)") from None
        if self.groups == 1:
            if codes.dim() != 1:
                raise row.error(f"'{key}': Qwen2.5-Omni codes are a flat list of ids, got shape {list(codes.shape)}")
        elif codes.dim() != 2 or codes.shape[1] != self.groups:
            raise row.error(f"'{key}': Qwen3-Omni codes are frames of {self.groups} ids ([[c0, ..., c{self.groups - 1}], ...]), "
                            f"got shape {list(codes.shape)}")  # fmt: skip
        if codes.shape[0] == 0:
            raise row.error(f"'{key}' is empty: nothing to speak")
        if int(codes.min()) < 0 or int(codes.max()) >= self.vocab:
            raise row.error(
                f"'{key}': codec ids must lie in 0 .. {self.vocab - 1} (got {int(codes.min())} .. {int(codes.max())})"
            )
        return codes


# -- rows --------------------------------------------------------------------------------------------


def answer_text(row: Row) -> str:
    _, answer = split_prompt(conversation(row))
    if answer is None:
        raise row.error("Talker training needs the spoken answer as the last (assistant) turn")
    content = answer["content"]
    if isinstance(content, list):
        texts = [c.get("text", "") for c in content if c.get("type") == "text"]
        if len(texts) != len(content):
            raise row.error("the assistant turn to speak must be text")
        content = "".join(texts)
    if not content:
        raise row.error("the assistant turn is empty: an empty answer has no speech")
    return content


def encode_speech_row(recipe, row: Row, code_keys: tuple[str, ...], codes: CodeSource) -> Example:
    """The prompt + the answer's tokens as one Example (no text labels) with the target codes attached."""
    proc = recipe.processor
    prompt = encode_prompt(proc, row, recipe.positions, recipe.cfg.max_length, recipe.cfg.use_audio_in_video)
    answer = torch.tensor(proc.tokenizer.encode(answer_text(row)), dtype=torch.long)
    ids = torch.cat([prompt.input_ids, answer])
    if ids.shape[0] > recipe.cfg.max_length:
        raise row.error(
            f"{ids.shape[0]} tokens, longer than max_length={recipe.cfg.max_length} (rows are never truncated)"
        )
    positions = recipe.positions(ids[None], prompt.media, recipe.cfg.use_audio_in_video)
    speech = SpeechRow(prompt.length, int(answer.shape[0]), {k: codes(row, k) for k in code_keys})
    return Example(ids, torch.full_like(ids, IGNORE), positions, prompt.media, row, extra={"speech": speech})


# -- the Thinker's states -----------------------------------------------------------------------------


@torch.no_grad()
def thinker_states(thinker, batch: Batch, layers: tuple[int, ...], use_audio_in_video: bool) -> dict[int, torch.Tensor]:
    """The frozen Thinker's hidden states ``layer -> [B, T, H]`` over the batch (0 = input embeddings)."""
    inputs = batch.inputs
    mask = inputs["attention_mask"]
    media = {k: inputs[k] for k in MEDIA_KEYS if k in inputs}
    emb = thinker.embed(inputs["input_ids"], (mask > 0).long(), use_audio_in_video=use_audio_in_video, **media)
    extra = getattr(emb, "decoder_kwargs", {})
    out = thinker.model(emb.inputs_embeds, batch.position_ids.to(emb.inputs_embeds.device), attention_mask=mask,
                        output_hidden_states=True, **extra)  # fmt: skip
    return {layer: out.hidden_states[layer].detach() for layer in layers}


def row_states(states: dict[int, torch.Tensor], i: int, length: int) -> dict[int, torch.Tensor]:
    return {layer: s[i : i + 1, :length] for layer, s in states.items()}


# -- Talker sequences -----------------------------------------------------------------------------------


@dataclass
class TalkerSequence:
    """One teacher-forced Talker sequence: inputs, positions, and which positions predict which code."""

    embeds: torch.Tensor  # [L, D] (Qwen2.5: Thinker width, before thinker_to_talker_proj)
    positions: torch.Tensor  # [3, L]
    targets: torch.Tensor  # [N + 1]: codebook 0 of every frame, then the codec end token
    start: int  # the position predicting targets[0]; targets[k] is predicted at start + k
    codes: torch.Tensor  # [N] or [N, G]


def _media_for_talker(ex: Example, cfg_ids: tuple[int, int, int], use_audio_in_video: bool, T: int):
    ids = ex.input_ids[:T]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for key, token in zip(("input_features", "pixel_values", "pixel_values_videos"), cfg_ids):
        if key in ex.media:
            mask |= ids == token
    fam = ex.media.get("feature_attention_mask")
    media = {
        "image_grid_thw": ex.media.get("image_grid_thw"),
        "video_grid_thw": ex.media.get("video_grid_thw"),
        "audio_feature_lengths": fam.sum(-1) if fam is not None else None,
        "video_second_per_grid": ex.media.get("video_second_per_grid"),
        "use_audio_in_video": use_audio_in_video,
    }
    return mask[None], media


def qwen25_sequence(talker, thinker_embed, ex: Example, states: dict[int, torch.Tensor], codes: torch.Tensor,
                    speaker_bos: int, use_audio_in_video: bool) -> TalkerSequence:  # fmt: skip
    from thinktalk.models.qwen2_5_omni.talker import prompt_embeds

    sp: SpeechRow = ex.extra["speech"]
    T, A, N = sp.prompt_len, sp.answer_len, codes.shape[0]
    cfg = talker.cfg
    device = states[0].device
    media_mask, media = _media_for_talker(ex, (cfg.audio_token_index, cfg.image_token_index, cfg.video_token_index),
                                          use_audio_in_video, T)  # fmt: skip
    reads = states[-1][:, T : T + A] + states[0][:, T : T + A]  # R_0 .. R_{A-1}
    prompt_ids = ex.input_ids[None, :T].to(device)
    prompt = prompt_embeds(
        talker,
        thinker_embed,
        prompt_ids,
        {0: states[0][:, :T], -1: states[-1][:, :T]},
        media_mask,
        reads[:, :1],
        ex.input_ids[T : T + 1].to(device),
        speaker_bos,
        None,
        False,
        **media,
    )
    special = thinker_embed(torch.tensor([cfg.tts_text_end_token_id, cfg.tts_text_pad_token_id], device=device))
    text = [reads[0, k] if k < A else special[0 if k == A else 1] for k in range(1, N + 1)]
    codes = codes.to(device)
    steps = talker.embed_codes(codes) + torch.stack(text).to(prompt.inputs_embeds.dtype)  # step k reads code k-1
    embeds = torch.cat([prompt.inputs_embeds[0], steps])
    last = prompt.position_ids[:, 0, -1:]
    positions = torch.cat([prompt.position_ids[:, 0], last + torch.arange(1, N + 1, device=last.device)], dim=1)
    targets = torch.cat([codes, codes.new_tensor([cfg.tts_codec_end_token_id])])
    return TalkerSequence(embeds, positions, targets, T + 1, codes)


def qwen3_sequence(model, talker, ex: Example, states: dict[int, torch.Tensor], codes: torch.Tensor,
                   speaker_id: int) -> TalkerSequence:  # fmt: skip
    sp: SpeechRow = ex.extra["speech"]
    T, A, N = sp.prompt_len, sp.answer_len, codes.shape[0]
    cfg = model.cfg
    thinker = model.thinker
    device = states[0].device
    embed = thinker.model.embed_tokens
    specials = embed(torch.tensor([[cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id]], device=device))
    special_embeds = tuple(specials.split(1, dim=1))
    layer = talker.cfg.accept_hidden_layer
    media = {k: ex.media[k] for k in ("image_grid_thw", "video_grid_thw", "video_second_per_grid", "feature_attention_mask")
             if k in ex.media}  # fmt: skip
    prompt = talker.build_prompt(
        input_ids=ex.input_ids[None, :T].to(device),
        attention_mask=None,
        thinker_embeds=states[0][:, :T],
        thinker_hidden=states[layer][:, :T],
        answer_embeds=states[0][:, T : T + 1],
        special_embeds=special_embeds,
        speaker_id=speaker_id,
        ids={
            "im_start": cfg.im_start_token_id,
            "user": cfg.user_token_id,
            "assistant": cfg.assistant_token_id,
            "tts_pad": cfg.tts_pad_token_id,
        },  # fmt: skip
        media=media,
        n_window=thinker.cfg.audio.n_window,
    )
    codes = codes.to(device)
    predictor = talker.code_predictor
    frames = talker.model.codec_embedding(codes[:, 0])
    for g in range(1, codes.shape[1]):
        frames = frames + predictor.model.codec_embedding[g - 1](codes[:, g])
    tts_eos, tts_pad = talker.text_projection(special_embeds[1])[0, 0], talker.text_projection(special_embeds[2])[0, 0]
    answer = talker.text_projection(states[0][0, T + 1 : T + A]) if A > 1 else frames.new_zeros(0, frames.shape[-1])
    text = [answer[j - 1] if j < A else (tts_eos if j == A else tts_pad) for j in range(1, N + 1)]
    steps = frames + torch.stack(text).to(frames.dtype)  # step j reads frame j-1
    embeds = torch.cat([prompt.embeds[0], steps])
    p = prompt.embeds.shape[1]
    last = prompt.position_ids[:, 0, -1:]
    positions = torch.cat([prompt.position_ids[:, 0], last + torch.arange(1, N + 1, device=last.device)], dim=1)
    targets = torch.cat([codes[:, 0], codes.new_tensor([talker.cfg.codec_eos_token_id])])
    return TalkerSequence(embeds, positions, targets, p - 1, codes)


# -- scoring ---------------------------------------------------------------------------------------------


@dataclass
class SequenceScores:
    codec: list[torch.Tensor]  # per sequence: log p of its targets [N + 1] (codebook 0 + the end token)
    predictor: list[torch.Tensor] | None = None  # Qwen3: log p of codebooks 1 .. G-1 per frame [N, G-1]

    def totals(self) -> torch.Tensor:
        """Summed log-probability of every sequence [S] (all codebooks)."""
        out = [c.sum() for c in self.codec]
        if self.predictor is not None:
            out = [a + p.sum() for a, p in zip(out, self.predictor)]
        return torch.stack(out)


def _pad(seqs: list[TalkerSequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    longest = max(s.embeds.shape[0] for s in seqs)
    b, d = len(seqs), seqs[0].embeds.shape[-1]
    ref = seqs[0].embeds
    embeds = ref.new_zeros(b, longest, d)
    positions = torch.ones(3, b, longest, dtype=seqs[0].positions.dtype, device=ref.device)
    mask = torch.zeros(b, longest, dtype=torch.long, device=ref.device)
    rows = []
    for i, s in enumerate(seqs):
        n = s.embeds.shape[0]
        rows.append(F.pad(s.embeds, (0, 0, 0, longest - n)))
        positions[:, i, :n] = s.positions
        mask[i, :n] = 1
    embeds = torch.stack(rows)
    return embeds, positions, mask


def sequence_logits(model, talker, seqs: list[TalkerSequence]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Teacher-forced logits of every sequence (one padded Talker forward): per sequence the codebook-0 logits
    [N + 1, V] at the positions predicting its targets and (Qwen3) the code predictor's [N, G-1, V']."""
    embeds, positions, mask = _pad(seqs)
    if model.family == "qwen2_5_omni":
        logits = talker(embeds, positions, mask)
        hidden = None
    else:
        hidden = talker.model(embeds, positions, mask).last_hidden_state
        logits = None
    codec, predictor = [], []
    for i, s in enumerate(seqs):
        span = slice(s.start, s.start + s.targets.shape[0])
        codec.append(logits[i, span] if logits is not None else talker.codec_head(hidden[i, span]).float())
        if hidden is not None:
            h = hidden[i, s.start : s.start + s.codes.shape[0]][:, None]
            predictor.append(talker.code_predictor(h, s.codes, talker.model.codec_embedding).float())
    return codec, (predictor if hidden is not None else None)


def sequence_logprobs(model, talker, seqs: list[TalkerSequence]) -> SequenceScores:
    """Teacher-forced log-probabilities of every sequence's targets under ``talker``."""
    codec_logits, predictor_logits = sequence_logits(model, talker, seqs)
    codec = [lg.log_softmax(-1).gather(-1, s.targets[:, None])[:, 0] for lg, s in zip(codec_logits, seqs)]
    if predictor_logits is None:
        return SequenceScores(codec, None)
    predictor = [lg.log_softmax(-1).gather(-1, s.codes[:, 1:, None])[..., 0] for lg, s in zip(predictor_logits, seqs)]
    return SequenceScores(codec, predictor)
