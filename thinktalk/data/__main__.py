"""``python -m thinktalk.data --out DIR [--seed N] [--n-train N] [--n-val N] [--n-test N]``: write the data set."""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from thinktalk.data import tasks
    from thinktalk.data.generate import generate

    ap = argparse.ArgumentParser(prog="python -m thinktalk.data", description="write thinktalk-tiny's data set")
    ap.add_argument("--out", required=True, help="output directory (train/val/test.jsonl, media/, answers/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=105)
    ap.add_argument("--n-test", type=int, default=210)
    ap.add_argument("--tasks", default=",".join(tasks.TASKS), help=f"comma-separated subset of {','.join(tasks.TASKS)}")
    ap.add_argument("--spoken-share", type=float, default=0.5, help="share of questions spoken instead of typed")
    a = ap.parse_args(argv)
    start = time.perf_counter()
    manifest = generate(a.out, a.seed, a.n_train, a.n_val, a.n_test, tuple(t for t in a.tasks.split(",") if t),
                        a.spoken_share, progress=True)  # fmt: skip
    print(json.dumps(manifest["counts"], indent=1))
    print(f"wrote {a.n_train}+{a.n_val}+{a.n_test} rows and {manifest['answers']} answer renderings to {a.out} "
          f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
