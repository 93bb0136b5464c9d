"""First audio after ``speech_stopped`` on ``/v1/realtime`` with server VAD, measured with the ``openai`` SDK.

A tiny random checkpoint (the serve tests' one, so its answers decode to speech) behind a real server on
loopback; espeak-ng questions are streamed at real-time pace (100 ms chunks) with no commit; the server's
Silero VAD ends each turn. Per turn, from the client's receipt of ``input_audio_buffer.speech_stopped``:
``response.created``, the first transcript delta and the first audio delta.

    PYTHONPATH=$PWD python bench/realtime_latency.py --turns 5
"""

from __future__ import annotations

import argparse
import base64
import statistics
import tempfile
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the tiny test one)")
    ap.add_argument("--silence-ms", type=int, default=400)
    args = ap.parse_args()

    import openai
    import torch

    from tests.serve_helpers import TEST_LIMITS, espeak_wav, make_serve_checkpoint, pcm16_24k
    from thinktalk.serve.app import create_app
    from thinktalk.serve.server import ServerThread, load_for_serving
    from thinktalk.serve.settings import ServeSettings

    tmp = tempfile.mkdtemp()
    path = args.checkpoint or make_serve_checkpoint(tmp + "/ckpt")
    torch.manual_seed(0)
    model, processor = load_for_serving(path)
    app = create_app(model, processor, ServeSettings(**TEST_LIMITS), model_name="tiny")
    questions = ["What time is it?", "Tell me a story.", "How are you today?", "Where is the station?"]
    pcms = [pcm16_24k(espeak_wav(q, f"{tmp}/q{i}.wav")) for i, q in enumerate(questions)]
    rows = []
    with ServerThread(app) as srv:
        client = openai.OpenAI(
            api_key="x", base_url=srv.url + "/v1", websocket_base_url=srv.url.replace("http", "ws") + "/v1"
        )
        with client.realtime.connect(model="tiny") as conn:
            conn.recv()
            td = {"type": "server_vad", "silence_duration_ms": args.silence_ms, "prefix_padding_ms": 200}
            conn.session.update(session={"type": "realtime", "output_modalities": ["audio"], "max_output_tokens": 8,
                                         "audio": {"input": {"turn_detection": td}}})  # fmt: skip
            while conn.recv().type != "session.updated":
                pass
            for turn in range(args.turns + 1):  # the first turn warms up
                pcm = pcms[turn % len(pcms)] + b"\0\0" * 24000

                def mic(pcm=pcm):
                    t0 = time.monotonic()
                    for k, i in enumerate(range(0, len(pcm), 4800)):
                        conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 4800]).decode())
                        time.sleep(max(0.0, t0 + (k + 1) * 0.1 - time.monotonic()))

                th = threading.Thread(target=mic)
                th.start()
                t = {}
                while True:
                    ev = conn.recv()
                    now = time.monotonic()
                    key = {"input_audio_buffer.speech_stopped": "stopped", "response.created": "created",
                           "response.output_audio_transcript.delta": "text",
                           "response.output_audio.delta": "audio"}.get(ev.type)  # fmt: skip
                    if key and key not in t:
                        t[key] = now
                    if ev.type == "response.done":
                        break
                th.join()
                if turn:
                    rows.append({k: (t[k] - t["stopped"]) * 1000 for k in ("created", "text", "audio") if k in t})
    print("| turn | response.created | first transcript delta | first audio |")
    print("|---|---|---|---|")
    for i, r in enumerate(rows, 1):
        print(
            f"| {i} | {r.get('created', float('nan')):.0f} ms | {r.get('text', float('nan')):.0f} ms | {r['audio']:.0f} ms |"
        )
    audio = [r["audio"] for r in rows]
    print(f"\nfirst audio after speech_stopped: median {statistics.median(audio):.0f} ms, max {max(audio):.0f} ms")


if __name__ == "__main__":
    main()
