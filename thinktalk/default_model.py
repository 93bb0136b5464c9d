"""The embedded default model: what ``thinktalk chat`` / ``serve`` / ``demo`` / ``transcribe`` use when no
checkpoint is given.

It is **thinktalk-tiny** (``thinktalk/assets/thinktalk-tiny``): a 3.8 M-parameter Qwen3-Omni trained by the
project's own recipes (``scripts/train_tiny.sh``, docs/tiny-model.md) on pictures of coloured shapes, small sums,
repeated phrases and transcription, in the official checkpoint layout. It knows nothing else: ask it what it was
trained on (``thinktalk demo`` shows how). When the package was installed without it, the fallback is a tiny
Qwen2.5-Omni with random weights, built into the user's cache, and a note says so.
"""

from __future__ import annotations

import os
import sys

TINY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "thinktalk-tiny")

DEFAULT_MODEL_NOTE = (
    "no checkpoint given: using the embedded default model thinktalk-tiny (3.8 M parameters, trained only on "
    "pictures of coloured shapes, small sums, 'Say ...' and 'What did I say?'; see `thinktalk demo`). "
    "Pass an official checkpoint directory for a real assistant, e.g. `thinktalk chat /models/Qwen3-Omni-30B-A3B-Instruct ...`."
)
RANDOM_MODEL_NOTE = (
    "no checkpoint given and thinktalk-tiny is not installed ({missing} not found): using a tiny Qwen2.5-Omni "
    "with RANDOM weights (the pipeline is real, the answers are gibberish). Pass an official checkpoint directory."
)


def shipped_model_dir() -> str | None:
    """The trained default model's directory, or None when the package holds no weights for it."""
    return TINY_DIR if os.path.isfile(os.path.join(TINY_DIR, "model.safetensors")) else None


def random_model_dir(family: str = "qwen2_5_omni") -> str:
    """A tiny random-weight model of ``family``, built once into the user's cache (``THINKTALK_CACHE`` or
    ~/.cache/thinktalk)."""
    from thinktalk.testing.tiny import build_tiny_checkpoint

    root = os.environ.get("THINKTALK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "thinktalk")
    directory = os.path.join(root, f"tiny-{family}")
    if not os.path.exists(os.path.join(directory, "config.json")):
        build_tiny_checkpoint(directory, family)
    return directory


def default_model_dir() -> str:
    """thinktalk-tiny when installed, else the random tiny Qwen2.5-Omni."""
    return shipped_model_dir() or random_model_dir()


def resolve_model_dir(path: str | None, quiet: bool = False) -> str:
    """``path`` itself, or (with a note on stderr) the embedded default model when none is given."""
    if path:
        return path
    shipped = shipped_model_dir()
    if not quiet:
        missing = os.path.join(TINY_DIR, "model.safetensors")
        print(DEFAULT_MODEL_NOTE if shipped else RANDOM_MODEL_NOTE.format(missing=missing), file=sys.stderr)
    return shipped or random_model_dir()
