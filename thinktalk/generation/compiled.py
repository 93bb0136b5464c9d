"""torch.compile'd speech decoders and decode steps, owned by the engine (never cached on modules), like :mod:`graphs`.

The speech decoders are where a CPU spends its time once the LLM steps are batched: Qwen2.5's Token2Wav
(a DiT evaluated ~28 times per utterance, then BigVGAN, whose anti-aliased activations are two depthwise
convolutions and a dozen elementwise passes over a signal twice as long, per layer — compiled in their fused
form, ``AntiAliasedSnake.fused``) and Qwen3's Code2Wav (a deep stack of small convolutions and SnakeBeta
activations). Eager PyTorch runs every one of those passes as its own kernel over memory; inductor fuses
them into a few loops (and on a GPU removes the launches). The LLMs' decode steps (``Decoder.body`` for one new
token: rotary, the layers, the final norm; the cache slots and mask are prepared eagerly) are compiled too: at
small shapes a step is a hundred small kernels, and the Talker takes one per codec id. Measured in
``docs/benchmarks.md``.

    thinktalk.compile_speech(model)       # once, after loading: registers compiled forwards
    # ... every later generate / stream / serve uses them; the first call of each shape compiles

What is compiled is named by the model (``model.compile_targets()``: ``(name, module, method[, torch.compile
options])`` tuples) and called through :func:`call`, which falls back to the module's own method when nothing
is registered — the plain eager path, which stays the reference (tests compare the two). Compiled functions
are kept per module in a weak dictionary, so they go with the model, and the module itself is left untouched
(trainable; a compiled forward is only used where the generation code asks for it).
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Iterable

import torch

_PER_CALL_LIMIT = "recompile_limit" in inspect.signature(torch.compile).parameters  # torch >= 2.13
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {method: compiled function}
_LOCK = threading.Lock()


def compile_speech(model, backend: str = "inductor", mode: str | None = None, only: Iterable[str] | None = None) -> list[str]:
    """Compile ``model``'s speech path (what ``model.compile_targets()`` names: the speech decoders and the decode
    steps of its LLMs) for every later call; ``only``: just the targets of these names.

    Compilation itself happens lazily, at the first call of each input shape (tens of seconds per shape on
    a CPU; the inductor cache on disk makes later processes faster). Returns the names compiled.
    """
    targets = getattr(model, "compile_targets", None)
    if targets is None:
        raise ValueError(f"{type(model).__name__} names nothing to compile")
    chosen = targets()
    if only is not None:
        only = set(only)
        known = {t[0] for t in chosen}
        if only - known:
            raise ValueError(f"nothing to compile is called {sorted(only - known)}; {type(model).__name__} has {sorted(known)}")
        chosen = [t for t in chosen if t[0] in only]
    names = []
    with _LOCK:
        for name, module, method, *options in chosen:
            fn = getattr(type(module), method)
            # The unbound function (module passed at call time): a bound method would keep the module alive.
            # A target may add torch.compile options: ``dynamic``, and ``recompile_limit`` where a function needs
            # more graphs than dynamo's default of 8 (past its limit a function runs eagerly, silently slower).
            opts = dict(options[0]) if options else {}
            if mode is not None:
                opts.pop("options", None)  # torch.compile takes a mode or inductor options, not both: the mode wins
            limit = opts.pop("recompile_limit", None)
            if limit is not None and _PER_CALL_LIMIT:
                opts["recompile_limit"] = limit
            elif limit is not None:  # older torch: only the global limit exists
                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
            _COMPILED.setdefault(module, {})[method] = torch.compile(fn, backend=backend, mode=mode, **opts)
            if name not in names:  # several modules may share a name (and their graphs: same code, same shapes)
                names.append(name)
    return names


def uncompile(model) -> None:
    """Forget ``model``'s compiled functions: every call runs eagerly again."""
    with _LOCK:
        for _, module, *_ in model.compile_targets():
            _COMPILED.pop(module, None)


def is_compiled(module, method: str = "forward") -> bool:
    return method in _COMPILED.get(module, {})


def call(module, method: str, *args):
    """``module.<method>(*args)`` — through its compiled function when :func:`compile_speech` registered one."""
    fn = _COMPILED.get(module, {}).get(method)
    if fn is None:
        return getattr(module, method)(*args)
    return fn(module, *args)
