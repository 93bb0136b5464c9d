"""Qwen3-Omni end to end: conversation → thinktalk.Processor → model → text and streamed speech (tiny checkpoint)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import tiny3  # noqa: F401
from thinktalk.testing.speech import qwen3_reference_speech

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")


def _roles_are_single_tokens(proc) -> bool:
    """The Talker (ours and the reference's) finds turns by the official role token ids."""
    return [proc.tokenizer.encode(w) for w in ("system", "user", "assistant")] == [[8948], [872], [77091]]


def processor(directory):
    proc = thinktalk.Processor.from_pretrained(directory)
    if not _roles_are_single_tokens(proc):
        pytest.skip("the tiny tokenizer does not encode 'system'/'user'/'assistant' as the official single tokens")
    return proc


def conversation():
    t = np.arange(16000 * 2) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    image = PIL.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful voice assistant."}]},
        {"role": "user", "content": [
            {"type": "audio", "audio": tone},
            {"type": "image", "image": image},
            {"type": "text", "text": "What do you hear and see?"},
        ]},
    ]


def test_processor_to_speech_matches_reference(tiny3):  # noqa: F811
    proc = processor(tiny3)
    inputs = proc(conversation())
    assert inputs["input_ids"].shape[0] == 1 and "pixel_values" in inputs and "input_features" in inputs
    model = thinktalk.load(tiny3)
    kwargs = dict(speaker="ethan", max_new_tokens=8, eos_token_id=151645, talker_max_new_tokens=10, talker_do_sample=False)
    res = model.generate(**inputs, return_audio=True, **kwargs)
    assert res.codes[0].shape == (9, 16) and res.audio[0].shape == (model.code2wav.num_samples(9),)
    if model.tokenizer is not None:
        assert isinstance(res.text[0], str)

    ref = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny3, dtype=torch.float32).eval()
    ref.talker.config.audio_config = ref.config.thinker_config.audio_config  # see test_qwen3_speech
    ref_ids, ref_codes, _ = qwen3_reference_speech(ref, inputs, speaker="ethan", thinker_max_new_tokens=8,
                                                   thinker_do_sample=False, thinker_eos_token_id=151645,
                                                   talker_do_sample=False, talker_max_new_tokens=10)  # fmt: skip
    assert torch.equal(res.text_ids, ref_ids)
    assert torch.equal(res.codes[0], ref_codes)

    events = list(model.stream(**inputs, **kwargs))
    audio = torch.cat([e.audio for e in events if e.kind == "audio"])
    assert (audio - res.audio[0]).abs().max().item() <= 2e-4


def test_talker_system_prompt_is_the_talkers_own(tiny3):  # noqa: F811
    """The Thinker's system turn never reaches the Talker; talker_system_ids gives it one of its own."""
    proc = processor(tiny3)
    model = thinktalk.load(tiny3)
    kwargs = dict(speaker="ethan", max_new_tokens=6, eos_token_id=(), talker_max_new_tokens=6, talker_do_sample=False,
                  return_audio=True)
    conv = conversation()
    base = model.generate(**proc(conv), **kwargs)
    system = proc.tokenizer.encode("<|im_start|>system\nSpeak slowly.<|im_end|>\n")
    spoken = model.generate(**proc(conversation()), talker_system_ids=torch.tensor([system]), **kwargs)
    assert torch.equal(spoken.text_ids, base.text_ids)  # the Thinker is unaffected
    assert not torch.equal(spoken.codes[0], base.codes[0])
