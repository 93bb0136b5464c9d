"""Codec ids for new audio: Mimi's encoder (Qwen3-Omni Talker codes) and the project's own trainable codec.

    from thinktalk.codec import load_mimi, qwen3_codes
    mimi = load_mimi("/models/mimi")                       # kyutai/mimi, transformers layout
    codes = qwen3_codes(mimi, waveform, sample_rate)       # [16, frames] at 12.5 Hz

    from thinktalk.codec import CodecTrainConfig, train_codec, load_codec
    train_codec(CodecTrainConfig(output_dir="runs/codec", data=["speech/"], codec={...}))
    codec = load_codec("runs/codec/codec")                 # encoder + RVQ + a Qwen3-Omni Code2Wav decoder

See docs/codec.md.
"""

from thinktalk.codec.export import export_qwen3_checkpoint, load_code2wav, load_codec, save_codec
from thinktalk.codec.mimi import MimiConfig, MimiEncoder, MimiEncoding, frames_for_samples, load_mimi, qwen3_codes
from thinktalk.codec.model import Codec, CodecConfig, CodecEncoderConfig, QuantizerConfig, code2wav_hf_dict
from thinktalk.codec.quantizer import ResidualVectorQuantizer
from thinktalk.codec.train import CodecTrainConfig, TrainResult, train_codec

__all__ = [
    "Codec", "CodecConfig", "CodecEncoderConfig", "CodecTrainConfig", "MimiConfig", "MimiEncoder", "MimiEncoding",
    "QuantizerConfig", "ResidualVectorQuantizer", "TrainResult", "code2wav_hf_dict", "export_qwen3_checkpoint",
    "frames_for_samples", "load_code2wav", "load_codec", "load_mimi", "qwen3_codes", "save_codec", "train_codec",
]
