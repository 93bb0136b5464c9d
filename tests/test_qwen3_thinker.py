"""Qwen3-Omni Thinker parity with the reference: logits, hidden states, positions, AuT lengths, greedy tokens."""

from __future__ import annotations

import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import thinker_cases, tiny3_weights  # noqa: F401
from thinktalk.models.qwen3_omni.model import Qwen3Omni

transformers = pytest.importorskip("transformers")
M = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")

CASES = thinker_cases()


@pytest.fixture(scope="module")
def ref_thinker(tiny3_weights):  # noqa: F811
    m = transformers.Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(tiny3_weights, dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def ours(tiny3_weights):  # noqa: F811
    return thinktalk.load(tiny3_weights, components=("thinker",))


def test_load_returns_qwen3_omni(ours):
    assert isinstance(ours, Qwen3Omni)
    assert ours.talker is None and ours.code2wav is None and not ours.has_speech


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_reference(name, ref_thinker, ours):
    inputs, use_aiv = CASES[name]
    with torch.no_grad():
        ref = ref_thinker(**inputs, use_audio_in_video=use_aiv, output_hidden_states=True)
        out = ours.thinker(**inputs, use_audio_in_video=use_aiv, output_hidden_states=True)
    valid = inputs["attention_mask"].bool()
    diff = (ref.logits - out.logits)[valid].abs().max().item()
    scale = ref.logits[valid].abs().max().item()
    print(f"{name}: max abs logit diff {diff:.3e} (logit scale {scale:.3f})")
    assert diff <= 1e-4 * max(1.0, scale)
    # Hidden states as the reference reports them (deepstack additions not included, last one normed).
    assert len(out.hidden_states) == len(ref.hidden_states)
    for a, b in zip(ref.hidden_states, out.hidden_states):
        assert (a - b)[valid].abs().max().item() <= 1e-4 * max(1.0, a[valid].abs().max().item())


@pytest.mark.parametrize("name", list(CASES))
def test_positions_match_reference(name, ref_thinker, ours):
    inputs, use_aiv = CASES[name]
    fam = inputs.get("feature_attention_mask")
    lens = fam.sum(-1) if fam is not None else None
    ref_pos, ref_delta = ref_thinker.model.get_rope_index(
        inputs["input_ids"], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), inputs["attention_mask"],
        use_aiv, lens, inputs.get("video_second_per_grid"),
    )
    pos, delta = ours.thinker.rope_index(
        inputs["input_ids"], inputs["attention_mask"], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
        lens, inputs.get("video_second_per_grid"), use_aiv,
    )
    assert pos.dtype == torch.float32
    assert torch.equal(pos, ref_pos.float())
    assert torch.equal(delta.view(-1), ref_delta.float().view(-1))


def test_fractional_video_times_are_kept(ours):
    inputs, _ = CASES["video_fractional_time"]
    pos, _ = ours.thinker.rope_index(
        inputs["input_ids"], inputs["attention_mask"], video_grid_thw=inputs["video_grid_thw"],
        video_second_per_grid=inputs["video_second_per_grid"],
    )
    assert (pos.frac() == 0.5).any()  # 0.5 s per grid × 13 positions/s


def test_aut_output_lengths_match_reference(ref_thinker, ours):
    """Clip lengths below one chunk, exact multiples and remainders, batched together and one by one."""
    lengths = [1, 7, 37, 99, 100, 101, 199, 230, 400, 401, 803, 1000]
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(128, sum(lengths), generator=gen)
    lens = torch.tensor(lengths)
    with torch.no_grad():
        ref = ref_thinker.model.audio_tower(feats, feature_lens=lens).last_hidden_state
        out = ours.thinker.audio_tower(feats, lens)
    ref_lens = M._get_feat_extract_output_lengths(lens, 50)
    assert ours.thinker.audio_tower.output_lengths(lens).tolist() == ref_lens.tolist()
    assert out.shape == ref.shape == (int(ref_lens.sum()), ours.cfg.thinker.text.hidden_size)
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    for n in (1, 100, 101, 401):  # alone (the conv padding differs from the batched run)
        f = torch.randn(128, n, generator=gen)
        with torch.no_grad():
            r = ref_thinker.model.audio_tower(f, feature_lens=torch.tensor([n])).last_hidden_state
            o = ours.thinker.audio_tower(f, torch.tensor([n]))
        assert o.shape == r.shape
        assert (o - r).abs().max().item() <= 1e-4 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("name", ["text", "audio", "image", "video_with_audio", "batch_left_padding"])
def test_greedy_tokens_match_reference(name, ref_thinker, ours):
    inputs, use_aiv = CASES[name]
    with torch.no_grad():
        ref = ref_thinker.generate(
            **inputs, use_audio_in_video=use_aiv, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=151643
        )
    ref_new = ref[:, inputs["input_ids"].shape[1] :]
    res = ours.generate(**inputs, use_audio_in_video=use_aiv, max_new_tokens=16, eos_token_id=())
    assert res.text_ids.shape == ref_new.shape == (inputs["input_ids"].shape[0], 16)
    assert torch.equal(res.text_ids, ref_new)
