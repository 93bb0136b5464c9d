"""Server-side voice activity detection for ``/v1/realtime``: Silero VAD, and the turn logic on top of it.

:class:`TurnDetection` is the session's ``turn_detection: {"type": "server_vad", ...}`` object, checked.
:class:`VoiceActivity` runs the ``silero-vad`` package's own model (shipped inside the package, TorchScript,
~2 MB) over the 16 kHz audio as it is appended, one 32 ms window (512 samples) at a time, and turns its
speech probabilities into turn events with hysteresis (as Silero's own ``VADIterator`` does):

- ``speech_started`` at the first window whose probability is >= ``threshold``;
- ``speech_stopped`` once the probability has stayed below ``threshold - 0.15`` for ``silence_duration_ms``;
  the turn's audio is from ``prefix_padding_ms`` before the start to the end of the last speech window.

Positions are in milliseconds of audio appended since the session began (OpenAI's ``audio_start_ms`` /
``audio_end_ms``), so the decisions depend on the audio only, not on how fast it arrives.

The Silero model keeps an LSTM state across windows, so every session gets its own instance (the
TorchScript file is read once per process; a further instance costs ~50 ms, done off the event loop).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import numpy as np

from thinktalk.serve.errors import invalid

RATE = 16000  # the rate Silero runs at (the model's audio rate too)
WINDOW = 512  # samples per Silero window at 16 kHz (32 ms)
WINDOW_MS = WINDOW * 1000 // RATE


@dataclass
class TurnDetection:
    """``turn_detection`` of type ``server_vad`` (OpenAI's defaults)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = None

    @classmethod
    def parse(cls, value, param: str) -> TurnDetection | None:
        """The session's ``turn_detection`` (``None``: push-to-talk), or a 400 naming the bad field."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise invalid("must be null or an object", param)
        kind = value.get("type", "server_vad")
        if kind != "server_vad":
            raise invalid(f"turn detection '{kind}' is not supported; use 'server_vad' or null", f"{param}.type",
                          "unsupported_parameter")  # fmt: skip
        out = cls()
        for key, v in value.items():
            p = f"{param}.{key}"
            if key == "type":
                continue
            if key == "threshold":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                    raise invalid("must be a number between 0 and 1", p)
                out.threshold = float(v)
            elif key in ("prefix_padding_ms", "silence_duration_ms"):
                hi = 5000 if key == "prefix_padding_ms" else 10000
                lo = 0 if key == "prefix_padding_ms" else WINDOW_MS
                if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                    raise invalid(f"must be an integer from {lo} to {hi}", p)
                setattr(out, key, v)
            elif key in ("create_response", "interrupt_response"):
                if not isinstance(v, bool):
                    raise invalid("must be true or false", p)
                setattr(out, key, v)
            elif key == "idle_timeout_ms":
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1000 <= v <= 600_000):
                    raise invalid("must be null or an integer from 1000 to 600000", p)
                out.idle_timeout_ms = v
            else:
                raise invalid(f"unknown turn_detection field '{key}'", p, "unknown_parameter")
        return out

    def to_json(self) -> dict:
        return {"type": "server_vad", **asdict(self)}


_MODEL_LOCK = threading.Lock()


def load_silero():
    """A fresh Silero VAD model (its own LSTM state), from the ``silero-vad`` package."""
    try:
        from silero_vad import load_silero_vad
    except ImportError:
        raise invalid("server-side turn detection needs the 'silero-vad' package (pip install 'thinktalk[serve]'); "
                      "set turn_detection to null and commit turns", "turn_detection", "unsupported_parameter") from None  # fmt: skip
    with _MODEL_LOCK:  # the first load reads the TorchScript file; concurrent first loads would each do it
        return load_silero_vad()


class VoiceActivity:
    """One session's speech detector over appended 16 kHz audio (see the module docstring)."""

    def __init__(self, config: TurnDetection, model=None):
        self.config = config
        self.model = model if model is not None else load_silero()
        self._tail = np.zeros(0, dtype=np.float32)  # samples not yet a whole window
        self.position_ms = 0.0  # audio seen so far
        self.speaking = False
        self.start_ms = 0  # the current (or last) speech's first window
        self.last_speech_ms = 0  # end of the last window at or above the threshold
        self.probs: list[float] = []  # kept for tests and debugging (bounded)

    def reset(self) -> None:
        self.model.reset_states()
        self._tail = np.zeros(0, dtype=np.float32)
        self.speaking = False

    def feed(self, audio16: np.ndarray) -> list[tuple[str, int]]:
        """Run the model over ``audio16`` (float32 at 16 kHz); the turn events it causes, with their ms."""
        import torch

        events: list[tuple[str, int]] = []
        samples = np.concatenate([self._tail, audio16.astype(np.float32, copy=False)])
        n = len(samples) // WINDOW
        self._tail = samples[n * WINDOW :]
        if n == 0:
            return events
        stop_below = max(self.config.threshold - 0.15, 0.01)
        with torch.inference_mode():
            windows = torch.from_numpy(samples[: n * WINDOW].copy()).reshape(n, WINDOW)
            for w in windows:
                p = float(self.model(w, RATE))
                start = self.position_ms
                self.position_ms += WINDOW_MS
                self.probs = self.probs[-511:] + [p]
                if p >= self.config.threshold:
                    self.last_speech_ms = int(self.position_ms)
                    if not self.speaking:
                        self.speaking = True
                        self.start_ms = int(start)
                        events.append(("speech_started", self.start_ms))
                elif self.speaking and p < stop_below:
                    if self.position_ms - self.last_speech_ms >= self.config.silence_duration_ms:
                        self.speaking = False
                        events.append(("speech_stopped", self.last_speech_ms))
        return events
