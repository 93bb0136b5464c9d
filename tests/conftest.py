"""Shared fixtures: tiny random checkpoints built by the reference implementation (transformers 5.23)."""

from __future__ import annotations

import pytest
import torch

from thinktalk.testing.tiny import build_reference_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny25_weights(tmp_path_factory):
    """Qwen2.5-Omni tiny checkpoint (thinker + talker + token2wav weights and config.json only)."""
    d = tmp_path_factory.mktemp("tiny25_weights")
    build_reference_checkpoint(str(d), "qwen2_5_omni", seed=0, with_speech=True, extras=False)
    return d


@pytest.fixture(scope="session")
def tiny25(tmp_path_factory):
    """Qwen2.5-Omni tiny checkpoint with tokenizer, chat template, preprocessor config and speakers."""
    d = tmp_path_factory.mktemp("tiny25")
    build_reference_checkpoint(str(d), "qwen2_5_omni", seed=0, with_speech=True, extras=True)
    return d
