"""Qwen2.5-Omni speech speed against the reference (transformers 5.23 ``generate``, non-streaming).

One random-weight model is built in-process at the chosen shapes and the reference loads the very same
tensors (our module names are the checkpoint names). The Thinker answers exactly ``--text-tokens``
tokens and the Talker speaks exactly ``--codes`` codec ids (20 ms each): end tokens are disabled (the
Talker's codec head rows for ids >= 8192 are zeroed, which also keeps every code inside the DiT's codebook).

    python bench/qwen25_speech.py                                  # CPU: tiny and small shapes
    python bench/qwen25_speech.py --shapes small --codes 300
    python bench/qwen25_speech.py --device cuda --shapes 7b        # published 7B shapes, bfloat16

Metrics (batch 1, greedy, audio prompt of ``--audio-seconds``):
* first audio s — request to the first waveform sample. thinktalk: ``model.stream`` (Talker interleaved
  with the Thinker, sliding-window Token2Wav); reference: the end of ``generate`` (it returns audio once);
* RTF — total time / seconds of speech produced (< 1: faster than real time);
* talker codes/s — Talker steps per second of Talker time (thinktalk: offline ``generate``, timed between
  the end of the Thinker and the end of the Talker; reference: its ``talker.generate`` call).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import time

import torch

from thinktalk.testing.speech import AUDIO, AUDIO_BOS, AUDIO_EOS, IM_END, IM_START
from thinktalk.testing.tiny import TINY_QWEN25_OMNI


def _rope(section: list[int]) -> dict:
    return {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section}


def shapes(name: str) -> dict:
    cfg = copy.deepcopy(TINY_QWEN25_OMNI)
    if name == "tiny":
        return cfg
    th, tk, t2w = cfg["thinker_config"], cfg["talker_config"], cfg["token2wav_config"]
    if name == "small":  # 4 layers, 256 wide everywhere
        th["audio_config"].update(d_model=256, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024,
                                  output_dim=256, n_window=100)
        th["vision_config"].update(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=256,
                                   window_size=112, fullatt_block_indexes=[3])
        th["text_config"].update(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, rope_parameters=_rope([8, 12, 12]))
        tk.update(embedding_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_parameters=_rope([8, 12, 12]))
        t2w["dit_config"].update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=64, emb_dim=128,
                                 look_ahead_layers=[2], look_backward_layers=[0, 3], enc_emb_dim=192, enc_dim=64,
                                 enc_channels=[64, 64, 64, 64, 192], enc_attention_channels=32, enc_se_channels=32,
                                 num_embeds=8193)
        t2w["bigvgan_config"].update(upsample_initial_channel=256, resblock_kernel_sizes=[3, 7, 11],
                                     resblock_dilation_sizes=[[1, 3, 5]] * 3)
        return cfg
    if name == "7b":  # Qwen/Qwen2.5-Omni-7B's config.json (the fields that shape the model)
        th["audio_config"].update(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                                  output_dim=3584, n_window=100)
        th["vision_config"].update(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                   out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
        th["text_config"].update(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, rope_parameters=_rope([16, 24, 24]))
        tk.update(embedding_size=3584, hidden_size=896, intermediate_size=18944, num_hidden_layers=24,
                  num_attention_heads=12, num_key_value_heads=4, head_dim=128, rope_parameters=_rope([16, 24, 24]))
        cfg["token2wav_config"] = {"dit_config": {}, "bigvgan_config": {}}  # the defaults are the published ones
        return cfg
    raise SystemExit(f"unknown shapes '{name}' (tiny, small, 7b)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_(model: torch.nn.Module) -> None:
    """Random weights with O(1) activations: matrices std 1/sqrt(fan_in), norms 1, other vectors std 0.02."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".alpha", ".beta")):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0) if "norm" in name and name.endswith("weight") else p.normal_(0, 0.02)
            else:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
        # No end token and no code outside the DiT's codebook: every row >= 8192 scores 0, below the best.
        model.talker.codec_head.weight[8192:] = 0


