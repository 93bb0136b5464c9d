"""GSPO: rewards (rule-based, a callable, an HTTP endpoint) and a run whose reward rises."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tests.train_helpers import run, write_jsonl
from thinktalk.testing.tiny import build_tiny_checkpoint
from thinktalk.train.data import DataError
from thinktalk.train.rewards import Rewards, RewardSpec, last_number


def length_reward(prompts, completions, rows):
    """A model-based reward stand-in, imported by path: shorter is better."""
    assert len(prompts) == len(completions) == len(rows)
    return [1.0 / (1 + len(c)) for c in completions]


def test_rule_based_rewards():
    rows = [{"answer": "42"}] * 4
    done = ["42", "The answer is 42.", "forty-two", "  42 \n"]
    r = Rewards([RewardSpec("exact"), RewardSpec("contains"), RewardSpec("numeric"),
                 RewardSpec("format", pattern=r"^\s*\d+\s*$")])
    parts = r.components(["q"] * 4, done, rows)
    assert parts["exact"] == [1, 0, 0, 1]
    assert parts["contains"] == [1, 1, 0, 1]
    assert parts["numeric"] == [1, 1, 0, 1]
    assert parts["format"] == [1, 0, 0, 1]
    total, _ = Rewards([RewardSpec("exact", weight=2), RewardSpec("contains", weight=0.5)])(["q"] * 4, done, rows)
    assert total == [2.5, 0.5, 0.0, 2.5]
    assert last_number("1,234.5 then -7") == -7 and last_number("no digits") is None
    with pytest.raises(ValueError, match="unknown type 'fuzzy'"):
        Rewards([RewardSpec("fuzzy")])
    with pytest.raises(ValueError, match="needs a 'pattern'"):
        Rewards([RewardSpec("format")])


def test_model_based_reward_hooks():
    r = Rewards([RewardSpec("callable", function="tests.test_train_gspo:length_reward")])
    assert r(["q", "q"], ["a", "abc"], [{}, {}])[0] == [0.5, 0.25]
    with pytest.raises(ValueError, match="cannot import the reward function"):
        Rewards([RewardSpec("callable", function="tests.test_train_gspo:nothing_here")])

    seen = []

    class Judge(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            out = json.dumps({"rewards": [float("yes" in c) for c in body["completions"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/reward"
        total, parts = Rewards([RewardSpec("http", url=url)])(["p1", "p2"], ["yes!", "no"], [{"id": 1}, {"id": 2}])
        assert total == [1.0, 0.0] and parts == {"http": [1.0, 0.0]}
        assert seen[0] == {"prompts": ["p1", "p2"], "completions": ["yes!", "no"], "rows": [{"id": 1}, {"id": 2}]}
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def talkative(tmp_path_factory):
    """The demo-friendly tiny model (its samples are real byte-level text, so text rewards can see them)."""
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("demo25")), "qwen2_5_omni", with_speech=False)


def test_gspo_reward_rises(talkative, tmp_path):
    rows = [{"messages": [{"role": "user", "content": q}], "answer": "e"}
            for q in ("Say a word.", "Write something.", "Say hello.", "Name a colour.")]
    data = write_jsonl(str(tmp_path / "prompts.jsonl"), rows)
    res = run(talkative, data, tmp_path / "gspo", recipe="gspo", max_steps=6, lr=3e-2, batch_size=2, group_size=8,
              max_new_tokens=1, top_k=20, updates_per_rollout=2, rewards=[{"type": "contains"}], save_final=False)
    reward = [r["reward"] for r in res.records]
    print("gspo reward", reward)
    assert sum(reward[-2:]) / 2 > sum(reward[:2]) / 2 + 0.3
    # every other step reuses its rollout: the sequence ratio leaves 1 there and the clipping acts
    assert all(r["ratio"] == pytest.approx(1.0, abs=1e-6) for r in res.records[0::2])
    assert any(abs(r["ratio"] - 1) > 1e-3 and r["clip_frac"] > 0 for r in res.records[1::2])
    assert reward[0] == reward[1]  # same samples, same rewards


def test_gspo_rows_need_the_reward_field(talkative, tmp_path):
    data = write_jsonl(str(tmp_path / "prompts.jsonl"), [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(DataError, match=r"prompts.jsonl:1: the rewards compare with the row's 'answer'"):
        run(talkative, data, tmp_path / "x", recipe="gspo", rewards=[{"type": "exact"}], max_steps=1)
