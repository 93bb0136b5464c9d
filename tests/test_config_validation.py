"""config.json validation at the boundary: wrong types, zero heads and absurd sizes are a ConfigError naming the field.

Regression tests for issue 10, item 11: ``hidden_size: "32"`` was a bare TypeError, zero heads a
ZeroDivisionError, and ``num_hidden_layers: 100000`` built modules for minutes before failing.
"""

from __future__ import annotations

import copy
import json
import time

import pytest

import thinktalk
from thinktalk.config import ConfigError
from thinktalk.families import load_config
from thinktalk.testing.tiny import tiny_config


def _write(tmp_path, cfg: dict):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def _with(family: str, path: tuple, value) -> dict:
    cfg = copy.deepcopy(tiny_config(family))
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return cfg


TEXT = ("thinker_config", "text_config")
BAD = [
    # (family, field path, value, what the message must say)
    ("qwen2_5_omni", (*TEXT, "hidden_size"), "32", r"'thinker_config\.text_config\.hidden_size' must be an integer, got string '32'"),
    ("qwen2_5_omni", (*TEXT, "num_attention_heads"), 0, r"'thinker_config\.text_config\.num_attention_heads' is 0; it must be between 1 and"),
    ("qwen2_5_omni", (*TEXT, "num_key_value_heads"), 0, r"'thinker_config\.text_config\.num_key_value_heads' is 0"),
    ("qwen2_5_omni", (*TEXT, "num_hidden_layers"), 100000, r"'thinker_config\.text_config\.num_hidden_layers' is 100000; it must be between 1 and 1024"),
    ("qwen2_5_omni", (*TEXT, "num_hidden_layers"), True, r"num_hidden_layers' must be an integer, got boolean"),
    ("qwen2_5_omni", (*TEXT, "rms_norm_eps"), "tiny", r"rms_norm_eps' must be a number, got string"),
    ("qwen2_5_omni", (*TEXT, "num_key_value_heads"), 3, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ("qwen2_5_omni", (*TEXT, "rope_parameters", "mrope_section"), ["a", 1, 2], r"mrope_section\[0\]' must be an integer"),
    ("qwen2_5_omni", (*TEXT, "rope_parameters", "rope_theta"), -1.0, r"rope_parameters' is -1.0; it must be positive"),
    ("qwen2_5_omni", ("thinker_config", "vision_config", "num_heads"), 0, r"vision_config\.num_heads' is 0"),
    ("qwen2_5_omni", ("thinker_config", "vision_config", "num_heads"), 3, r"vision_config: hidden_size \(16\) must be a multiple of num_heads \(3\)"),
    ("qwen2_5_omni", ("thinker_config", "audio_config", "encoder_attention_heads"), 0, r"audio_config\.encoder_attention_heads' is 0"),
    ("qwen2_5_omni", ("thinker_config", "vision_config", "fullatt_block_indexes"), 1, r"fullatt_block_indexes' must be a list"),
    ("qwen2_5_omni", ("talker_config", "vocab_size"), 10**12, r"talker_config\.vocab_size' is 1000000000000"),
    ("qwen2_5_omni", ("token2wav_config", "dit_config", "num_attention_heads"), 0, r"dit_config\.num_attention_heads' is 0"),
    ("qwen2_5_omni", ("enable_audio_output",), "yes", r"'config\.enable_audio_output' must be true or false"),
    ("qwen3_omni_moe", (*TEXT, "num_attention_heads"), 0, r"'thinker_config\.text_config\.num_attention_heads' is 0"),
    ("qwen3_omni_moe", (*TEXT, "hidden_size"), "32", r"'thinker_config\.text_config\.(hidden_size|head_dim)' must be an integer"),
    ("qwen3_omni_moe", (*TEXT, "num_hidden_layers"), 100000, r"num_hidden_layers' is 100000"),
    ("qwen3_omni_moe", (*TEXT, "num_experts"), -1, r"num_experts' is -1"),
    ("qwen3_omni_moe", ("talker_config", "code_predictor_config", "num_attention_heads"), 0, r"code_predictor_config\.num_attention_heads' is 0"),
    ("qwen3_omni_moe", ("code2wav_config", "num_hidden_layers"), 10**6, r"code2wav_config\.num_hidden_layers' is 1000000"),
]


@pytest.mark.parametrize("family,path,value,message", BAD, ids=[f"{b[0]}:{'.'.join(map(str, b[1]))}={b[2]!r}" for b in BAD])
def test_bad_field_is_a_config_error_naming_it(tmp_path, family, path, value, message):
    cfg = _with(family, path, value)
    if path[-1] == "num_attention_heads" and family == "qwen3_omni_moe" and path[:2] == TEXT:
        cfg["thinker_config"]["text_config"].pop("head_dim", None)  # the head size is then derived from the heads
    if path[-1] == "hidden_size" and family == "qwen3_omni_moe":
        cfg["thinker_config"]["text_config"].pop("head_dim", None)
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, cfg))


def test_absurd_layer_count_fails_before_building(tmp_path):
    """100000 layers used to build modules for minutes (4 GB) before the checkpoint check failed."""
    cfg = _with("qwen2_5_omni", (*TEXT, "num_hidden_layers"), 100000)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="num_hidden_layers' is 100000"):
        thinktalk.load(str(_write(tmp_path, cfg)))
    assert time.perf_counter() - start < 2.0


def test_config_must_be_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_config(tmp_path)
    cfg = _with("qwen2_5_omni", ("thinker_config", "vision_config"), [1])
    with pytest.raises(ConfigError, match="vision_config"):
        load_config(_write(tmp_path, cfg))


@pytest.mark.parametrize("family", ["qwen2_5_omni", "qwen3_omni_moe"])
def test_limits_admit_the_published_shapes(family):
    """The ranges admit the released checkpoints: the shape fields of Qwen2.5-Omni-7B and Qwen3-Omni-30B-A3B."""
    from thinktalk.models.qwen2_5_omni.config import Qwen25OmniConfig
    from thinktalk.models.qwen3_omni.config import Qwen3OmniConfig

    cfg = copy.deepcopy(tiny_config(family))
    th = cfg["thinker_config"]
    if family == "qwen2_5_omni":  # Qwen/Qwen2.5-Omni-7B config.json
        th["audio_config"].update(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                                  output_dim=3584, n_window=100)
        th["vision_config"].update(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                   out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
        th["text_config"].update(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
        cfg["talker_config"].update(embedding_size=3584, hidden_size=896, intermediate_size=18944, num_hidden_layers=24,
                                    num_attention_heads=12, num_key_value_heads=4, head_dim=128,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
        cfg["token2wav_config"] = {"dit_config": {}, "bigvgan_config": {}}
        parsed = Qwen25OmniConfig.from_hf(cfg)
        assert parsed.thinker.text.num_hidden_layers == 28 and parsed.talker.head_dim == 128
    else:  # Qwen/Qwen3-Omni-30B-A3B-Instruct config.json
        th["text_config"].update(vocab_size=152064, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                                 num_key_value_heads=4, head_dim=128, intermediate_size=768, moe_intermediate_size=768,
                                 num_experts=128, num_experts_per_tok=8, max_position_embeddings=65536,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [24, 20, 20]})
        th["vision_config"].update(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048)
        th["audio_config"].update(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                                  output_dim=2048)
        cfg["talker_config"].update(thinker_hidden_size=2048, accept_hidden_layer=24)
        parsed = Qwen3OmniConfig.from_hf(cfg)
        assert parsed.thinker.text.num_experts == 128 and parsed.thinker.text.max_position_embeddings == 65536
