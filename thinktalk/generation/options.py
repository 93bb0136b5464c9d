"""Typed generation options, and the keyword shim that reads ``generate()`` / ``stream()`` arguments.

The options are dataclasses: :class:`TextParams` (the Thinker), :class:`SpeechParams` (Talker and
vocoder) and :class:`GenerateOptions` around them. :func:`parse_generate_kwargs` turns keyword
arguments — thinktalk's names and the reference's spellings — into them, with one rule for both
families:

- an unprefixed option is the Thinker's (``max_new_tokens``, ``min_new_tokens``, ``do_sample``,
  ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``);
  the ``thinker_`` spelling of the same option wins over it;
- a ``talker_`` option is the Talker's (the same names, plus ``talker_system_ids`` for Qwen3-Omni);
  ``token2wav_`` options are Qwen2.5-Omni's vocoder's;
- a keyword that is none of these, or that the loaded family does not have, is a ``TypeError`` that
  names it.

Departures from the reference, on purpose: transformers 5.23 ignores an unprefixed ``max_new_tokens``
(its own ``thinker_max_new_tokens=1024`` wins) and, for Qwen2.5-Omni, also applies unprefixed
``min_new_tokens`` & co. to the Talker; here unprefixed options always mean the Thinker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from thinktalk.generation.inputs import INPUT_KEYS, ModelInputs
from thinktalk.generation.sampling import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 256
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
LENGTH_KEYS = ("max_new_tokens", "min_new_tokens", "eos_token_id", "pad_token_id")
# Options the reference accepts that only have one meaning here: accepted when they ask for it.
ONLY_VALUE = {"use_cache": True, "num_beams": 1, "num_return_sequences": 1}


@dataclass(frozen=True)
class TextParams:
    """How the Thinker writes its answer."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 0  # end tokens are suppressed before this many new tokens (as the reference)
    sampling: SamplingParams = SamplingParams()
    eos_token_ids: tuple[int, ...] | None = None  # None: the model's end-of-turn tokens
    pad_token_id: int | None = None  # filler after a row ended (default: its first end token)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}] (got {self.min_new_tokens})")


@dataclass(frozen=True)
class SpeechParams:
    """How the Talker speaks and the vocoder renders. ``None`` fields take the family's defaults."""

    speaker: str | None = None
    sampling: SamplingParams | None = None  # the Talker's (codebook 0); None: the family's default
    max_new_tokens: int = 4096  # codec tokens (Qwen2.5: 50 per second) / frames (Qwen3: 12.5 per second)
    min_new_tokens: int = 0
    eos_token_ids: tuple[int, ...] | None = None  # None: the family's codec end tokens
    # Qwen2.5-Omni Token2Wav
    num_steps: int = 10
    guidance_scale: float = 0.5
    sway_coefficient: float | None = -1.0
    noise: torch.Tensor | None = None  # [1|B, >= mel frames, mel_dim]: the DiT's starting noise
    stream_options: object | None = None  # token2wav.StreamOptions for the streamed DiT
    reference_quirks: bool = False  # transformers 5.23's unpadded-Talker behaviour (see qwen2_5_omni/talker.py)
    # Qwen3-Omni
    system_ids: torch.Tensor | None = None  # [1, S] token ids of the Talker's own system turn
    cuda_graphs: bool = True  # replay the greedy code predictor as a CUDA graph (CUDA only)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"talker_max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"talker_min_new_tokens must be in [0, talker_max_new_tokens] (got {self.min_new_tokens})")
        if self.num_steps < 2:
            raise ValueError(f"token2wav_num_steps must be >= 2 (got {self.num_steps})")


@dataclass(frozen=True)
class GenerateOptions:
    text: TextParams = field(default_factory=TextParams)
    speech: SpeechParams | None = None  # None: text only
    seed: int | None = None  # Thinker RNG = seed, Talker = seed + 1, Qwen2.5 DiT noise of row r = seed + r
    cancel: object | None = None  # anything with is_set() (a threading.Event): stop at the next step


@dataclass(frozen=True)
class FamilyKeywords:
    """What a family adds to the common keywords (its speech options, with their reference defaults)."""

    name: str
    talker_sampling: SamplingParams  # the reference's Talker defaults
    extra: tuple[str, ...] = ()  # family-only keywords (prefixed names)


