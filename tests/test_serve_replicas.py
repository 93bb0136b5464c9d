"""``thinktalk serve --replicas 2``: two CPU replicas on Ray Serve behind one endpoint (loopback).

Concurrent HTTP clients are answered by both replicas (each answer names its replica), the same prompt
gets the same greedy answer whichever replica takes it, realtime sessions keep their conversation (one
WebSocket = one replica), and ``/metrics`` reports the replicas.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.serve_helpers import make_serve_checkpoint, metrics
from thinktalk.serve.replicas import REPLICA_HEADER
from thinktalk.serve.server import free_port

pytest.importorskip("ray.serve")
websockets = pytest.importorskip("websockets")
from websockets.sync.client import connect  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    directory = make_serve_checkpoint(str(tmp_path_factory.mktemp("replica_tiny")))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    cmd = [sys.executable, "-m", "thinktalk", "serve", directory, "--replicas", "2", "--port", str(port),
           "--max-tokens", "64", "--log-level", "warning"]  # fmt: skip
    # Its own session: Ray's daemons are its children, and the last resort below ends the whole group.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the replicas did not start in 120 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # serve.shutdown() + ray.shutdown()
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _chat(url: str, text: str) -> tuple[str, str]:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers[REPLICA_HEADER], r.json()["choices"][0]["message"]["content"]


def test_concurrent_clients_reach_both_replicas(replicas):
    results: list[tuple[str, str]] = []
    lock = threading.Lock()

    def client():
        for _ in range(2):
            out = _chat(replicas, "Hello there")
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 8
    seen = {replica for replica, _ in results}
    for _ in range(40):  # Ray routes by queue length; light load may favour one replica for a while
        if len(seen) == 2:
            break
        seen.add(httpx.get(replicas + "/v1/models", timeout=10).headers[REPLICA_HEADER])
    assert len(seen) == 2, seen
    answers = {answer for _, answer in results}
    assert len(answers) == 1 and answers != {""}, results  # the same greedy answer from either replica


def test_metrics_report_the_replicas(replicas):
    m = metrics(replicas)
    assert m["thinktalk_replicas"] == 2
    assert any(k.startswith("thinktalk_replica_info{replica=") for k in m)


def _realtime_session(url: str, turns: list[str], out: list) -> None:
    ws = connect(url.replace("http://", "ws://") + "/v1/realtime", subprotocols=["realtime"], open_timeout=20)
    with ws:
        replica = ws.response.headers.get(REPLICA_HEADER)  # the replica the proxy pinned this session to
        assert replica
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        ws.send(json.dumps({"type": "session.update", "session": {"modalities": ["text"], "turn_detection": None}}))
        usages = []
        for text in turns:
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
            ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
            ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 4}}))
            while True:
                event = json.loads(ws.recv(timeout=60))
                assert event["type"] != "error", event
                if event["type"] == "response.done":
                    usages.append(event["response"]["usage"]["input_tokens"])
                    break
        out.append((replica, usages))


def test_realtime_sessions_keep_their_conversation(replicas):
    out: list = []
    threads = [threading.Thread(target=_realtime_session, args=(replicas, ["Hi", "And again", "Once more"], out))
               for _ in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(out) == 2, out
    known: set[str] = set()
    for _ in range(40):  # the replicas that exist, as HTTP answers name them
        known.add(httpx.get(replicas + "/v1/models", timeout=10).headers[REPLICA_HEADER])
        if len(known) == 2:
            break
    for replica, usages in out:
        assert replica in known, (replica, known)
        # Every turn reads the whole conversation so far: the session's state stayed on its replica.
        assert usages[0] < usages[1] < usages[2], usages
