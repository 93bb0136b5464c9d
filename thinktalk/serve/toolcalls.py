"""The model's answer text -> OpenAI's shapes: content, ``reasoning_content`` and ``tool_calls``.

Qwen3 chat templates (and Qwen2.5's) describe tools in the system turn and ask for each call as
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``; the Thinking variants put their reasoning
in ``<think>...</think>`` before the answer (the generation prompt may already hold ``<think>\\n``, so a
``</think>`` with no opening tag closes reasoning that began with the answer). These tags are ordinary
added tokens (not "special"), so they survive detokenization and are parsed here.

:func:`parse_answer` parses a whole answer; :class:`AnswerStream` splits the deltas of a streamed one into
``content`` / ``reasoning`` / ``tool`` channels as they come, holding back only what could still be the
start of a tag. A tool call whose JSON does not parse, has no ``name`` or whose ``arguments`` are not an
object is returned in ``errors`` (with the raw text), never dropped.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object

    def chat(self) -> dict:
        """The chat-completions ``tool_calls`` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedAnswer:
    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one message per malformed call (raw text included)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(raw: str) -> ToolCall:
    """One ``<tool_call>`` body -> a :class:`ToolCall`; ``ValueError`` saying what is wrong otherwise."""
    text = raw.strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the tool call is not valid JSON ({e.msg} at character {e.pos}): {text[:200]!r}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"the tool call is not a JSON object: {text[:200]!r}")
    name = obj.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"the tool call has no valid 'name': {text[:200]!r}")
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ValueError(f"the tool call's 'arguments' are not JSON: {text[:200]!r}") from None
    if not isinstance(args, dict):
        raise ValueError(f"the tool call's 'arguments' are not a JSON object: {text[:200]!r}")
    return ToolCall(new_call_id(), name, json.dumps(args, ensure_ascii=False))


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``(reasoning, rest)``: the ``<think>`` block at the start of ``text`` (or before a lone ``</think>``)."""
    close = text.find(THINK_CLOSE)
    if close < 0:
        stripped = text.lstrip()
        if stripped.startswith(THINK_OPEN):  # reasoning cut short (max_tokens): all of it is reasoning
            return stripped[len(THINK_OPEN) :].strip("\n"), ""
        return None, text
    head = text[:close]
    opened = head.find(THINK_OPEN)
    if opened >= 0 and head[:opened].strip():
        return None, text  # a <think> after some answer text: not a reasoning block
    reasoning = head[opened + len(THINK_OPEN) :] if opened >= 0 else head
    return reasoning.strip("\n"), text[close + len(THINK_CLOSE) :].lstrip("\n")


def parse_answer(text: str, tools: bool = True) -> ParsedAnswer:
    """A whole answer -> content, reasoning and (when ``tools``) the tool calls, malformed ones in ``errors``."""
    reasoning, rest = split_reasoning(text)
    if not tools or CALL_OPEN not in rest:
        return ParsedAnswer(rest, reasoning)
    out = ParsedAnswer("", reasoning)
    content = []
    pos = 0
    while True:
        start = rest.find(CALL_OPEN, pos)
        if start < 0:
            content.append(rest[pos:])
            break
        content.append(rest[pos:start])
        end = rest.find(CALL_CLOSE, start)
        body = rest[start + len(CALL_OPEN) : end if end >= 0 else len(rest)]
        if end < 0:
            out.errors.append(
                f"the tool call is not closed with {CALL_CLOSE} (the answer ended): {body.strip()[:200]!r}"
            )
            break
        try:
            out.tool_calls.append(parse_call(body))
        except ValueError as e:
            out.errors.append(str(e))
        pos = end + len(CALL_CLOSE)
    out.content = "".join(content).strip() if out.tool_calls or out.errors else "".join(content)
    return out


class AnswerStream:
    """Streamed answer deltas -> ``[(channel, text)]`` with channel ``content`` | ``reasoning`` | ``tool``.

    ``reasoning_open``: the generation prompt already opened ``<think>`` (the answer starts inside it).
    """

    def __init__(self, tools: bool = True, reasoning_open: bool = False):
        self.tools = tools
        self.channel = "reasoning" if reasoning_open else "content"
        self.started = False  # any content seen (a <think> is only reasoning at the very start)
        self._held = ""

    def _tags(self) -> list[tuple[str, str]]:
        if self.channel == "reasoning":
            return [(THINK_CLOSE, "content")]
        if self.channel == "tool":
            return [(CALL_CLOSE, "content")]
        tags = [(CALL_OPEN, "tool")] if self.tools else []
        if not self.started:
            tags.append((THINK_OPEN, "reasoning"))
        return tags

    def feed(self, delta: str, final: bool = False) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        text = self._held + delta
        self._held = ""
        while text:
            tags = self._tags()
            hits = [(text.find(t), t, nxt) for t, nxt in tags if t in text]
            if hits:
                at, tag, nxt = min(hits)
                if at:
                    self._emit(out, text[:at])
                self.channel = nxt
                text = text[at + len(tag) :]
                if tag == THINK_CLOSE:
                    text = text.lstrip("\n")
                continue
            keep = (
                0 if final else max((k for t, _ in tags for k in range(1, len(t)) if text.endswith(t[:k])), default=0)
            )
            self._emit(out, text[: len(text) - keep])
            self._held = text[len(text) - keep :]
            break
        return [(c, t) for c, t in out if t]

    def _emit(self, out: list, text: str) -> None:
        if not text:
            return
        if self.channel == "content" and text.strip():
            self.started = True
        out.append((self.channel, text))
