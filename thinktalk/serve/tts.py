"""Text-to-speech through the Talker, without asking the Thinker to "repeat after me".

The Talker does not read text: it reads what the Thinker *read* while writing its answer — at answer
token k, the Thinker's last hidden state plus the token's embedding (see talker.py). So the honest way
to speak a given text is to make that text the Thinker's answer by **teacher forcing**: the Thinker
reads a prompt (a user turn holding the text, "Read the following text aloud."), and instead of
sampling its answer, it is fed the text's own token ids followed by ``<|im_end|>``, one decode step
per token, exactly as if it had chosen them. The hidden states it produces along the way are then
those of a Thinker answering with this text, and the unchanged Talker + Token2Wav speak them. The
words spoken are the words given — nothing is generated that could paraphrase, refuse or drift.

:class:`ForcedThinkerSession` is a :class:`ThinkerSession` whose choice of the next token is the given
one; :func:`speak` runs the Qwen2.5-Omni speech stages of ``models/qwen2_5_omni/speech.py`` over it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from thinktalk.generation.api import StreamEvent
from thinktalk.generation.sampling import SamplingParams
from thinktalk.generation.thinker import MEDIA_KEYS, TextStep, ThinkerSession

READ_ALOUD_PROMPT = "Read the following text aloud."
IM_END = "<|im_end|>"


def tts_conversation(text: str, system_prompt: str | None) -> list[dict]:
    """The prompt the forced answer follows: the text is in the user turn, so the Thinker's states carry it."""
    conversation = [{"role": "user", "content": [{"type": "text", "text": f"{READ_ALOUD_PROMPT}\n{text}"}]}]
    if system_prompt:
        conversation.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    return conversation


def answer_token_ids(processor, text: str) -> list[int]:
    """The text as the Thinker would have written it: its token ids (the end token is added by the session)."""
    ids = list(processor.tokenizer.encode(text))
    if not ids:
        raise ValueError("the text has no tokens to speak")
    return ids


class ForcedThinkerSession(ThinkerSession):
    """A ThinkerSession that reads ``answer_ids`` + the end token as its answer (teacher forcing).

    Steps, states and the KV cache are exactly those of a session that happened to choose these tokens;
    only the choice differs. Batch size 1.
    """

    def __init__(self, thinker, inputs: dict, answer_ids: list[int], end_token_id: int, keep_layers=(0, -1)):
        super().__init__(thinker, inputs, max_new_tokens=len(answer_ids) + 1, sampling=SamplingParams(),
                         eos_token_ids=(end_token_id,), keep_layers=keep_layers)  # fmt: skip
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("teacher-forced speech takes one conversation at a time")
        self.forced = [int(t) for t in answer_ids] + [int(end_token_id)]

    @torch.inference_mode()
    def __iter__(self) -> Iterator[TextStep]:
        th = self.thinker
        device = th.lm_head.weight.device
        input_ids = self.inputs["input_ids"].to(device)
        mask = self.inputs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
        media = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.inputs.items() if k in MEDIA_KEYS}
        emb = th.embed(input_ids, mask, use_audio_in_video=self.use_audio_in_video, **media)
        self.cache = th.model.new_cache(1, input_ids.shape[1] + self.max_new_tokens)
        _, out = th.decode(emb.inputs_embeds, emb.position_ids, mask, self.cache, True, logits_to_keep=1,
                           **getattr(emb, "decoder_kwargs", {}))  # fmt: skip
        states = self._states(out)
        last_pos = emb.position_ids[:, :, -1:].to(device)
        for step, token in enumerate(self.forced):
            tok = torch.tensor([token], device=device)
            finished = torch.tensor([token == self.forced[-1] and step == len(self.forced) - 1], device=device)
            self.generated.append(tok)
            yield TextStep(index=step, tokens=tok, finished=finished, states=states)
            if bool(finished.all()) or self.cancelled:
                return
            last_pos = last_pos + 1
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            _, out = th.decode(th.model.embed_tokens(tok[:, None]), last_pos, mask, self.cache, True, logits_to_keep=1)
            states = self._states(out)


def speak(
    model, inputs: dict, answer_ids: list[int], voice: str | None, seed: int | None = None, max_codes: int | None = None
) -> Iterator[StreamEvent]:
    """Audio events (then "done") of ``voice`` speaking ``answer_ids`` after the prompt ``inputs``."""
    if getattr(model, "family", None) != "qwen2_5_omni":
        raise ValueError(f"text-to-speech is implemented for Qwen2.5-Omni only (this model is {model.family})")
    if not getattr(model, "has_speech", False):
        raise ValueError("this checkpoint has no Talker/Token2Wav weights")
    # The speech stages of Qwen2.5-Omni; their session takes any ThinkerSession (here, a forced one).
    from thinktalk.models.qwen2_5_omni import speech
    from thinktalk.models.qwen2_5_omni.speakers import speaker_params

    start = time.perf_counter()
    end_token = int(model.eos_token_ids[0])  # <|im_end|>: the Thinker's end of turn
    forced = ForcedThinkerSession(model.thinker, inputs, answer_ids, end_token)
    options = speech.speech_options({} if max_codes is None else {"talker_max_new_tokens": max_codes}, seed)
    _, params = speaker_params(model.speakers, voice, getattr(model, "checkpoint_dir", None))
    sp = speech.SpeechSession(thinker=forced, options=options, speaker=params)
    t2w = model.token2wav
    talker_eos = model.talker.eos_token_ids
    stream = None
    for kind, item in speech.run_stages(model, sp, interleave=True):
        if kind == "text":
            yield StreamEvent(kind="text", text="", token_ids=[int(item.tokens[0])], time=time.perf_counter() - start)
            continue
        code = int(item[0])
        ended = code in talker_eos or sp.talker.done
        if stream is None:
            stream = t2w.stream_start(params["cond"], params["ref_mel"], options.num_steps, options.guidance_scale,
                                      None, options.sway_coefficient, speech.noise_generator(options, 0),
                                      options.stream)  # fmt: skip
        piece = None if code in talker_eos else item[0:1]
        chunk = t2w.stream_push(stream, piece, final=ended)
        if chunk.numel():
            yield StreamEvent(kind="audio", audio=chunk.float().cpu(), sample_rate=t2w.sample_rate,
                              time=time.perf_counter() - start)  # fmt: skip
        if ended:
            break
    yield StreamEvent(kind="done", time=time.perf_counter() - start)