def speakers(cfg_dict: dict) -> dict:
    dit = cfg_dict["token2wav_config"]["dit_config"]
    gen = torch.Generator().manual_seed(0)
    voice = {"bos_token": 151872, "cond": torch.randn(1, dit.get("enc_emb_dim", 192), generator=gen),
             "ref_mel": torch.randn(1, 400, 80, generator=gen) * 2 - 5}
    return {"Chelsie": voice}


def build_ours(cfg_dict: dict, device: torch.device, dtype: torch.dtype):
    from thinktalk.checkpoint import materialize_buffers
    from thinktalk.models.qwen2_5_omni.config import Qwen25OmniConfig
    from thinktalk.models.qwen2_5_omni.model import Qwen25Omni

    with torch.device("meta"):
        model = Qwen25Omni(Qwen25OmniConfig.from_hf(cfg_dict))
    model.to_empty(device=device)
    torch.manual_seed(0)
    random_(model)
    model.thinker.to(dtype)
    model.talker.to(dtype)
    materialize_buffers(model, device)
    model.speakers = speakers(cfg_dict)
    model.tokenizer = None
    return model.eval()


def reference_name(name: str) -> str:
    """Checkpoint (= thinktalk) name → the reference's in-memory name (transformers 5 nests the Thinker's parts)."""
    for ckpt, mem in (("thinker.audio_tower.", "thinker.model.audio_tower."), ("thinker.visual.", "thinker.model.visual."),
                      ("thinker.model.", "thinker.model.language_model.")):
        if name.startswith(ckpt):
            return mem + name[len(ckpt):]
    return name


def build_reference(cfg_dict: dict, ours, device: torch.device, dtype: torch.dtype):
    import transformers

    config = transformers.Qwen2_5OmniConfig(**{k: v for k, v in cfg_dict.items() if k not in ("model_type", "architectures")})
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ref = transformers.Qwen2_5OmniForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    ref.token2wav.float()
    missing, unexpected = ref.load_state_dict({reference_name(k): v for k, v in ours.state_dict().items()}, strict=False)
    persistent = {n for n, _ in ref.named_parameters()}
    if unexpected or set(missing) & persistent:
        raise RuntimeError(f"weights do not line up: missing {sorted(set(missing) & persistent)[:5]}, unexpected {unexpected[:5]}")
    ref.speaker_map = ours.speakers
    return ref.eval()


def audio_prompt(seconds: float, device) -> dict:
    frames = int(seconds * 100)
    n = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    ids = [IM_START, 872, 198, AUDIO_BOS] + [AUDIO] * n + [AUDIO_EOS, 3838, 374, IM_END, 198, IM_START, 77091, 198]
    ids = torch.tensor([ids], device=device)
    feats = torch.randn(1, 128, frames, generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "input_features": feats,
            "feature_attention_mask": torch.ones(1, frames, dtype=torch.long, device=device)}


def bench_ours(model, prompt, args, device) -> dict:
    kw = dict(speaker="Chelsie", eos_token_id=[-1], talker_do_sample=False, seed=0)
    for _ in model.stream(**prompt, max_new_tokens=3, talker_max_new_tokens=4, **kw):  # warm-up
        pass

    def streamed() -> dict:
        sync(device)
        t0 = time.perf_counter()
        first, samples = None, 0
        for ev in model.stream(**prompt, max_new_tokens=args.text_tokens, talker_max_new_tokens=args.codes, **kw):
            if ev.kind == "audio":
                samples += ev.audio.shape[0]
                if first is None:
                    first = time.perf_counter() - t0
        sync(device)
        total = time.perf_counter() - t0
        return {"first_audio_s": first, "total_s": total, "audio_s": samples / 24000}

    def offline() -> dict:
        sync(device)
        t0 = time.perf_counter()
        res = model.generate(**prompt, max_new_tokens=args.text_tokens, talker_max_new_tokens=args.codes,
                             return_audio=True, **kw)
        sync(device)
        total = time.perf_counter() - t0
        return {"first_audio_s": total, "total_s": total, "audio_s": res.audio[0].numel() / 24000,
                "talker_codes_s": res.codes[0].numel() / res.timings["talker_s"]}

    return {"thinktalk stream": best(streamed, args.repeats), "thinktalk offline": best(offline, args.repeats)}


