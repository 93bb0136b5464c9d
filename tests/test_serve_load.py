"""Load on loopback: N concurrent streaming clients with speech all complete; nothing leaks afterwards."""

from __future__ import annotations

import base64
import os
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
pytest.register_assert_rewrite("tests.serve_helpers")

from tests.serve_helpers import ARTIFACTS, metrics, wait_idle  # noqa: E402

pytest_plugins = ["tests.serve_helpers"]

CLIENT_COUNTS = (1, 4, 8)
SPEECH_SECONDS = 1.0


def one_client(url: str, model: str, i: int, out: dict) -> None:
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    start = time.perf_counter()
    first_audio, pcm = None, 0
    try:
        stream = c.chat.completions.create(model=model, stream=True, max_tokens=8, modalities=["text", "audio"],
                                           audio={"voice": "Chelsie", "format": "pcm16"},
                                           messages=[{"role": "user", "content": f"Client {i} says hello."}])  # fmt: skip
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.audio is not None and choice.delta.audio.data:
                    first_audio = first_audio or time.perf_counter() - start
                    pcm += len(base64.b64decode(choice.delta.audio.data))
        ok = pcm == int(SPEECH_SECONDS * 24000) * 2
        out[i] = (first_audio, time.perf_counter() - start, None if ok else f"{pcm} bytes of audio")
    except Exception as e:  # noqa: BLE001 - recorded as the client's error
        out[i] = (first_audio, time.perf_counter() - start, f"{type(e).__name__}: {e}")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def test_concurrent_streaming_clients(server, capsys):
    rows = []
    before = metrics(server.url).get('thinktalk_sessions_total{kind="chat",outcome="completed"}', 0)
    for n in CLIENT_COUNTS:
        out: dict[int, tuple] = {}
        threads = [threading.Thread(target=one_client, args=(server.url, server.model_name, i, out)) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        wall = time.perf_counter() - t0
        assert len(out) == n, "a client hung"
        errors = [e for _, _, e in out.values() if e]
        firsts = [f for f, _, e in out.values() if f is not None and not e]
        totals = [t for _, t, e in out.values() if not e]
        rows.append((n, percentile(firsts, 50), percentile(firsts, 95), percentile(totals, 50), wall, len(errors)))
        assert not errors, errors
    m = wait_idle(server.url)
    assert m["thinktalk_running_sessions"] == 0
    after = m['thinktalk_sessions_total{kind="chat",outcome="completed"}']
    assert after - before == sum(CLIENT_COUNTS)

    table = [
        f"Concurrent streaming clients on loopback (tiny random Qwen2.5-Omni, CPU, {os.cpu_count()} cores; each: "
        f"8 text tokens + {SPEECH_SECONDS:g} s of speech, pcm16 over SSE; "
        f"{type(server.app.state.ctx.backend).__name__})",
        "",
        "| clients | first audio p50 | first audio p95 | total p50 | wall | errors |",
        "|---:|---:|---:|---:|---:|---:|",
        *[f"| {n} | {p50:.2f} s | {p95:.2f} s | {tot:.2f} s | {wall:.2f} s | {err} |" for n, p50, p95, tot, wall, err in rows],
    ]
    text = "\n".join(table)
    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(ARTIFACTS, "serve_load.md"), "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    with capsys.disabled():
        print("\n" + text)


def test_engine_load_benchmark_measures_equal_work_per_request(capsys):
    """bench/engine_load.py (the serve benchmark's request straight through the engine): every request of a count
    does the same work as one alone (seeded: the same answer and speech), the phases account for the CPU time."""
    import json

    from bench.engine_load import main

    assert main(["--requests", "1,3", "--repeat", "1", "--tokens", "6", "--speech-seconds", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    one, three = rows
    assert one["errors"] == three["errors"] == 0 and one["speech_s"] > 0.3
    assert three["speech_s"] == pytest.approx(3 * one["speech_s"], rel=1e-6)  # equal work: 3x the speech
    assert three["steps"] == one["steps"]  # in step together, not one after another
    for r in rows:
        assert 0.5 * r["cpu_s"] < sum(r["phases"].values()) <= r["cpu_s"] * 1.01
