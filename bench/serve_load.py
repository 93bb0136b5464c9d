"""Load benchmark of ``thinktalk serve``: 1..N concurrent streaming clients with speech.

Starts a real ``thinktalk serve`` (the embedded default model, thinktalk-tiny, unless ``--model``) on loopback in
a child process, then for every client count runs that many clients at once, each the same streaming chat
completion (``--question``) with text + speech (pcm16 over SSE), and reports per count: first-audio p50/p95, per-stream real-time factor
(a stream's time from request to its last audio ÷ its audio's duration; p50/p95), throughput (seconds of
speech produced per wall second, all streams), the wall time and its ratio to one client's wall, the server's CPU
time, and the clients' own CPU time (they run in this process, on the same machine: on a 2-core box they take
CPU the server would otherwise have; ``bench/engine_load.py`` measures the engine alone).

    python bench/serve_load.py                          # 1, 2, 4, 8 clients, the embedded tiny model
    python bench/serve_load.py --clients 1,8,16 --json  # machine-readable
    python bench/serve_load.py --plot docs/img          # also PNGs: first audio / throughput vs clients
    python bench/serve_load.py --scheduler single       # the one-session-at-a-time backend, for comparison

Every client count runs ``--repeat`` times (default 1) and keeps the lowest wall (the machine may be shared).
Bounded: every request has a timeout; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import sys
import threading
import time

import httpx

QUESTION = "What is three plus four?"  # thinktalk-tiny answers it (6 tokens, ~1.5 s of speech); any model can
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


class Server:
    """``thinktalk serve`` in a child process (:class:`thinktalk.serve.server.ServeProcess`), with its CPU time."""

    def __init__(self, model: str | None, speech_seconds: float, scheduler: str, extra: list[str], log_path: str,
                 threads: int = 0):  # fmt: skip
        from thinktalk.serve.server import ServeProcess

        args = [*([model] if model else []), "--max-speech-seconds", str(speech_seconds), "--max-sessions", "128",
                "--scheduler", scheduler, "--system-prompt", "", *extra]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        self.log = open(log_path, "w")
        try:
            self.server = ServeProcess(args, log=self.log, env=env, timeout_s=300)
        except RuntimeError as e:
            raise SystemExit(str(e)) from None
        self.proc, self.url = self.server.proc, self.server.url

    def cpu_s(self) -> float | None:
        """The server's CPU time so far (user + system, all threads), or None off Linux."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        self.server.stop()
        self.log.close()


def one_client(url: str, i: int, tokens: int, out: dict, start_gate: threading.Barrier, question: str,
               voice: str | None, seed: int | None = None) -> None:  # fmt: skip
    audio = {"format": "pcm16", **({"voice": voice} if voice else {})}  # no voice: the server's default
    body = {"model": "", "stream": True, "max_tokens": tokens, "modalities": ["text", "audio"], "audio": audio,
            "messages": [{"role": "user", "content": question.format(i=i)}], **({"seed": seed} if seed is not None else {})}  # fmt: skip
    first = last = None
    pcm = 0
    error = None
    start_gate.wait()
    start = time.perf_counter()
    try:
        with httpx.Client(timeout=600) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:]).get("choices", []):
                    audio = (choice.get("delta") or {}).get("audio") or {}
                    if audio.get("data"):
                        now = time.perf_counter() - start
                        first = first if first is not None else now
                        last = now
                        pcm += len(base64.b64decode(audio["data"]))
    except Exception as e:  # noqa: BLE001 - recorded as the client's error
        error = f"{type(e).__name__}: {e}"
    total = time.perf_counter() - start
    out[i] = {"first_audio_s": first, "last_audio_s": last, "total_s": total, "audio_s": pcm / 2 / 24000, "error": error}


def default_label() -> str:
    from thinktalk.default_model import shipped_model_dir

    return "embedded thinktalk-tiny" if shipped_model_dir() else "embedded tiny random Qwen2.5-Omni"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def run_count(url: str, n: int, tokens: int, question: str = QUESTION, voice: str | None = None,
              seed: int | None = None) -> dict:  # fmt: skip
    out: dict[int, dict] = {}
    gate = threading.Barrier(n + 1)
    threads = [threading.Thread(target=one_client, args=(url, i, tokens, out, gate, question, voice, seed), daemon=True)
               for i in range(n)]  # fmt: skip
    for t in threads:
        t.start()
    gate.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.join(900)
    wall, clients_cpu = time.perf_counter() - t0, time.process_time() - c0
    clients = [out.get(i, {"error": "hung", "audio_s": 0.0}) for i in range(n)]
    ok = [c for c in clients if not c["error"] and c["audio_s"] > 0]
    firsts = [c["first_audio_s"] for c in ok]
    rtfs = [c["last_audio_s"] / c["audio_s"] for c in ok]
    audio = sum(c["audio_s"] for c in ok)
    return {
        "clients": n,
        "first_audio_p50_s": percentile(firsts, 50),
        "first_audio_p95_s": percentile(firsts, 95),
        "rtf_p50": percentile(rtfs, 50),
        "rtf_p95": percentile(rtfs, 95),
        "audio_s_per_stream": audio / max(1, len(ok)),
        "throughput_audio_s_per_s": audio / wall,
        "wall_s": wall,
        "clients_cpu_s": clients_cpu,  # this process: the clients share the machine with the server
        "errors": [c["error"] for c in clients if c["error"]] + [f"client {i}: no audio" for i, c in enumerate(clients)
                                                                  if not c["error"] and c["audio_s"] <= 0],  # fmt: skip
    }


