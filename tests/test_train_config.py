"""Training configs: YAML + key=value overrides into typed dataclasses, clear errors, the example recipes."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from thinktalk.train.config import DataSource, TrainConfigError, load_config
from thinktalk.train.recipes import RECIPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, """
recipe: lora
model: /models/x
data: [{path: a.jsonl, weight: 3}, b.jsonl]
output_dir: out
lr: 1e-4
lora_rank: 4
""")
    c = load_config(path, ["lr=2e-5", "max_steps=7", "packing=true", "trainable=[llm,adapters]", "lora_alpha=8",
                           "lora_targets=q_proj,v_proj", "tensorboard=false"])
    t, o = c.train, c.options
    assert t.lr == 2e-5 and isinstance(t.lr, float)  # YAML 1.1 reads "2e-5" as a string; the field type wins
    assert t.max_steps == 7 and t.packing is True and t.tensorboard == "false"
    assert t.data == [DataSource("a.jsonl", 3.0), DataSource("b.jsonl", 1.0)]
    assert t.trainable == ["llm", "adapters"]
    assert (o.lora_rank, o.lora_alpha, o.lora_targets) == (4, 8.0, ["q_proj", "v_proj"])
    assert c.raw["lr"] == 2e-5 or c.raw["lr"] == "2e-5"


def test_unknown_and_bad_keys_are_clear_errors(tmp_path):
    path = write(tmp_path, "recipe: sft\nmodel: m\ndata: d.jsonl\noutput_dir: o\n")
    with pytest.raises(TrainConfigError, match=r"unknown key\(s\) lerning_rate .*Common keys: .*lr"):
        load_config(path, ["lerning_rate=1"])
    with pytest.raises(TrainConfigError, match=r"max_steps: expected int, got 'many'"):
        load_config(path, ["max_steps=many"])
    with pytest.raises(TrainConfigError, match="not key=value"):
        load_config(path, ["max_steps"])
    with pytest.raises(TrainConfigError, match="unknown recipe 'ssft'"):
        load_config(path, ["recipe=ssft"])
    with pytest.raises(TrainConfigError, match=r"unknown key\(s\) beta for recipe 'talker'.*Keys of this recipe: codec_model"):
        load_config(path, ["recipe=talker", "beta=0.1"])
    with pytest.raises(TrainConfigError, match="the key 'model' is required"):
        load_config(write(tmp_path, "recipe: sft\ndata: d.jsonl\noutput_dir: o\n", "no_model.yaml"))
    with pytest.raises(TrainConfigError, match="batch_size must be >= 1"):
        load_config(path, ["batch_size=0"])


def test_recipe_defaults_apply_unless_given(tmp_path):
    path = write(tmp_path, "recipe: stage3\nmodel: m\ndata: d.jsonl\noutput_dir: o\n")
    c = load_config(path)
    assert c.train.packing and c.train.gradient_checkpointing and c.train.loss_chunk_size > 0
    assert c.train.max_length == 32768
    assert load_config(path, ["packing=false", "max_length=8192"]).train.packing is False


def test_every_example_recipe_parses():
    files = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))
    found = {os.path.basename(f)[:-5] for f in files}
    assert set(RECIPES) <= {n.split("_")[0] for n in found}, found
    for f in files:
        with open(f, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
        if raw.get("recipe") == "codec":  # the codec's own loop (thinktalk.codec), which `thinktalk train` runs
            from thinktalk.codec.train import CodecTrainConfig

            CodecTrainConfig.from_dict(raw, where=f)
            continue
        c = load_config(f)
        assert c.train.recipe in RECIPES
