"""``thinktalk serve --tensor-parallel-size 2`` (CPU processes over gloo) answers as one process does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.serve_helpers import TEST_LIMITS, make_serve_checkpoint, metrics
from thinktalk.serve.server import free_port

pytest.importorskip("fastapi")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Hello there", "Tell me about the sea", "1 2 3"]


def _ask(url: str, text: str, history: list | None = None) -> str:
    body = {"messages": [*(history or []), {"role": "user", "content": text}], "max_tokens": 12, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _start(directory: str, tp: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "thinktalk", "serve", directory, "--port", str(port), "--tensor-parallel-size", str(tp),
           "--max-tokens", "64", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not start in 90 s")


def _child_pids(pid: int) -> list[int]:
    """The tensor-parallel worker processes of server ``pid`` (its spawned Python children)."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "multiprocessing" in line and "spawn" in line]


def test_serve_tensor_parallel_answers_like_one_process(tmp_path):
    directory = make_serve_checkpoint(str(tmp_path / "tiny"))
    assert TEST_LIMITS["max_tokens"] == 64
    answers = {}
    for tp in (1, 2):
        proc, url = _start(directory, tp)
        try:
            answers[tp] = [_ask(url, p) for p in PROMPTS]
            # A second turn of the first conversation: the engine reuses its parked KV rows (prefix reuse),
            # which the workers hold too.
            history = [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": answers[tp][0]}]
            answers[tp].append(_ask(url, "And then?", history))
            assert metrics(url)["thinktalk_tensor_parallel_size"] == tp
            if tp == 2:  # a worker that dies makes the server unhealthy (503), not silently stuck
                worker = _child_pids(proc.pid)
                assert len(worker) == 1, worker
                os.kill(worker[0], signal.SIGKILL)
                deadline = time.monotonic() + 10
                while httpx.get(url + "/health", timeout=5).status_code != 503:
                    assert time.monotonic() < deadline, "the server stayed healthy without its worker"
                    time.sleep(0.2)
                assert httpx.get(url + "/health", timeout=5).json()["dead_ranks"] == [1]
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert all(answers[1]), answers  # the tiny model's answers decode to text
    assert answers[2] == answers[1]
