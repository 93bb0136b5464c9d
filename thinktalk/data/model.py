"""thinktalk-tiny's architecture: Qwen3-Omni (MoE Thinker, AuT, vision with deepstack, MoE Talker + code predictor,
causal Code2Wav) at tiny sizes, with the tokenizer of :mod:`thinktalk.data.tokenizer`; ~4 M parameters (~16 MB).

``build_untrained(directory, data_dir)`` writes an official-layout checkpoint directory (random weights: the
recipes' starting point) that thinktalk and the reference both load::

    python -m thinktalk.data.model --data runs/tiny/data --out runs/tiny/init

The Code2Wav sizes are the project's codec recipe's (``recipes/tiny/codec.yaml``: 8 codebooks of 256 codes),
so the trained codec's decoder drops into this checkpoint, and the Talker predicts those 8 codebooks.
"""

from __future__ import annotations

import copy
import json
import os

import torch

# The project's codec (recipes/tiny/codec.yaml, the same numbers as recipes/codec_tiny.yaml).
CODEBOOK_SIZE = 256
NUM_CODE_GROUPS = 8
CODE2WAV = {
    "codebook_size": CODEBOOK_SIZE,
    "num_quantizers": NUM_CODE_GROUPS,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "sliding_window": 16,
    "decoder_dim": 128,
    "upsample_rates": [8, 5, 4, 3],
    "upsampling_ratios": [2, 2],
}
# Talker codec vocabulary: codes 0..255, then control tokens; the Talker never samples its top 1024 ids except
# codec EOS (the reference's rule), so the vocabulary is 256 + 1024 and every control id lies in the top part.
TALKER_VOCAB = CODEBOOK_SIZE + 1024
CODEC_IDS = {"codec_pad_id": 256, "codec_bos_id": 257, "codec_eos_token_id": 258, "codec_nothink_id": 259,
             "codec_think_bos_id": 260, "codec_think_eos_id": 261}  # fmt: skip
SPEAKERS = {"tiny": 300, "tiny_f": 301}
HIDDEN = 128


def tiny_omni_config(ids: dict[str, int], vocab_size: int) -> dict:
    """The ``config.json`` dict of thinktalk-tiny for a tokenizer with special ids ``ids``."""
    mm = {
        "audio_token_id": ids["<|audio_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "audio_start_token_id": ids["<|audio_start|>"],
        "audio_end_token_id": ids["<|audio_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "position_id_per_seconds": 13,
    }
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_interleaved": True}
    return {
        "model_type": "qwen3_omni_moe",
        "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
        "enable_audio_output": True,
        "im_start_token_id": ids["<|im_start|>"],
        "im_end_token_id": ids["<|im_end|>"],
        "system_token_id": ids["system"],
        "user_token_id": ids["user"],
        "assistant_token_id": ids["assistant"],
        "tts_pad_token_id": ids["<tts_pad>"],
        "tts_bos_token_id": ids["<tts_text_bos>"],
        "tts_eos_token_id": ids["<tts_text_eod>"],
        "thinker_config": {
            "model_type": "qwen3_omni_moe_thinker",
            **mm,
            "user_token_id": ids["user"],
            "audio_config": {
                "num_mel_bins": 128,
                "d_model": 64,
                "encoder_layers": 2,
                "encoder_attention_heads": 2,
                "encoder_ffn_dim": 128,
                "downsample_hidden_size": 32,
                "output_dim": HIDDEN,
                "n_window": 50,
                "n_window_infer": 200,
                "conv_chunksize": 50,
                "max_source_positions": 1500,
            },
            "vision_config": {
                "depth": 2,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_heads": 2,
                "patch_size": 16,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "out_hidden_size": HIDDEN,
                "num_position_embeddings": 64,
                "deepstack_visual_indexes": [0, 1],
            },
            "text_config": {
                "vocab_size": vocab_size,
                "hidden_size": HIDDEN,
                "intermediate_size": 256,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 32,
                "moe_intermediate_size": 128,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "norm_topk_prob": True,
                "mlp_only_layers": [],
                "max_position_embeddings": 4096,
                "rope_parameters": {**rope, "mrope_section": [6, 5, 5]},
            },
        },
        "talker_config": {
            **mm,
            "spatial_merge_size": 2,
            "num_code_groups": NUM_CODE_GROUPS,
            "thinker_hidden_size": HIDDEN,
            "accept_hidden_layer": 2,
            **CODEC_IDS,
            "speaker_id": dict(SPEAKERS),
            "text_config": {
                "vocab_size": TALKER_VOCAB,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 32,
                "moe_intermediate_size": 64,
                "shared_expert_intermediate_size": 64,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "norm_topk_prob": False,
                "max_position_embeddings": 4096,
                "rope_parameters": {**rope, "mrope_section": [6, 5, 5]},
            },
            "code_predictor_config": {
                "vocab_size": CODEBOOK_SIZE,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 32,
                "num_code_groups": NUM_CODE_GROUPS,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        },
        "code2wav_config": copy.deepcopy(CODE2WAV),
    }


def build_untrained(directory: str, data_dir: str | None = None, texts: list[str] | None = None, seed: int = 0,
                    vocab_size: int = 512) -> str:  # fmt: skip
    """Tokenizer (trained on ``data_dir``'s text, or ``texts``) + config + random weights, in ``directory``."""
    from thinktalk.checkpoint import save_weights
    from thinktalk.data.tokenizer import read_texts, write_tokenizer
    from thinktalk.families import load_config
    from thinktalk.models.qwen3_omni.model import Qwen3Omni
    from thinktalk.testing.tiny import adjust_qwen3_weights, randomize

    if texts is None:
        if data_dir is None:
            raise ValueError("build_untrained needs data_dir (a generated data set) or texts")
        texts = read_texts(data_dir)
    ids = write_tokenizer(directory, texts, vocab_size)
    vocab = (max(ids.values()) + 1 + 63) // 64 * 64  # embedding rows: every id, rounded up to 64
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(tiny_omni_config(ids, vocab), fh, indent=2)
    torch.manual_seed(seed)
    model = Qwen3Omni(load_config(directory))
    randomize(model, seed)
    adjust_qwen3_weights(model, seed)
    save_weights(model, directory, model.weight_map)
    return directory


def parameter_count(directory: str) -> dict[str, int]:
    """Parameters per component of a checkpoint directory (from its safetensors headers)."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                for key in f.keys():
                    part = key.split(".")[0] if not key.startswith("thinker.") else ".".join(key.split(".")[:2])
                    n = 1
                    for d in f.get_slice(key).get_shape():
                        n *= d
                    counts[part] = counts.get(part, 0) + n
    return counts


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m thinktalk.data.model", description="build thinktalk-tiny (untrained)")
    ap.add_argument("--data", required=True, help="a data set written by python -m thinktalk.data")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=512, help="BPE tokens (byte alphabet included)")
    a = ap.parse_args(argv)
    build_untrained(a.out, a.data, seed=a.seed, vocab_size=a.vocab_size)
    counts = parameter_count(a.out)
    size = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    print(json.dumps(counts, indent=1))
    print(f"{sum(counts.values()):,} parameters, {size / 1e6:.1f} MB on disk in {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
