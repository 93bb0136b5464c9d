"""Tiny random checkpoints in the official directory layout, for tests, demos and CI.

The same config dictionaries serve two builders: the parity tests build the checkpoint with the
reference implementation (transformers' ``save_pretrained``), and :func:`build_tiny_checkpoint` builds
it with thinktalk alone (no transformers needed), so the README's demo runs on a fresh install.
Weights are random: the answers are gibberish, the pipeline is real.
"""

from __future__ import annotations

import copy
import json
import os

import torch

ROPE_TEXT = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]}

TINY_QWEN25_OMNI: dict = {
    "model_type": "qwen2_5_omni",
    "architectures": ["Qwen2_5OmniForConditionalGeneration"],
    "enable_audio_output": True,
    "thinker_config": {
        "model_type": "qwen2_5_omni_thinker",
        "audio_config": {
            "num_mel_bins": 128,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 32,
            "d_model": 16,
            "n_window": 8,
            "output_dim": 32,
            "max_source_positions": 1500,
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "out_hidden_size": 32,
            "fullatt_block_indexes": [1],
        },
        "text_config": {
            "vocab_size": 152064,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_parameters": ROPE_TEXT,
        },
        "vision_start_token_id": 151652,
    },
    "talker_config": {
        "vocab_size": 8448,
        "embedding_size": 32,
        "hidden_size": 24,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 12,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 4]},
    },
    "token2wav_config": {
        "dit_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "head_dim": 16,
            "ff_mult": 2,
            "emb_dim": 16,
            "look_ahead_layers": [1],
            "look_backward_layers": [0],
            "enc_emb_dim": 16,
            "enc_dim": 8,
            "enc_channels": [16, 16, 16, 16, 48],
            "enc_attention_channels": 8,
            "enc_se_channels": 8,
        },
        "bigvgan_config": {
            "upsample_initial_channel": 128,
            "resblock_kernel_sizes": [3, 7],
            "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
            "upsample_rates": [5, 3, 2, 2, 2, 2],
            "upsample_kernel_sizes": [11, 7, 4, 4, 4, 4],
        },
    },
}

TINY_CONFIGS: dict[str, dict] = {"qwen2_5_omni": TINY_QWEN25_OMNI}


def tiny_config(family: str = "qwen2_5_omni", with_speech: bool = True) -> dict:
    """A deep copy of the tiny config dict of ``family`` (``with_speech=False`` drops the speech parts)."""
    cfg = copy.deepcopy(TINY_CONFIGS[family])
    if not with_speech:
        cfg["enable_audio_output"] = False
        for key in ("talker_config", "token2wav_config", "code2wav_config"):
            cfg.pop(key, None)
    return cfg


def build_reference_checkpoint(
    directory: str, family: str = "qwen2_5_omni", seed: int = 0, with_speech: bool = True, extras: bool = True
):
    """Build the tiny checkpoint with the reference implementation (needs the ``test`` extra).

    ``extras`` also writes the tokenizer, chat template, preprocessor config and speakers.
    """
    import transformers

    cfg = tiny_config(family, with_speech)
    torch.manual_seed(seed)
    if family == "qwen2_5_omni":
        config = transformers.Qwen2_5OmniConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
        model = transformers.Qwen2_5OmniForConditionalGeneration(config)
    else:  # pragma: no cover - filled in by the Qwen3-Omni family
        raise ValueError(f"no reference builder for {family}")
    randomize(model, seed)
    model.eval()
    model.save_pretrained(directory)
    if extras:
        _write_extras(directory, family, model_for_speakers=model if with_speech else None, seed=seed)
    return model


def build_tiny_checkpoint(directory: str, family: str = "qwen2_5_omni", seed: int = 0, with_speech: bool = True) -> str:
    """Build a tiny random checkpoint with thinktalk's own modules (no transformers needed)."""
    from thinktalk.checkpoint import save_weights
    from thinktalk.config import load_config

    cfg_dict = tiny_config(family, with_speech)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg_dict, fh, indent=2)
    cfg = load_config(directory)
    torch.manual_seed(seed)
    if family == "qwen2_5_omni":
        from thinktalk.models.qwen2_5_omni.model import Qwen25Omni

        model = Qwen25Omni(cfg)
    else:
        from thinktalk.models.qwen3_omni.model import Qwen3Omni

        model = Qwen3Omni(cfg)
    randomize(model, seed)
    save_weights(model, directory, model.weight_map)
    _write_extras(directory, family, model_for_speakers=model if with_speech else None, seed=seed)
    return directory


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights that keep activations O(1) through every layer.

    The reference initialises with std 0.02, which makes a tiny model's outputs nearly independent
    of its inputs (logits ~0.5, media features barely visible): a parity test on such weights could
    not fail when an encoder is wrong. Matrices get std 1/sqrt(fan_in), biases 0.02, norm scales
    1 ± 0.1 (never exactly one, so a missing norm weight shows), and vocoder activation
    parameters (snake alpha/beta) stay as initialised.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".alpha", ".beta")):
                continue
            if p.dim() == 1:
                is_scale = "norm" in name or "ln_" in name or name.endswith(("weight", ".scale"))
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(1 + 0.1 * noise if is_scale and name.endswith("weight") else 0.02 * noise)
                continue
            fan_in = max(1, p[0].numel())
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def _write_extras(directory: str, family: str, model_for_speakers=None, seed: int = 0) -> None:
    """Tokenizer / chat template / preprocessor files, and speakers for checkpoints that speak."""
    from thinktalk.testing.tokenizer import write_tokenizer_files

    write_tokenizer_files(directory, family)
    if model_for_speakers is not None and family == "qwen2_5_omni":
        from thinktalk.models.qwen2_5_omni.speakers import write_tiny_speakers

        write_tiny_speakers(directory, seed=seed)