def _tuple_of_ints(value, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    try:
        return tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a list of ints (got {type(value).__name__})") from None


def _sampling(values: Mapping, base: SamplingParams, suppress: tuple[int, ...] = ()) -> SamplingParams:
    return SamplingParams(
        do_sample=bool(values.get("do_sample", base.do_sample)),
        temperature=float(values.get("temperature", base.temperature)),
        top_k=int(values.get("top_k", base.top_k) or 0),
        top_p=float(values.get("top_p", base.top_p)),
        repetition_penalty=float(values.get("repetition_penalty", base.repetition_penalty)),
        suppress_tokens=suppress or base.suppress_tokens,
    )


def parse_generate_kwargs(
    kwargs: dict, family: FamilyKeywords, default_audio: bool, where: str = "generate()"
) -> tuple[ModelInputs, GenerateOptions]:
    """Read ``generate()`` / ``stream()`` keyword arguments; anything not understood is a TypeError."""
    rest = dict(kwargs)
    use_audio_in_video = bool(rest.pop("use_audio_in_video", False))
    inputs = ModelInputs.from_dict({k: rest.pop(k) for k in list(rest) if k in INPUT_KEYS}, use_audio_in_video)
    for key, only in ONLY_VALUE.items():
        if key in rest and rest.pop(key) != only:
            raise TypeError(f"{where}: {key} other than {only!r} is not supported")

    thinker: dict = {}
    talker: dict = {}
    for key in SAMPLING_KEYS + LENGTH_KEYS:
        if key in rest:
            thinker[key] = rest.pop(key)
    for key in SAMPLING_KEYS + LENGTH_KEYS:
        if f"thinker_{key}" in rest:
            thinker[key] = rest.pop(f"thinker_{key}")
        if f"talker_{key}" in rest:
            talker[key] = rest.pop(f"talker_{key}")

    eos = thinker.get("eos_token_id")
    text = TextParams(
        max_new_tokens=int(thinker.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
        min_new_tokens=int(thinker.get("min_new_tokens", 0) or 0),
        sampling=_sampling(thinker, SamplingParams()),
        eos_token_ids=None if eos is None else _tuple_of_ints(eos, "eos_token_id"),
        pad_token_id=thinker.get("pad_token_id"),
    )

    return_audio = rest.pop("return_audio", None)
    mode = rest.pop("generation_mode", None)
    if return_audio is None and mode is not None:
        if mode not in ("text", "audio"):
            raise ValueError(f"generation_mode must be 'text' or 'audio' (got {mode!r})")
        return_audio = mode == "audio"
    speaker = rest.pop("speaker", None)
    if return_audio is None:
        return_audio = default_audio and speaker is not None

    speech_kw = {}
    families = {"token2wav_num_steps": "num_steps", "token2wav_guidance_scale": "guidance_scale",
                "token2wav_sway_coefficient": "sway_coefficient", "noise": "noise", "stream_options": "stream_options",
                "reference_quirks": "reference_quirks", "talker_system_ids": "system_ids",
                "talker_cuda_graphs": "cuda_graphs"}  # fmt: skip
    for key, name in families.items():
        if key in rest:
            if key not in family.extra:
                raise TypeError(f"{where}: '{key}' is not an option of {family.name}")
            speech_kw[name] = rest.pop(key)
    seed = rest.pop("seed", None)
    cancel = rest.pop("cancel", None)
    if rest:
        raise TypeError(f"unexpected {where} arguments: {', '.join(sorted(rest))}")

    speech = None
    if return_audio:
        if "system_ids" in speech_kw and speech_kw["system_ids"] is not None:
            speech_kw["system_ids"] = torch.as_tensor(speech_kw["system_ids"]).view(1, -1)
        for name in ("num_steps",):
            if name in speech_kw:
                speech_kw[name] = int(speech_kw[name])
        for name in ("guidance_scale",):
            if name in speech_kw:
                speech_kw[name] = float(speech_kw[name])
        for name in ("reference_quirks", "cuda_graphs"):
            if name in speech_kw:
                speech_kw[name] = bool(speech_kw[name])
        talker_eos = talker.get("eos_token_id")
        if "pad_token_id" in talker:
            raise TypeError(f"{where}: talker_pad_token_id is not an option (finished rows repeat the codec pad)")
        speech = SpeechParams(
            speaker=speaker,
            sampling=_sampling(talker, family.talker_sampling),
            max_new_tokens=int(talker.get("max_new_tokens", 4096)),
            min_new_tokens=int(talker.get("min_new_tokens", 0) or 0),
            eos_token_ids=None if talker_eos is None else _tuple_of_ints(talker_eos, "talker_eos_token_id"),
            **speech_kw,
        )
    if seed is not None:
        seed = int(seed)
        if not 0 <= seed < 2**63 - 1:
            raise ValueError(f"seed must be in [0, 2**63 - 1) (got {seed})")
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise TypeError(f"{where}: cancel must have an is_set() method (e.g. a threading.Event)")
    return inputs, GenerateOptions(text=text, speech=speech, seed=seed, cancel=cancel)
