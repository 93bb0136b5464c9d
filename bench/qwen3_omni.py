"""Qwen3-Omni speed against the reference (transformers): thinker decode, time to first audio, real-time factor.

Both models are built in-process with random weights at the chosen shapes (no checkpoint needed), so
the numbers measure the code, not the answers: the Thinker is run for exactly ``--text-tokens`` tokens
and the Talker for exactly ``--frames`` codec frames (80 ms each; end tokens are disabled).

    python bench/qwen3_omni.py                                   # CPU, tiny shapes
    python bench/qwen3_omni.py --shapes small
    python bench/qwen3_omni.py --device cuda --shapes 30b-a3b    # published shapes, bfloat16 (~70 GB each)

Metrics (batch 1, greedy):
* thinker decode tok/s — decode steps only (prefill excluded), after a text prompt of ``--prompt-tokens``;
* first audio s — from the request (audio prompt of ``--audio-seconds``) to the first waveform sample:
  thinktalk streams (first codec frame), the reference returns audio only at the end;
* RTF — generation time / duration of the speech produced (< 1: faster than real time).
The two models are built one after the other (the published shapes do not fit twice on one GPU).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import time

import torch

from thinktalk.benchmark import sync
from thinktalk.testing.tiny import TINY_QWEN3_OMNI

IM_START, IM_END, NEWLINE, USER, ASSISTANT = 151644, 151645, 198, 872, 77091
AUDIO, AUDIO_START, AUDIO_END = 151675, 151669, 151670


def _rope(section: list[int]) -> dict:
    return {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section, "mrope_interleaved": True}


def shapes(name: str) -> dict:
    cfg = copy.deepcopy(TINY_QWEN3_OMNI)
    if name == "tiny":
        return cfg
    th, tk = cfg["thinker_config"], cfg["talker_config"]
    if name == "small":
        th["audio_config"].update(d_model=128, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=512,
                                  downsample_hidden_size=32, output_dim=256, n_window_infer=800)
        th["vision_config"].update(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
                                   num_position_embeddings=256, deepstack_visual_indexes=[1, 2])
        th["text_config"].update(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=8,
                                 num_key_value_heads=2, head_dim=32, moe_intermediate_size=128, num_experts=32,
                                 num_experts_per_tok=4, mlp_only_layers=[], rope_parameters=_rope([8, 4, 4]))
        tk.update(thinker_hidden_size=256, accept_hidden_layer=4)
        tk["text_config"].update(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=32, moe_intermediate_size=64,
                                 shared_expert_intermediate_size=128, num_experts=32, num_experts_per_tok=4,
                                 rope_parameters=_rope([8, 4, 4]))
        tk["code_predictor_config"].update(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=32)
        cfg["code2wav_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=4, sliding_window=72, decoder_dim=256)
        return cfg
    if name == "30b-a3b":  # Qwen3-Omni-30B-A3B-Instruct's config.json (the fields that shape the model)
        th["audio_config"].update(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                                  downsample_hidden_size=480, output_dim=2048, n_window=50, n_window_infer=800,
                                  conv_chunksize=500)
        th["vision_config"].update(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                                   out_hidden_size=2048, num_position_embeddings=2304,
                                   deepstack_visual_indexes=[8, 16, 24])
        th["text_config"].update(vocab_size=152064, hidden_size=2048, intermediate_size=768, num_hidden_layers=48,
                                 num_attention_heads=32, num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
                                 num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, mlp_only_layers=[],
                                 max_position_embeddings=65536, rope_parameters=_rope([24, 20, 20]))
        tk.update(thinker_hidden_size=2048, accept_hidden_layer=24)
        tk["text_config"].update(vocab_size=3072, hidden_size=1024, intermediate_size=2048, num_hidden_layers=20,
                                 num_attention_heads=16, num_key_value_heads=2, head_dim=128, moe_intermediate_size=384,
                                 shared_expert_intermediate_size=768, num_experts=128, num_experts_per_tok=6,
                                 norm_topk_prob=True, max_position_embeddings=65536, rope_parameters=_rope([24, 20, 20]))
        tk["code_predictor_config"].update(vocab_size=2048, hidden_size=1024, intermediate_size=3072, num_hidden_layers=5,
                                           num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        cfg["code2wav_config"].update(hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                                      num_attention_heads=16, num_key_value_heads=16, sliding_window=72, decoder_dim=1536)
        return cfg
    raise SystemExit(f"unknown shapes '{name}' (tiny, small, 30b-a3b)")


def random_(model: torch.nn.Module) -> None:
    """Random weights with activations O(1): matrices std 1/sqrt(fan_in), vectors 1 (norms) or 0.02."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".alpha", ".beta")):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0) if ("norm" in name or "ln_" in name) and name.endswith("weight") else p.normal_(0, 0.02)
            else:
                p.normal_(0, 1 / math.sqrt(p.shape[-1] if p.dim() <= 3 else p[0].numel()))


def build_ours(cfg_dict: dict, device: torch.device, dtype: torch.dtype):
    from thinktalk.checkpoint import materialize_buffers
    from thinktalk.models.qwen3_omni.config import Qwen3OmniConfig
    from thinktalk.models.qwen3_omni.model import Qwen3Omni

    cfg = Qwen3OmniConfig.from_hf(cfg_dict)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate the LLMs directly in their dtype
    try:
        with torch.device("meta"):
            model = Qwen3Omni(cfg)
    finally:
        torch.set_default_dtype(old)
    model.code2wav.float()  # the vocoder runs in float32 (as thinktalk.load does)
    model.to_empty(device=device)
    random_(model)
    materialize_buffers(model, device)
    model.tokenizer = None
    return model.eval()


