"""Qwen2.5-Omni: Thinker (+ Talker + Token2Wav when the checkpoint has them), and generation entry points."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from thinktalk import asr
from thinktalk.checkpoint import WEIGHT_MAPS
from thinktalk.generation import api
from thinktalk.generation.events import GenerateResult, StreamEvent
from thinktalk.generation.options import FamilyKeywords, SpeechParams
from thinktalk.models.qwen2_5_omni.config import Qwen25OmniConfig
from thinktalk.models.qwen2_5_omni.talker import TALKER_DEFAULTS
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
    keywords = FamilyKeywords(
        name="Qwen2.5-Omni",
        talker_sampling=TALKER_DEFAULTS,
        extra=("token2wav_num_steps", "token2wav_guidance_scale", "token2wav_sway_coefficient", "noise",
               "stream_options", "reference_quirks"),  # fmt: skip
    )

    def generate(self, **kwargs) -> GenerateResult:
        """Text (and speech with ``return_audio=True``) for processor inputs; see :func:`thinktalk.generation.api.generate`."""
        return api.generate(self, **kwargs)

    def stream(self, **kwargs) -> Iterator[StreamEvent]:
        """Events as they are produced: text deltas, then (with speech) audio chunks interleaved."""
        return api.stream(self, **kwargs)

    @property
    def talker_reads(self) -> tuple[int, ...]:
        """The Thinker layers the Talker is conditioned on: input embeddings and the last hidden state."""
        return (0, -1)

    def compile_targets(self) -> list[tuple]:
        """What :func:`thinktalk.compile_speech` compiles: the DiT's velocity, BigVGAN's anti-aliased activations
        in their fused form (one compiled graph per signal shape, shared by the activations of a stage; whole
        mel, streamed pieces and windows alike; with them, BigVGAN's narrow convolutions run as matrix products on a
        CPU, the others stay oneDNN's/cuDNN's), and the decode
        steps of the Talker and the Thinker (:meth:`thinktalk.nn.decoder.Decoder.body`)."""
        from thinktalk.models.qwen2_5_omni.bigvgan import AntiAliasedSnake
        from thinktalk.nn.decoder import DECODE_STEP

        self.require_speech()
        t2w = self.token2wav
        acts = [m for m in t2w.code2wav_bigvgan_model.modules() if isinstance(m, AntiAliasedSnake)]
        # The activations meet a channel count per stage (static: parameters' shapes are), each for one stream and
        # for a batch, and every streamed piece's length (dynamic): 12 graphs, past dynamo's default limit of 8.
        fused = {"dynamic": True, "recompile_limit": 64}
        # The DiT's generated C++ calls its ~20 matrix products itself (cpp_wrapper): 36 evaluations an utterance.
        return [("token2wav DiT", t2w.code2wav_dit_model, "forward", {"options": {"cpp_wrapper": True}})] + [
            ("BigVGAN anti-aliased activations", m, "fused", fused) for m in acts
        ] + [("Talker decode step", self.talker.model, "body", DECODE_STEP),
             ("Thinker decode step", self.thinker.model, "body", DECODE_STEP)]  # fmt: skip

    def require_speech(self) -> None:
        if not self.has_speech:
            raise ValueError(
                "this checkpoint has no Talker/Token2Wav weights (or enable_audio_output is false): "
                "it can answer in text only; call generate() without return_audio"
            )

    def speech_stages(self, params: SpeechParams, seed: int | None, streaming: bool):
        """The Talker and Token2Wav stages of the shared driver (:mod:`thinktalk.models.qwen2_5_omni.speech`)."""
        self.require_speech()
        from thinktalk.models.qwen2_5_omni.speakers import speaker_params
        from thinktalk.models.qwen2_5_omni.speech import OfflineToken2Wav, StreamingToken2Wav, TalkerStage

        _, speaker = speaker_params(self.speakers, params.speaker, getattr(self, "checkpoint_dir", None))
        vocoder = (StreamingToken2Wav if streaming else OfflineToken2Wav)(self.token2wav, params, speaker, seed)
        return TalkerStage(self, params, speaker), vocoder
