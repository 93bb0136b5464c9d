"""``ModelInputs``: the processor's output as one typed object (the reference's key names)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

MEDIA_KEYS = (
    "input_features",
    "feature_attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "video_second_per_grid",
)
INPUT_KEYS = ("input_ids", "attention_mask", *MEDIA_KEYS)


@dataclass
class ModelInputs:
    """What the Thinker reads: token ids (left-padded for batches) and the media behind their placeholders."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None = None  # [B, T] 1 = real token, 0 = left padding
    input_features: torch.Tensor | None = None  # [clips, mel, frames]
    feature_attention_mask: torch.Tensor | None = None  # [clips, frames]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    video_second_per_grid: torch.Tensor | None = None
    use_audio_in_video: bool = False

    @classmethod
    def from_dict(cls, d: dict, use_audio_in_video: bool = False) -> ModelInputs:
        """From the processor's dict (``model.generate(**inputs)`` style); None values are absent ones."""
        if d.get("input_ids") is None:
            raise ValueError("generate/stream need input_ids (pass the processor's output: model.generate(**inputs))")
        fields = {k: d[k] for k in INPUT_KEYS if d.get(k) is not None}
        ids = fields["input_ids"]
        if not torch.is_tensor(ids) or ids.dim() != 2:
            raise ValueError(f"input_ids must be a [batch, tokens] tensor (got {type(ids).__name__} {getattr(ids, 'shape', '')})")
        if ids.shape[1] == 0:
            raise ValueError("input_ids is empty: the prompt needs at least one token")
        return cls(**fields, use_audio_in_video=use_audio_in_video)

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def mask(self) -> torch.Tensor:
        """The attention mask, all ones when none was given."""
        return torch.ones_like(self.input_ids) if self.attention_mask is None else self.attention_mask

    def media(self) -> dict:
        """The media keyword arguments of ``Thinker.embed`` (present ones only)."""
        return {k: getattr(self, k) for k in MEDIA_KEYS if getattr(self, k) is not None}

    def audio_lengths(self) -> torch.Tensor | None:
        """Mel frames per audio clip (what the position functions count audio tokens from)."""
        return None if self.feature_attention_mask is None else self.feature_attention_mask.sum(-1)

    def to(self, device: torch.device | str) -> ModelInputs:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in moved.items():
            if torch.is_tensor(v):
                moved[k] = v.to(device)
        return ModelInputs(**moved)
