"""The streamed vocoder's cost against vocoding the whole mel at once (Qwen2.5-Omni BigVGAN).

The mel of an utterance arrives in the pieces the sliding-window DiT emits (first 2 blocks, then 4-block
chunks: 48, 96, 96, ... frames) and is vocoded three ways, CPU time of each (best of ``--repeats``):

* offline — BigVGAN over the whole mel (the reference's computation);
* incremental — thinktalk's streamed vocoder: each piece of the network computes only its new outputs
  (``bigvgan.incremental_push``), the same waveform as offline;
* window — the previous streamed vocoder: every piece re-vocoded with receptive-field context on each side.

    python bench/vocoder_stream.py                       # the embedded tiny vocoder, batch 1 and 8
    python bench/vocoder_stream.py --shapes 7b --frames 400 --batch 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build(shape: str, device: torch.device):
    from thinktalk.checkpoint import materialize_buffers
    from thinktalk.models.qwen2_5_omni.bigvgan import BigVGAN
    from thinktalk.models.qwen2_5_omni.config import BigVGANConfig
    from thinktalk.testing.tiny import TINY_QWEN25_OMNI

    fields = TINY_QWEN25_OMNI["token2wav_config"]["bigvgan_config"] if shape == "tiny" else {}
    cfg = BigVGANConfig.from_hf(fields)
    with torch.device("meta"):
        voc = BigVGAN(cfg)
    voc.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in voc.parameters():
            p.normal_(0, 0.02) if p.dim() == 1 else p.normal_(0, 1 / p[0].numel() ** 0.5)
    materialize_buffers(voc, device)
    return voc.eval()


def main() -> None:
    from thinktalk.models.qwen2_5_omni.bigvgan import UnitState, incremental_push, receptive_field, stream_units
    from thinktalk.models.qwen2_5_omni.token2wav import VocoderStreamState, vocoder_stream_push

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny", choices=["tiny", "7b"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--frames", type=int, default=200, help="mel frames (100 per second)")
    p.add_argument("--batch", default="1,8", help="streams vocoded together")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    voc = build(args.shapes, device)
    rf = receptive_field(voc.cfg)
    cuts = [0, 48] + list(range(144, args.frames, 96)) + [args.frames]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()
        best = float("inf")
        for _ in range(args.repeats):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            best = min(best, (time.perf_counter() - t0) if device.type == "cuda" else time.process_time() - c0)
        return best

    rows = []
    with torch.inference_mode():
        for b in [int(x) for x in args.batch.split(",")]:
            mel = torch.randn(b, voc.cfg.mel_dim, args.frames, device=device) - 4

            def offline(mel=mel):
                voc(mel)

            def incremental(b=b, mel=mel):
                states = [[UnitState() for _ in stream_units(voc)] for _ in range(b)]
                for lo, hi in zip(cuts[:-1], cuts[1:]):
                    incremental_push(voc, states, [mel[i, :, lo:hi] for i in range(b)], [False] * b)
                incremental_push(voc, states, [None] * b, [True] * b)

            def window(b=b, mel=mel):
                for i in range(b):
                    st = VocoderStreamState(context=rf, lookahead=rf, mel=mel[i : i + 1, :, :0])
                    for lo, hi in zip(cuts[:-1], cuts[1:]):
                        vocoder_stream_push(voc, st, mel[i : i + 1, :, lo:hi], False)
                    vocoder_stream_push(voc, st, None, True)

            row = {"batch": b, "offline_s": timed(offline), "incremental_s": timed(incremental), "window_s": timed(window)}
            row["incremental_vs_offline"] = row["incremental_s"] / row["offline_s"]
            row["window_vs_offline"] = row["window_s"] / row["offline_s"]
            row["saved_vs_window"] = 1 - row["incremental_s"] / row["window_s"]
            rows.append(row)
    meta = {"shapes": args.shapes, "device": str(device), "threads": args.threads, "frames": args.frames,
            "pieces": [b - a for a, b in zip(cuts[:-1], cuts[1:])], "receptive_field": rf,
            "load_1min": os.getloadavg()[0]}  # fmt: skip
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return
    print(f"# streamed BigVGAN, {args.shapes} shapes, {device} ({args.threads} threads), {args.frames} frames in pieces "
          f"{meta['pieces']}, receptive field {rf} frames, load {meta['load_1min']:.1f}")  # fmt: skip
    print("| streams | offline | incremental | window | incremental / offline | window / offline | saved vs window |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['offline_s']:.3f} s | {r['incremental_s']:.3f} s | {r['window_s']:.3f} s "
              f"| {r['incremental_vs_offline']:.2f}x | {r['window_vs_offline']:.2f}x | {100 * r['saved_vs_window']:.0f} % |")  # fmt: skip


if __name__ == "__main__":
    main()
