"""Tokenizer and chat template of a checkpoint directory, with the ``tokenizers`` and ``jinja2`` libraries.

The tokenizer is the checkpoint's byte-level BPE: ``tokenizer.json`` when present, otherwise
``vocab.json`` + ``merges.txt`` with Qwen2's pre-tokenizer (NFC, the Qwen split regex, byte level),
plus the added tokens of ``tokenizer_config.json``. Qwen tokenizers add no BOS/EOS when encoding.

The chat template comes from ``chat_template.jinja``, ``chat_template.json``, ``processor_config.json``
or ``tokenizer_config.json`` (first found), and is rendered like transformers renders it: a sandboxed
jinja2 environment with ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception``, a ``tojson`` that keeps
non-ASCII text, ``strftime_now``, loop controls, and a no-op ``{% generation %}`` block; the special
tokens (``eos_token``, ``pad_token``...) are template variables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The placeholder/boundary tokens of each family, by the names the reference reads off its tokenizer.
FAMILY_MM_TOKENS = {
    "qwen2_5_omni": {
        "image_token": "<|IMAGE|>",
        "audio_token": "<|AUDIO|>",
        "video_token": "<|VIDEO|>",
        "vision_bos_token": "<|vision_bos|>",
        "vision_eos_token": "<|vision_eos|>",
        "audio_bos_token": "<|audio_bos|>",
        "audio_eos_token": "<|audio_eos|>",
    },
    "qwen3_omni_moe": {
        "image_token": "<|image_pad|>",
        "audio_token": "<|audio_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
        "audio_bos_token": "<|audio_start|>",
        "audio_eos_token": "<|audio_end|>",
    },
}

_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


class Tokenizer:
    """A checkpoint's tokenizer: ``encode``, ``decode``, special-token ids and the multimodal token names."""

    def __init__(self, backend, config: dict[str, Any] | None = None, family: str | None = None):
        self.backend = backend  # a tokenizers.Tokenizer
        self._plain = None  # the same tokenizer with special tokens read as text (made on first use)
        self._special_strings: list[str] | None = None
        self.config = dict(config or {})
        mm = dict(FAMILY_MM_TOKENS.get(family or "", {}))
        for key in list(mm) + [k for k in self.config if k.endswith("_token") and k not in _NAMED_SPECIALS]:
            value = _token_content(self.config.get(key))
            if value is not None:
                mm[key] = value
        self.mm_tokens = mm
        self.special_tokens = {k: _token_content(self.config.get(k)) for k in _NAMED_SPECIALS}
        if self.special_tokens["pad_token"] is None and self.backend.token_to_id("<|endoftext|>") is not None:
            self.special_tokens["pad_token"] = "<|endoftext|>"

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, family: str | None = None) -> Tokenizer:
        from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE

        directory = os.fspath(directory)
        config_path = os.path.join(directory, "tokenizer_config.json")
        config = _read_json(config_path) if os.path.exists(config_path) else {}
        tokenizer_json = os.path.join(directory, "tokenizer.json")
        if os.path.exists(tokenizer_json):
            backend = HFTokenizer.from_file(tokenizer_json)
        else:
            vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
            if not (os.path.exists(vocab) and os.path.exists(merges)):
                raise FileNotFoundError(
                    f"{directory!r} has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt"
                )
            backend = HFTokenizer(BPE.from_file(vocab, merges, unk_token=None, fuse_unk=False))
            backend.normalizer = normalizers.NFC()
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
            backend.decoder = decoders.ByteLevel()
        # Added tokens in id order: tokens missing from the vocabulary get the next ids (how the official
        # vocab.json + tokenizer_config.json pair defines them); present ones keep theirs. Adding an
        # already added token is a no-op, so tokenizer.json files pass through unchanged.
        added = config.get("added_tokens_decoder") or {}
        for _, spec in sorted(added.items(), key=lambda kv: int(kv[0])):
            token = AddedToken(
                spec["content"],
                special=spec.get("special", True),
                normalized=spec.get("normalized", False),
                lstrip=spec.get("lstrip", False),
                rstrip=spec.get("rstrip", False),
                single_word=spec.get("single_word", False),
            )
            if token.special:
                backend.add_special_tokens([token])
            else:
                backend.add_tokens([token])
        for token_id, spec in added.items():
            found = backend.token_to_id(spec["content"])
            if found != int(token_id):
                raise ValueError(
                    f"tokenizer files disagree: {spec['content']!r} is id {token_id} in tokenizer_config.json "
                    f"but {found} in the vocabulary"
                )
        return cls(backend, config, family)

    # -- ids -------------------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_ids(self) -> list[int]:
        """The ids that end an answer: ``<|im_end|>`` and ``<|endoftext|>``."""
        ids = []
        for token in ("<|im_end|>", "<|endoftext|>", self.special_tokens["eos_token"]):
            token_id = self._id(token)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.special_tokens["eos_token"])

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.special_tokens["pad_token"])

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def mm_token_id(self, name: str) -> int:
        """Id of a multimodal token by its reference name (``"image_token"``, ``"audio_bos_token"``...)."""
        token = self.mm_tokens[name]
        token_id = self._id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {name} {token!r}")
        return token_id

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(
            self._id(t.content)
            for t in self.backend.get_added_tokens_decoder().values()
            if t.special and self._id(t.content) is not None
        )

    @property
    def special_token_strings(self) -> list[str]:
        """The text of every special added token (``<|im_start|>``, ``<|IMAGE|>``...), longest first."""
        if self._special_strings is None:
            tokens = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
            self._special_strings = sorted(tokens, key=lambda t: (-len(t), t))
        return self._special_strings

    # -- text ------------------------------------------------------------------------------------

    def encode(self, text: str, split_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; nothing is added.

        By default special tokens written in the text are recognised, as the reference does
        (``"<|im_end|>"`` becomes the end-of-turn id). ``split_special_tokens=True`` reads the text as plain
        text: ``"<|im_end|>"`` becomes the ordinary tokens of its characters (the reference tokenizer's
        ``split_special_tokens``). The server tokenizes client text that way.
        """
        backend = self._plain_backend() if split_special_tokens else self.backend
        return backend.encode(text, add_special_tokens=False).ids

    def _plain_backend(self):
        """A copy of the backend that never extracts special tokens (``encode_special_tokens``; a separate
        object so the shared one is never switched while another thread encodes)."""
        if self._plain is None:
            from tokenizers import Tokenizer as HFTokenizer

            plain = HFTokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def encode_rendered(self, text: str, restore: dict[str, str]) -> list[int]:
        """Token ids of a rendered chat template whose *client* text is to be read as plain text.

        Before rendering, every special-token string inside the conversation's text was replaced by a
        placeholder character (``restore`` maps each placeholder back to its string), so the special
        tokens still in ``text`` are the template's own. The text is cut at those (as the tokenizer
        itself cuts at special tokens before anything else), each control token keeps its id, and each
        piece in between gets its placeholders restored and is encoded as plain text. With no
        placeholders this equals :meth:`encode`.
        """
        if not restore:
            return self.encode(text)
        table = str.maketrans(restore)
        special = {self._id(t) for t in self.special_token_strings}
        enc = self.backend.encode(text, add_special_tokens=False)
        ids: list[int] = []
        start = 0
        for token_id, (a, b) in zip(enc.ids, enc.offsets):
            if token_id not in special:
                continue
            if a > start:
                ids += self.encode(text[start:a].translate(table), split_special_tokens=True)
            ids.append(token_id)
            start = b
        if start < len(text):
            ids += self.encode(text[start:].translate(table), split_special_tokens=True)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def __len__(self) -> int:
        return self.vocab_size


# ---------------------------------------------------------------------------------------------
# Chat template


def load_chat_template(directory: str | os.PathLike) -> str | None:
    """The chat template of a checkpoint directory, or ``None``.

    Looks at ``chat_template.jinja``, ``chat_template.json``, ``processor_config.json`` and
    ``tokenizer_config.json``, in that order (a dict of named templates yields its ``"default"``).
    """
    directory = os.fspath(directory)
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        template = _read_json(path).get("chat_template")
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template}
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            return template
    return None


def _compile(template: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; renders as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def plain_template_data(value: Any) -> Any:
    """What a template may see: JSON-like data; arrays, images and other objects become ``"<TypeName>"``.

    Templates only test whether media keys are present, so this changes nothing they render.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(v) for v in value)
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return plain_template_data(value.item())
    except ImportError:  # pragma: no cover
        pass
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """A compiled chat template."""

    def __init__(self, source: str, special_tokens: dict[str, str | None] | None = None):
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._template = _compile(source)

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render one conversation, normalised as the reference does: ``None``-valued keys are dropped, and
        a message's reasoning given as ``thinking`` or ``reasoning`` is also passed as ``reasoning_content``.
        """
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        for i, m in enumerate(messages):
            reasoning = next(
                (m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None
            )
            if reasoning is not None:
                messages[i] = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        variables = {**self.special_tokens, **kwargs}
        return self._template.render(
            messages=plain_template_data(messages),
            tools=plain_template_data(tools),
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **plain_template_data(variables),
        )
