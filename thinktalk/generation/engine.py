"""The engine: the one driver of every generation — ``model.stream()``'s and the server's.

    submit ─► waiting ─► admitted to rows ─► prompt read (in pieces) ─► decode steps ─► done
                                                   │ answer token j read
                                                   ▼
                                   Talker prefill ─► Talker steps ─► vocoder ─► audio events

Requests are submitted with their inputs and options. The engine keeps each in rows of preallocated
pools — one Thinker KV-cache row and one Talker KV-cache row per conversation — and every
:meth:`Engine.step`:

1. admits waiting requests in arrival order while rows are free (a request that does not fit waits,
   and so do those behind it: nobody is overtaken forever);
2. reads a piece of the waiting prompts (at most ``prefill_chunk`` tokens per step, so a long
   audio/video prompt does not stall the others' answers; with ``short_first`` a chat turn is read
   before a long prompt's pieces). The media encoders run when a prompt is first read — or, with
   ``encode_async``, on the encoder thread from admission on (:mod:`thinktalk.generation.encoder`),
   the prompt being read from the first step after its embeddings are ready;
3. runs **one batched Thinker decode step** over every request that has a token to read (rows of
   other requests sit it out through the cache's exec mask);
4. runs **one batched Talker step** over every request whose next Talker input exists (Talker input j
   is answer token j as the Thinker read it: :mod:`thinktalk.generation.reply`), then **the vocoders of
   every request that spoke, batched** where their stage class can (``push_many``: Qwen2.5's streamed
   Token2Wav solves the DiT windows of all of them as one batch and runs BigVGAN's pieces as one batch);
5. finishes what is done (a ``done`` event with the whole answer) and frees its rows at once —
   including cancelled requests, within one step.

Every request's state is explicit and its own — stage states, token choosers with their own random
generators, reply track, vocoder state — and rows never see each other's keys, so batching does not
change what a request produces: a request gives the same tokens and codes alone or among others
(tested). ``model.stream()`` is an engine with one request; the server runs one engine for everyone.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from thinktalk.generation.encoder import MediaEncoder
from thinktalk.generation.events import GenerateResult, StreamEvent, TextDetokenizer, strip_after_eos
from thinktalk.generation.inputs import ModelInputs
from thinktalk.generation.options import GenerateOptions
from thinktalk.generation.reply import ReplyTrack
from thinktalk.generation.sampling import TokenChooser
from thinktalk.generation.thinker import ThinkerRead, ThinkerStage, ThinkerState


@dataclass(frozen=True)
class EngineConfig:
    rows: int  # conversations held at once (KV-cache rows)
    max_len: int  # Thinker KV slots per row: the longest prompt + answer admitted
    talker_max_len: int = 0  # Talker KV slots per row (0: sized by the first speech request)
    prefill_chunk: int | None = None  # prompt tokens read per step (None: each prompt at once)
    prefix_reuse: bool = False  # keep finished conversations' rows for their next turn
    min_reuse: int = 8  # shortest prefix worth reusing (tokens)
    keep_layers: tuple[int, ...] = ()  # Thinker layers every request keeps (what a reused prefix must carry)
    short_first: bool = False  # with prefill_chunk: short prompts read before long ones (_prefill_order)
    encode_async: bool = False  # run media prompts' encoders on the encoder thread, beside the steps
    # (thinktalk.generation.encoder); False: inside the step that first reads the prompt


@dataclass
class Parked:
    """A finished conversation's Thinker row, kept so that its next turn reads only what is new."""

    row: int
    tokens: torch.Tensor  # [L] the ids whose keys/values the row holds (prompt, then the answer tokens read)
    digests: list  # its media items by content (thinktalk.models.items.item_digests)
    states: dict[int, torch.Tensor]  # keep layer -> [1, L, H]: what the Talker's prompt reads
    used: float
    windows: list = None  # per audio item, the digests of its complete encoder windows (see Engine._into_audio)


class RequestError(RuntimeError):
    """A request the engine could not run (its own failure; other requests go on)."""


def _generator(device: torch.device, seed: int | None, offset: int) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed + offset)