def plot(rows: list[dict], directory: str, label: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    n = [r["clients"] for r in rows]
    paths = []
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(n, [r["first_audio_p50_s"] for r in rows], "o-", label="p50")
    ax.plot(n, [r["first_audio_p95_s"] for r in rows], "s--", label="p95")
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("first audio (s)")
    ax.set_title(f"thinktalk serve: first audio ({label})", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(directory, "serve_first_audio.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(n, [r["throughput_audio_s_per_s"] for r in rows], "o-", label="speech s / wall s")
    ax.plot(n, [r["wall_s"] / rows[0]["wall_s"] for r in rows], "s--", label=f"wall / wall at {n[0]} client(s)")
    ax.set_xlabel("concurrent streaming clients")
    ax.set_title(f"thinktalk serve: throughput ({label})", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(directory, "serve_throughput.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the embedded default model, thinktalk-tiny)")
    p.add_argument("--question", default=QUESTION, help="every client's message ({i}: the client's number)")
    p.add_argument("--voice", default=None, help="audio.voice (default: the server's default voice)")
    p.add_argument("--seed", type=int, default=0,
                   help="every request's seed: every client gets the same answer and speech as one alone, so the counts "
                        "compare equal work (-1: none, each stream samples its own length)")  # fmt: skip
    p.add_argument("--clients", default="1,2,4,8", help="comma-separated client counts")
    p.add_argument("--tokens", type=int, default=8, help="max_tokens of every request")
    p.add_argument("--speech-seconds", type=float, default=2.0, help="the server's --max-speech-seconds")
    p.add_argument("--scheduler", default="batch", choices=["batch", "single"])
    p.add_argument("--threads", type=int, default=0,
                   help="the server's torch threads (0: its default). On a shared machine 1 avoids threads waiting "
                        "on each other; it is what docs/benchmarks.md uses")  # fmt: skip
    p.add_argument("--repeat", type=int, default=1, help="runs per count; the lowest wall is kept")
    p.add_argument("--warmup", type=int, default=1, help="single-client requests before measuring")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", metavar="DIR", help="write serve_first_audio.png and serve_throughput.png here")
    p.add_argument("--log", default="serve_load.log", help="the server's log file")
    p.add_argument("serve_args", nargs="*", help="more `thinktalk serve` arguments (after --)")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.clients.split(",") if x]
    args.seed = None if args.seed < 0 else args.seed
    if not counts or min(counts) < 1:
        raise SystemExit("--clients: positive counts, e.g. 1,2,4,8")
    server = Server(args.model, args.speech_seconds, args.scheduler, args.serve_args, args.log, args.threads)
    try:
        for _ in range(args.warmup):
            run_count(server.url, 1, args.tokens, args.question, args.voice, args.seed)
        rows = []
        for n in counts:
            runs = []
            for _ in range(max(1, args.repeat)):
                c0 = server.cpu_s()
                r = run_count(server.url, n, args.tokens, args.question, args.voice, args.seed)
                c1 = server.cpu_s()
                r["server_cpu_s"] = None if c0 is None or c1 is None else c1 - c0
                runs.append(r)
            rows.append(min(runs, key=lambda r: r["wall_s"]))
    finally:
        server.stop()
    base = rows[0]["wall_s"]
    for r in rows:
        r["wall_vs_first"] = r["wall_s"] / base
        if r["server_cpu_s"] is not None and rows[0]["server_cpu_s"]:
            r["cpu_vs_first"] = r["server_cpu_s"] / rows[0]["server_cpu_s"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_1min_after": load, "model": args.model or default_label(),
            "scheduler": args.scheduler, "threads": args.threads or "default", "tokens": args.tokens, "speech_seconds": args.speech_seconds,
            "seed": args.seed, "serve_args": args.serve_args}  # fmt: skip
    if args.plot:
        meta["plots"] = plot(rows, args.plot, f"{meta['model']}, {meta['cpus']} CPUs, {args.scheduler}")
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    else:
        print(f"# thinktalk serve load — {meta['date']}, {meta['machine']}, {meta['cpus']} CPUs, load {load:.1f}, "
              f"{meta['model']}, scheduler {args.scheduler}, threads {meta['threads']}, seed {args.seed}"
              f"{' ' + ' '.join(args.serve_args) if args.serve_args else ''}; each client: {args.question!r}, "
              f"at most {args.tokens} tokens + {args.speech_seconds:g} s of speech")  # fmt: skip
        print("| clients | first audio p50 | p95 | RTF p50 | RTF p95 | speech s / wall s | wall | wall vs 1st "
              "| server CPU | CPU vs 1st | clients' CPU | errors |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            cpu = "—" if r["server_cpu_s"] is None else f"{r['server_cpu_s']:.2f} s"
            cpu_ratio = f"{r['cpu_vs_first']:.2f}x" if "cpu_vs_first" in r else "—"
            print(f"| {r['clients']} | {r['first_audio_p50_s']:.2f} s | {r['first_audio_p95_s']:.2f} s | {r['rtf_p50']:.2f} "
                  f"| {r['rtf_p95']:.2f} | {r['throughput_audio_s_per_s']:.2f} | {r['wall_s']:.2f} s "
                  f"| {r['wall_vs_first']:.2f}x | {cpu} | {cpu_ratio} | {r['clients_cpu_s']:.2f} s | {len(r['errors'])} |")  # fmt: skip
        for r in rows:
            for e in r["errors"][:3]:
                print(f"  {r['clients']} clients: {e}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
