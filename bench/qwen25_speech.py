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
import gc
import json
import time

import torch

from thinktalk.benchmark import audio_prompt, build_ours, build_reference, shapes, sync


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
        out = {"first_audio_s": total, "total_s": total, "audio_s": res.audio[0].numel() / 24000}
        if "talker_s" in res.timings:  # the engine times its stages interleaved, without a Talker-only span
            out["talker_codes_s"] = res.codes[0].numel() / res.timings["talker_s"]
        return out

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
