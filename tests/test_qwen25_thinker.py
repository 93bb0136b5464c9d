"""Qwen2.5-Omni Thinker parity with the reference: logits, positions, greedy tokens."""

from __future__ import annotations

import pytest
import torch

import thinktalk
from tests.qwen25_inputs import cases
from thinktalk.positions import TokenIds, rope_index

transformers = pytest.importorskip("transformers")

CASES = cases()


@pytest.fixture(scope="module")
def ref_thinker(tiny25_weights):
    m = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(tiny25_weights), dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def ours(tiny25_weights):
    return thinktalk.load(str(tiny25_weights), components=("thinker",))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_reference(name, ref_thinker, ours):
    inputs, use_aiv = CASES[name]
    with torch.no_grad():
        ref = ref_thinker(**inputs, use_audio_in_video=use_aiv).logits
        out = ours.thinker(**inputs, use_audio_in_video=use_aiv).logits
    valid = inputs["attention_mask"].bool()
    diff = (ref - out)[valid].abs().max().item()
    scale = ref[valid].abs().max().item()
    print(f"{name}: max abs logit diff {diff:.3e} (logit scale {scale:.3f})")
    assert diff <= 1e-4 * max(1.0, scale)


@pytest.mark.parametrize("name", list(CASES))
def test_positions_match_reference(name, ref_thinker, ours):
    inputs, use_aiv = CASES[name]
    fam = inputs.get("feature_attention_mask")
    ref_pos, ref_delta = ref_thinker.model.get_rope_index(
        inputs["input_ids"],
        inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"),
        inputs["attention_mask"],
        use_aiv,
        fam.sum(-1) if fam is not None else None,
        inputs.get("video_second_per_grid"),
    )
    cfg = ours.cfg.thinker
    pos, delta = rope_index(
        inputs["input_ids"],
        TokenIds(cfg.image_token_index, cfg.video_token_index, cfg.audio_token_index, cfg.vision_start_token_id, cfg.audio_start_token_id),
        attention_mask=inputs["attention_mask"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        audio_feature_lengths=fam.sum(-1) if fam is not None else None,
        video_second_per_grid=inputs.get("video_second_per_grid"),
        use_audio_in_video=use_aiv,
    )
    assert torch.equal(pos, ref_pos)
    assert torch.equal(delta.view(-1), ref_delta.view(-1))


@pytest.mark.parametrize("name", ["text", "audio", "image", "video_with_audio", "batch_left_padding"])
def test_greedy_tokens_match_reference(name, ref_thinker, ours):
    inputs, use_aiv = CASES[name]
    with torch.no_grad():
        ref = ref_thinker.generate(
            **inputs, use_audio_in_video=use_aiv, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=151643
        )
    ref_new = ref[:, inputs["input_ids"].shape[1] :]
    res = ours.generate(**inputs, use_audio_in_video=use_aiv, max_new_tokens=32, eos_token_id=())
    assert res.text_ids.shape == ref_new.shape == (inputs["input_ids"].shape[0], 32)
    assert torch.equal(res.text_ids, ref_new)


def test_hidden_states_match_reference(ref_thinker, ours):
    inputs, _ = CASES["image"]
    with torch.no_grad():
        ref = ref_thinker(**inputs, output_hidden_states=True).hidden_states
        out = ours.thinker(**inputs, output_hidden_states=True).hidden_states
    assert len(ref) == len(out)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_cache_decoding_equals_full_forward(ours):
    """Prefill + one-token decode steps through the KV cache give the logits of one full forward."""
    inputs, _ = CASES["audio"]
    ids = inputs["input_ids"]
    with torch.no_grad():
        full = ours.thinker(**inputs).logits
        th = ours.thinker
        media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        prefix = 20
        emb = th.embed(ids, inputs["attention_mask"], **media)
        cache = th.model.new_cache(1, ids.shape[1])
        logits, _ = th.decode(emb.inputs_embeds[:, :prefix], emb.position_ids[:, :, :prefix], None, cache)
        steps = [logits]
        for i in range(prefix, ids.shape[1]):
            lg, _ = th.decode(emb.inputs_embeds[:, i : i + 1], emb.position_ids[:, :, i : i + 1], None, cache)
            steps.append(lg)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_placeholder_count_mismatch_is_a_clear_error(ours):
    inputs, _ = CASES["image"]
    bad = dict(inputs)
    bad["input_ids"] = inputs["input_ids"][:, :-6].clone()
    bad["attention_mask"] = inputs["attention_mask"][:, :-6]
    bad["input_ids"][0, -1] = 7  # drop a run of image tokens
    n = int((bad["input_ids"] == 151655).sum())
    bad["input_ids"][bad["input_ids"] == 151655] = torch.tensor([151655] * (n - 1) + [5])
    with pytest.raises(ValueError, match="image: .* placeholder tokens"):
        ours.thinker(**bad)


@pytest.mark.parametrize(
    "name,key", [("audio", "input_features"), ("image", "pixel_values"), ("video", "pixel_values_videos")]
)
def test_media_moves_the_logits(name, key, ours):
    """Guard for the parity tests: the tiny model's logits depend on every encoder far beyond the tolerance."""
    inputs, _ = CASES[name]
    changed = dict(inputs)
    changed[key] = inputs[key] + 1.0
    with torch.no_grad():
        a = ours.thinker(**inputs).logits
        b = ours.thinker(**changed).logits
    assert (a - b).abs().max().item() > 1e-2
