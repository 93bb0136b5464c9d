"""A tiny random Mimi codec built by the reference (transformers' ``MimiModel``), for parity tests.

The shape keeps what the encoder's numerics depend on: kyutai/mimi's strides (8, 6, 5, 4) and ×2
downsampling (1920 samples per 12.5 Hz frame), a split quantizer with one semantic level and more
acoustic levels than Qwen3-Omni uses (20 > 16, so the cut matters), GQA attention and a sliding window
shorter than the test audio. The reference initialises codebooks to zeros and layer scales to 0.01,
and its linear layers to std 0.02, which would make every code 0 and the transformer invisible;
:func:`randomize_mimi` fixes both, so a
wrong module shows up in the codes.
"""

from __future__ import annotations

import torch

TINY_MIMI = {
    "hidden_size": 32,
    "num_filters": 4,
    "upsampling_ratios": [8, 6, 5, 4],
    "codebook_size": 64,
    "codebook_dim": 16,
    "num_quantizers": 20,
    "vector_quantization_hidden_dimension": 16,
    "num_hidden_layers": 2,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "sliding_window": 6,
    "upsample_groups": 32,
}


def randomize_mimi(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale.scale"):
                p.copy_(0.3 + 0.4 * torch.rand(p.shape, generator=g))
            elif "_transformer." in name and p.dim() == 2:  # the reference's std 0.02 hides the transformer
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("codebook.embed_sum"):
                b.copy_(torch.randn(b.shape, generator=g))
            elif name.endswith("codebook.cluster_usage"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def build_reference_mimi(directory: str, seed: int = 0):
    """Build, randomize and ``save_pretrained`` a tiny ``transformers.MimiModel``; returns it (eval mode)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.MimiModel(transformers.MimiConfig(**TINY_MIMI)).eval()
    randomize_mimi(model, seed)
    model.save_pretrained(directory)
    return model