class Speech:
    """A request's Talker and vocoder: their stages, states and generator."""

    def __init__(self, talker, vocoder, generator):
        self.talker, self.vocoder, self.generator = talker, vocoder, generator
        self.reply: ReplyTrack | None = None
        self.state = None  # TalkerState once the Talker has started
        self.voice = None  # the vocoder's state
        self.finished = False

    def codes(self, batch: int) -> list[torch.Tensor]:
        out = []
        for row in range(batch):
            if self.state is None or not bool(self.state.speaking[row]):
                out.append(torch.zeros(0, dtype=torch.long))
                continue
            codes = self.state.codes(row, self.talker.end_ids)
            out.append(codes[:, 0] if codes.shape[1] == 1 else codes)
        return out


class Request:
    """One submitted generation (one or more rows of the same batch), and everything it owns."""

    _ids = itertools.count()

    def __init__(self, inputs: ModelInputs, options: GenerateOptions, chooser: TokenChooser, eos: tuple[int, ...],
                 speech: Speech | None, streaming_audio: bool, tokenizer, max_new: int, prefill_only: bool = False):  # fmt: skip
        self.id = next(self._ids)
        self.inputs, self.options, self.chooser, self.eos = inputs, options, chooser, eos
        self.speech, self.streaming_audio, self.max_new = speech, streaming_audio, max_new
        self.prefill_only = prefill_only  # read the prompt, choose nothing, park it (prefix reuse)
        self.embed_from: int | None = None  # reuse ends inside an audio clip: embed from the clip's start
        self.windows: list | None = None
        self.batch = inputs.batch
        self.detok = [TextDetokenizer(tokenizer, eos) for _ in range(self.batch)]
        self.rows: tuple[int, int] | None = None  # Thinker cache rows
        self.talker_rows: tuple[int, int] | None = None
        self.thinker: ThinkerState | None = None
        self.reused = 0  # prompt tokens found in a parked row (prefix reuse), not read again
        self.digests: list | None = None  # its media items by content (prefix reuse)
        self.reuse_states: dict[int, torch.Tensor] = {}  # the parked row's states of the reused prefix
        self.prompt_read_states: dict[int, torch.Tensor] = {}  # with prefix reuse: states of what was read,
        self.read_states: list[dict[int, torch.Tensor]] = []  # the prompt's, then per answer token
        self.pending: torch.Tensor | None = None  # [b] tokens chosen and not read yet
        self.encoding: concurrent.futures.Future | None = None  # its embeddings, on the encoder thread
        self.thinker_done = False
        self.events: collections.deque[StreamEvent] = collections.deque()
        self.created = time.perf_counter()
        self.cancelled = False
        self.done = False
        self.error: BaseException | None = None

    def now(self) -> float:
        return time.perf_counter() - self.created

    def cancel(self) -> None:
        """Stop at the next engine step (idempotent; safe from any thread)."""
        self.cancelled = True

    def _wants_cancel(self) -> bool:
        c = self.options.cancel
        return self.cancelled or (c is not None and c.is_set())


