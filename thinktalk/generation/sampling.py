"""Next-token choice: greedy, or sampling with repetition penalty, temperature, top-k and top-p.

The processors run in the reference's order (repetition penalty → suppression → temperature →
top-k → top-p), so the same settings give the same distribution as transformers' ``generate``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    suppress_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number (got {getattr(self, name)})")
        if self.temperature <= 0 and self.do_sample:
            raise ValueError(f"temperature must be > 0 when sampling (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (got {self.top_k})")
        # Below ~1e-3 (or above 1e3) a penalty only overflows the logits; nobody means that.
        if not 1e-3 <= self.repetition_penalty <= 1e3:
            raise ValueError(f"repetition_penalty must be in [0.001, 1000] (got {self.repetition_penalty})")


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of every token already in ``history`` [B, L]."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    picked = logits.gather(1, history)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(1, history, picked)


def process_logits(
    logits: torch.Tensor, history: torch.Tensor | None, p: SamplingParams, suppress: tuple[int, ...] = ()
) -> torch.Tensor:
    """logits [B, V] → processed float32 logits (masked entries -inf).

    The repetition penalty applies to the tokens of ``history`` [B, L] (repeats change nothing: each token
    once); ``suppress`` adds to ``p.suppress_tokens``.
    """
    logits = logits.float()
    if history is not None:
        logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
    masked = tuple(p.suppress_tokens) + tuple(suppress)
    if masked:
        logits = logits.index_fill(1, _index(masked, logits.device), -float("inf"))  # the caller's logits stay as they were
    if not p.do_sample:
        return logits
    if p.temperature != 1.0:
        logits = logits / p.temperature
    if p.top_k > 0:
        k = min(p.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - p.top_p
        remove[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return logits


@functools.lru_cache(maxsize=256)
def _index(tokens: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The ids as a tensor on ``device``, made once (not every step). A normal tensor even under inference mode."""
    with torch.inference_mode(False):
        return torch.tensor(tokens, dtype=torch.long, device=device)


def choose(
    logits: torch.Tensor,
    history: torch.Tensor | None,
    p: SamplingParams,
    generator: torch.Generator | None | list[tuple[int, torch.Generator | None]] = None,
) -> torch.Tensor:
    """The next token of every row, [B]. ``generator``: one for every row, or ``[(rows, generator), ...]`` for
    consecutive row groups (several requests in one batch): the logits are processed once (row by row, so
    each group's rows as alone) and each group draws from its own generator."""
    logits = process_logits(logits, history, p)
    if not p.do_sample:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    if not isinstance(generator, list):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    parts, lo = [], 0
    for rows, gen in generator:
        parts.append(torch.multinomial(probs[lo : lo + rows], 1, generator=gen).squeeze(1))
        lo += rows
    return torch.cat(parts)


