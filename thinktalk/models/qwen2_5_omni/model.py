"""Qwen2.5-Omni: Thinker (+ Talker + Token2Wav when the checkpoint has them), and generation entry points."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from thinktalk import asr
from thinktalk.checkpoint import WEIGHT_MAPS
from thinktalk.generation.api import GenerateResult, StreamEvent, generate_text, stream_text
from thinktalk.models.qwen2_5_omni.config import Qwen25OmniConfig
from thinktalk.models.qwen2_5_omni.thinker import Thinker

# Thinker end-of-turn tokens (<|im_end|>, <|endoftext|>); the official generation_config uses the same.
DEFAULT_EOS = (151645, 151643)


class Qwen25Omni(nn.Module):
    family = "qwen2_5_omni"
    weight_map = WEIGHT_MAPS["qwen2_5_omni"]
    codec_rate_hz = 50.0  # Talker codes per second of speech (480 samples at 24 kHz each)
    transcribe = asr.transcribe  # model.transcribe(audio, language=None, prompt=None) -> str
    translate = asr.translate  # model.translate(audio, language=None, prompt=None) -> English text

    def __init__(self, cfg: Qwen25OmniConfig, components: tuple[str, ...] = ("thinker", "talker", "token2wav")):
        super().__init__()
        self.cfg = cfg
        self.components = components
        self.thinker = Thinker(cfg.thinker)
        self.talker = None
        self.token2wav = None
        if "talker" in components and cfg.talker is not None:
            from thinktalk.models.qwen2_5_omni.talker import Talker

            self.talker = Talker(cfg.talker)
        if "token2wav" in components and cfg.token2wav is not None:
            from thinktalk.models.qwen2_5_omni.token2wav import Token2Wav

            self.token2wav = Token2Wav(cfg.token2wav)
        self.speakers: dict[str, dict] = {}
        self.eos_token_ids: tuple[int, ...] = DEFAULT_EOS

    def load_speakers(self, directory: str) -> None:
        """Voices from ``spk_dict.pt`` beside the weights (loaded with ``weights_only=True``)."""
        if self.talker is None:
            return
        from thinktalk.models.qwen2_5_omni.speakers import load_speakers

        self.speakers = load_speakers(directory)

    # -- information ------------------------------------------------------------------------------
    @property
    def has_speech(self) -> bool:
        return self.talker is not None and self.token2wav is not None

    def parameter_counts(self) -> dict[str, int]:
        counts = {}
        for name in ("thinker", "talker", "token2wav"):
            m = getattr(self, name)
            if m is not None:
                counts[name] = sum(p.numel() for p in m.parameters())
        th = self.thinker
        counts["thinker.audio_tower"] = sum(p.numel() for p in th.audio_tower.parameters())
        counts["thinker.visual"] = sum(p.numel() for p in th.visual.parameters())
        counts["thinker.llm"] = counts["thinker"] - counts["thinker.audio_tower"] - counts["thinker.visual"]
        return counts

    def dtype_for(self, name: str, dtype: torch.dtype) -> torch.dtype:
        # Token2Wav runs in float32 whatever the rest uses (the reference does the same).
        return torch.float32 if name.startswith("token2wav.") else dtype

    def tied_weights(self) -> dict[str, str]:
        if self.cfg.thinker.tie_word_embeddings:
            return {"thinker.lm_head.weight": "thinker.model.embed_tokens.weight"}
        return {}

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, **kwargs) -> GenerateResult:
        """Text (and speech when ``return_audio``) for processor inputs; see :func:`thinktalk.generation.api.generate_text`."""
        if kwargs.get("return_audio"):
            from thinktalk.models.qwen2_5_omni.speech import generate_with_speech

            return generate_with_speech(self, **kwargs)
        kwargs.pop("return_audio", None)
        return generate_text(self, **kwargs)

    def stream(self, **kwargs) -> Iterator[StreamEvent]:
        """Events as they are produced: text deltas, then (with speech) audio chunks interleaved."""
        if kwargs.get("return_audio", self.has_speech and kwargs.get("speaker") is not None):
            from thinktalk.models.qwen2_5_omni.speech import stream_with_speech

            kwargs.pop("return_audio", None)
            return stream_with_speech(self, **kwargs)
        kwargs.pop("return_audio", None)
        return stream_text(self, **kwargs)
