"""Official 4-bit checkpoints (GPTQ, AWQ): packing, dequantization, and tiny quantized models vs the reference.

The reference (transformers 5.23) loads GPTQ/AWQ only through gptqmodel, which does not install on a
CPU-only machine. So the reference here is the float model the quantized checkpoint means: its weights
are dequantized by this file's own transcription of the published formulas (GPTQModel's
``dequantize_weight`` for GPTQ v1, AutoAWQ's ``dequantize_gemm`` for AWQ; written separately from
:mod:`thinktalk.nn.quant`), saved as a float checkpoint, and run by transformers.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import thinker_cases, tiny3_weights  # noqa: F401
from tests.qwen25_inputs import cases
from thinktalk.checkpoint import Checkpoint, save_tensors
from thinktalk.nn.moe import Experts
from thinktalk.nn.quant import (
    AWQ_ORDER,
    QuantConfig,
    QuantConfigError,
    QuantExperts,
    QuantLinear,
    dequantize,
    pack_awq,
    pack_gptq,
    pack_int4,
    quantize_rtn,
    unpack_int4,
)
from thinktalk.testing.quantize import quantize_checkpoint

transformers = pytest.importorskip("transformers")


# -- the published formulas, transcribed independently -----------------------------------------------
def ref_dequant_gptq_v1(qweight, qzeros, scales, g_idx):
    """GPTQModel TorchQuantLinear.dequantize_weight (bits=4) after its v1 -> v2 conversion (zeros + 1)."""
    wf = torch.tensor(list(range(0, 32, 4)), dtype=torch.int32)[None]
    zeros = torch.bitwise_right_shift(qzeros[:, :, None].expand(-1, -1, 8), wf[None]).to(torch.int16)
    zeros = torch.bitwise_and(zeros, 15).reshape(qzeros.shape[0], -1) + 1
    weight = torch.bitwise_and(
        torch.bitwise_right_shift(qweight[:, None, :].expand(-1, 8, -1), wf[:, :, None]).to(torch.int16), 15
    )
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    g = g_idx.long()
    return (scales.float()[g] * (weight - zeros[g]).float()).t()


def ref_dequant_awq(qweight, qzeros, scales, group_size):
    """AutoAWQ dequantize_gemm (bits=4): unpack columnwise, undo the [0, 2, 4, 6, 1, 3, 5, 7] interleave."""
    shifts = torch.arange(0, 32, 4)
    iw = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8).view(qweight.shape[0], -1)
    iz = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8).view(qzeros.shape[0], -1)
    reverse = torch.arange(iw.shape[-1]).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)
    iw, iz = iw[:, reverse] & 15, iz[:, reverse] & 15
    s = scales.float().repeat_interleave(group_size, dim=0)
    z = iz.repeat_interleave(group_size, dim=0)
    return ((iw - z).float() * s).t()


def test_pack_known_words():
    # GPTQ packs 8 inputs per word, first in the lowest nibble.
    assert hex(int(pack_int4(torch.arange(1, 9)[:, None], dim=0)[0, 0]) & 0xFFFFFFFF) == "0x87654321"
    # AWQ: word position j holds output AWQ_ORDER[j]; outputs with codes 0..7 give nibbles 0,2,4,6,1,3,5,7.
    word = int(pack_int4(torch.arange(8)[None], dim=1, order=AWQ_ORDER)[0, 0])
    assert hex(word) == "0x75316420"
    # A top nibble >= 8 makes a negative int32, as the files store it.
    assert int(pack_int4(torch.full((1, 8), 15), dim=1)[0, 0]) == -1


@pytest.mark.parametrize("order", [None, AWQ_ORDER])
def test_unpack_inverts_pack(order):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (24, 40), generator=g)
    for dim in (0, 1):
        c = codes if dim == 1 else codes[:, :32]
        assert torch.equal(unpack_int4(pack_int4(c, dim, order), dim, order), c)


def test_dequantize_matches_published_formulas():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g)
    codes, zeros, scales = quantize_rtn(w, group_size=16)
    # Round-to-nearest reconstruction error is at most half a step.
    approx = (codes - zeros.repeat_interleave(16, 0)).float() * scales.float().repeat_interleave(16, 0)
    assert (approx.t() - w).abs().max() <= scales.float().max() / 2 + 1e-6

    gp = pack_gptq(codes, zeros, scales)
    ours = dequantize("gptq", gp["qweight"], gp["qzeros"], gp["scales"].float(), gp["g_idx"], zero_offset=1)
    assert torch.equal(ours, ref_dequant_gptq_v1(gp["qweight"], gp["qzeros"], gp["scales"], gp["g_idx"]))
    assert torch.allclose(ours, approx.t())
    # The v1 offset matters: read as gptq_v2, every weight moves by one step.
    v2 = dequantize("gptq", gp["qweight"], gp["qzeros"], gp["scales"].float(), gp["g_idx"], zero_offset=0)
    assert torch.allclose(v2 - ours, scales.float().repeat_interleave(16, 0).t())

    # desc_act: inputs quantized in another order, g_idx names each input's group.
    perm_g_idx = gp["g_idx"][torch.randperm(64, generator=g)]
    ours = dequantize("gptq", gp["qweight"], gp["qzeros"], gp["scales"].float(), perm_g_idx, zero_offset=1)
    assert torch.equal(ours, ref_dequant_gptq_v1(gp["qweight"], gp["qzeros"], gp["scales"], perm_g_idx))

    aw = pack_awq(codes, zeros, scales)
    ours = dequantize("awq", aw["qweight"], aw["qzeros"], aw["scales"].float())
    assert torch.equal(ours, ref_dequant_awq(aw["qweight"], aw["qzeros"], aw["scales"], 16))
    assert torch.allclose(ours, approx.t())


def test_quant_config_errors():
    assert QuantConfig.from_hf({"quant_method": "gptq", "bits": 4, "group_size": 128}).zero_offset == 1
    assert QuantConfig.from_hf({"quant_method": "gptq", "checkpoint_format": "gptq_v2"}).zero_offset == 0
    assert QuantConfig.from_hf({"quant_method": "awq", "bits": 4, "version": "gemm"}).zero_offset == 0
    for bad, words in [
        ({"quant_method": "bitsandbytes"}, "not supported"),
        ({"quant_method": "gptq", "bits": 3}, "only 4-bit"),
        ({"quant_method": "awq", "version": "gemv"}, "gemv"),
        ({"quant_method": "gptq", "group_size": 0}, "group_size"),
        ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "checkpoint_format"),
    ]:
        with pytest.raises(QuantConfigError, match=words):
            QuantConfig.from_hf(bad)
    with pytest.raises(QuantConfigError, match="cannot hold"):
        QuantLinear(30, 16, False, QuantConfig("gptq", group_size=16))


# -- tiny quantized models vs the reference -----------------------------------------------------------
def _reference_float_dir(src: str, qdir: str, dst: str, method: str, group_size: int) -> str:
    """``src`` with every layer quantized in ``qdir`` replaced by its (independently) dequantized weight."""
    q = Checkpoint.open(qdir)
    names = set(q.names())
    tensors = {n: Checkpoint.open(src).tensor(n) for n in Checkpoint.open(src).names()}
    for n in names:
        if n.endswith(".qweight"):
            p = n[: -len(".qweight")]
            if method == "gptq":
                w = ref_dequant_gptq_v1(
                    q.tensor(n), q.tensor(f"{p}.qzeros"), q.tensor(f"{p}.scales"), q.tensor(f"{p}.g_idx")
                )
            else:
                w = ref_dequant_awq(q.tensor(n), q.tensor(f"{p}.qzeros"), q.tensor(f"{p}.scales"), group_size)
            assert not torch.equal(w, tensors[f"{p}.weight"])  # quantization moved the weight
            tensors[f"{p}.weight"] = w.to(tensors[f"{p}.weight"].dtype)
    save_tensors(tensors, dst)
    with open(os.path.join(src, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh)
    return dst


@pytest.fixture(scope="module", params=["gptq", "awq"])
def quant25(request, tiny25_weights, tmp_path_factory):
    method = request.param
    qdir = str(tmp_path_factory.mktemp(f"tiny25_{method}"))
    layers = quantize_checkpoint(str(tiny25_weights), qdir, method=method, group_size=16)
    fdir = _reference_float_dir(
        str(tiny25_weights), qdir, str(tmp_path_factory.mktemp(f"tiny25_{method}_float")), method, 16
    )
    ref = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(fdir, dtype=torch.float32).eval()
    return method, qdir, layers, ref


def test_qwen25_quantized_logits_match_reference(quant25):
    method, qdir, layers, ref = quant25
    ours = thinktalk.load(qdir, components=("thinker",))
    assert ours.quantization.method == method
    swapped = [n for n, m in ours.named_modules() if isinstance(m, QuantLinear)]
    assert sorted(swapped) == sorted(layers) and len(swapped) == 2 * 7
    # The encoders and lm_head stay float.
    assert isinstance(ours.thinker.lm_head, torch.nn.Linear)
    assert not any(isinstance(m, QuantLinear) for m in ours.thinker.audio_tower.modules())
    assert not any(isinstance(m, QuantLinear) for m in ours.thinker.visual.modules())
    all_cases = cases()
    for name in ("text", "audio", "image", "batch_left_padding"):
        inputs, use_aiv = all_cases[name]
        with torch.no_grad():
            want = ref(**inputs, use_audio_in_video=use_aiv).logits
            got = ours.thinker(**inputs, use_audio_in_video=use_aiv).logits
        valid = inputs["attention_mask"].bool()
        diff = (want - got)[valid].abs().max().item()
        print(f"{method} {name}: max abs logit diff {diff:.3e}")
        assert diff <= 1e-4 * max(1.0, want[valid].abs().max().item())
    inputs, _ = all_cases["text"]
    with torch.no_grad():
        want = ref.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=151643)
    res = ours.generate(**inputs, max_new_tokens=12, eos_token_id=())
    assert torch.equal(res.text_ids, want[:, inputs["input_ids"].shape[1] :])


def test_dequantize_option_is_the_same_float_model(quant25):
    _, qdir, _, _ = quant25
    packed = thinktalk.load(qdir, components=("thinker",))
    plain = thinktalk.load(qdir, components=("thinker",), dequantize=True)
    assert plain.quantization is None
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    inputs, _ = cases()["text"]
    with torch.no_grad():
        assert torch.equal(packed.thinker(**inputs).logits, plain.thinker(**inputs).logits)
    q_bytes = sum(b.numel() * b.element_size() for n, b in packed.thinker.model.layers.named_buffers())
    f_bytes = sum(
        p.numel() * p.element_size()
        for n, p in plain.thinker.model.layers.named_parameters()
        if n.endswith("proj.weight")
    )
    assert q_bytes < f_bytes / 3  # packed codes + float32 scales of groups of 16 vs float32 weights


def test_qwen3_quantized_experts_match_reference(tiny3_weights, tmp_path):  # noqa: F811
    qdir = str(tmp_path / "q")
    layers = quantize_checkpoint(tiny3_weights, qdir, method="gptq", group_size=16)
    assert any(".experts." in n for n in layers)
    fdir = _reference_float_dir(tiny3_weights, qdir, str(tmp_path / "f"), "gptq", 16)
    ref = transformers.Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(fdir, dtype=torch.float32).eval()
    ours = thinktalk.load(qdir, components=("thinker",))
    plain = thinktalk.load(qdir, components=("thinker",), dequantize=True)
    # Attention layers and the stacked experts stay packed.
    assert any(isinstance(m, QuantLinear) for m in ours.modules())
    moe_layers = [m for m in ours.modules() if isinstance(m, QuantExperts)]
    assert len(moe_layers) == 2  # the tiny Thinker's MoE layers (one of its 3 layers is dense)
    packed = sum(b.numel() * b.element_size() for b in moe_layers[0].buffers())
    assert packed < (plain.thinker.model.layers[0].mlp.experts.gate_up_proj.numel() * 3 / 2) * 4 / 3
    for name in ("text", "image", "batch_left_padding"):
        inputs, use_aiv = thinker_cases()[name]
        with torch.no_grad():
            want = ref(**inputs, use_audio_in_video=use_aiv).logits
            got = ours.thinker(**inputs, use_audio_in_video=use_aiv).logits
            same = plain.thinker(**inputs, use_audio_in_video=use_aiv).logits
        valid = inputs["attention_mask"].bool()
        diff = (want - got)[valid].abs().max().item()
        print(f"qwen3 gptq {name}: max abs logit diff {diff:.3e}")
        assert diff <= 1e-4 * max(1.0, want[valid].abs().max().item())
        assert (same - got)[valid].abs().max().item() <= 1e-5 * max(1.0, want[valid].abs().max().item())
    inputs, _ = thinker_cases()["text"]
    with torch.no_grad():
        want = ref.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=151643)
    assert torch.equal(
        ours.generate(**inputs, max_new_tokens=8, eos_token_id=()).text_ids, want[:, inputs["input_ids"].shape[1] :]
    )


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("impl", ["gather", "padded"])
def test_quant_experts_match_float_experts(method, impl):
    g = torch.Generator().manual_seed(4)
    E, H, inter, group = 6, 32, 16, 16
    cfg = QuantConfig(method, group_size=group, zero_offset=1 if method == "gptq" else 0)
    q = QuantExperts(E, H, inter, "silu", cfg)
    for proj, (n_in, n_out) in (("gate", (H, inter)), ("up", (H, inter)), ("down", (inter, H))):
        parts = []
        for _ in range(E):
            codes, zeros, scales = quantize_rtn(torch.randn(n_out, n_in, generator=g), group)
            parts.append(pack_gptq(codes, zeros, scales) if method == "gptq" else pack_awq(codes, zeros, scales))
        for kind in parts[0]:
            setattr(
                q,
                f"{proj}_{kind}",
                torch.stack([p[kind] for p in parts]).to(torch.float32 if kind == "scales" else None),
            )
    dense = Experts(E, H, inter)
    dense.gate_up_proj.data = torch.cat([q.dequantized("gate"), q.dequantized("up")], dim=1).contiguous()
    dense.down_proj.data = q.dequantized("down").contiguous()
    # each expert's float weight is the 2-D dequantization of its own tensors
    assert torch.equal(q.dequantized("down")[2], dequantize(method, q.down_qweight[2], q.down_qzeros[2], q.down_scales[2],
                                                           getattr(q, "down_g_idx", None) if method == "gptq" else None,
                                                           cfg.zero_offset))  # fmt: skip
    x = torch.randn(9, H, generator=g)
    experts = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(9)])
    weights = torch.rand(9, 2, generator=g)
    q.impl = dense.impl = impl
    assert torch.allclose(q(x, weights, experts), dense(x, weights, experts), atol=1e-6)


def test_declared_but_missing_quantized_tensors(tiny25_weights, tmp_path):
    import shutil

    d = tmp_path / "fake"
    shutil.copytree(tiny25_weights, d)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemm"}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(thinktalk.CheckpointError, match="no '\\*.qweight' tensors"):
        thinktalk.load(str(d), components=("thinker",))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_int4mm_kernel_matches_plain_path(method):
    g = torch.Generator().manual_seed(3)
    n_in, n_out, group = 256, 80, 64
    w = torch.randn(n_out, n_in, generator=g)
    codes, zeros, scales = quantize_rtn(w, group)
    packed = pack_gptq(codes, zeros, scales) if method == "gptq" else pack_awq(codes, zeros, scales)
    layer = QuantLinear(
        n_in, n_out, True, QuantConfig(method, group_size=group, zero_offset=1 if method == "gptq" else 0)
    )
    for name, t in packed.items():
        setattr(layer, name, t.float() if name == "scales" else t)
    layer.bias = torch.nn.Parameter(torch.randn(n_out, generator=g), requires_grad=False)
    x = torch.randn(3, 5, n_in, generator=g)
    plain = layer(x)
    assert layer.int4mm_supported() is None
    layer.use_int4mm()
    fast = layer(x)
    assert fast.shape == plain.shape
    assert (fast - plain).abs().max().item() <= 1e-4 * plain.abs().max().item()
    # act-order groups (a permuted g_idx) are refused, not silently mis-grouped
    if method == "gptq":
        layer.g_idx = layer.g_idx[torch.randperm(n_in, generator=g)]
        assert "act-order" in layer.int4mm_supported()
