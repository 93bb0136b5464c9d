"""The engine's encoder thread: a prompt's media encoders run beside the engine's steps, not inside one.

A 4000x4000 image's vision encoder takes seconds; run inside :meth:`Engine.step <thinktalk.generation.engine.Engine.step>`
it stalls every other conversation's tokens and audio for that long. With ``EngineConfig.encode_async`` the
engine hands a newly admitted media prompt's :meth:`ThinkerStage.embed
<thinktalk.generation.thinker.ThinkerStage.embed>` (the encoders, the scatter into the placeholders, the
TMRoPE positions) to :class:`MediaEncoder` and keeps stepping the others; the prompt's LLM prefill starts on
the first step after its embeddings are ready. The embeddings are the same computation on the same inputs —
only the thread differs — so results are unchanged (tested against the plain path). The start of the
embeddings is fixed at admission, after prefix reuse is matched, so media already in a reused KV row are
not encoded again.

One worker thread: encodes run one after another, in admission order. It runs with the caller's intra-op
thread count (a new thread's OpenMP default may differ) and, on CUDA, on its own stream, so the encoder's
kernels overlap the engine's decode steps instead of queueing in front of them; the result is synchronized
before it is handed over and its tensors are recorded as used on the engine's stream.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import torch

from thinktalk.generation.inputs import ModelInputs


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class MediaEncoder:
    """Runs ``stage.embed(inputs, start)`` on one worker thread; :meth:`submit` returns its future."""

    def __init__(self, stage, device: torch.device):
        self.stage = stage
        self.device = device
        threads = torch.get_num_threads()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="thinktalk-encode", initializer=torch.set_num_threads, initargs=(threads,)
        )
        self._stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None

    def submit(self, inputs: ModelInputs, start: int) -> concurrent.futures.Future:
        ready = None
        if self._stream is not None:  # the inputs were copied to the device on the engine's stream
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        return self._pool.submit(
            self._job, inputs, start, ready, torch.cuda.current_stream(self.device) if ready else None
        )

    def _job(self, inputs: ModelInputs, start: int, ready, main):
        with torch.inference_mode():
            if self._stream is None:
                return self.stage.embed(inputs, start)
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                out = self.stage.embed(inputs, start)
            self._stream.synchronize()
            for t in _tensors(out):
                if t.device.type == "cuda":
                    t.record_stream(main)  # freed later by the engine: not reused before its stream is past it
            return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
