"""Helpers for Qwen2.5-Omni speech parity tests and benchmarks: synthetic prompts and the reference's speech path.

:func:`synthetic_inputs` builds processor-shaped inputs (reference key names) without a processor: text
tokens around placeholder runs whose lengths match random media features of the tiny config.
:func:`reference_speech` runs the reference's ``generate`` and also returns what it hides: the codec ids
and the Talker's per-step logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thinktalk.positions import audio_token_count

# Qwen2.5-Omni special tokens (official ids).
IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
AUDIO, AUDIO_BOS, AUDIO_EOS = 151646, 151647, 151648
VISION_BOS, VISION_EOS, IMAGE, VIDEO = 151652, 151653, 151655, 151656
THINKER_EOS = (IM_END, ENDOFTEXT)


def synthetic_inputs(kind: str = "text", seed: int = 0, pad: int = 1, text_len: int = 6, mel_bins: int = 128) -> dict:
    """A one-row prompt with ``pad`` left-padding tokens, of kind "text" | "audio" | "image" | "video" | "audio_in_video".

    Media features are random; their placeholder runs have the lengths the encoders produce
    (patch 14, temporal patch 2, merge 2; audio: 100 mel frames → 25 tokens).
    """
    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(0, 150000, (n,), generator=g).tolist()

    ids = [IM_START] + text(text_len)
    out: dict = {}
    if kind in ("audio", "audio_in_video"):
        frames = 100
        out["input_features"] = torch.randn(1, mel_bins, frames, generator=g)
        out["feature_attention_mask"] = torch.ones(1, frames, dtype=torch.long)
    if kind == "audio":
        ids += [AUDIO_BOS] + [AUDIO] * audio_token_count(100) + [AUDIO_EOS]
    if kind == "image":
        grid = torch.tensor([[1, 4, 6]])  # one 2-frame temporal patch, 4×6 patches → 6 tokens
        out["pixel_values"] = torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, generator=g)
        out["image_grid_thw"] = grid
        ids += [VISION_BOS] + [IMAGE] * (int(grid.prod()) // 4) + [VISION_EOS]
    if kind in ("video", "audio_in_video"):
        grid = torch.tensor([[3, 4, 4]])  # 3 temporal patches of 4×4 → 12 tokens
        out["pixel_values_videos"] = torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, generator=g)
        out["video_grid_thw"] = grid
        out["video_second_per_grid"] = torch.tensor([1.0])
        n_video = int(grid.prod()) // 4
        if kind == "video":
            ids += [VISION_BOS] + [VIDEO] * n_video + [VISION_EOS]
        else:
            # Audio inside the video: 2 s chunks of video then audio on one time axis (as the processor builds them).
            ids += _audio_in_video_ids(n_video, audio_token_count(100), grid, spg=1.0)
    ids += text(text_len) + [IM_END]
    ids = [ENDOFTEXT] * pad + ids
    out["input_ids"] = torch.tensor([ids])
    mask = torch.ones(1, len(ids), dtype=torch.long)
    mask[0, :pad] = 0
    out["attention_mask"] = mask
    return out


def _audio_in_video_ids(n_video: int, n_audio: int, grid: torch.Tensor, spg: float) -> list[int]:
    """<|vision_bos|><|audio_bos|> video/audio tokens interleaved per 2 s chunk <|audio_eos|><|vision_eos|>."""
    t, h, w = grid[0].tolist()
    per_frame = h * w // 4
    video_time = [int(i * spg * 25) for i in range(t) for _ in range(per_frame)]
    audio_time = list(range(n_audio))
    seq, vi, ai = [], 0, 0
    chunk = 50
    edge = chunk
    while vi < len(video_time) or ai < len(audio_time):
        while vi < len(video_time) and video_time[vi] < edge:
            seq.append(VIDEO)
            vi += 1
        while ai < len(audio_time) and audio_time[ai] < edge:
            seq.append(AUDIO)
            ai += 1
        edge += chunk
    return [VISION_BOS, AUDIO_BOS] + seq + [AUDIO_EOS, VISION_EOS]


@dataclass
class ReferenceSpeech:
    text_ids: torch.Tensor  # [B, new tokens]
    codes: torch.Tensor  # [B, steps] (end tokens included)
    logits: torch.Tensor  # [B, steps, vocab] raw Talker logits
    audio: torch.Tensor  # waveform (as the reference returns it)


def reference_speech(ref, inputs: dict, **kwargs) -> ReferenceSpeech:
    """``ref.generate(**inputs, **kwargs)`` plus the Talker's codes and logits (captured around ``ref.talker.generate``)."""
    captured: dict = {}
    original = ref.talker.generate

    def spy(*args, **kw):
        out = original(*args, return_dict_in_generate=True, output_logits=True, **kw)
        captured["prompt"] = kw["input_ids"].shape[1]
        captured["codes"] = out.sequences
        captured["logits"] = torch.stack(out.logits, dim=1)
        return out.sequences

    # The reference forwards unknown inputs to both the Thinker and the Talker, whose generate() rejects
    # pixel values; the "thinker_" prefix routes them to the Thinker only (grids still reach both).
    routed = {("thinker_" + k if k in ("pixel_values", "pixel_values_videos") else k): v for k, v in inputs.items()}
    ref.talker.generate = spy
    try:
        sequences, audio = ref.generate(**routed, **kwargs)
    finally:
        del ref.talker.generate
    return ReferenceSpeech(
        text_ids=sequences[:, inputs["input_ids"].shape[1] :],
        codes=captured["codes"][:, captured["prompt"] :],
        logits=captured["logits"],
        audio=audio,
    )


def qwen3_reference_speech(ref, inputs: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Qwen3-Omni: ``ref.generate(**inputs, return_audio=True, **kwargs)`` -> (new text ids [B, T], the codes
    Code2Wav was given [frames, G] (captured around ``ref.code2wav.chunked_decode``), the waveform [samples])."""
    captured: dict = {}
    decode = ref.code2wav.chunked_decode

    def capture(codes, **kw):
        captured["codes"] = codes.clone()
        return decode(codes, **kw)

    ref.code2wav.chunked_decode = capture
    try:
        with torch.no_grad():
            seq, wav = ref.generate(**inputs, return_audio=True, **kwargs)
    finally:
        ref.code2wav.chunked_decode = decode
    return seq[:, inputs["input_ids"].shape[1] :], captured["codes"][0].T, wav.reshape(-1)
