"""Text-to-speech through the Talker, without asking the Thinker to "repeat after me".

The Talker does not read text: it reads what the Thinker *read* while writing its answer — at answer
token k, the Thinker's last hidden state plus the token's embedding (see talker.py). So the honest way
to speak a given text is to make that text the Thinker's answer by **teacher forcing**: the Thinker
reads a prompt (a user turn holding the text, "Read the following text aloud."), and instead of
sampling its answer, it is fed the text's own token ids followed by ``<|im_end|>``, one decode step
per token, exactly as if it had chosen them. The hidden states it produces along the way are then
those of a Thinker answering with this text, and the unchanged Talker + Token2Wav speak them. The
words spoken are the words given — nothing is generated that could paraphrase, refuse or drift.

The forcing itself is the shared driver's (:func:`thinktalk.generation.api.speak`): the Thinker stage
reads given tokens instead of chosen ones, so both families speak through their unchanged stages.
"""

from __future__ import annotations

from collections.abc import Iterator

from thinktalk.generation import api
from thinktalk.generation.events import StreamEvent
from thinktalk.generation.inputs import ModelInputs

READ_ALOUD_PROMPT = "Read the following text aloud."


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


def speak(
    model, inputs: dict, answer_ids: list[int], voice: str | None, seed: int | None = None, max_codes: int | None = None
) -> Iterator[StreamEvent]:
    """Audio events (then "done") of ``voice`` speaking ``answer_ids`` after the prompt ``inputs`` (either family)."""
    if not getattr(model, "has_speech", False):
        raise ValueError("this checkpoint has no Talker/vocoder weights")
    return api.speak(model, ModelInputs.from_dict(inputs), answer_ids, voice, seed, max_codes)