def best(run, repeats: int) -> dict:
    """The fastest of ``repeats`` runs, field by field (shared machines are noisy; the minimum is the code's speed)."""
    runs = [run() for _ in range(repeats)]
    return {k: (runs[0][k] if k == "audio_s" else (max if k.endswith("codes_s") else min)(r[k] for r in runs)) for k in runs[0]}


def bench_reference(ref, prompt, args, device) -> dict:
    timing = {}
    original = ref.talker.generate

    def timed(*a, **k):
        sync(device)
        t0 = time.perf_counter()
        out = original(*a, **k)
        sync(device)
        timing["talker_s"] = time.perf_counter() - t0
        timing["codes"] = out.shape[1] - k["input_ids"].shape[1]
        return out

    ref.talker.generate = timed
    kw = dict(speaker="Chelsie", thinker_do_sample=False, thinker_eos_token_id=None, talker_do_sample=False)

    def once() -> dict:
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            _, wav = ref.generate(**prompt, thinker_max_new_tokens=args.text_tokens, talker_max_new_tokens=args.codes, **kw)
        sync(device)
        total = time.perf_counter() - t0
        return {"first_audio_s": total, "total_s": total, "audio_s": wav.shape[-1] / 24000,
                "talker_codes_s": timing["codes"] / timing["talker_s"]}

    with torch.no_grad():
        ref.generate(**prompt, thinker_max_new_tokens=3, talker_max_new_tokens=4, **kw)  # warm-up
    try:
        return {"reference": best(once, args.repeats)}
    finally:
        del ref.talker.generate


def run(shape: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = shapes(shape)
    prompt = audio_prompt(args.audio_seconds, device)
    ours = build_ours(cfg, device, dtype)
    rows = bench_ours(ours, prompt, args, device)
    if not args.skip_reference:
        ref = build_reference(cfg, ours, device, dtype)
        del ours
        gc.collect()
        rows.update(bench_reference(ref, prompt, args, device))
        del ref
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for r in rows.values():
        r["rtf"] = r["total_s"] / r["audio_s"] if r["audio_s"] else float("nan")
    return rows


def table(results: dict, args) -> str:
    lines = [
        f"Qwen2.5-Omni speech, {args.device}, {args.audio_seconds:g} s audio prompt → {args.text_tokens} text tokens, "
        f"{args.codes} codec ids ({args.codes / 50:g} s of speech), 10 ODE steps",
        "",
        "| shapes | implementation | first audio (s) | total (s) | RTF | Talker codes/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for shape, rows in results.items():
        for name, r in rows.items():
            codes = r.get("talker_codes_s")
            lines.append(
                f"| {shape} | {name} | {r['first_audio_s']:.2f} | {r['total_s']:.2f} | {r['rtf']:.2f} | "
                f"{'—' if codes is None else f'{codes:.0f}'} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", nargs="+", default=None, choices=("tiny", "small", "7b"),
                   help="default: tiny small on CPU, 7b on CUDA")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA")
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--codes", type=int, default=150)
    p.add_argument("--audio-seconds", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the fastest counts")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.shapes or (["7b"] if device.type == "cuda" else ["tiny", "small"])
    results = {}
    for shape in names:
        results[shape] = run(shape, args, device, dtype)
        print(f"{shape}: {json.dumps(results[shape])}", flush=True)
    print()
    print(table(results, args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
