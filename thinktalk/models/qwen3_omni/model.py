"""Qwen3-Omni: Thinker (+ Talker + Code2Wav when the checkpoint speaks), and generation entry points.

One class covers the three published variants: Instruct (all three components), Thinking and
Captioner (Thinker only; asking them for audio raises a clear error).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from thinktalk import asr
from thinktalk.checkpoint import WEIGHT_MAPS
from thinktalk.generation import api
from thinktalk.generation.events import GenerateResult, StreamEvent
from thinktalk.generation.options import FamilyKeywords, SpeechParams
from thinktalk.generation.sampling import SamplingParams
from thinktalk.models.qwen3_omni.config import Qwen3OmniConfig
from thinktalk.models.qwen3_omni.thinker import Thinker

# Thinker end-of-turn tokens (<|im_end|>, <|endoftext|>).
DEFAULT_EOS = (151645, 151643)
DEFAULT_SPEAKER = "ethan"  # the reference's default voice


class NoSpeechError(RuntimeError):
    """Audio was requested from a checkpoint (or a load) without Talker and Code2Wav."""


class Qwen3Omni(nn.Module):
    family = "qwen3_omni_moe"
    weight_map = WEIGHT_MAPS["qwen3_omni_moe"]
    codec_rate_hz = 12.5  # codec frames per second of speech (80 ms each)
    transcribe = asr.transcribe  # model.transcribe(audio, language=None, prompt=None) -> str
    translate = asr.translate  # model.translate(audio, language=None, prompt=None) -> English text

    def __init__(self, cfg: Qwen3OmniConfig, components: tuple[str, ...] = ("thinker", "talker", "code2wav")):
        super().__init__()
        self.cfg = cfg
        self.components = components
        self.thinker = Thinker(cfg.thinker)
        self.talker = None
        self.code2wav = None
        if "talker" in components and cfg.talker is not None:
            from thinktalk.models.qwen3_omni.talker import Talker

            self.talker = Talker(cfg.talker)
        if "code2wav" in components and cfg.code2wav is not None:
            from thinktalk.models.qwen3_omni.code2wav import Code2Wav

            self.code2wav = Code2Wav(cfg.code2wav)
        self.speakers: dict[str, int] = {}
        self.load_speakers("")
        self.eos_token_ids: tuple[int, ...] = DEFAULT_EOS

    def load_speakers(self, directory: str) -> None:
        """Voices are codec token ids listed in ``talker_config.speaker_id`` (no file beside the weights)."""
        del directory
        self.speakers = {k.lower(): int(v) for k, v in (self.cfg.talker.speaker_id if self.cfg.talker else {}).items()}

    def speaker_id(self, speaker: str | None) -> int:
        if not self.speakers:
            raise NoSpeechError("this checkpoint lists no speakers (talker_config.speaker_id)")
        name = (speaker or (DEFAULT_SPEAKER if DEFAULT_SPEAKER in self.speakers else next(iter(self.speakers)))).lower()
        if name not in self.speakers:
            raise ValueError(f"unknown speaker '{speaker}' (this checkpoint has: {', '.join(sorted(self.speakers))})")
        return self.speakers[name]

    # -- information ------------------------------------------------------------------------------
    @property
    def has_speech(self) -> bool:
        return self.talker is not None and self.code2wav is not None

    def require_speech(self) -> None:
        if self.has_speech:
            return
        if not self.cfg.has_speech:
            raise NoSpeechError(
                "this checkpoint has no Talker/Code2Wav (a Qwen3-Omni Thinking or Captioner variant, or "
                "enable_audio_output=false): it answers in text only; call generate()/stream() without return_audio"
            )
        raise NoSpeechError(
            f"audio needs the talker and code2wav components; this model was loaded with components={self.components}"
        )

    def parameter_counts(self) -> dict[str, int]:
        counts = {}
        for name in ("thinker", "talker", "code2wav"):
            m = getattr(self, name)
            if m is not None:
                counts[name] = sum(p.numel() for p in m.parameters())
        th = self.thinker
        counts["thinker.audio_tower"] = sum(p.numel() for p in th.audio_tower.parameters())
        counts["thinker.visual"] = sum(p.numel() for p in th.visual.parameters())
        counts["thinker.llm"] = counts["thinker"] - counts["thinker.audio_tower"] - counts["thinker.visual"]
        # Parameters one token actually uses in the LLM (of the routed experts, only the top-k).
        text = self.cfg.thinker.text
        routed = sum(p.numel() for n, p in th.model.named_parameters() if ".experts." in n)
        used = routed * text.num_experts_per_tok // max(1, text.num_experts)
        counts["thinker.llm_active"] = counts["thinker.llm"] - routed + used
        return counts

    def dtype_for(self, name: str, dtype: torch.dtype) -> torch.dtype:
        # The vocoder runs in float32 whatever the rest uses (its snake activations and long
        # transposed-convolution stacks are sensitive to bfloat16).
        return torch.float32 if name.startswith("code2wav.") else dtype

    def tied_weights(self) -> dict[str, str]:
        if self.cfg.thinker.tie_word_embeddings:
            return {"thinker.lm_head.weight": "thinker.model.embed_tokens.weight"}
        return {}

    # -- generation ---------------------------------------------------------------------------------
    keywords = FamilyKeywords(
        name="Qwen3-Omni",
        # The reference's Talker defaults: sampling, temperature 0.9, top-k 50, repetition penalty 1.05.
        talker_sampling=SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=1.0, repetition_penalty=1.05),
        extra=("talker_system_ids", "talker_cuda_graphs"),
    )

    def generate(self, **kwargs) -> GenerateResult:
        """Text (and speech with ``return_audio=True``) for processor inputs; see :func:`thinktalk.generation.api.generate`.

        Speech options: ``speaker`` (a name from ``talker_config.speaker_id``, default Ethan),
        ``talker_do_sample`` (default True, as the reference), ``talker_temperature`` (0.9),
        ``talker_top_k`` (50), ``talker_top_p`` (1.0), ``talker_repetition_penalty`` (1.05),
        ``talker_max_new_tokens`` (4096 codec frames), ``talker_min_new_tokens``, ``talker_system_ids``
        (token ids of a system turn for the Talker only; the Thinker's system turn never reaches the Talker).
        """
        return api.generate(self, **kwargs)

    def stream(self, **kwargs) -> Iterator[StreamEvent]:
        """Events as they are produced: text deltas and, with speech, 80 ms audio chunks from the first frame on."""
        return api.stream(self, **kwargs)

    @property
    def talker_reads(self) -> tuple[int, ...]:
        """The Thinker layers the Talker is conditioned on: input embeddings and ``accept_hidden_layer``."""
        return tuple(sorted({0, self.cfg.talker.accept_hidden_layer})) if self.cfg.talker is not None else (0,)

    def compile_targets(self) -> list[tuple]:
        """What :func:`thinktalk.compile_speech` compiles: Code2Wav's convolution stack (a streamed frame, or a whole
        utterance), and the code predictor's decode step (its dense layers, 14 of them a frame; the MoE decoders of
        the Thinker and Talker stay eager: their routing is data-dependent)."""
        from thinktalk.nn.decoder import DECODE_STEP

        self.require_speech()
        return [("Code2Wav frame", self.code2wav, "decode_step"), ("Code2Wav", self.code2wav, "forward"),
                ("code predictor decode step", self.talker.code_predictor.model, "body", DECODE_STEP)]  # fmt: skip

    def speech_stages(self, params: SpeechParams, seed: int | None, streaming: bool):
        """The Talker (+ code predictor) and Code2Wav stages of the shared driver (:mod:`thinktalk.models.qwen3_omni.speech`)."""
        self.require_speech()
        from thinktalk.models.qwen3_omni.speech import OfflineCode2Wav, StreamingCode2Wav, TalkerStage

        vocoder = (StreamingCode2Wav if streaming else OfflineCode2Wav)(self.code2wav)
        return TalkerStage(self, params, self.speaker_id(params.speaker)), vocoder
