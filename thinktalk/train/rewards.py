"""Rewards for GSPO: rule-based ones and a hook for model-based ones.

A config lists rewards with weights; a completion's reward is the weighted sum::

    rewards:
      - {type: exact, weight: 1.0}                      # the answer exactly (whitespace and case folded)
      - {type: contains, weight: 0.5}                   # the answer somewhere in the completion
      - {type: format, pattern: "^<answer>.*</answer>$"}  # the completion matches a regex (1 or 0)
      - {type: numeric, tolerance: 1.0e-6}              # the last number in the completion equals the answer's
      - {type: callable, function: "my_pkg.rewards:judge"}  # any Python function, by import path
      - {type: http, url: "http://127.0.0.1:8001/reward"}   # a reward model behind an HTTP endpoint

Rule-based rewards compare with the row's ``answer`` (another key with ``field``). A callable gets
``(prompts, completions, rows)`` — lists of the same length, rows being the JSONL objects — and
returns one float per completion. An HTTP endpoint gets the same three lists as a JSON object
``{"prompts": [...], "completions": [...], "rows": [...]}`` in a POST and answers ``{"rewards": [...]}``.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass
class RewardSpec:
    type: str  # exact | contains | format | numeric | callable | http
    weight: float = 1.0
    field: str = "answer"  # the row key rule-based rewards compare with
    pattern: str = ""  # format: a regular expression (re.search; anchor it with ^...$ for a full match)
    tolerance: float = 1e-6  # numeric: |completion - answer| <= tolerance * max(1, |answer|)
    function: str = ""  # callable: "package.module:function"
    url: str = ""  # http: the endpoint
    timeout: float = 60.0  # http: seconds


RULES = ("exact", "contains", "format", "numeric")
TYPES = RULES + ("callable", "http")


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def exact(completion: str, answer: str) -> float:
    return float(_norm(completion) == _norm(answer))


def contains(completion: str, answer: str) -> float:
    return float(_norm(answer) in _norm(completion)) if answer.strip() else 0.0


def matches(completion: str, pattern: str) -> float:
    return float(re.search(pattern, completion, flags=re.DOTALL) is not None)


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric(completion: str, answer: str, tolerance: float = 1e-6) -> float:
    got, want = last_number(completion), last_number(str(answer))
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=0.0, abs_tol=tolerance * max(1.0, abs(want))))


def load_callable(path: str) -> Callable:
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise ValueError(f"reward function '{path}' is not 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import the reward function '{path}': {e}") from None
    if not callable(fn):
        raise ValueError(f"reward function '{path}' is not callable")
    return fn


def http_rewards(url: str, prompts: list[str], completions: list[str], rows: list[dict], timeout: float) -> list[float]:
    body = json.dumps({"prompts": prompts, "completions": completions, "rows": rows}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
    except OSError as e:
        raise RuntimeError(f"reward endpoint {url} failed: {e}") from None
    rewards = answer.get("rewards") if isinstance(answer, dict) else None
    if not isinstance(rewards, list):
        raise RuntimeError(f"reward endpoint {url} answered {str(answer)[:200]!r}, expected {{'rewards': [...]}}")
    return rewards


class Rewards:
    """The weighted sum of a config's rewards; :meth:`__call__` scores a batch of completions."""

    def __init__(self, specs: list[RewardSpec]):
        if not specs:
            raise ValueError("gspo needs at least one reward (the 'rewards' list)")
        self.specs = specs
        self.functions: dict[int, Callable] = {}
        for i, s in enumerate(specs):
            if s.type not in TYPES:
                raise ValueError(f"rewards[{i}]: unknown type '{s.type}' (known: {', '.join(TYPES)})")
            if s.type == "format":
                if not s.pattern:
                    raise ValueError(f"rewards[{i}]: a format reward needs a 'pattern'")
                re.compile(s.pattern)
            if s.type == "callable":
                self.functions[i] = load_callable(s.function)
            if s.type == "http" and not s.url:
                raise ValueError(f"rewards[{i}]: an http reward needs a 'url'")

    def needs_field(self) -> set[str]:
        return {s.field for s in self.specs if s.type in ("exact", "contains", "numeric")}

    def components(self, prompts: list[str], completions: list[str], rows: list[dict]) -> dict[str, list[float]]:
        """Per reward (named ``type`` or ``type_i`` when repeated): one value per completion, unweighted."""
        out: dict[str, list[float]] = {}
        for i, s in enumerate(self.specs):
            name = s.type if sum(x.type == s.type for x in self.specs) == 1 else f"{s.type}_{i}"
            if s.type == "exact":
                values = [exact(c, str(r.get(s.field, ""))) for c, r in zip(completions, rows)]
            elif s.type == "contains":
                values = [contains(c, str(r.get(s.field, ""))) for c, r in zip(completions, rows)]
            elif s.type == "format":
                values = [matches(c, s.pattern) for c in completions]
            elif s.type == "numeric":
                values = [numeric(c, str(r.get(s.field, "")), s.tolerance) for c, r in zip(completions, rows)]
            elif s.type == "callable":
                values = list(self.functions[i](prompts, completions, rows))
            else:
                values = http_rewards(s.url, prompts, completions, rows, s.timeout)
            if len(values) != len(completions):
                raise RuntimeError(f"reward '{name}' gave {len(values)} values for {len(completions)} completions")
            out[name] = [float(v) for v in values]
        return out

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
        parts = self.components(prompts, completions, rows)
        total = [0.0] * len(completions)
        for s, values in zip(self.specs, parts.values()):
            total = [t + s.weight * v for t, v in zip(total, values)]
        return total, parts
