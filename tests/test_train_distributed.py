"""FSDP2 on CPU: ``torchrun --nproc-per-node 2 -m thinktalk train`` (gloo) tracks the one-process run of the
same global batch, its sharded checkpoint resumes, and its final checkpoint is consolidated."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from tests.train_helpers import chat_rows, run, tensors, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(config: str, *overrides: str, timeout: int = 400) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "thinktalk", "train", config, *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        out, err = proc.communicate()
        raise AssertionError(f"torchrun timed out after {timeout} s: {err[-3000:]}") from None
    if proc.returncode:
        print("STDERR>>>", err[-12000:])
    assert proc.returncode == 0, (out[-2000:], err[-4000:])


def losses(out) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line)["loss"] for line in fh]


@pytest.fixture(scope="module")
def setup(tiny25, tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    data = write_jsonl(str(d / "chat.jsonl"), chat_rows(8))
    config = d / "sft.yaml"
    config.write_text(f"recipe: sft\nmodel: {tiny25}\ndata: {data}\nmax_steps: 4\nlr: 1.0e-2\nprogress: false\n"
                      "tensorboard: false\nlength_bucketing: true\ntrainable: [llm_layers]\n")
    return d, str(config), data


def test_two_processes_track_one_and_resume(tiny25, setup):
    d, config, data = setup
    single = run(tiny25, data, d / "one", max_steps=4, batch_size=4, length_bucketing=True,
                 trainable=["llm_layers"])
    # same global batch of 4; activation checkpointing on (it must not change the numbers)
    torchrun(config, f"output_dir={d / 'two'}", "batch_size=2", "save_every=2", "gradient_checkpointing=true")
    two = losses(d / "two")
    print("1 process", single.losses, "\n2 processes", two)
    assert two == pytest.approx(single.losses, rel=1e-4)
    # the final checkpoint is consolidated into the official layout and equals the one-process result
    a, b = tensors(d / "one"), tensors(d / "two")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4)
    # the sharded checkpoint of step 2 resumes in a new run and continues the same losses
    resumed = d / "resumed"
    resumed.mkdir()
    shutil.copytree(d / "two" / "checkpoint-2", resumed / "checkpoint-2")
    assert sorted(os.listdir(resumed / "checkpoint-2")).count("rng-1.pt") == 1  # one RNG state per process
    torchrun(config, f"output_dir={resumed}", "batch_size=2", "save_every=2", "save_final=false", "gradient_checkpointing=true")
    assert losses(resumed) == pytest.approx(two[2:], rel=1e-6)  # steps 3 and 4
