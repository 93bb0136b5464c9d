"""Tensor + expert parallelism: a 2-process gloo run gives the single-process logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import thinker_cases, tiny3_weights  # noqa: F401
from tests.qwen25_inputs import cases
from thinktalk.checkpoint import Checkpoint
from thinktalk.config import read_config
from thinktalk.loading import build
from thinktalk.nn.moe import SparseMoE
from thinktalk.nn.quant import QuantConfig
from thinktalk.parallel import (
    ExpertParallelExperts,
    ParallelError,
    RowParallelQuantLinear,
    ShardedSource,
    TPGroup,
    check_shards,
    launch,
    shard_model,
)
from thinktalk.testing.quantize import quantize_checkpoint

CASES25 = ("text", "image", "batch_left_padding")
CASES3 = ("text", "audio", "batch_left_padding")
NEW_TOKENS = 8


def _inputs(family: str):
    table, names = (cases(), CASES25) if family == "qwen2_5_omni" else (thinker_cases(), CASES3)
    return {n: table[n] for n in names}


def _run(model, family: str) -> dict:
    out = {}
    with torch.no_grad():
        for name, (inputs, use_aiv) in _inputs(family).items():
            out[name] = model.thinker(**inputs, use_audio_in_video=use_aiv).logits
        inputs, _ = _inputs(family)["text"]
        out["greedy"] = model.generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_id=()).text_ids
    return out


def _moe_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    moe = SparseMoE(32, 16, num_experts=8, top_k=2, normalize=True)
    for p in moe.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    return moe, torch.randn(37, 32, generator=g)


def _rank_main(rank: int, dirs: dict, out_path: str) -> None:
    torch.set_num_threads(1)
    result = {}
    for label, (family, directory) in dirs.items():
        model = thinktalk.load(directory, components=("thinker",), tensor_parallel_size=2)
        attn = model.thinker.model.layers[0].self_attn
        result[label] = _run(model, family)
        result[label]["q_rows"] = attn.q_proj.weight.shape[0]
        result[label]["kv_heads"] = model.thinker.model.spec.num_key_value_heads
        result[label]["packed_row_shards"] = sum(isinstance(m, RowParallelQuantLinear) for m in model.modules())
    # Expert parallel routing: rank r holds experts [4r, 4r + 4) of a random MoE layer.
    moe, x = _moe_case()
    full = moe(x)
    ep = ExpertParallelExperts(8, 4 * rank, 4, 32, 16, "silu", TPGroup(rank, 2))
    ep.gate_up_proj.data = moe.experts.gate_up_proj.data[4 * rank : 4 * rank + 4].clone()
    ep.down_proj.data = moe.experts.down_proj.data[4 * rank : 4 * rank + 4].clone()
    moe.experts = ep
    result["moe"] = (full, moe(x))
    if rank == 0:
        torch.save(result, out_path)


@pytest.fixture(scope="module")
def parallel_run(tiny25_weights, tiny3_weights, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("tp") / "rank0.pt")
    q25, q3 = str(tmp_path_factory.mktemp("tp_gptq25")), str(tmp_path_factory.mktemp("tp_awq3"))
    quantize_checkpoint(str(tiny25_weights), q25, method="gptq", group_size=16)
    quantize_checkpoint(tiny3_weights, q3, method="awq", group_size=16)
    dirs = {"qwen2_5_omni": ("qwen2_5_omni", str(tiny25_weights)), "qwen3_omni_moe": ("qwen3_omni_moe", tiny3_weights),
            "qwen2_5_omni gptq": ("qwen2_5_omni", q25), "qwen3_omni_moe awq": ("qwen3_omni_moe", q3)}  # fmt: skip
    launch(_rank_main, 2, dirs, out, backend="gloo", timeout_s=120)
    return dirs, torch.load(out)


@pytest.mark.parametrize("label", ["qwen2_5_omni", "qwen3_omni_moe", "qwen2_5_omni gptq", "qwen3_omni_moe awq"])
def test_two_ranks_match_one_process(label, parallel_run):
    dirs, result = parallel_run
    family, directory = dirs[label]
    single = thinktalk.load(directory, components=("thinker",))
    want = _run(single, family)
    got = result[label]
    # Each rank held half the heads and its KV cache half the key/value heads.
    spec = single.thinker.model.spec
    assert got["q_rows"] == spec.num_attention_heads * spec.head_dim // 2
    assert got["kv_heads"] == spec.num_key_value_heads // 2
    # 4-bit checkpoints stay packed on every rank: o_proj (and the dense down_proj) row shards are packed.
    assert (got["packed_row_shards"] > 0) == (" " in label)
    for name, (inputs, _) in _inputs(family).items():
        valid = inputs["attention_mask"].bool()
        diff = (want[name] - got[name])[valid].abs().max().item()
        print(f"{label} {name}: max abs logit diff (2 ranks vs 1) {diff:.3e}")
        assert diff <= 1e-5 * max(1.0, want[name][valid].abs().max().item())
    assert torch.equal(want["greedy"], got["greedy"])


def test_expert_parallel_routing_matches(parallel_run):
    _, result = parallel_run
    full, ep = result["moe"]
    assert torch.allclose(full, ep, atol=1e-6, rtol=1e-5)
    # and the single-process layer built the same way agrees (the workers saw the same weights)
    moe, x = _moe_case()
    assert torch.equal(moe(x), full)


def test_sharded_source_reads_only_this_ranks_slices(tiny3_weights):  # noqa: F811
    data = read_config(tiny3_weights)
    ckpt = Checkpoint.open(tiny3_weights)
    for rank in (0, 1):
        model = build(data, ("thinker",))
        plan = shard_model(model, TPGroup(rank, 2))
        src = ShardedSource(ckpt, plan, model.weight_map)
        q = "thinker.model.layers.0.self_attn.q_proj.weight"
        o = "thinker.model.layers.0.self_attn.o_proj.weight"
        half = ckpt.shape(q)[0] // 2
        assert torch.equal(src.tensor(q), ckpt.tensor(q)[rank * half : (rank + 1) * half])
        assert torch.equal(src.tensor(o), ckpt.tensor(o)[:, rank * half : (rank + 1) * half])
        assert src.nbytes(q) == ckpt.nbytes(q) // 2
        # Experts 4r..4r+3 of 8, renumbered 0..3; the other rank's are not listed at all.
        names = src.names()
        e = "thinker.model.layers.0.mlp.experts.{}.down_proj.weight"
        assert e.format(4) not in names and e.format(3) in names
        assert torch.equal(src.tensor(e.format(0)), ckpt.tensor(e.format(4 * rank)))


def _driver_main(directory: str, family: str, out_path: str) -> None:
    """One process that loads with tensor_parallel_size=2 itself (it starts rank 1), then one without."""
    torch.set_num_threads(1)
    sharded = thinktalk.load(directory, components=("thinker",), tensor_parallel_size=2)
    # A call that fails on rank 0 (a KV cache overflow, before any all-reduce) fails on the workers too,
    # and they stay in step for the next one.
    decoder = sharded.thinker.model
    try:
        decoder(torch.zeros(1, 6, decoder.spec.hidden_size), None, cache=decoder.new_cache(1, 4))
    except RuntimeError as e:
        assert "overflow" in str(e)
    else:
        raise AssertionError("the overflow was not raised")
    got = _run(sharded, family)
    sharded.tensor_parallel_driver.close()
    torch.save(got, out_path)


def test_load_starts_its_own_workers(tiny3_weights, tmp_path):  # noqa: F811
    """The driver path (what ``serve --tensor-parallel-size`` uses): rank 0 mirrors the decoder's calls."""
    import os
    import subprocess
    import sys

    out = str(tmp_path / "driver.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"from tests.test_parallel import _driver_main; _driver_main({tiny3_weights!r}, 'qwen3_omni_moe', {out!r})"
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=180, env=env, cwd=root)
    got = torch.load(out)
    want = _run(thinktalk.load(tiny3_weights, components=("thinker",)), "qwen3_omni_moe")
    for name, (inputs, _) in _inputs("qwen3_omni_moe").items():
        valid = inputs["attention_mask"].bool()
        assert (want[name] - got[name])[valid].abs().max().item() <= 1e-5 * max(
            1.0, want[name][valid].abs().max().item()
        )
    assert torch.equal(want["greedy"], got["greedy"])


def test_bad_parallel_requests(tiny25_weights):
    with pytest.raises(ParallelError, match=">= 1"):
        thinktalk.load(str(tiny25_weights), components=("thinker",), tensor_parallel_size=0)
    # The shapes are checked before any worker is started.
    with pytest.raises(ParallelError, match="num_attention_heads=4 is not divisible by tensor_parallel_size=3"):
        thinktalk.load(str(tiny25_weights), components=("thinker",), tensor_parallel_size=3)
    model = build(read_config(str(tiny25_weights)), ("thinker",))
    with pytest.raises(ParallelError, match="num_attention_heads=4 is not divisible by tensor_parallel_size=3"):
        shard_model(model, TPGroup(0, 3))
    # An act-order GPTQ row shard whose inputs use another rank's groups is refused after loading.
    shard = RowParallelQuantLinear(32, 16, False, QuantConfig("gptq", group_size=16), TPGroup(1, 2), group_offset=2)
    shard.scales = torch.ones(2, 16)
    shard.g_idx = torch.tensor([0, 3] * 16, dtype=torch.int32)  # groups 0 and 1 belong to rank 0
    with pytest.raises(ParallelError, match="act-order"):
        check_shards(torch.nn.Sequential(shard))
