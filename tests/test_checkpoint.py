"""Checkpoint loading/saving: sharded layout, dtype, strict names, partial loads, round trip, config errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import thinktalk
from tests.qwen25_inputs import cases
from thinktalk.checkpoint import Checkpoint, CheckpointError, save_weights
from thinktalk.config import ConfigError
from thinktalk.families import load_config


def _copy_meta(src, dst):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and not f.endswith(".index.json"):
            shutil.copy(os.path.join(src, f), dst)


def test_sharded_checkpoint_loads_identically(tiny25_weights, tmp_path):
    model = thinktalk.load(str(tiny25_weights))
    sharded = tmp_path / "sharded"
    _copy_meta(tiny25_weights, sharded)
    files = save_weights(model, sharded, model.weight_map, max_shard_bytes=2 * 2**20)
    assert len(files) > 1 and (sharded / "model.safetensors.index.json").exists()
    again = thinktalk.load(str(sharded))
    inputs, _ = cases()["image"]
    with torch.no_grad():
        torch.testing.assert_close(again.thinker(**inputs).logits, model.thinker(**inputs).logits, atol=0, rtol=0)


def test_save_round_trip_is_equal(tiny25_weights, tmp_path):
    model = thinktalk.load(str(tiny25_weights))
    out = tmp_path / "saved"
    _copy_meta(tiny25_weights, out)
    save_weights(model, out, model.weight_map)
    a, b = Checkpoint.open(tiny25_weights), Checkpoint.open(out)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        assert torch.equal(a.tensor(name), b.tensor(name)), name


def test_bfloat16_load_runs(tiny25_weights):
    model = thinktalk.load(str(tiny25_weights), dtype=torch.bfloat16)
    assert model.thinker.lm_head.weight.dtype == torch.bfloat16
    if model.token2wav is not None:
        assert next(model.token2wav.parameters()).dtype == torch.float32  # the vocoder stays float32
    inputs, _ = cases()["video_with_audio"]
    with torch.no_grad():
        ref = thinktalk.load(str(tiny25_weights)).thinker(**inputs, use_audio_in_video=True).logits
        out = model.thinker(**inputs, use_audio_in_video=True).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # bf16 keeps ~3 significant digits: the answer is the same model, not noise.
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_thinker_only_load_skips_speech_tensors(tiny25_weights, monkeypatch):
    read = []
    orig = Checkpoint.tensor

    def spy(self, name):
        read.append(name)
        return orig(self, name)

    monkeypatch.setattr(Checkpoint, "tensor", spy)
    model = thinktalk.load(str(tiny25_weights), components=("thinker",))
    assert model.talker is None and model.token2wav is None
    assert read and all(n.startswith("thinker.") for n in read)


def test_missing_and_unexpected_keys_are_named(tiny25_weights, tmp_path):
    broken = tmp_path / "broken"
    _copy_meta(tiny25_weights, broken)
    with safe_open(os.path.join(tiny25_weights, "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del tensors["thinker.model.layers.1.mlp.up_proj.weight"]
    tensors["thinker.model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, os.path.join(broken, "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        thinktalk.load(str(broken))
    msg = str(e.value)
    assert "missing (1): thinker.model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): thinker.model.layers.1.mlp.extra.weight" in msg


def test_wrong_shape_is_named(tiny25_weights, tmp_path):
    broken = tmp_path / "shape"
    _copy_meta(tiny25_weights, broken)
    with safe_open(os.path.join(tiny25_weights, "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["thinker.model.norm.weight"] = torch.ones(7)
    save_file(tensors, os.path.join(broken, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"thinker.model.norm.weight.*\(7,\)"):
        thinktalk.load(str(broken))


def test_missing_shard_and_missing_weights_are_clear(tiny25_weights, tmp_path):
    empty = tmp_path / "empty"
    _copy_meta(tiny25_weights, empty)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        thinktalk.load(str(empty))
    (empty / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="shards listed .* are missing"):
        thinktalk.load(str(empty))


def test_config_errors_name_the_problem(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni", "thinker_config": {}}))
    with pytest.raises(ConfigError, match="thinker_config.text_config' is missing"):
        load_config(tmp_path)
    cfg = {"model_type": "qwen2_5_omni", "thinker_config": {"audio_config": {}, "vision_config": {}, "text_config": {"hidden_size": 8}}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"'thinker_config\.text_config\.(vocab_size|intermediate_size|num_hidden_layers|num_attention_heads|num_key_value_heads)' is missing"):
        load_config(tmp_path)


def test_old_style_rope_config_is_understood(tiny25_weights, tmp_path):
    """Official checkpoints spell rotary settings as rope_theta + rope_scaling (transformers 4.x)."""
    d = json.loads((tiny25_weights / "config.json").read_text())
    text = d["thinker_config"]["text_config"]
    params = text.pop("rope_parameters")
    text["rope_theta"] = params["rope_theta"]
    text["rope_scaling"] = {"type": "mrope", "mrope_section": params["mrope_section"]}
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = load_config(tmp_path)
    assert cfg.thinker.text.mrope_section == tuple(params["mrope_section"])
    assert cfg.thinker.text.rope_theta == params["rope_theta"]


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen2.5-Omni-7B.*local directory"):
        thinktalk.load("Qwen/Qwen2.5-Omni-7B")


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        thinktalk.load(str(tmp_path / "nope"))


def test_index_cannot_name_files_outside_the_directory(tiny25_weights, tmp_path):
    """An index.json is the checkpoint author's data: '../../etc/passwd' must not be opened (issue 10, item 11)."""
    outside = tmp_path / "secret.safetensors"
    save_file({"x": torch.zeros(2)}, str(outside))
    ckpt = tmp_path / "ckpt"
    _copy_meta(tiny25_weights, ckpt)
    for name in ("../secret.safetensors", str(outside), "sub/../../secret.safetensors", "../../../../etc/passwd"):
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"thinker.lm_head.weight": name}}))
        with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
            Checkpoint.open(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"thinker.lm_head.weight": 7}}))
    with pytest.raises(CheckpointError, match="invalid shard file 7"):
        Checkpoint.open(ckpt)
    (ckpt / "model.safetensors.index.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="has no 'weight_map'"):
        Checkpoint.open(ckpt)


def test_truncated_safetensors_error_names_the_file(tiny25_weights, tmp_path):
    cut = tmp_path / "cut"
    _copy_meta(tiny25_weights, cut)
    data = (tiny25_weights / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read safetensors file '.*cut/model\.safetensors' \(\d+ bytes\)"):
        thinktalk.load(str(cut))
    # The same through an index (the shard is opened lazily, when its first tensor is read).
    sharded = tmp_path / "sharded"
    _copy_meta(tiny25_weights, sharded)
    files = save_weights(thinktalk.load(str(tiny25_weights)), sharded, thinktalk.load(str(tiny25_weights)).weight_map,
                         max_shard_bytes=2 * 2**20)  # fmt: skip
    victim = sharded / files[-1]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"cannot read safetensors file '.*{files[-1]}'"):
        thinktalk.load(str(sharded))
