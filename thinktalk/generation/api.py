"""The generation entry points every model family shares: ``stream``, ``generate`` and ``speak``.

``model.stream(**kw)`` and ``model.generate(**kw)`` of both families are these functions: keyword
arguments are read by :func:`~thinktalk.generation.options.parse_generate_kwargs`, the family
supplies its speech stages (``model.speech_stages``), and the engine runs them
(:mod:`thinktalk.generation.engine`; here, an engine of the request's own).
"""

from __future__ import annotations

from collections.abc import Iterator

from thinktalk.generation.engine import collect, run
from thinktalk.generation.events import GenerateResult, StreamEvent
from thinktalk.generation.inputs import ModelInputs
from thinktalk.generation.options import GenerateOptions, SpeechParams, TextParams, parse_generate_kwargs


def _end_tokens(model, options: GenerateOptions) -> tuple[int, ...]:
    eos = options.text.eos_token_ids
    return tuple(model.eos_token_ids if eos is None else eos)


def stream(model, **kwargs) -> Iterator[StreamEvent]:
    """Events as they are produced: text deltas and (with speech) audio chunks, then ``done``.

    Speech is on with ``return_audio=True``, or when a ``speaker`` is named and the model speaks.
    Arguments are checked here, before the first event is asked for.
    """
    inputs, options = parse_generate_kwargs(kwargs, model.keywords, default_audio=model.has_speech, where="stream()")
    return run(model, inputs, options, streaming_audio=True)


def generate(model, **kwargs) -> GenerateResult:
    """Text (and with ``return_audio=True`` codes and waveforms) for processor inputs: :func:`stream` drained,
    with each utterance vocoded at once at its end (the reference's offline vocoder)."""
    inputs, options = parse_generate_kwargs(kwargs, model.keywords, default_audio=False, where="generate()")
    events = run(model, inputs, options, streaming_audio=False)
    return collect(model, events, _end_tokens(model, options))


def speak(
    model,
    inputs: ModelInputs,
    answer_ids: list[int],
    speaker: str | None = None,
    seed: int | None = None,
    max_new_codes: int | None = None,
    cancel=None,
    sampling=None,
) -> Iterator[StreamEvent]:
    """Text-to-speech: the Thinker reads ``answer_ids`` (then its end-of-turn token) as its answer after the
    prompt ``inputs`` — teacher forcing — and the Talker speaks what it read; streamed audio events, then done.

    The words spoken are the words given: nothing is generated that could paraphrase, refuse or drift.
    ``sampling`` (a :class:`~thinktalk.generation.sampling.SamplingParams`) replaces the family's Talker
    sampling (``SamplingParams()`` is greedy).
    """
    if not answer_ids:
        raise ValueError("the text has no tokens to speak")
    defaults = model.keywords.talker_sampling if sampling is None else sampling
    speech = SpeechParams(speaker=speaker, sampling=defaults, **({} if max_new_codes is None else {"max_new_tokens": max_new_codes}))
    end = int(model.eos_token_ids[0])  # <|im_end|>: the Thinker's end of turn
    options = GenerateOptions(text=TextParams(max_new_tokens=len(answer_ids) + 1), speech=speech, seed=seed, cancel=cancel)
    return run(model, inputs, options, streaming_audio=True, forced=[int(t) for t in answer_ids] + [end])