def build_reference(cfg_dict: dict, device: torch.device, dtype: torch.dtype):
    import transformers

    config = transformers.Qwen3OmniMoeConfig(**{k: v for k, v in cfg_dict.items() if k not in ("model_type", "architectures")})
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.Qwen3OmniMoeForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    random_(model)
    return model.eval()


def text_prompt(n: int, device) -> dict:
    ids = [IM_START, USER, NEWLINE] + [(i * 7919) % 5000 + 100 for i in range(n)] + [IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]
    ids = torch.tensor([ids], device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def audio_prompt(seconds: float, device, dtype) -> dict:
    from thinktalk.positions import aut_token_count

    frames = int(seconds * 100)
    n = aut_token_count(frames)
    ids = [IM_START, USER, NEWLINE, AUDIO_START] + [AUDIO] * n + [AUDIO_END, 3838, 374, IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]
    ids = torch.tensor([ids], device=device)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 128, frames, generator=gen).to(device=device, dtype=dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "input_features": feats,
            "feature_attention_mask": torch.ones(1, frames, dtype=torch.long, device=device)}


@torch.inference_mode()
def bench_ours(model, args, device) -> dict:
    out = {}
    text = text_prompt(args.prompt_tokens, device)
    for warm in (True, False):
        n = 3 if warm else args.text_tokens
        sync(device)
        t0 = time.perf_counter()
        first = None
        for ev in model.stream(**text, max_new_tokens=n, eos_token_id=()):
            sync(device)
            if first is None and ev.kind == "text":
                first = time.perf_counter()
        sync(device)
        end = time.perf_counter()
    out["thinker_prefill_s"] = first - t0
    out["thinker_decode_tok_s"] = (args.text_tokens - 1) / (end - first)

    audio = audio_prompt(args.audio_seconds, device, next(model.thinker.parameters()).dtype)
    kwargs = dict(speaker="ethan", eos_token_id=(), talker_do_sample=False)
    for _ in model.stream(**audio, max_new_tokens=4, talker_max_new_tokens=4, **kwargs):  # warm-up
        pass
    sync(device)
    t0 = time.perf_counter()
    first_audio, samples = None, 0
    for ev in model.stream(**audio, max_new_tokens=args.text_tokens, talker_max_new_tokens=args.frames + 1, **kwargs):
        if ev.kind == "audio":
            samples += ev.audio.shape[0]
            if first_audio is None:
                first_audio = time.perf_counter() - t0
    sync(device)
    total = time.perf_counter() - t0
    out.update(first_audio_s=first_audio, total_s=total, audio_s=samples / 24000, rtf=total / (samples / 24000))
    out["rtf_after_first_audio"] = (total - first_audio) / max(1e-9, samples / 24000 - 0.08)
    return out


@torch.inference_mode()
def bench_reference(ref, args, device) -> dict:
    out = {}
    text = text_prompt(args.prompt_tokens, device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=151643)
    ref.thinker.generate(**text, max_new_tokens=3, **kw)  # warm-up
    times = {}
    for n in (1, args.text_tokens):
        sync(device)
        t0 = time.perf_counter()
        ref.thinker.generate(**text, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(device)
        times[n] = time.perf_counter() - t0
    out["thinker_prefill_s"] = times[1]
    out["thinker_decode_tok_s"] = (args.text_tokens - 1) / (times[args.text_tokens] - times[1])

    audio = audio_prompt(args.audio_seconds, device, next(ref.thinker.parameters()).dtype)
    gkw = dict(speaker="ethan", return_audio=True, thinker_do_sample=False, thinker_eos_token_id=None, talker_do_sample=False)
    ref.generate(**audio, thinker_max_new_tokens=4, talker_max_new_tokens=4, **gkw)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    _, wav = ref.generate(**audio, thinker_max_new_tokens=args.text_tokens, talker_max_new_tokens=args.frames + 1, **gkw)
    sync(device)
    total = time.perf_counter() - t0
    seconds = wav.shape[-1] / 24000
    out.update(first_audio_s=total, total_s=total, audio_s=seconds, rtf=total / seconds)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", default="tiny", choices=("tiny", "small", "30b-a3b"))
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--frames", type=int, default=50, help="codec frames to speak (80 ms each)")
    p.add_argument("--audio-seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = shapes(args.shapes)
    results = {"device": str(device), "shapes": args.shapes, "dtype": str(dtype).replace("torch.", ""),
               "text_tokens": args.text_tokens, "frames": args.frames, "audio_seconds_in": args.audio_seconds}
    runs = [("thinktalk", build_ours, bench_ours)]
    if not args.skip_reference:
        runs.append(("reference", build_reference, bench_reference))
    for name, build, bench in runs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        model = build(cfg, device, dtype)
        built = time.perf_counter() - t0
        if device.type == "cuda":
            weights = torch.cuda.memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        r = bench(model, args, device)
        r["build_s"] = built
        if device.type == "cuda":
            r["weights_gib"] = weights
            r["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        results[name] = r
        print(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in r.items()), flush=True)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "reference" in results:
        o, ref = results["thinktalk"], results["reference"]
        print(
            f"thinker decode {o['thinker_decode_tok_s']:.1f} vs {ref['thinker_decode_tok_s']:.1f} tok/s | "
            f"first audio {o['first_audio_s']:.2f} vs {ref['first_audio_s']:.2f} s | "
            f"RTF {o['rtf']:.2f} vs {ref['rtf']:.2f}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
