"""Speech recognition and speech-to-English translation with a loaded Qwen-Omni model.

Neither is a separate model or decoder: the Thinker reads the audio together with an instruction and
answers in text, through the same ``generate`` (and, in the server, the same scheduler) as any chat turn.
What this module owns is the *prompt*, which differs per family, taken from the official material:

* **Qwen2.5-Omni** — the cookbook ``cookbooks/universal_audio_understanding.ipynb`` (QwenLM/Qwen2.5-Omni):
  a system turn "You are a speech recognition model." (translation: "You are a speech translation
  model."), then a user turn holding the instruction text *before* the audio. Its recognition
  instructions ask for text without punctuation ("Transcribe the English audio into text without any
  punctuation marks."; Chinese: "请将这段中文语音转换为纯文本，去掉标点符号。"), so this family's transcripts are
  unpunctuated, as in the cookbook.
* **Qwen3-Omni** — the README's "Setting for Evaluation" (QwenLM/Qwen3-Omni: default prompts, "no system
  prompt", the text *after* the media), whose layout the ``speech_translation`` cookbook follows:
  "Transcribe the <language> audio into text." (Chinese: "请将这段中文语音转换为纯文本。") and "Listen to the
  provided <language> speech and produce a translation in <language> text."

Without a ``language`` the same sentences are used without the language name ("Transcribe the audio
into text."): that form is ours, the official examples always name the language. A ``prompt`` (OpenAI's
"text to guide the style or continue a previous segment") becomes the system turn's text — the place
Qwen's own speech-recognition service (Qwen3-ASR) takes context, and where Qwen Cloud's guide tells
Qwen-Omni users to describe their domain; for Qwen2.5-Omni it follows the cookbook's system sentence.

Python API (attached to both model classes)::

    text = model.transcribe("q.wav", language="en")      # path, encoded bytes, or float samples at 16 kHz
    english = model.translate("frage.wav", language="de")
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any

TASKS = ("transcribe", "translate")
DEFAULT_MAX_NEW_TOKENS = 1024  # ~10 minutes of fast speech; the Python API warns when a transcript reaches it

# ISO-639-1 code (what OpenAI's `language` takes) -> the English name the prompts use. The first block
# is Qwen3-Omni's published speech-input languages; the rest are common languages Qwen2.5-Omni's and
# Qwen3-Omni's evaluations (Common Voice, FLEURS, CoVoST2) include.
LANGUAGES = {
    "en": "English", "zh": "Chinese", "yue": "Cantonese", "ko": "Korean", "ja": "Japanese", "de": "German",
    "ru": "Russian", "it": "Italian", "fr": "French", "es": "Spanish", "pt": "Portuguese", "ms": "Malay",
    "nl": "Dutch", "id": "Indonesian", "tr": "Turkish", "vi": "Vietnamese", "ar": "Arabic", "ur": "Urdu",
    "hi": "Hindi", "th": "Thai", "pl": "Polish", "sv": "Swedish", "cs": "Czech", "da": "Danish", "fi": "Finnish",
    "el": "Greek", "he": "Hebrew", "hu": "Hungarian", "ro": "Romanian", "uk": "Ukrainian", "fa": "Persian",
    "tl": "Filipino", "bn": "Bengali", "ta": "Tamil", "ca": "Catalan", "no": "Norwegian", "sk": "Slovak",
    "bg": "Bulgarian", "hr": "Croatian", "sr": "Serbian", "sl": "Slovenian", "lt": "Lithuanian", "lv": "Latvian",
    "et": "Estonian", "cy": "Welsh", "sw": "Swahili", "mn": "Mongolian", "kk": "Kazakh", "uz": "Uzbek",
}  # fmt: skip
_BY_NAME = {name.lower(): code for code, name in LANGUAGES.items()}


def language_name(language: str | None) -> str | None:
    """``"en"`` / ``"EN"`` / ``"english"`` / ``"zh-CN"`` -> ``"English"`` / ... ; ``None`` -> ``None``.

    An unknown language is a ``ValueError`` naming it (never guessed): the name goes into the prompt.
    """
    if language is None or not language.strip():
        return None
    key = language.strip().lower()
    if key in _BY_NAME:
        return LANGUAGES[_BY_NAME[key]]
    code = key.replace("_", "-").split("-")[0]  # "zh-CN", "pt_BR": the language, not the region
    if code in LANGUAGES:
        return LANGUAGES[code]
    raise ValueError(
        f"unknown language {language!r}: give an ISO-639-1 code or an English name "
        f"(known: {', '.join(sorted(LANGUAGES))})"
    )


@dataclass(frozen=True)
class ASRPrompt:
    """The parts of a speech-recognition / speech-translation request, per family (see the module docstring)."""

    system: str | None  # the system turn's text (None: no system turn)
    instruction: str  # the user turn's text
    text_first: bool  # the instruction precedes the audio in the user turn (Qwen2.5-Omni's cookbook)


def asr_prompt(family: str, task: str = "transcribe", language: str | None = None, prompt: str | None = None) -> ASRPrompt:
    """The official instruction for ``task`` in ``family``, with ``language`` named and ``prompt`` as context."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    name = language_name(language)
    context = prompt.strip() if prompt and prompt.strip() else None
    if family == "qwen2_5_omni":
        if task == "transcribe":
            if name == "Chinese":
                instruction = "请将这段中文语音转换为纯文本，去掉标点符号。"
            else:
                instruction = f"Transcribe the {name + ' ' if name else ''}audio into text without any punctuation marks."
            role = "You are a speech recognition model."
        else:
            instruction = f"Listen to the provided {name + ' ' if name else ''}speech and produce a translation in English text."
            role = "You are a speech translation model."
        return ASRPrompt(system=role if context is None else f"{role}\n{context}", instruction=instruction, text_first=True)
    if family == "qwen3_omni_moe":
        if task == "transcribe":
            instruction = "请将这段中文语音转换为纯文本。" if name == "Chinese" else f"Transcribe the {name + ' ' if name else ''}audio into text."
        else:
            instruction = f"Listen to the provided {name + ' ' if name else ''}speech and produce a translation in English text."
        return ASRPrompt(system=context, instruction=instruction, text_first=False)
    raise ValueError(f"speech recognition prompts are defined for qwen2_5_omni and qwen3_omni_moe, not {family!r}")


