"""Hands-free ``/v1/realtime`` with server VAD, measured with the ``openai`` SDK's realtime client.

A tiny random checkpoint (the serve tests' one, so its answers decode to speech) behind a real server on
loopback; espeak-ng questions are streamed at real-time pace (100 ms chunks) with no commit, and the
server's Silero VAD ends each turn. Reported, from the client's receipt of ``speech_stopped``: the
``response.created``, first transcript delta and first audio delta of the answer. ``--barge-in``: a second
utterance over each answer, from its ``speech_started`` to the answer's ``response.done`` (cancelled).
``--clients K``: K sessions at once; errors, latencies and the server's session count afterwards.

    PYTHONPATH=$PWD python bench/realtime_latency.py --turns 5 [--no-read-ahead]
    PYTHONPATH=$PWD python bench/realtime_latency.py --turns 3 --barge-in
    PYTHONPATH=$PWD python bench/realtime_latency.py --clients 16 --turns 2
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tests.serve_helpers

QUESTIONS = ["What time is it?", "Tell me a story.", "How are you today?", "Where is the station?"]
LONG = [
    "What time is it now in the city of Paris, and will it rain there tomorrow afternoon?",
    "Tell me a short story about a cat who lives in a lighthouse by the sea.",
]
SECOND = b"\0\0" * 24000


def stream(conn, pcm: bytes) -> threading.Thread:
    def mic():
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(pcm), 4800)):
            conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 4800]).decode())
            time.sleep(max(0.0, t0 + (k + 1) * 0.1 - time.monotonic()))

    th = threading.Thread(target=mic, daemon=True)
    th.start()
    return th


def session(conn, turns: int, pcms: list[bytes], barge_in: bool, out: dict) -> None:
    """One hands-free conversation: ``turns`` measured turns after a warm-up turn."""
    conn.recv()
    td = {"type": "server_vad", "silence_duration_ms": 400, "prefix_padding_ms": 200}
    conn.session.update(session={"type": "realtime", "output_modalities": ["audio"], "max_output_tokens": 8,
                                 "audio": {"input": {"turn_detection": td}}})  # fmt: skip
    while conn.recv().type != "session.updated":
        pass
    for turn in range(turns + 1):
        th = stream(conn, pcms[turn % len(pcms)] + SECOND)
        t, barge, cancelled = {}, None, None
        while True:
            ev = conn.recv()
            now = time.monotonic()
            if ev.type == "error":
                out["errors"].append(ev.error.message)
            key = {"input_audio_buffer.speech_stopped": "stopped", "response.created": "created",
                   "response.output_audio_transcript.delta": "text",
                   "response.output_audio.delta": "audio"}.get(ev.type)  # fmt: skip
            if key and key not in t:
                t[key] = now
                if key == "audio" and barge_in and turn:
                    th.join()
                    th = stream(conn, pcms[(turn + 1) % len(pcms)] + SECOND)  # talk over the answer
            if barge_in and turn and ev.type == "input_audio_buffer.speech_started" and "audio" in t:
                barge, late = now, 0
            elif barge is not None and ev.type == "response.output_audio.delta":
                late += 1
            if ev.type == "response.done":
                if barge is not None:
                    cancelled = (now - barge, late, ev.response.status)
                    while conn.recv().type != "response.done":  # the barging turn's own answer
                        pass
                break
        th.join()
        if turn:
            out["rows"].append({k: (t[k] - t["stopped"]) * 1000 for k in ("created", "text", "audio") if k in t})
            if cancelled is not None:
                out["barge"].append(cancelled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--barge-in", action="store_true")
    ap.add_argument("--no-read-ahead", action="store_true", help="read each turn at its end (the plain path)")
    ap.add_argument("--long", action="store_true", help="5 s questions instead of 1-2 s ones")
    ap.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the tiny test one)")
    args = ap.parse_args()

    import httpx
    import openai
    import torch

    from tests.serve_helpers import TEST_LIMITS, espeak_wav, make_serve_checkpoint, metrics, pcm16_24k
    from thinktalk.serve.app import create_app
    from thinktalk.serve.server import ServerThread, load_for_serving
    from thinktalk.serve.settings import ServeSettings

    tmp = tempfile.mkdtemp()
    path = args.checkpoint or make_serve_checkpoint(tmp + "/ckpt")
    torch.manual_seed(0)
    model, processor = load_for_serving(path)
    limits = {**TEST_LIMITS, "max_speech_seconds": 4.0 if args.barge_in else 1.0,
              "realtime_prefill_while_speaking": not args.no_read_ahead}  # fmt: skip
    app = create_app(model, processor, ServeSettings(**limits), model_name="tiny")
    pcms = [pcm16_24k(espeak_wav(q, f"{tmp}/q{i}.wav")) for i, q in enumerate(LONG if args.long else QUESTIONS)]
    out = {"rows": [], "barge": [], "errors": []}
    with ServerThread(app) as srv:
        ws = srv.url.replace("http", "ws") + "/v1"
        client = openai.OpenAI(api_key="x", base_url=srv.url + "/v1", websocket_base_url=ws)

        def one():
            try:
                with client.realtime.connect(model="tiny") as conn:
                    session(conn, args.turns, pcms, args.barge_in, out)
            except Exception as e:  # counted, not raised: the run reports every failure
                out["errors"].append(repr(e))

        threads = [threading.Thread(target=one) for _ in range(args.clients)]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.monotonic() - t0
        deadline = time.monotonic() + 20
        while (m := metrics(srv.url))["thinktalk_active_sessions"] and time.monotonic() < deadline:
            time.sleep(0.1)
        active = m["thinktalk_active_sessions"]
        health = httpx.get(srv.url + "/health").text
    rows = out["rows"]
    if args.clients == 1:
        print("| turn | response.created | first transcript delta | first audio |")
        print("|---|---|---|---|")
        for i, r in enumerate(rows, 1):
            print(f"| {i} | {r.get('created', float('nan')):.0f} ms | {r.get('text', float('nan')):.0f} ms "
                  f"| {r['audio']:.0f} ms |")  # fmt: skip
    audio = sorted(r["audio"] for r in rows if "audio" in r)
    if audio:
        p95 = audio[min(len(audio) - 1, int(0.95 * len(audio)))]
        print(f"\nfirst audio after speech_stopped ({len(audio)} turns, {args.clients} clients): "
              f"median {statistics.median(audio):.0f} ms, p95 {p95:.0f} ms, max {audio[-1]:.0f} ms")  # fmt: skip
    for dt, late, status in out["barge"]:
        print(f"barge-in: speech_started -> response.done {dt * 1000:.0f} ms ({status}), "
              f"{late} audio deltas after speech_started")  # fmt: skip
    print(f"errors: {len(out['errors'])} {out['errors'][:3]}; wall {wall:.1f} s; active sessions after: {active:.0f}; "
          f"health: {health}")  # fmt: skip


if __name__ == "__main__":
    main()