class TokenChooser:
    """The sampling half of a stage: chooses the next token of every row and keeps what that needs.

    State: the token history (for the repetition penalty: the prompt's ids, then every chosen token; the
    penalty reads only those entries — a gather and a scatter of L ids — not the whole vocabulary), which
    rows have ended, the chosen tokens, the generator. ``forced`` replaces the choice by given tokens
    (teacher forcing: text-to-speech), so a forced stage runs exactly the steps a sampling one would.
    """

    def __init__(
        self,
        params: SamplingParams,
        eos_token_ids: tuple[int, ...],
        pad_token_id: int,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        generator: torch.Generator | None = None,
        history: torch.Tensor | None = None,
        vocab_size: int | None = None,
        forced: list[int] | None = None,
    ):
        self.params = params
        self.eos_ids = tuple(eos_token_ids)
        self.pad = int(pad_token_id)
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.generator = generator
        self.forced = None if forced is None else [int(t) for t in forced]
        # [B, L] the ids the repetition penalty applies to (prompt, then chosen); None: no penalty.
        # ``vocab_size`` is accepted for the callers' sake (the history needs none).
        penalised = params.repetition_penalty != 1.0 and history is not None and forced is None
        self.history: torch.Tensor | None = history if penalised else None
        self.finished: torch.Tensor | None = None  # [B] bool: the row produced an end token
        self.tokens: list[torch.Tensor] = []  # one [B] per step
        self._eos: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return len(self.tokens)

    @property
    def done(self) -> bool:
        """Every row ended, or the length limit is reached (one host check per step)."""
        return self.steps >= self.max_new_tokens or (self.finished is not None and bool(self.finished.all()))

    def _process(self, logits: torch.Tensor) -> torch.Tensor:
        suppress = self.eos_ids if self.steps < self.min_new_tokens else ()
        return process_logits(logits, self.history, self.params, suppress=suppress)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] of the last position → the next token of every row [B] (pad for ended rows)."""
        self._start(logits)
        if self.forced is not None:
            tok = torch.full((logits.shape[0],), self.forced[self.steps], dtype=torch.long, device=logits.device)
        else:
            processed = self._process(logits)
            if self.params.do_sample:
                tok = torch.multinomial(processed.softmax(-1), 1, generator=self.generator).squeeze(1)
            else:
                tok = processed.argmax(-1)
        return self._commit(tok)

    @staticmethod
    def choose_many(choosers: list[TokenChooser], logits: list[torch.Tensor]) -> list[torch.Tensor | Exception]:
        """:meth:`choose` of several choosers (requests) at once: ``logits[i]`` [B_i, V] for ``choosers[i]``.

        Choosers whose logits are processed alike (the same settings, end tokens suppressed or not, a token
        history or none; none forced) process theirs as one batch, and greedy ones take one argmax; a sampling one
        draws from its own generator (one draw for the whole group when none is seeded). Each gets the tokens
        :meth:`choose` would give it — the processing is row by row — so batching requests changes nothing."""
        out: list = [None] * len(choosers)
        groups: dict = {}
        for i, (c, lg) in enumerate(zip(choosers, logits)):
            if c.forced is not None or len(choosers) == 1:
                try:
                    out[i] = c.choose(lg)
                except Exception as e:  # noqa: BLE001 - returned as that chooser's result
                    out[i] = e
                continue
            suppress = c.eos_ids if c.steps < c.min_new_tokens else ()
            penalised = c.history is not None and c.history.shape[1] > 0
            key = (c.params, suppress, penalised, lg.shape[-1], lg.device, lg.dtype)
            groups.setdefault(key, []).append(i)
        for (params, suppress, _, _, _, _), members in groups.items():
            try:
                toks = TokenChooser._choose_group([choosers[i] for i in members], [logits[i] for i in members], params,
                                                  suppress)  # fmt: skip
            except Exception:  # noqa: BLE001 - somebody's logits: each alone, so that only its request fails
                toks = [None] * len(members)
            for i, tok in zip(members, toks):
                try:
                    if isinstance(tok, Exception):
                        raise tok
                    if tok is None:
                        out[i] = choosers[i].choose(logits[i])
                    else:
                        choosers[i]._start(logits[i])
                        out[i] = choosers[i]._commit(tok)
                except Exception as e:  # noqa: BLE001 - returned as that chooser's result
                    out[i] = e
        return out  # type: ignore[return-value]

    @staticmethod
    def _choose_group(choosers: list[TokenChooser], logits: list[torch.Tensor], params: SamplingParams,
                      suppress: tuple[int, ...]) -> list:  # fmt: skip
        """The raw tokens of choosers that process alike (nothing recorded yet), or a chooser's draw's error."""
        history = None
        if choosers[0].history is not None and choosers[0].history.shape[1] > 0:
            # Histories of other lengths are made as long as the longest by repeating a row's first id (a repeat
            # penalises nothing twice).
            n = max(c.history.shape[1] for c in choosers)
            history = torch.cat([torch.cat([c.history, c.history[:, :1].expand(-1, n - c.history.shape[1])], dim=1)
                                 for c in choosers])  # fmt: skip
        processed = process_logits(torch.cat(logits), history, params, suppress=suppress)
        sizes = [lg.shape[0] for lg in logits]
        if not params.do_sample:
            return list(processed.argmax(-1).split(sizes))
        probs = processed.softmax(-1)
        if all(c.generator is None for c in choosers):  # nobody seeded: one draw from torch's generator
            try:
                return list(torch.multinomial(probs, 1).squeeze(1).split(sizes))
            except RuntimeError:  # a bad row (NaN/inf): draw row group by row group below, to find whose
                pass
        out: list = []
        for c, p in zip(choosers, probs.split(sizes)):  # each from its own generator, as alone
            try:
                out.append(torch.multinomial(p, 1, generator=c.generator).squeeze(1))
            except RuntimeError as e:
                out.append(e)
        return out

    def _start(self, logits: torch.Tensor) -> None:
        if self._eos is None:
            self._eos = torch.tensor(list(self.eos_ids) or [-1], device=logits.device)
            self.finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)

    def _commit(self, tok: torch.Tensor) -> torch.Tensor:
        """Record the chosen ``tok`` [B]: ended rows get the pad, end tokens end their rows."""
        tok = tok.masked_fill(self.finished, self.pad)
        self.finished = self.finished | torch.isin(tok, self._eos)
        if self.history is not None:
            self.history = torch.cat([self.history, tok[:, None]], dim=1)
        self.tokens.append(tok)
        return tok

    def sequences(self) -> torch.Tensor:
        """[B, steps] the chosen tokens (end tokens included, pad after them)."""
        return torch.stack(self.tokens, dim=1)
