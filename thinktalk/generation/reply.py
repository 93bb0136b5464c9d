"""``ReplyTrack``: the Thinker's answer as the Talker of either family consumes it.

Both Talkers are conditioned on what the Thinker *read* of its answer, one answer token per Talker
step: Talker input ``j`` (the prompt for ``j`` = 0, decode step ``j`` after it) is answer token ``j``
as the Thinker read it — its id and the Thinker's hidden states at that read — which exists once the
Thinker has produced token ``j + 1``. A row's track ends at ``f``, the number of answer tokens the
Thinker read (the index of its end token, or of its last token when it stopped by length: the
Thinker never reads the token it stops on). Input ``f`` is then the family's text-end embedding, and
every later one its text-pad embedding. ``f`` = 0 is an empty answer: the row says nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thinktalk.generation.thinker import ThinkerRead


@dataclass(frozen=True)
class Entry:
    """Talker input ``j`` of one row: a token the Thinker read, or the end / pad of the text track."""

    kind: str  # "token" | "eos" | "pad"
    index: int = -1  # answer token index (kind == "token")


class ReplyTrack:
    def __init__(self, batch: int, prompt: ThinkerRead):
        self.batch = batch
        self.prompt_states = prompt.states  # layer -> [B, T, H] of the prompt
        self.tokens: list[torch.Tensor] = []  # tokens[k]: [B] answer token k
        self.reads: list[dict[int, torch.Tensor]] = []  # reads[k]: layer -> [B, 1, H] when token k was read
        self.ends: list[int | None] = [None] * batch  # f per row, once known

    def push_token(self, tokens: torch.Tensor, finished: torch.Tensor) -> None:
        """Answer token k = len(tokens) of every row; rows that end on it get f = k."""
        k = len(self.tokens)
        self.tokens.append(tokens)
        if any(e is None for e in self.ends):
            done = finished.tolist()
            for r in range(self.batch):
                if self.ends[r] is None and done[r]:
                    self.ends[r] = k

    def push_read(self, read: ThinkerRead) -> None:
        self.reads.append(read.states)

    def stop(self) -> None:
        """The Thinker stopped: rows without an end token end at their last token (never read)."""
        last = len(self.tokens) - 1
        self.ends = [last if e is None else e for e in self.ends]

    def empty(self, row: int) -> bool:
        return self.ends[row] == 0

    def entries(self, j: int) -> list[Entry] | None:
        """Talker input ``j`` of every row, or None while some row's is not known yet."""
        out = []
        for r in range(self.batch):
            f = self.ends[r]
            if f is not None and j >= f:
                out.append(Entry("eos" if j == f else "pad"))
            elif j < len(self.reads):
                out.append(Entry("token", j))
            else:
                return None
        return out

    def state(self, j: int, layer: int) -> torch.Tensor:
        """The Thinker's hidden state at ``layer`` when it read answer token ``j``, [B, 1, H]."""
        return self.reads[j][layer]
