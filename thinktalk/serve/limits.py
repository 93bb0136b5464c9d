"""Limits the server applies before costly work: JSON parsing with bounded work, text size, media budgets.

Everything here runs before the model worker sees a request, and the costly parts off the event loop.
Running in a thread is not enough on its own: the C JSON decoder and pydantic hold the GIL for as long as
they run (1.5 million tiny messages: ~12 s in which no other request is served). So bodies are parsed
by :func:`parse_json`, the standard library's pure-Python scanner with its C string scanner — Python
bytecode between values, so other threads get the GIL every few milliseconds — which counts values and
depth and stops at the first one over the limit; and messages are validated one at a time.

Every error names the limit and what was sent.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import math
from dataclasses import dataclass, field
from typing import Any

from thinktalk.serve.errors import APIError, invalid

_WS = json.decoder.WHITESPACE


class _Scanner:
    """The attributes ``json.scanner.py_make_scanner`` reads, with counting container parsers."""

    def __init__(self, max_values: int, max_depth: int, what: str):
        self.max_values, self.max_depth, self.what = max_values, max_depth, what
        self.values = 0
        self.depth = 0
        self.strict = True
        self.object_hook = None
        self.object_pairs_hook = None
        self.memo: dict = {}
        self.parse_string = json.decoder.scanstring
        self.parse_int = self._int
        self.parse_float = self._float
        self.parse_constant = self._constant
        self.parse_object = self._object
        self.parse_array = self._array

    def _counted(self, scan_once):
        def scan(s, idx):
            self.values += 1
            if self.values > self.max_values:
                raise invalid(f"{self.what} has more than {self.max_values:,} JSON values; this server accepts at most "
                              f"{self.max_values:,}", None, "json_too_large")  # fmt: skip
            return scan_once(s, idx)

        return scan

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > self.max_depth:
            raise invalid(f"{self.what} is nested more than {self.max_depth} levels deep; this server accepts at most "
                          f"{self.max_depth}", None, "json_too_deep")  # fmt: skip

    def _object(self, s_and_end, strict, scan_once, *rest):
        self._enter()
        try:
            return json.decoder.JSONObject(s_and_end, strict, self._counted(scan_once), *rest)
        finally:
            self.depth -= 1

    def _array(self, s_and_end, scan_once):
        self._enter()
        try:
            return json.decoder.JSONArray(s_and_end, self._counted(scan_once))
        finally:
            self.depth -= 1

    def _int(self, digits: str) -> int:
        if len(digits) > 40:  # no field takes more; int() of a huge digit string is quadratic
            raise invalid(f"{self.what} has an integer of {len(digits)} digits", None, "invalid_json")
        return int(digits)

    def _float(self, text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise invalid(f"{self.what} has the number {text}, which is out of range", None, "invalid_json")
        return value

    def _constant(self, name: str):
        raise invalid(f"{self.what} contains {name}, which is not valid JSON (numbers must be finite)", None,
                      "invalid_json")  # fmt: skip


def parse_json(raw: bytes | str, max_values: int, max_depth: int, what: str = "the request body") -> Any:
    """Strict JSON (no NaN/Infinity) with at most ``max_values`` values nested at most ``max_depth`` deep.

    Raises a 400 :class:`APIError` (``invalid_json``, ``json_too_large``, ``json_too_deep``) as soon as the
    input breaks a rule, so the work done on a hostile body is bounded by the limits, not by its size.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise invalid(f"{what} is not UTF-8 text ({e.reason} at byte {e.start})", None, "invalid_json") from None
    else:
        text = raw
    if text.startswith("\ufeff"):
        text = text[1:]
    scanner = _Scanner(max_values, max_depth, what)
    scan = json.scanner.py_make_scanner(scanner)
    start = _WS.match(text, 0).end()
    try:
        try:
            value, end = scan(text, start)
        except StopIteration as err:
            raise json.JSONDecodeError("Expecting value", text, err.value) from None
        end = _WS.match(text, end).end()
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    except json.JSONDecodeError as e:
        if not text.strip():
            raise invalid(f"{what} is empty; send a JSON object", None, "invalid_json") from None
        raise invalid(f"{what} is not valid JSON: {e}", None, "invalid_json") from None
    except RecursionError:  # only reachable with a max_depth beyond the interpreter's stack
        raise invalid(f"{what} is nested too deeply", None, "json_too_deep") from None
    return value