class Engine:
    """Runs generation requests on one model, batching their decode steps (see the module docstring)."""

    def __init__(self, model, config: EngineConfig):
        if config.rows < 1 or config.max_len < 2:
            raise ValueError(f"an engine needs rows >= 1 and max_len >= 2 (got {config.rows}, {config.max_len})")
        self.model = model
        self.config = config
        self._stage = ThinkerStage(model.thinker, config.keep_layers)
        self._cache = None  # the Thinker pool, allocated on the first admission
        self._talker_cache = None
        self._free = [True] * config.rows
        self._talker_free = [True] * config.rows
        self.parked: list[Parked] = []
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._voicing: list[tuple[Request, torch.Tensor]] = []  # this step's Talker frames, to vocode
        self._encoder: MediaEncoder | None = None  # with config.encode_async, made at the first media prompt
        self.steps = 0  # steps run (tests count them)

    # -- submission ---------------------------------------------------------------------------------
    def submit(
        self,
        inputs: ModelInputs,
        options: GenerateOptions,
        forced: list[int] | None = None,
        streaming_audio: bool = True,
        prefill_only: bool = False,
    ) -> Request:
        """Check and queue a request; everything that can be wrong with it raises here.

        ``forced``: the Thinker's answer token ids (its end token included), read instead of chosen.
        ``prefill_only``: read the prompt and stop — no token, no speech — parking the row (with prefix reuse) so
        that a later prompt starting the same way reads only the rest. A realtime session sends the turn so far
        while the user is still speaking; a clip's complete encoder windows are reused (:meth:`_into_audio`).
        """
        model = self.model
        if prefill_only and (options.speech is not None or not self.config.prefix_reuse or inputs.batch != 1):
            raise ValueError("prefill_only is for one text-only conversation on an engine with prefix_reuse")
        speech = None
        if options.speech is not None:
            talker, vocoder = model.speech_stages(options.speech, options.seed, streaming_audio)
            speech = Speech(talker, vocoder, _generator(self._stage.device, options.seed, 1))
            keep = set(self._stage.keep_layers) | set(talker.keep_layers)
            self._stage.keep_layers = tuple(sorted(keep, key=lambda x: (x < 0, x)))
        text = options.text
        eos = tuple(text.eos_token_ids if text.eos_token_ids is not None else model.eos_token_ids)
        if forced is not None:
            eos = (forced[-1],)
        max_new = len(forced) if forced is not None else text.max_new_tokens
        if inputs.batch > self.config.rows:
            raise ValueError(f"{inputs.batch} conversations in one request; this engine holds {self.config.rows}")
        if inputs.length + max_new > self.config.max_len:
            raise ValueError(
                f"the prompt ({inputs.length} tokens) plus max_new_tokens ({max_new}) is {inputs.length + max_new} "
                f"tokens; this engine holds {self.config.max_len} per conversation"
            )
        if speech is not None and self.config.talker_max_len and speech.talker.cache_length(inputs) > self.config.talker_max_len:
            raise ValueError(
                f"the speech of this request needs {speech.talker.cache_length(inputs)} Talker positions "
                f"(prompt + talker_max_new_tokens); this engine holds {self.config.talker_max_len}"
            )
        chooser = TokenChooser(
            text.sampling,
            eos,
            text.pad_token_id if text.pad_token_id is not None else (eos[0] if eos else 0),
            max_new,
            text.min_new_tokens,
            _generator(self._stage.device, options.seed, 0),
            history=inputs.input_ids.to(self._stage.device),
            vocab_size=model.thinker.lm_head.out_features,
            forced=forced,
        )
        request = Request(inputs, options, chooser, eos, speech, streaming_audio, getattr(model, "tokenizer", None), max_new,
                          prefill_only)  # fmt: skip
        self.waiting.append(request)
        return request

    def allocate(self, talker=None) -> None:
        """Allocate the pools now (a server does, at start) rather than at the first admission.
        ``talker``: a Talker stage to size the Talker pool with (``config.talker_max_len`` slots per row)."""
        if self._cache is None:
            self._cache = self._stage.new_cache(self.config.rows, self.config.max_len)
        if talker is not None and self._talker_cache is None and self.config.talker_max_len:
            self._talker_cache = talker.new_cache(self.config.rows, self.config.talker_max_len)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def load(self) -> tuple[int, int]:
        """(waiting, running) requests."""
        return len(self.waiting), len(self.running)

    # -- the loop -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """One round: admit, read prompts, one Thinker step, one Talker step, finish (see the module docstring)."""
        for req in [r for r in self.waiting if r._wants_cancel()]:
            self.waiting.remove(req)
            self._finish(req)
        for req in [r for r in self.running if r._wants_cancel()]:
            self._finish(req)
        self._admit()
        self._prefill()
        self._decode()
        self._talk()
        self._vocode()
        for req in [r for r in self.running if self._complete(r)]:
            self._finish(req)
        self.steps += 1
        encoding = [r.encoding for r in self.running if r.encoding is not None]
        if encoding and len(encoding) == len(self.running):
            # nothing else to do: wait a little for an encoder (not for all of it: a new request may come)
            concurrent.futures.wait(encoding, timeout=0.01, return_when=concurrent.futures.FIRST_COMPLETED)

    def close(self) -> None:
        """Stop the encoder thread (encodes not started are dropped)."""
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None

    def events(self, request: Request) -> Iterator[StreamEvent]:
        """Run the engine until ``request`` is done, yielding its events as they come (single-threaded use)."""
        while True:
            while request.events:
                ev = request.events.popleft()
                if ev.kind == "error":
                    raise request.error
                yield ev
            if request.done:
                return
            self.step()

    # -- admission ------------------------------------------------------------------------------------
    @staticmethod
    def _acquire(free: list[bool], n: int) -> int | None:
        run = 0
        for i, f in enumerate(free):
            run = run + 1 if f else 0
            if run == n:
                start = i - n + 1
                free[start : i + 1] = [False] * n
                return start
        return None

    def _rows_for(self, req: Request) -> int | None:
        """Thinker rows for ``req``: a parked row holding its prompt's beginning, else free rows (evicting the
        least recently used parked rows when none are free)."""
        if self.config.prefix_reuse and req.batch == 1 and self.parked:
            hit = self._match(req)
            if hit is not None:
                return hit
        while True:
            lo = self._acquire(self._free, req.batch)
            if lo is not None or not self.parked:
                return lo
            victim = min(self.parked, key=lambda p: p.used)
            self.parked.remove(victim)
            self._free[victim.row] = True

    def _admit(self) -> None:
        while self.waiting:
            req = self.waiting[0]
            talker_lo = None
            if req.speech is not None:
                talker_lo = self._acquire(self._talker_free, req.batch)
                if talker_lo is None:
                    return
            if self._cache is None:
                self._cache = self._stage.new_cache(self.config.rows, self.config.max_len)
            lo = self._rows_for(req)
            if lo is None:
                if talker_lo is not None:
                    self._talker_free[talker_lo : talker_lo + req.batch] = [True] * req.batch
                return  # first come, first served: the head waits for rows, and so does everyone behind it
            self.waiting.popleft()
            req.rows = (lo, lo + req.batch)
            if talker_lo is not None:
                req.talker_rows = (talker_lo, talker_lo + req.batch)
            self.running.append(req)
            try:
                req.thinker = self._stage.new_state(req.inputs, self._cache.rows(lo, lo + req.batch))
                if req.reused:
                    self._resume(req, req.reused)
                if req.speech is not None:
                    self._talker_rows(req)
                if self.config.encode_async and req.inputs.media():
                    self._encode(req)
            except Exception as e:
                self._fail(req, e)

    # -- prefix reuse -----------------------------------------------------------------------------------
    def _digests(self, req: Request):
        from thinktalk.models.items import item_digests

        media = req.inputs.media()
        if req.digests is None:
            req.digests = item_digests(media, self.model.thinker.media_layout(media)) if media else []
        return req.digests

    def _match(self, req: Request) -> int | None:
        """The row of the parked conversation sharing the longest prefix with ``req`` (at least ``min_reuse``
        tokens, no media item cut or different); ``req.reused`` says how long."""
        from thinktalk.models.items import item_boundary

        inputs = req.inputs
        if inputs.attention_mask is not None and not bool(inputs.attention_mask.all()):
            return None
        ids = inputs.input_ids[0].cpu()
        digests = self._digests(req)
        lay = self.model.thinker.media_layout(inputs.media()) if digests else None
        best, best_len = None, 0
        for p in self.parked:
            if any(layer not in p.states for layer in self._stage.keep_layers):
                continue
            n = min(
                len(p.tokens), len(ids) - 1
            )  # at least the last prompt token is read anew: its logits start the answer
            same = (p.tokens[:n] == ids[:n]).to(torch.int8)
            length = int(same.cumprod(0).sum())
            if lay is not None:
                raw = length
                length = item_boundary(inputs.input_ids[:, :], length, self.model.thinker.token_ids, lay)
                length = self._same_media(ids, length, digests, p.digests)
                if raw > length and not inputs.use_audio_in_video:
                    length = self._into_audio(req, p, ids, length, raw, lay)
            if length >= self.config.min_reuse and length > best_len:
                best, best_len = p, length
        if best is None:
            return None
        self.parked.remove(best)
        req.reused = best_len
        if lay is not None:
            start = item_boundary(inputs.input_ids[:, :], best_len, self.model.thinker.token_ids, lay)
            req.embed_from = start if start < best_len else None
        req.reuse_states = {layer: s[:, :best_len] for layer, s in best.states.items()}
        return best.row

    def _windows(self, req: Request) -> list:
        """Per audio clip of ``req``, the digests of its complete encoder windows (``[]`` when the Thinker has
        no window-local audio encoder: :attr:`audio_block`)."""
        if req.windows is None:
            import hashlib

            block = getattr(self.model.thinker, "audio_block", None)
            media = req.inputs.media()
            fam = media.get("feature_attention_mask")
            req.windows = []
            if block is not None and fam is not None:
                frames = block[0]
                for i, n in enumerate(fam.sum(-1).tolist()):
                    feats = media["input_features"][i]
                    req.windows.append([
                        hashlib.blake2b(feats[..., w * frames : (w + 1) * frames].contiguous().cpu().numpy().tobytes(),
                                        digest_size=16).hexdigest()
                        for w in range(int(n) // frames)
                    ])  # fmt: skip
        return req.windows

    def _into_audio(self, req: Request, p: Parked, ids: torch.Tensor, length: int, raw: int, lay) -> int:
        """``length`` (an item boundary) moved into the audio clip that starts there, over the windows whose
        features are the same in ``req`` and in the parked row ``p`` (so their tokens are too), up to ``raw``."""
        from thinktalk.models.items import _items_before

        tid = self.model.thinker.token_ids
        block = getattr(self.model.thinker, "audio_block", None)
        if block is None or not p.windows or int(ids[length]) != tid.audio:
            return length
        k = _items_before(lay.audio, int((ids[:length] == tid.audio).sum()))
        mine, theirs = self._windows(req), p.windows
        if k is None or k >= len(mine) or k >= len(theirs):
            return length
        same = 0
        while same < min(len(mine[k]), len(theirs[k])) and mine[k][same] == theirs[k][same]:
            same += 1
        return min(raw, length + same * block[1])

    def _same_media(self, ids: torch.Tensor, length: int, mine: list, theirs: list) -> int:
        """``length`` cut back to before the first media item (of those it covers) that differs in content."""
        tid = self.model.thinker.token_ids
        token_of = {"audio": tid.audio, "image": tid.image, "video": tid.video}
        count = {m: 0 for m in token_of}
        theirs_by = {}
        for m, i, d in theirs:
            theirs_by[(m, i)] = d
        for pos in range(length):
            tok = int(ids[pos])
            for m, t in token_of.items():
                if tok == t and (pos == 0 or int(ids[pos - 1]) != t):  # the first placeholder of an item
                    k = count[m]
                    count[m] += 1
                    mine_d = next((d for mm, i, d in mine if mm == m and i == k), None)
                    if mine_d is None or theirs_by.get((m, k)) != mine_d:
                        return pos
        return length

    def _resume(self, req: Request, reused: int) -> None:
        """Keep the first ``reused`` slots of the parked row: the prompt is read from there on."""
        cache, state = req.thinker.cache, req.thinker
        cache.lengths[:] = reused
        cache.valid[:, :reused] = True
        cache.host_lengths[:] = reused
        state.prefilled = reused
        state.embed_from = req.embed_from
        state.prompt_states = {layer: [s] for layer, s in req.reuse_states.items() if layer in self._stage.keep_layers}

    def _park(self, req: Request) -> None:
        """Keep ``req``'s finished conversation in its row for the next turn."""
        state = req.thinker
        read = state.steps  # answer tokens whose keys/values are in the row
        answer = req.chooser.sequences()[0, :read].cpu() if read else torch.zeros(0, dtype=torch.long)
        tokens = torch.cat([req.inputs.input_ids[0].cpu(), answer])
        states = {}
        for layer in self._stage.keep_layers:
            parts = [req.prompt_read_states[layer]] + [s[layer] for s in req.read_states]
            states[layer] = torch.cat(parts, dim=1)
        self.parked.append(Parked(row=req.rows[0], tokens=tokens, digests=self._digests(req), states=states,
                                  used=time.monotonic(), windows=self._windows(req)))  # fmt: skip

    def _talker_rows(self, req: Request) -> None:
        sp = req.speech
        if self._talker_cache is None:
            length = self.config.talker_max_len or sp.talker.cache_length(req.inputs)
            self._talker_cache = sp.talker.new_cache(self.config.rows, length)
        if sp.talker.cache_length(req.inputs) > self._talker_cache.max_len:
            raise RequestError(f"the speech needs {sp.talker.cache_length(req.inputs)} Talker positions; "
                               f"the engine holds {self._talker_cache.max_len}")  # fmt: skip
        sp.voice = sp.vocoder.new_state(req.batch)

    # -- the Thinker -----------------------------------------------------------------------------------
    def _encode(self, req: Request) -> None:
        """Start ``req``'s media encoders on the encoder thread, from where its prompt is read (after reuse)."""
        if self._encoder is None:
            self._encoder = MediaEncoder(self._stage, self._stage.device)
        state = req.thinker
        state.embed_start = self._stage.embed_start(state)
        req.encoding = self._encoder.submit(state.inputs, state.embed_start)

    def _prefill_order(self, reading: list[Request]) -> list[Request]:
        """Who reads first this step: prompts (their embeddings ready) whose rest fits in a quarter of the
        budget — a chat turn, read in one step — up to half the budget in all, then everyone in arrival order
        (a long prompt still gets at least half of every step: nobody starves)."""
        budget = self.config.prefill_chunk
        if budget is None or not self.config.short_first:
            return reading
        first, used = [], 0
        for r in reading:
            rest = r.inputs.length - r.thinker.prefilled
            if (r.encoding is None or r.encoding.done()) and rest <= budget // 4 and used + rest <= budget // 2:
                first.append(r)
                used += rest
        return first + [r for r in reading if r not in first]

    def _prefill(self) -> None:
        budget = self.config.prefill_chunk
        reading = [r for r in self.running if r.thinker is not None and not r.thinker.prefill_done and not r.done]
        for req in self._prefill_order(reading):
            if budget is not None and budget <= 0:
                return
            state = req.thinker
            if req.encoding is not None:
                if not req.encoding.done():
                    continue  # still encoding: the others read on
                try:
                    state.embedded = req.encoding.result()
                except Exception as e:
                    self._fail(req, e)
                    continue
                finally:
                    req.encoding = None
            before = state.prefilled
            try:
                read = self._stage.prefill(state, budget)
            except Exception as e:
                self._fail(req, e)
                continue
            if budget is not None:
                budget -= state.prefilled - before
            if read is not None:
                if req.speech is not None:
                    req.speech.reply = ReplyTrack(req.batch, read)
                if self.config.prefix_reuse:
                    req.prompt_read_states = read.states
                if req.prefill_only:
                    req.thinker_done = True  # nothing to choose: it finishes (and parks) this step
                    continue
                self._chose(req, read)

    def _chose(self, req: Request, read: ThinkerRead, tokens: torch.Tensor | None = None) -> None:
        """Choose the next token of every row of ``req`` from ``read`` (unless ``tokens`` were chosen already);
        text events; the reply track."""
        if tokens is None:
            tokens = req.chooser.choose(read.logits)
        row_tokens = tokens.tolist()
        for row in range(req.batch):
            delta = req.detok[row].push(row_tokens[row])
            if req.detok[row].should_emit(delta):
                req.events.append(StreamEvent(kind="text", text=delta, token_ids=req.detok[row].take_ids(),
                                              time=req.now(), row=row))  # fmt: skip
        if req.speech is not None:
            req.speech.reply.push_token(tokens, req.chooser.finished)
        if req.chooser.done:
            req.thinker_done = True
            req.pending = None
            if req.speech is not None:
                req.speech.reply.stop()
        else:
            req.pending = tokens

    def _decode(self) -> None:
        batch = [r for r in self.running if r.pending is not None and not r.done]
        if not batch:
            return
        lo = min(r.rows[0] for r in batch)
        hi = max(r.rows[1] for r in batch)
        if len(batch) == 1:  # one request: its own tensors are the step's input
            tokens, positions, active = batch[0].pending, batch[0].thinker.position + 1, None
        else:
            device = self._stage.device
            tokens = torch.zeros(hi - lo, dtype=torch.long, device=device)
            positions = torch.zeros(3, hi - lo, 1, dtype=batch[0].thinker.position.dtype, device=device)
            active = np.zeros(hi - lo, dtype=bool)
            for r in batch:
                a, b = r.rows[0] - lo, r.rows[1] - lo
                tokens[a:b] = r.pending
                positions[:, a:b] = r.thinker.position + 1
                active[a:b] = True
            active = None if active.all() else active
        read = self._stage.decode(self._cache.rows(lo, hi), tokens, positions, active)
        reads = []
        for r in batch:
            a, b = r.rows[0] - lo, r.rows[1] - lo
            r.thinker.position = positions[:, a:b]
            mine = ThinkerRead(index=r.thinker.steps, logits=read.logits[a:b],
                               states={k: v[a:b] for k, v in read.states.items()})  # fmt: skip
            r.thinker.steps += 1
            if self.config.prefix_reuse:
                r.read_states.append(mine.states)
            if r.speech is not None:
                r.speech.reply.push_read(mine)
            reads.append(mine)
        # every request's next token at once (one logits pass per alike group; each request's own generator)
        chosen = TokenChooser.choose_many([r.chooser for r in batch], [m.logits for m in reads])
        for r, mine, tokens in zip(batch, reads, chosen):
            try:
                if isinstance(tokens, Exception):
                    raise tokens
                self._chose(r, mine, tokens)
            except Exception as e:
                self._fail(r, e)

    # -- the Talker and the vocoder ---------------------------------------------------------------------
    def _talk(self) -> None:
        stepping = []
        for req in self.running:
            sp = req.speech
            if sp is None or sp.finished or req.done or sp.reply is None:
                continue
            j = 0 if sp.state is None else sp.state.steps
            entries = sp.reply.entries(j)
            if entries is None:
                continue
            try:
                if sp.state is None:
                    if all(sp.reply.empty(r) for r in range(req.batch)):
                        sp.finished = True  # nothing to say (the reference fails on an empty answer)
                        continue
                    lo, hi = req.talker_rows
                    sp.state = sp.talker.new_state(sp.reply, req.thinker.inputs, sp.generator, self._talker_cache.rows(lo, hi))
                    logits = sp.talker.prefill(sp.state, sp.reply, req.thinker.inputs, entries)
                    self._spoke(req, logits, None)
                else:
                    embeds, positions = sp.talker.step_input(sp.state, sp.reply, entries)
                    stepping.append((req, embeds, positions))
            except Exception as e:
                self._fail(req, e)
        if not stepping:
            return
        groups = collections.defaultdict(list)  # requests of the same Talker stage class step together
        for item in stepping:
            groups[type(item[0].speech.talker)].append(item)
        for items in groups.values():
            talker = items[0][0].speech.talker
            lo = min(r.talker_rows[0] for r, _, _ in items)
            hi = max(r.talker_rows[1] for r, _, _ in items)
            if len(items) == 1:  # one request: its own tensors are the step's input
                _, embeds, positions = items[0]
                active = None
            else:
                first = items[0][1]
                embeds = first.new_zeros(hi - lo, *first.shape[1:])
                positions = items[0][2].new_zeros(3, hi - lo, 1)
                active = np.zeros(hi - lo, dtype=bool)
                for r, e, p in items:
                    a, b = r.talker_rows[0] - lo, r.talker_rows[1] - lo
                    embeds[a:b], positions[:, a:b], active[a:b] = e, p, True
                active = None if active.all() else active
            logits, hidden = talker.forward(self._talker_cache.rows(lo, hi), embeds, positions, active)
            mine = [(r, logits[r.talker_rows[0] - lo : r.talker_rows[1] - lo],
                     None if hidden is None else hidden[r.talker_rows[0] - lo : r.talker_rows[1] - lo]) for r, _, _ in items]  # fmt: skip
            many = getattr(type(talker), "choose_many", None)
            if many is not None:  # the next frames of all at once (Qwen3: one predictor loop)
                chosen = many([(r.speech.talker, r.speech.state, lg, h) for r, lg, h in mine])
                for (r, _, _), codes in zip(mine, chosen):
                    if isinstance(codes, Exception):
                        self._fail(r, codes)  # a request's own failure: the others go on
                    else:
                        self._voicing.append((r, codes))
                continue
            for r, lg, h in mine:
                try:
                    self._spoke(r, lg, h)
                except Exception as e:
                    self._fail(r, e)

    def _spoke(self, req: Request, logits: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """Choose the next frame of ``req``'s Talker from ``logits``; push it to the vocoder; audio events."""
        sp = req.speech
        codes = sp.talker.choose(sp.state, logits, hidden)
        self._voicing.append((req, codes))  # vocoded in :meth:`_vocode`, with the other requests' frames

    def _vocode(self) -> None:
        """Push this step's frames to their requests' vocoders: requests whose vocoder stages share a model
        run as one batch (``push_many`` of the stage class, where it has one), the others one by one."""
        items, self._voicing = self._voicing, []
        groups = collections.defaultdict(list)
        for req, codes in items:
            if not req.done:
                v = req.speech.vocoder  # grouped by the vocoder model the stages share (Token2Wav / Code2Wav)
                groups[(type(v), id(getattr(v, "t2w", None) or getattr(v, "code2wav", None) or v))].append((req, codes))
        for (kind, _), group in groups.items():
            args = [(r.speech.vocoder, r.speech.voice, c, r.speech.state.ended, r.speech.state.done, r.speech.state.speaking)
                    for r, c in group]  # fmt: skip
            results = None
            if len(group) > 1 and getattr(kind, "push_many", None) is not None:
                try:
                    results = kind.push_many(args)
                except Exception:
                    results = None  # one request's fault: run them one by one, so that only it fails
            for k, (req, _) in enumerate(group):
                sp = req.speech
                try:
                    chunks = results[k] if results is not None else sp.vocoder.push(*args[k][1:])
                except Exception as e:
                    self._fail(req, e)
                    continue
                for row, chunk in enumerate(chunks):
                    if chunk is not None and chunk.numel():
                        req.events.append(StreamEvent(kind="audio", audio=chunk.float().cpu(), sample_rate=sp.vocoder.sample_rate,
                                                      time=req.now(), row=row))  # fmt: skip
                if sp.state.done:
                    sp.finished = True

    # -- the end of a request ------------------------------------------------------------------------------
    def _complete(self, req: Request) -> bool:
        return req.thinker_done and (req.speech is None or req.speech.finished)

    def _release(self, req: Request, park: bool = False) -> None:
        if req in self.running:
            self.running.remove(req)
        if req.encoding is not None:
            req.encoding.cancel()  # not started yet: dropped; running: its result is dropped
            req.encoding = None
        if req.talker_rows is not None:
            lo, hi = req.talker_rows
            self._talker_free[lo:hi] = [True] * (hi - lo)
            req.talker_rows = None
        if req.rows is not None:
            lo, hi = req.rows
            if park:
                self._park(req)  # the row stays taken, by the parked conversation
            else:
                self._free[lo:hi] = [True] * (hi - lo)
            req.rows = None

    def _finish(self, req: Request) -> None:
        if req.done:
            return
        cancelled = req._wants_cancel() and not self._complete(req)
        for row, d in enumerate(req.detok):
            delta = d.flush()
            if delta or d.pending():
                req.events.append(StreamEvent(kind="text", text=delta, token_ids=d.take_ids(), time=req.now(), row=row))
        ids = req.chooser.sequences() if req.chooser.tokens else torch.zeros(req.batch, 0, dtype=torch.long)
        req.events.append(StreamEvent(
            kind="done",
            time=req.now(),
            finish_reasons=[d.finish_reason(cancelled) for d in req.detok],
            num_tokens=[len(d.ids) for d in req.detok],
            text_ids=ids,
            codes=req.speech.codes(req.batch) if req.speech is not None else None,
        ))  # fmt: skip
        req.done = True
        park = self.config.prefix_reuse and req.batch == 1 and not cancelled and req.thinker is not None
        self._release(req, park=park and req.thinker.prefill_done)

    def _fail(self, req: Request, error: BaseException) -> None:
        if req.done:
            return
        req.error = error
        req.events.append(StreamEvent(kind="error", time=req.now(), error=error))
        req.done = True
        self._release(req)


def run(
    model,
    inputs: ModelInputs,
    options: GenerateOptions,
    streaming_audio: bool = True,
    forced: list[int] | None = None,
) -> Iterator[StreamEvent]:
    """One request on an engine of its own (sized for it): its events as they are produced, ``done`` last.

    Everything that can be wrong with the arguments raises here, not at the first event.
    """
    max_new = len(forced) if forced is not None else options.text.max_new_tokens
    engine = Engine(model, EngineConfig(rows=inputs.batch, max_len=inputs.length + max_new))
    with torch.inference_mode():
        request = engine.submit(inputs, options, forced=forced, streaming_audio=streaming_audio)
    return engine.events(request)


def collect(model, events: Iterator[StreamEvent], eos: tuple[int, ...]) -> GenerateResult:
    """Drain a run into a :class:`GenerateResult` (text, codes and audio per row, timings)."""
    first_token = first_audio = None
    audio: dict[int, list[torch.Tensor]] = {}
    done = None
    rate = 24000
    for ev in events:
        if ev.kind == "text" and first_token is None:
            first_token = ev.time
        elif ev.kind == "audio":
            first_audio = ev.time if first_audio is None else first_audio
            audio.setdefault(ev.row, []).append(ev.audio)
            rate = ev.sample_rate
        elif ev.kind == "done":
            done = ev
    ids = done.text_ids
    texts = None
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        texts = [tokenizer.decode(strip_after_eos(row, eos), skip_special_tokens=True) for row in ids.tolist()]
    waves = None
    if done.codes is not None:
        waves = [torch.cat(audio[r]) if r in audio else torch.zeros(0) for r in range(ids.shape[0])]
    timings = {"first_token_s": first_token or 0.0, "total_s": done.time}
    if done.codes is not None:
        timings["first_audio_s"] = first_audio if first_audio is not None else done.time
    return GenerateResult(text_ids=ids, text=texts, codes=done.codes, audio=waves, sample_rate=rate, timings=timings)
