"""CUDA graphs owned by the engine (never cached on modules): captured once per module and batch size.

A captured graph replays a fixed sequence of kernels on static input/output buffers, removing the
launch overhead of many small layer calls. The plain (eager) path stays the reference: tests compare
them where a GPU exists. Graphs are kept per module in a weak dictionary, so they go with the model.
"""

from __future__ import annotations

import threading
import weakref

import torch

_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class GraphedPredictor:
    """The greedy code predictor (``CodePredictor.predict``) of ``batch`` rows as one CUDA graph.

    The fixed-length loop (G-1 steps; every shape and cache slot the same for every frame) is ~75
    small layer calls; one replay runs them all. Its static buffers are shared: one thread at a time.
    """

    def __init__(self, predictor, batch: int):
        w = predictor.model.norm.weight
        if w.device.type != "cuda":
            raise ValueError("CUDA graphs need the code predictor on a CUDA device")
        dim = predictor.cfg.hidden_size
        self.lock = threading.Lock()
        with torch.inference_mode():
            self.hidden = torch.zeros(batch, 1, dim, dtype=w.dtype, device=w.device)
            self.code0_embed = torch.zeros_like(self.hidden)
            self.cache = predictor.new_cache(batch)
            side = torch.cuda.Stream(device=w.device)
            side.wait_stream(torch.cuda.current_stream(w.device))
            with torch.cuda.stream(side):  # warm up (kernel selection) outside the capture
                for _ in range(2):
                    predictor.predict(self.hidden, self.code0_embed, None, None, self.cache)
            torch.cuda.current_stream(w.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # the encoder thread may allocate
                self.codes, self.embeds = predictor.predict(self.hidden, self.code0_embed, None, None, self.cache)

    def __call__(self, talker_hidden: torch.Tensor, code0_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.lock:
            self.hidden.copy_(talker_hidden)
            self.code0_embed.copy_(code0_embed)
            self.graph.replay()
            return self.codes.clone(), self.embeds.clone()


def graphed_predictor(predictor, batch: int) -> GraphedPredictor:
    with _LOCK:
        per_module = _GRAPHS.setdefault(predictor, {})
        if batch not in per_module:
            per_module[batch] = GraphedPredictor(predictor, batch)
        return per_module[batch]
