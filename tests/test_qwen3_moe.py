"""Qwen3-Omni mixture of experts: routing and expert outputs against the reference; stacked-expert checkpoints."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import tiny3_weights  # noqa: F401
from thinktalk.checkpoint import WEIGHT_MAPS, Checkpoint, save_weights
from thinktalk.nn.moe import Experts, route

transformers = pytest.importorskip("transformers")
M = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")


@pytest.fixture(scope="module")
def ref(tiny3_weights):  # noqa: F811
    return transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny3_weights, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(tiny3_weights):  # noqa: F811
    return thinktalk.load(tiny3_weights, components=("thinker", "talker"))


@pytest.mark.parametrize("experts,top_k,normalize", [(128, 8, True), (128, 6, False), (8, 2, True), (8, 2, False)])
def test_routing_matches_reference(experts, top_k, normalize):
    torch.manual_seed(experts + top_k)
    hidden = 64
    cfg = SimpleNamespace(num_experts_per_tok=top_k, num_experts=experts, norm_topk_prob=normalize, hidden_size=hidden)
    router = M.Qwen3OmniMoeThinkerTextTopKRouter(cfg)
    with torch.no_grad():
        router.weight.normal_()
    x = torch.randn(257, hidden)
    ref_logits, ref_weights, ref_idx = router(x)
    logits, weights, idx = route(x, router.weight, top_k, normalize)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(weights, ref_weights, atol=1e-6, rtol=1e-5)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    if normalize:
        assert torch.allclose(weights.sum(-1), torch.ones(257), atol=1e-5)


@pytest.mark.parametrize("where", ["thinker", "talker"])
@pytest.mark.parametrize("tokens", [1, 3, 200])
def test_moe_block_matches_reference(ref, ours, where, tokens):
    if where == "thinker":
        ref_block, block = ref.thinker.model.language_model.layers[0].mlp, ours.thinker.model.layers[0].mlp
    else:
        ref_block, block = ref.talker.model.layers[1].mlp, ours.talker.model.layers[1].mlp
    dim = block.gate.weight.shape[1]
    x = torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        _, ref_w, ref_idx = ref_block.gate(x.view(-1, dim))
        _, w, idx = route(x.view(-1, dim), block.gate.weight, block.top_k, block.normalize)
        assert torch.equal(idx, ref_idx)
        assert torch.allclose(w, ref_w, atol=1e-6)
        expected = ref_block(x)
        for impl in ("grouped", "gather", "padded"):
            block.experts.impl = impl
            out = block(x)
            diff = (out - expected).abs().max().item()
            assert diff <= 1e-5 * max(1.0, expected.abs().max().item()), (impl, diff)
        block.experts.impl = "auto"


def test_expert_implementations_agree_with_uneven_shapes():
    """Shapes the grouped kernel cannot take (unaligned) and empty experts go through the other paths."""
    torch.manual_seed(0)
    ex = Experts(num_experts=5, dim=7, hidden=3)
    with torch.no_grad():
        ex.gate_up_proj.normal_()
        ex.down_proj.normal_()
    x = torch.randn(11, 7)
    idx = torch.randint(0, 3, (11, 2))  # experts 3 and 4 get nothing
    idx[:, 1] = (idx[:, 0] + 1) % 3
    w = torch.rand(11, 2)
    expected = torch.zeros(11, 7)
    for t in range(11):
        for j in range(2):
            e = int(idx[t, j])
            gate, up = (ex.gate_up_proj[e] @ x[t]).split(3)
            expected[t] += w[t, j] * (ex.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    with torch.no_grad():
        for impl in ("gather", "padded", "auto"):
            ex.impl = impl
            assert torch.allclose(ex(x, w, idx), expected, atol=1e-5), impl


def test_checkpoint_stores_experts_one_by_one_and_loads_stacked(tiny3_weights, ours, tmp_path):  # noqa: F811
    names = Checkpoint.open(tiny3_weights).names()
    assert "thinker.model.layers.0.mlp.experts.7.up_proj.weight" in names
    assert "talker.model.layers.1.mlp.experts.0.down_proj.weight" in names
    assert not any(n.endswith("gate_up_proj") for n in names)
    # Saving splits the stacked tensors back into the reference's names, and loading restacks them.
    save_weights(ours, tmp_path, WEIGHT_MAPS["qwen3_omni_moe"])
    assert set(Checkpoint.open(tmp_path).names()) == {n for n in names if n.startswith(("thinker.", "talker."))}
    ck = Checkpoint.open(tiny3_weights)
    gate_up = ours.thinker.model.layers[2].mlp.experts.gate_up_proj
    assert torch.equal(gate_up[5, :16], ck.tensor("thinker.model.layers.2.mlp.experts.5.gate_proj.weight"))
    assert torch.equal(gate_up[5, 16:], ck.tensor("thinker.model.layers.2.mlp.experts.5.up_proj.weight"))


def test_missing_expert_is_reported(tiny3_weights, tmp_path):  # noqa: F811
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copy(f"{tiny3_weights}/config.json", tmp_path / "config.json")
    state = load_file(f"{tiny3_weights}/model.safetensors")
    del state["thinker.model.layers.0.mlp.experts.3.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(thinktalk.CheckpointError, match=r"experts.gate_up_proj \(15 of 16"):
        thinktalk.load(tmp_path)
