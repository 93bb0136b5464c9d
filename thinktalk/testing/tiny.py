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
            # The real DiT embeds codes 0..8193 and the real Talker only emits those before its end tokens;
            # a random Talker emits any of its 8448 ids, so the tiny DiT accepts them all.
            "num_embeds": 8448,
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

# Qwen3-Omni: the official special-token and codec ids, the published AuT chunking (n_window=50, which
# the reference's audio length formula assumes) and codec rates (1920 samples per 80 ms frame); few
# experts (8, top-2) and a dense layer among the MoE ones; num_code_groups=16 like the real model.
_QWEN3_MM_IDS = {
    "audio_token_id": 151675,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "audio_start_token_id": 151669,
    "audio_end_token_id": 151670,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "position_id_per_seconds": 13,
}
TINY_QWEN3_OMNI: dict = {
    "model_type": "qwen3_omni_moe",
    "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
    "enable_audio_output": True,
    "thinker_config": {
        "model_type": "qwen3_omni_moe_thinker",
        **_QWEN3_MM_IDS,
        "user_token_id": 872,
        "audio_config": {
            "num_mel_bins": 128,
            "d_model": 16,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 32,
            "downsample_hidden_size": 8,
            "output_dim": 32,
            "n_window": 50,
            "n_window_infer": 200,
            "conv_chunksize": 3,
            "max_source_positions": 1500,
        },
        "vision_config": {
            "depth": 3,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 32,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 2],
        },
        "text_config": {
            "vocab_size": 152064,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "moe_intermediate_size": 16,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        },
    },
    "talker_config": {
        **_QWEN3_MM_IDS,
        "spatial_merge_size": 2,
        "num_code_groups": 16,
        "thinker_hidden_size": 32,
        "accept_hidden_layer": 2,
        "codec_bos_id": 2149,
        "codec_eos_token_id": 2150,
        "codec_pad_id": 2148,
        "codec_nothink_id": 2155,
        "codec_think_bos_id": 2156,
        "codec_think_eos_id": 2157,
        "speaker_id": {"chelsie": 2301, "ethan": 2302, "aiden": 2303},
        "text_config": {
            "vocab_size": 3072,
            "hidden_size": 24,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 12,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 24,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 2, 2], "mrope_interleaved": True},
        },
        "code_predictor_config": {
            "vocab_size": 2048,
            "hidden_size": 24,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "num_code_groups": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    },
    "code2wav_config": {
        "codebook_size": 2048,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "sliding_window": 8,
        "num_quantizers": 16,
        "upsample_rates": [8, 5, 4, 3],
        "upsampling_ratios": [2, 2],
        "decoder_dim": 32,
    },
}

TINY_CONFIGS: dict[str, dict] = {"qwen2_5_omni": TINY_QWEN25_OMNI, "qwen3_omni_moe": TINY_QWEN3_OMNI}


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
    elif family == "qwen3_omni_moe":
        config = transformers.Qwen3OmniMoeConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
        model = transformers.Qwen3OmniMoeForConditionalGeneration(config)
    else:
        raise ValueError(f"no reference builder for {family}")
    randomize(model, seed)
    if family == "qwen3_omni_moe":
        adjust_qwen3_weights(model, seed)
    model.eval()
    model.save_pretrained(directory)
    if extras:
        _write_extras(directory, family, model_for_speakers=model if with_speech else None, seed=seed)
    return model


def build_tiny_checkpoint(directory: str, family: str = "qwen2_5_omni", seed: int = 0, with_speech: bool = True) -> str:
    """Build a tiny random checkpoint with thinktalk's own modules (no transformers needed)."""
    from thinktalk.checkpoint import save_weights
    from thinktalk.families import load_config

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
    if family == "qwen3_omni_moe":
        adjust_qwen3_weights(model, seed)
    _write_extras(directory, family, model_for_speakers=model if with_speech else None, seed=seed)
    make_demo_friendly(model, directory)
    save_weights(model, directory, model.weight_map)
    return directory


def make_demo_friendly(model: torch.nn.Module, directory: str) -> None:
    """Steer a random model so the demo shows real text and audible speech.

    Random weights pick any of the 152k ids, nearly all unknown to the tiny tokenizer (the answer
    would decode to nothing): output rows of ids outside its byte-level vocabulary are zeroed, except
    the end-of-turn token. The random vocoders amplify far past [-1, 1]; their last convolution is
    scaled so the waveform is audible noise, not a clipped square wave.
    """
    with open(os.path.join(directory, "vocab.json"), encoding="utf-8") as fh:
        plain = sum(1 for i in json.load(fh).values() if i < 151643)
    with torch.no_grad():
        head = model.thinker.lm_head.weight
        end = head[151645].clone()
        head[plain:] = 0
        head[151645] = end
        t2w = getattr(model, "token2wav", None)
        if t2w is not None:
            t2w.code2wav_bigvgan_model.conv_post.weight.mul_(0.008)


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


def adjust_qwen3_weights(model: torch.nn.Module, seed: int) -> None:
    """Qwen3-Omni touches after :func:`randomize` (the reference's module layout and ours agree here).

    Stacked expert tensors [E, out, in] get std 1/sqrt(in) (randomize would use the whole expert's
    size as fan-in), and the vocoder's last convolution is scaled down so the waveform mostly stays
    inside the final clamp to [-1, 1] (a clamped sample compares equal whatever the model did).
    """
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name and p.dim() == 3:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        code2wav = getattr(model, "code2wav", None)
        if code2wav is not None:
            code2wav.decoder[-1].conv.weight.mul_(0.02)


def _write_extras(directory: str, family: str, model_for_speakers=None, seed: int = 0) -> None:
    """Tokenizer / chat template / preprocessor files, and speakers for checkpoints that speak."""
    from thinktalk.testing.tokenizer import write_tokenizer_files

    write_tokenizer_files(directory, family)
    if model_for_speakers is not None and family == "qwen2_5_omni":
        from thinktalk.models.qwen2_5_omni.speakers import write_tiny_speakers

        write_tiny_speakers(directory, seed=seed)
