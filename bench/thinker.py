"""Thinker speed, thinktalk vs the reference (transformers 5.23), same shapes, same process.

Measures a full forward pass over a multimodal prompt (text + audio + image) and greedy decoding
throughput. Weights are random at the chosen shapes (speed does not depend on their values);
both implementations get the same inputs.

    python bench/thinker.py --shapes tiny,small                     # CPU, ratios count
    python bench/thinker.py --device cuda --shapes 7b --dtype bf16  # GPU, absolute numbers count
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.qwen25_inputs import InputBuilder, batch  # noqa: E402
from thinktalk.benchmark import sync  # noqa: E402
from thinktalk.testing.tiny import tiny_config  # noqa: E402

SHAPES = {
    "tiny": {},
    "small": {
        "audio_config": {"d_model": 256, "encoder_layers": 4, "encoder_attention_heads": 4, "encoder_ffn_dim": 1024, "output_dim": 512, "n_window": 50},
        "vision_config": {"depth": 4, "hidden_size": 256, "intermediate_size": 1024, "num_heads": 4, "out_hidden_size": 512, "fullatt_block_indexes": [3], "window_size": 112},
        "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 2,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}},
    },
    "7b": {
        "audio_config": {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "output_dim": 3584, "n_window": 100},
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112},
        "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
    },
}


def thinker_config(shape: str) -> dict:
    cfg = tiny_config("qwen2_5_omni", with_speech=False)
    for key, over in SHAPES[shape].items():
        cfg["thinker_config"][key].update(copy.deepcopy(over))
    return cfg


def make_inputs(audio_seconds: float, image_hw: tuple[int, int], text: int) -> dict:
    b = InputBuilder(0).text(text // 2).audio(int(audio_seconds * 100)).image(1, *image_hw).text(text // 2)
    return batch([b])


def timed(fn, device, repeat: int) -> float:
    fn()  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def bench_shape(shape: str, device: torch.device, dtype: torch.dtype, new_tokens: int, repeat: int, audio_s: float) -> dict:
    import transformers

    import thinktalk

    cfg = thinker_config(shape)
    hf_cfg = transformers.Qwen2_5OmniConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    with torch.device(device):
        ref = transformers.Qwen2_5OmniThinkerForConditionalGeneration._from_config(hf_cfg.thinker_config, dtype=dtype).eval()
    # The same random weights for both: the reference's tensors under checkpoint names, shared (not copied).
    tensors = {}
    for k, v in ref.state_dict().items():
        k = k.replace("model.language_model.", "model.").replace("model.audio_tower.", "audio_tower.").replace("model.visual.", "visual.")
        tensors["thinker." + k] = v
    ours = thinktalk.from_state_dict(cfg, tensors, device=device, dtype=dtype, components=("thinker",))
    del tensors
    inputs = {k: v.to(device) for k, v in make_inputs(audio_s, (28, 28), 64).items()}
    prompt = inputs["input_ids"].shape[1]
    row = {"shape": shape, "prompt_tokens": prompt, "new_tokens": new_tokens}
    with torch.inference_mode():
        row["ref_forward_s"] = timed(lambda: ref(**inputs), device, repeat)
        row["ours_forward_s"] = timed(lambda: ours.thinker(**inputs), device, repeat)
        row["ref_decode_s"] = timed(
            lambda: ref.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0),
            device, max(1, repeat // 2),
        )
        row["ours_decode_s"] = timed(lambda: ours.generate(**inputs, max_new_tokens=new_tokens, eos_token_id=()), device, max(1, repeat // 2))
    row["ref_tok_s"] = new_tokens / row["ref_decode_s"]
    row["ours_tok_s"] = new_tokens / row["ours_decode_s"]
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--shapes", default="tiny,small")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--audio-seconds", type=float, default=10.0)
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    rows = []
    for shape in a.shapes.split(","):
        rows.append(bench_shape(shape, device, dtype, a.new_tokens, a.repeat, a.audio_seconds))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"\nThinker forward + greedy decode, {where}, {a.dtype}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| shapes | prompt tok | forward ref (s) | forward ours (s) | ratio | decode ref tok/s | decode ours tok/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['prompt_tokens']} | {r['ref_forward_s']:.4f} | {r['ours_forward_s']:.4f} | "
              f"{r['ref_forward_s'] / r['ours_forward_s']:.2f}x | {r['ref_tok_s']:.1f} | {r['ours_tok_s']:.1f} | "
              f"{r['ours_tok_s'] / r['ref_tok_s']:.2f}x |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
