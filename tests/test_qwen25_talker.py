"""Qwen2.5-Omni Talker parity with the reference (transformers 5.23): logits and greedy codec ids.

Inputs are synthetic prompts (placeholder runs + random media features) with one left-padding token:
with padding the reference runs its Talker as trained (codec pad/bos embeddings, TMRoPE positions); see
``test_unpadded_prompt_reproduces_reference_quirk`` for what it does without.
"""

from __future__ import annotations

import pytest
import torch

import thinktalk
from thinktalk.models.qwen2_5_omni import talker as talking
from thinktalk.testing.speech import THINKER_EOS, reference_speech, synthetic_inputs

GEN = {"talker_do_sample": False, "talker_max_new_tokens": 20, "token2wav_num_steps": 2}


@pytest.fixture(scope="module")
def models(tiny25):
    from transformers import Qwen2_5OmniForConditionalGeneration

    ref = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(tiny25)).eval()
    return ref, thinktalk.load(tiny25)


def run_ours(model, inputs, **kwargs):
    """generate(return_audio=True) plus the Talker's last-position logits of every step."""
    logits = []
    hook = model.talker.register_forward_hook(lambda m, args, out: logits.append(out[:, -1]))
    try:
        res = model.generate(**inputs, return_audio=True, **kwargs)
    finally:
        hook.remove()
    return res, torch.stack(logits, dim=1)


def run_reference(ref, inputs, max_new_tokens=6, eos=THINKER_EOS, **kwargs):
    return reference_speech(
        ref, inputs, thinker_max_new_tokens=max_new_tokens, thinker_do_sample=False,
        thinker_eos_token_id=list(eos), **GEN, **kwargs,
    )


@pytest.mark.parametrize("kind", ["text", "audio", "image", "video", "audio_in_video"])
def test_talker_matches_reference(models, kind):
    ref, model = models
    inputs = synthetic_inputs(kind, seed=3)
    aiv = {"use_audio_in_video": True} if kind == "audio_in_video" else {}
    expected = run_reference(ref, inputs, **aiv)
    res, logits = run_ours(model, inputs, max_new_tokens=6, **GEN, **aiv)
    assert torch.equal(res.text_ids, expected.text_ids)
    assert logits.shape == expected.logits.shape
    torch.testing.assert_close(logits, expected.logits, atol=2e-4, rtol=1e-4)
    n = talking.utterance_lengths(expected.codes, model.talker.eos_token_ids)[0]
    assert torch.equal(res.codes[0], expected.codes[0, :n])


def test_thinker_end_token_and_batch_rows(models):
    """Rows that end at different Thinker steps: the text-eos/pad track per row, as the reference rewrites it."""
    ref, model = models
    a, b = synthetic_inputs("text", seed=5, pad=3), synthetic_inputs("text", seed=6, pad=1, text_len=7)
    inputs = {
        "input_ids": torch.cat([a["input_ids"], b["input_ids"]]),
        "attention_mask": torch.cat([a["attention_mask"], b["attention_mask"]]),
    }
    probe = model.generate(**inputs, max_new_tokens=8, eos_token_id=[-1]).text_ids
    eos = int(probe[0, 3])  # row 0 ends at its 4th token (or earlier if it repeats); row 1 usually runs on
    expected = run_reference(ref, inputs, max_new_tokens=8, eos=[eos])
    res, logits = run_ours(model, inputs, max_new_tokens=8, eos_token_id=[eos], **GEN)
    assert torch.equal(res.text_ids, expected.text_ids)
    assert bool((res.text_ids == eos).any())
    torch.testing.assert_close(logits, expected.logits, atol=2e-4, rtol=1e-4)
    lengths = talking.utterance_lengths(expected.codes, model.talker.eos_token_ids)
    for row in range(2):
        assert torch.equal(res.codes[row], expected.codes[row, : lengths[row]])


def test_unpadded_prompt_reproduces_reference_quirk(models):
    """transformers 5.23 drops an all-ones attention mask in generate(); its Talker then skips the codec
    pad/bos embeddings and TMRoPE. ``reference_quirks=True`` reproduces that; the default keeps the trained set-up."""
    ref, model = models
    inputs = synthetic_inputs("image", seed=4, pad=0)
    expected = run_reference(ref, inputs)
    res, logits = run_ours(model, inputs, max_new_tokens=6, reference_quirks=True, **GEN)
    torch.testing.assert_close(logits, expected.logits, atol=2e-4, rtol=1e-4)
    _, default_logits = run_ours(model, inputs, max_new_tokens=6, **GEN)
    assert (default_logits[:, 0] - expected.logits[:, 0]).abs().max() > 1e-2


def test_talker_positions_are_thinker_positions(models):
    """The Talker's prompt positions are the Thinker's TMRoPE positions of the same ids (+2 text positions)."""
    _, model = models
    inputs = synthetic_inputs("video", seed=2, pad=0)
    ids = inputs["input_ids"]
    emb = model.thinker.embed(ids, inputs["attention_mask"], pixel_values_videos=inputs["pixel_values_videos"],
                              video_grid_thw=inputs["video_grid_thw"], video_second_per_grid=inputs["video_second_per_grid"])
    text_ids = torch.cat([ids, torch.tensor([[151872, 42]])], dim=1)
    pos = model.talker.positions(text_ids, None, video_grid_thw=inputs["video_grid_thw"],
                                 video_second_per_grid=inputs["video_second_per_grid"])
    assert torch.equal(pos[:, :, : ids.shape[1]], emb.position_ids)
    last = emb.position_ids[:, :, -1:]
    assert torch.equal(pos[:, :, -2:], torch.cat([last + 1, last + 2], dim=2))