# -- text ---------------------------------------------------------------------------------------------
def text_too_long(chars: int, limit: int, param: str | None, scope: str = "per request") -> APIError:
    return invalid(
        f"the text is {chars:,} characters; this server accepts at most {limit:,} characters {scope} (checked before "
        "tokenizing; see --max-prompt-chars)",
        param,
        "context_length_exceeded",
    )


def prompt_too_long(tokens: int, limit: int, what: str = "the prompt") -> APIError:
    return invalid(f"{what} is {tokens:,} tokens; this server accepts at most {limit:,}", "messages",
                   "context_length_exceeded")  # fmt: skip


def context_exceeded(prompt: int | None, answer: int, context: int, answer_param: str = "max_tokens") -> APIError:
    """Prompt plus answer over the model's context (``prompt`` None: the answer alone leaves no room)."""
    if prompt is None:
        return invalid(f"{answer_param} is {answer:,}; the model's context is {context:,} tokens, which must also hold "
                       "the prompt", answer_param, "context_length_exceeded")  # fmt: skip
    return invalid(
        f"the prompt ({prompt:,} tokens) plus {answer_param} ({answer:,}) is {prompt + answer:,} tokens; the model's "
        f"context is {context:,} tokens",
        answer_param if prompt < context else "messages",
        "context_length_exceeded",
    )


# -- media ---------------------------------------------------------------------------------------------
def _seconds(values: list[float], exact_last: bool = True) -> str:
    """[200, 200] -> '200.0 s + 200.0 s = 400.0 s'; the last one can be a lower bound ('at least')."""
    total = sum(values)
    at_least = "" if exact_last else "at least "
    if len(values) == 1:
        return f"{at_least}{total:.1f} s"
    if len(values) <= 4:
        parts = [f"{v:.1f} s" for v in values[:-1]] + [f"{at_least}{values[-1]:.1f} s"]
        return " + ".join(parts) + f" = {at_least}{total:.1f} s"
    return f"{len(values)} clips, {at_least}{total:.1f} s in all"


