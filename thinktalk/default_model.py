"""The embedded default model: what ``thinktalk chat`` / ``serve`` use when no checkpoint is given."""

from __future__ import annotations

import os
import sys

DEFAULT_MODEL_NOTE = (
    "no checkpoint given: using the embedded default model — a tiny Qwen2.5-Omni with RANDOM weights "
    "(the pipeline is real, the answers are gibberish). Pass an official checkpoint directory, e.g. "
    "`thinktalk chat /models/Qwen2.5-Omni-7B ...`."
)


def default_model_dir(family: str = "qwen2_5_omni") -> str:
    """The embedded default model, built once into the user's cache (``THINKTALK_CACHE`` or ~/.cache/thinktalk)."""
    from thinktalk.testing.tiny import build_tiny_checkpoint

    root = os.environ.get("THINKTALK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "thinktalk")
    directory = os.path.join(root, f"tiny-{family}")
    if not os.path.exists(os.path.join(directory, "config.json")):
        build_tiny_checkpoint(directory, family)
    return directory


def resolve_model_dir(path: str | None) -> str:
    """``path`` itself, or (with a note on stderr) the embedded default model when none is given."""
    if path:
        return path
    print(DEFAULT_MODEL_NOTE, file=sys.stderr)
    return default_model_dir()
