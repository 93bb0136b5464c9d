"""Qwen3-Omni TMRoPE positions and AuT token counts: pure functions (reference parity is in test_qwen3_thinker)."""

from __future__ import annotations

import pytest
import torch

from thinktalk.positions import TokenIds, aut_token_count, qwen3_rope_index

IDS = TokenIds(image=151655, video=151656, audio=151675, vision_start=151652, audio_start=151669)
V_START, V_END, A_START, A_END = 151652, 151653, 151669, 151670
IMAGE, VIDEO, AUDIO = 151655, 151656, 151675


def test_aut_token_count_matches_reference_formula():
    M = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")
    lengths = torch.arange(1, 2501)
    expected = M._get_feat_extract_output_lengths(lengths, 50)
    assert [aut_token_count(n) for n in lengths.tolist()] == expected.tolist()
    assert (aut_token_count(100), aut_token_count(250), aut_token_count(7)) == (13, 33, 1)


def test_worked_example_of_the_docstring():
    toks = torch.tensor([[10, 11, V_START, IMAGE, IMAGE, V_END, 12]])
    pos, delta = qwen3_rope_index(toks, IDS, image_grid_thw=torch.tensor([[1, 2, 4]]))
    assert pos[:, 0].tolist() == [[0, 1, 2, 3, 3, 5, 6], [0, 1, 2, 3, 3, 5, 6], [0, 1, 2, 3, 4, 5, 6]]
    assert delta.tolist() == [[0.0]]


def test_text_and_audio_only_are_plain_positions_with_padding_one():
    toks = torch.tensor([[0, 0, 5, A_START, AUDIO, AUDIO, A_END, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    pos, delta = qwen3_rope_index(toks, IDS, attention_mask=mask, audio_feature_lengths=torch.tensor([150]))
    assert pos[0, 0].tolist() == [1, 1, 0, 1, 2, 3, 4, 5]
    assert torch.equal(pos[0], pos[1]) and torch.equal(pos[1], pos[2])
    assert delta.tolist() == [[0.0]]


def test_video_times_follow_seconds_per_grid_without_truncation():
    # 3 frame groups of 1×1 merged tokens, 0.3 s per group at 13 positions/s: times 0, 3.9, 7.8.
    toks = torch.tensor([[V_START, VIDEO, VIDEO, VIDEO, V_END, 7]])
    pos, delta = qwen3_rope_index(
        toks, IDS, video_grid_thw=torch.tensor([[3, 2, 2]]), video_second_per_grid=torch.tensor([0.3])
    )
    assert torch.allclose(pos[0, 0, 1:4], torch.tensor([1.0, 4.9, 8.8]))
    assert torch.allclose(pos[0, 0, 4:], torch.tensor([9.8, 10.8]))
    assert torch.allclose(delta, torch.tensor([[10.8 + 1 - 6]]))


def test_audio_in_video_merges_by_time_and_bos_take_two_positions():
    # 2 frame groups (times 0 and 13) of one token each; 30 frames of audio = 4 tokens at 0..3.
    toks = [V_START, A_START, VIDEO, AUDIO, AUDIO, AUDIO, AUDIO, VIDEO, A_END, V_END]
    pos, _ = qwen3_rope_index(
        torch.tensor([toks]), IDS, video_grid_thw=torch.tensor([[2, 2, 2]]), audio_feature_lengths=torch.tensor([30]),
        video_second_per_grid=torch.tensor([1.0]), use_audio_in_video=True,
    )
    assert aut_token_count(30) == 4
    # bos pair 0, 1; video t=2; audio 2..5 (video first on the tie); video t=15; eos pair after the last run.
    assert pos[0, 0].tolist() == [0, 1, 2, 2, 3, 4, 5, 15, 16, 17]


def test_mismatched_placeholders_are_a_clear_error():
    toks = torch.tensor([[V_START, IMAGE, IMAGE, V_END]])
    with pytest.raises(ValueError, match="placeholder tokens do not match"):
        qwen3_rope_index(toks, IDS, image_grid_thw=torch.tensor([[1, 4, 4]]))