def asr_conversation(
    family: str, audio: Any, task: str = "transcribe", language: str | None = None, prompt: str | None = None
) -> list[dict]:
    """The conversation (DESIGN.md §2 format) that asks ``family``'s Thinker to transcribe/translate ``audio``.

    ``audio`` is anything a conversation's audio item takes: a path, encoded bytes, float samples at 16 kHz.
    """
    p = asr_prompt(family, task, language, prompt)
    text = {"type": "text", "text": p.instruction}
    sound = {"type": "audio", "audio": audio}
    conversation = [{"role": "user", "content": [text, sound] if p.text_first else [sound, text]}]
    if p.system is not None:
        conversation.insert(0, {"role": "system", "content": [{"type": "text", "text": p.system}]})
    return conversation


@functools.lru_cache(maxsize=4)
def _processor(directory: str):
    from thinktalk.processing import Processor

    return Processor.from_pretrained(directory)


def run(
    model, audio: Any, task: str, language: str | None = None, prompt: str | None = None, processor=None,
    **generate_kwargs: Any,
) -> str:  # fmt: skip
    """Transcribe or translate ``audio`` with ``model.generate`` (text only); returns the answer's text."""
    if generate_kwargs.pop("return_audio", False) or generate_kwargs.get("speaker") is not None:
        raise TypeError(f"{task} answers in text only: return_audio/speaker are not accepted")
    if processor is None:
        directory = getattr(model, "checkpoint_dir", None)
        if not directory:
            raise ValueError(f"this model was not loaded from a checkpoint directory: pass processor= to {task}()")
        processor = _processor(os.fspath(directory))
    inputs = processor(asr_conversation(model.family, audio, task, language, prompt))
    max_new = int(generate_kwargs.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    result = model.generate(**inputs, max_new_tokens=max_new, return_audio=False, **generate_kwargs)
    ids = result.text_ids[0].tolist()
    eos = set(int(t) for t in getattr(model, "eos_token_ids", ()))
    if not eos.intersection(ids):
        warnings.warn(f"the {task} answer stopped at max_new_tokens={max_new} before the model ended it; "
                      "pass a larger max_new_tokens", stacklevel=3)  # fmt: skip
    if result.text is not None:
        return result.text[0]
    cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    return processor.decode(ids[:cut])


def transcribe(model, audio: Any, language: str | None = None, prompt: str | None = None, **generate_kwargs: Any) -> str:
    """Speech -> text in the language spoken (``language``: an ISO-639-1 code or name, a hint put into the
    prompt). ``audio``: a path, encoded bytes, or float samples at 16 kHz. ``generate_kwargs`` go to
    ``model.generate`` (``max_new_tokens`` defaults to 1024; decoding is greedy unless ``do_sample=True``);
    ``processor=`` overrides the checkpoint directory's processor."""
    return run(model, audio, "transcribe", language, prompt, **generate_kwargs)


def translate(model, audio: Any, language: str | None = None, prompt: str | None = None, **generate_kwargs: Any) -> str:
    """Speech in any language -> English text (``language``: the *spoken* language, a hint); as :func:`transcribe`."""
    return run(model, audio, "translate", language, prompt, **generate_kwargs)