@dataclass
class MediaBudget:
    """What one request — or one realtime conversation as a whole — may hold, with errors that name the numbers.

    Images (count and decoded pixels), audio seconds, sampled video frames and text characters. ``scope``
    says in messages which whole the limit is for ("per request", "per realtime conversation").
    """

    settings: Any
    scope: str = "per request"
    images: int = 0
    pixels: int = 0
    audio: list[float] = field(default_factory=list)
    video_frames: int = 0
    chars: int = 0

    # -- audio
    @property
    def audio_seconds(self) -> float:
        return sum(self.audio)

    def audio_left(self) -> float:
        return self.settings.max_audio_seconds - self.audio_seconds

    def audio_too_long(self, seconds: float, param: str | None, exact: bool = True) -> APIError:
        limit = self.settings.max_audio_seconds
        return invalid(f"audio is too long: {_seconds([*self.audio, seconds], exact)}; this server accepts at most "
                       f"{limit:g} s {self.scope}", param, "audio_too_long")  # fmt: skip

    def add_audio(self, seconds: float, param: str | None) -> None:
        if self.audio_seconds + seconds > self.settings.max_audio_seconds:
            raise self.audio_too_long(seconds, param)
        self.audio.append(seconds)

    # -- images
    def check_image_count(self, more: int, param: str | None) -> None:
        limit = self.settings.max_images
        if self.images + more > limit:
            held = f"{self.images} + {more} = {self.images + more}" if self.images else str(more)
            raise invalid(f"too many images ({held}); this server accepts at most {limit} {self.scope}", param,
                          "too_many_images")  # fmt: skip

    def add_image(self, width: int, height: int, param: str | None) -> None:
        self.check_image_count(1, param)
        pixels = width * height
        limit = self.settings.max_total_image_pixels
        if self.pixels + pixels > limit:
            before = f"{self.pixels:,} pixels in earlier images + " if self.pixels else ""
            raise invalid(f"the images are too large in all ({before}{width}x{height} = {pixels:,} = "
                          f"{self.pixels + pixels:,} pixels); this server accepts at most {limit:,} {self.scope}",
                          param, "image_too_large")  # fmt: skip
        self.images += 1
        self.pixels += pixels

    # -- video
    def add_video(self, frames: int, param: str | None) -> None:
        limit = self.settings.max_video_frames
        if self.video_frames + frames > limit:
            held = f"{self.video_frames} + {frames} = {self.video_frames + frames}" if self.video_frames else str(frames)
            raise invalid(f"video is too long ({held} frames at {self.settings.video_fps:g} fps); this server accepts "
                          f"at most {limit} {self.scope}", param, "video_too_long")  # fmt: skip
        self.video_frames += frames

    # -- text
    def add_text(self, chars: int, param: str | None) -> None:
        limit = self.settings.prompt_chars_limit
        if self.chars + chars > limit:
            raise text_too_long(self.chars + chars, limit, param, self.scope)
        self.chars += chars

    # -- whole budgets (realtime items)
    def fits(self, usage: MediaUsage) -> bool:
        s = self.settings
        return (self.images + usage.images <= s.max_images and self.pixels + usage.pixels <= s.max_total_image_pixels
                and self.audio_seconds + usage.audio_seconds <= s.max_audio_seconds
                and self.video_frames + usage.video_frames <= s.max_video_frames
                and self.chars + usage.chars <= s.prompt_chars_limit)  # fmt: skip

    def usage(self) -> MediaUsage:
        return MediaUsage(self.images, self.pixels, self.audio_seconds, self.video_frames, self.chars)


@dataclass
class MediaUsage:
    """What one realtime item holds (its share of the conversation's budget)."""

    images: int = 0
    pixels: int = 0
    audio_seconds: float = 0.0
    video_frames: int = 0
    chars: int = 0

    def __add__(self, other: MediaUsage) -> MediaUsage:
        return MediaUsage(self.images + other.images, self.pixels + other.pixels,
                          self.audio_seconds + other.audio_seconds, self.video_frames + other.video_frames,
                          self.chars + other.chars)  # fmt: skip

    def __sub__(self, other: MediaUsage) -> MediaUsage:
        return MediaUsage(self.images - other.images, self.pixels - other.pixels,
                          self.audio_seconds - other.audio_seconds, self.video_frames - other.video_frames,
                          self.chars - other.chars)  # fmt: skip


def budget_from(settings, usage: MediaUsage, scope: str) -> MediaBudget:
    return MediaBudget(settings, scope, usage.images, usage.pixels, [usage.audio_seconds] if usage.audio_seconds else [],
                       usage.video_frames, usage.chars)  # fmt: skip


# -- sampling values --------------------------------------------------------------------------------------
MIN_TEMPERATURE = 1e-3  # below this, logits / temperature overflow float32 for ordinary logits
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as OpenAI documents it (torch takes these)


def check_temperature(value, param: str) -> float:
    """0 (greedy) or [MIN_TEMPERATURE, 2]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid("must be a number between 0 and 2", param)
    if not (value == 0 or MIN_TEMPERATURE <= value <= 2):
        raise invalid(f"is {value!r}; it must be 0 (greedy) or between {MIN_TEMPERATURE:g} and 2", param)
    return float(value)
