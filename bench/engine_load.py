"""The engine alone under N concurrent speech requests: CPU time per phase, against one request.

``bench/serve_load.py`` measures ``thinktalk serve`` from the clients' side (HTTP, SSE, the clients' own CPU on the
same machine, the server's threads sharing the GIL); this runs the same request — the default model's processor,
the question, its seed and limits — straight through :class:`thinktalk.generation.engine.Engine` in this process,
N copies submitted at once, and reports the CPU time of each phase of the engine's steps (prompt reading, Thinker
decode, Talker + code predictor, vocoder). The difference between the two ratios is what the server adds.

    python bench/engine_load.py                     # 1 and 8 requests, the embedded thinktalk-tiny
    python bench/engine_load.py --requests 1,4,8,16 --repeat 5 --json

Process CPU time with one torch thread (``--threads``, default 1), the lowest of ``--repeat`` runs per count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from bench.serve_load import QUESTION  # noqa: E402

PHASES = ("_prefill", "_decode", "_talk", "_vocode")
NAMES = {"_prefill": "read prompts", "_decode": "Thinker steps", "_talk": "Talker + predictor", "_vocode": "vocoder"}


def build(model_dir: str | None, question: str, tokens: int, speech_seconds: float, seed: int | None, max_rows: int):
    import thinktalk
    from thinktalk.default_model import shipped_model_dir
    from thinktalk.generation.engine import Engine, EngineConfig
    from thinktalk.generation.inputs import ModelInputs
    from thinktalk.generation.options import GenerateOptions, SpeechParams, TextParams
    from thinktalk.processing import Processor

    path = model_dir or shipped_model_dir()
    model = thinktalk.load(path)
    if not model.has_speech:
        raise SystemExit(f"{path} has no speech decoders: this benchmark measures speech requests")
    processor = Processor.from_pretrained(path)
    inputs = processor([{"role": "user", "content": [{"type": "text", "text": question}]}])
    inputs = inputs if isinstance(inputs, ModelInputs) else ModelInputs.from_dict(inputs)
    codes = max(1, int(speech_seconds * getattr(model, "codec_rate_hz", 50.0)))
    options = GenerateOptions(text=TextParams(max_new_tokens=tokens),
                              speech=SpeechParams(sampling=model.keywords.talker_sampling, max_new_tokens=codes), seed=seed)  # fmt: skip
    max_len = inputs.length + tokens + 1
    engine = Engine(model, EngineConfig(rows=max_rows, max_len=max_len, talker_max_len=max_len + 16 + codes))
    return engine, inputs, options


def run(engine, inputs, options, n: int) -> dict:
    """N requests at once, stepped to the end: CPU seconds in all and per phase, steps, seconds of speech."""
    spent = dict.fromkeys(PHASES, 0.0)
    originals = {ph: getattr(engine, ph) for ph in PHASES}

    def timed(ph):
        def call():
            t0 = time.process_time()
            originals[ph]()
            spent[ph] += time.process_time() - t0

        return call

    for ph in PHASES:
        setattr(engine, ph, timed(ph))
    try:
        with torch.inference_mode():
            reqs = [engine.submit(inputs, options) for _ in range(n)]
            t0, steps = time.process_time(), 0
            while not all(r.done for r in reqs):
                engine.step()
                steps += 1
            total = time.process_time() - t0
    finally:
        for ph in PHASES:
            delattr(engine, ph)  # the bound methods again
    errors = sum(1 for r in reqs if any(e.kind == "error" for e in r.events))
    speech = sum(e.audio.numel() / e.sample_rate for r in reqs for e in r.events if e.kind == "audio")
    return {"requests": n, "cpu_s": total, "steps": steps, "speech_s": speech, "errors": errors,
            "phases": {NAMES[ph]: s for ph, s in spent.items()}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the embedded default model, thinktalk-tiny)")
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--requests", default="1,8", help="comma-separated counts of concurrent requests")
    p.add_argument("--tokens", type=int, default=16, help="max new text tokens of every request")
    p.add_argument("--speech-seconds", type=float, default=10.0, help="the speech limit of every request")
    p.add_argument("--seed", type=int, default=0, help="every request's seed (-1: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--repeat", type=int, default=3, help="runs per count; the lowest CPU time is kept")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.requests.split(",") if x]
    if not counts or min(counts) < 1:
        raise SystemExit("--requests: positive counts, e.g. 1,8")
    torch.set_num_threads(args.threads)
    engine, inputs, options = build(args.model, args.question, args.tokens, args.speech_seconds,
                                    None if args.seed < 0 else args.seed, max(counts))  # fmt: skip
    run(engine, inputs, options, 1)  # warm-up
    rows = [min((run(engine, inputs, options, n) for _ in range(max(1, args.repeat))), key=lambda r: r["cpu_s"])
            for n in counts]  # fmt: skip
    for r in rows:
        r["cpu_vs_first"] = r["cpu_s"] / rows[0]["cpu_s"]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
            "threads": args.threads, "torch": torch.__version__, "model": args.model or "thinktalk-tiny (embedded)",
            "question": args.question, "tokens": args.tokens, "speech_seconds": args.speech_seconds, "seed": args.seed}  # fmt: skip
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return 0
    print(f"# engine alone — {meta['date']}, {meta['machine']}, torch {meta['torch']}, {args.threads} thread(s), "
          f"{meta['model']}; each request: {args.question!r}, at most {args.tokens} tokens + {args.speech_seconds:g} s of "
          f"speech, seed {args.seed}; process CPU time, best of {args.repeat}")  # fmt: skip
    names = list(NAMES.values())
    print("| requests | CPU | vs first | steps | speech s | " + " | ".join(names) + " | errors |")
    print("|---:|---:|---:|---:|---:|" + "---:|" * len(names) + "---:|")
    for r in rows:
        phases = " | ".join(f"{r['phases'][n]:.3f} s" for n in names)
        print(f"| {r['requests']} | {r['cpu_s']:.3f} s | {r['cpu_vs_first']:.2f}x | {r['steps']} | {r['speech_s']:.2f} | "
              f"{phases} | {r['errors']} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
