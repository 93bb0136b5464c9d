"""Run every example recipe (recipes/*.yaml) briefly on tiny random models and draw its curves.

    PYTHONPATH=. python scripts/training_curves.py [--steps 30] [--only sft,lora] [--out docs/img]

Each run is the example config with the tiny model and a learning rate that moves a tiny model in a few
dozen steps (the configs' own rates are for the real 3B-30B models); the distillation teacher is the model
the sft run produced (run sft first); the Qwen3 voice's recording is encoded by a tiny random Mimi. GSPO's example rewards need real
answers; on the random tiny model it uses a reward the model can learn (a letter in a one-token answer).
The PNGs go to docs/img/train_<name>.png; the first and last values are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img"))
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "curves"))
    args = ap.parse_args()
    os.chdir(ROOT)
    from thinktalk.testing.tiny import build_tiny_checkpoint
    from thinktalk.train import load_config, train
    from thinktalk.train.metrics import plot, read_metrics

    work = args.work
    tiny25, tiny3 = (os.path.join(work, n) for n in ("tiny25", "tiny3"))
    for d, fam in ((tiny25, "qwen2_5_omni"), (tiny3, "qwen3_omni_moe")):
        if not os.path.exists(os.path.join(d, "config.json")):
            build_tiny_checkpoint(d, fam, seed=0)
    mimi = os.path.join(work, "mimi")  # a tiny random Mimi encodes the Qwen3 voice's recording
    if not os.path.exists(os.path.join(mimi, "config.json")):
        from thinktalk.testing.mimi import build_reference_mimi

        build_reference_mimi(mimi, seed=0)
    teacher = os.path.join(work, "sft")  # strong-to-weak: the SFT run's model teaches the base model
    n = args.steps
    common = {"max_steps": n, "save_every": 0, "progress": False, "warmup_steps": 0, "grad_accum": 1, "batch_size": 4}
    runs = {
        "stage1": ("recipes/stage1.yaml", {"model": tiny25, "lr": 1e-3}, ["loss", "grad_norm", "lr"]),
        "stage1_qwen3": ("recipes/stage1_qwen3.yaml", {"model": tiny3, "lr": 3e-3}, ["loss", "grad_norm", "lr"]),
        "stage2": ("recipes/stage2.yaml", {"model": tiny25, "lr": 3e-3}, ["loss", "grad_norm", "lr"]),
        "stage3": ("recipes/stage3.yaml", {"model": tiny25, "lr": 3e-3, "max_length": 512, "batch_size": 1,
                                           "loss_chunk_size": 64}, ["loss", "tokens", "lr"]),
        "sft": ("recipes/sft.yaml", {"model": tiny25, "lr": 3e-3}, ["loss", "grad_norm", "lr"]),
        "sft_qwen3": ("recipes/sft_qwen3.yaml", {"model": tiny3, "lr": 3e-3}, ["loss", "grad_norm", "lr"]),
        "lora": ("recipes/lora.yaml", {"model": tiny25, "lr": 1e-2, "lora_dropout": 0.0}, ["loss", "grad_norm", "lr"]),
        "distill": ("recipes/distill.yaml", {"model": tiny25, "teacher": teacher, "lr": 3e-3,
                                             "teacher_logits": os.path.join(work, "distill_top16.safetensors")},
                    ["loss", "kl", "lr"]),
        "distill_onpolicy": ("recipes/distill_onpolicy.yaml", {"model": tiny25, "teacher": teacher, "lr": 3e-3,
                                                               "max_new_tokens": 8}, ["loss", "kl", "completion_tokens"]),
        "gspo": ("recipes/gspo.yaml", {"model": tiny25, "lr": 3e-2, "batch_size": 2, "group_size": 8,
                                       "max_new_tokens": 1, "top_k": 20,
                                       "rewards": [{"type": "format", "pattern": "e"}]},
                 ["reward", "reward_std", "clip_frac", "loss"]),
        "talker": ("recipes/talker.yaml", {"model": tiny25, "lr": 3e-3}, ["loss", "codec_loss", "lr"]),
        "talker_qwen3": ("recipes/talker_qwen3.yaml", {"model": tiny3, "lr": 3e-3, "batch_size": 4},
                         ["loss", "codec_loss", "predictor_loss"]),
        "dpo": ("recipes/dpo.yaml", {"model": tiny25, "lr": 1e-3}, ["margin", "reward_chosen", "reward_rejected", "loss"]),
        "speaker": ("recipes/speaker.yaml", {"model": tiny25, "lr": 3e-3}, ["loss", "codec_loss", "lr"]),
        "speaker_qwen3": ("recipes/speaker_qwen3.yaml", {"model": tiny3, "lr": 3e-3, "batch_size": 4, "codec_model": mimi},
                          ["loss", "codec_loss", "predictor_loss"]),
    }
    only = {x for x in args.only.split(",") if x}
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name, (config, overrides, keys) in runs.items():
        if only and name not in only:
            continue
        out = os.path.join(work, name)
        values = {**common, **overrides, "output_dir": out, "resume": "never"}
        t0 = time.perf_counter()
        train(load_config(config, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]))
        seconds = time.perf_counter() - t0
        png = plot(out, os.path.join(args.out, f"train_{name}.png"), keys, title=f"{name} ({config}, tiny model)")
        records = read_metrics(out)
        main_key = keys[0]
        first, last = records[0][main_key], records[-1][main_key]
        rows.append((name, main_key, first, last, len(records), seconds))
        print(f"{name}: {main_key} {first:.4f} -> {last:.4f} over {len(records)} steps ({seconds:.0f} s); {png}", flush=True)
    print("\n| recipe | figure | first | last | steps |\n|---|---|---|---|---|")
    for name, key, first, last, steps, _ in rows:
        print(f"| {name} | {key} | {first:.3f} | {last:.3f} | {steps} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
