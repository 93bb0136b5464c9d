"""Synthetic Qwen2.5-Omni model inputs (placeholder runs + random media features of the right sizes).

They exercise the model without the processor, so thinker/talker parity tests do not depend on
tokenizer files; processor-built inputs are covered by the processor and end-to-end tests.
"""

from __future__ import annotations

import torch

from thinktalk.positions import audio_token_count, chunk_bounds, video_time_index

AUDIO, AUDIO_BOS, AUDIO_EOS = 151646, 151647, 151648
IMAGE, VIDEO, VISION_BOS, VISION_EOS = 151655, 151656, 151652, 151653
IM_START, IM_END = 151644, 151645
PATCH_DIM = 3 * 2 * 14 * 14


class InputBuilder:
    """Builds one row of tokens and the media tensors that go with it."""

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.tokens: list[int] = [IM_START]
        self.audio_feats: list[torch.Tensor] = []
        self.images: list[tuple[torch.Tensor, list[int]]] = []
        self.videos: list[tuple[torch.Tensor, list[int], float]] = []

    def text(self, n: int) -> InputBuilder:
        self.tokens += torch.randint(100, 5000, (n,), generator=self.gen).tolist()
        return self

    def audio(self, frames: int) -> InputBuilder:
        self.audio_feats.append(torch.randn(128, frames, generator=self.gen))
        self.tokens += [AUDIO_BOS] + [AUDIO] * audio_token_count(frames) + [AUDIO_EOS]
        return self

    def image(self, t: int, h: int, w: int) -> InputBuilder:
        self.images.append((torch.randn(t * h * w, PATCH_DIM, generator=self.gen), [t, h, w]))
        self.tokens += [VISION_BOS] + [IMAGE] * (t * h * w // 4) + [VISION_EOS]
        return self

    def video(self, t: int, h: int, w: int, second_per_grid: float = 1.0, audio_frames: int | None = None) -> InputBuilder:
        self.videos.append((torch.randn(t * h * w, PATCH_DIM, generator=self.gen), [t, h, w], second_per_grid))
        if audio_frames is None:
            self.tokens += [VISION_BOS] + [VIDEO] * (t * h * w // 4) + [VISION_EOS]
            return self
        # The processor's use_audio_in_video layout: 2-second chunks, video then audio.
        self.audio_feats.append(torch.randn(128, audio_frames, generator=self.gen))
        n_audio = audio_token_count(audio_frames)
        v_time = video_time_index(t, second_per_grid, 25).view(-1, 1).expand(-1, h * w // 4).flatten()
        v_chunks = chunk_bounds(v_time, 50, 0)
        a_chunks = chunk_bounds(torch.arange(n_audio), 50, 0)
        toks = [VISION_BOS, AUDIO_BOS]
        for j in range(max(len(v_chunks), len(a_chunks))):
            if j < len(v_chunks):
                toks += [VIDEO] * (v_chunks[j][1] - v_chunks[j][0])
            if j < len(a_chunks):
                toks += [AUDIO] * (a_chunks[j][1] - a_chunks[j][0])
        self.tokens += toks + [AUDIO_EOS, VISION_EOS]
        return self

    def end_turn(self) -> InputBuilder:
        self.tokens += [IM_END, IM_START]
        return self


def batch(rows: list[InputBuilder], pad_to_frames: int | None = None) -> dict:
    """Left-padded batch in the processor's format (media of all rows concatenated in order)."""
    longest = max(len(r.tokens) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r.tokens) :] = torch.tensor(r.tokens)
        mask[i, longest - len(r.tokens) :] = 1
        ids[i, : longest - len(r.tokens)] = 151643
    out = {"input_ids": ids, "attention_mask": mask}
    feats = [f for r in rows for f in r.audio_feats]
    if feats:
        frames = pad_to_frames or max(f.shape[1] for f in feats)
        out["input_features"] = torch.stack([torch.nn.functional.pad(f, (0, frames - f.shape[1])) for f in feats])
        fam = torch.zeros(len(feats), frames, dtype=torch.long)
        for i, f in enumerate(feats):
            fam[i, : f.shape[1]] = 1
        out["feature_attention_mask"] = fam
    images = [im for r in rows for im in r.images]
    if images:
        out["pixel_values"] = torch.cat([p for p, _ in images])
        out["image_grid_thw"] = torch.tensor([g for _, g in images])
    videos = [v for r in rows for v in r.videos]
    if videos:
        out["pixel_values_videos"] = torch.cat([p for p, _, _ in videos])
        out["video_grid_thw"] = torch.tensor([g for _, g, _ in videos])
        out["video_second_per_grid"] = torch.tensor([s for _, _, s in videos])
    return out


def cases() -> dict[str, tuple[dict, bool]]:
    """name -> (inputs, use_audio_in_video): the cases issue 2 asks parity for."""
    B = InputBuilder
    return {
        "text": (batch([B(1).text(12)]), False),
        "audio": (batch([B(2).text(3).audio(230).text(4)], pad_to_frames=300), False),
        "image": (batch([B(3).text(3).image(1, 8, 12).text(4)]), False),
        "video": (batch([B(4).text(3).video(4, 4, 8, second_per_grid=1.0).text(4)]), False),
        "video_fractional_time": (batch([B(5).text(2).video(6, 4, 4, second_per_grid=0.7).text(2)]), False),
        "video_with_audio": (batch([B(6).text(3).video(6, 4, 4, second_per_grid=1.0, audio_frames=520).text(3)]), True),
        "two_images_two_audios": (batch([B(7).text(2).image(1, 4, 4).audio(120).image(1, 8, 4).audio(64).text(3)]), False),
        "batch_left_padding": (batch([B(8).text(4).image(1, 4, 8).text(2), B(9).text(9).audio(150).text(6)]), False),
        "multi_turn": (batch([B(10).text(5).end_turn().text(6).end_turn().text(3).audio(90).text(2)]), False),
    }
