"""Qwen3-Omni variants and loading: Thinker-only checkpoints (Thinking, Captioner), config parsing, demo builder."""

from __future__ import annotations

import copy

import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import thinker_cases, tiny3_text_only, tiny3_weights  # noqa: F401
from thinktalk.config import ConfigError
from thinktalk.models.qwen3_omni.config import Qwen3OmniConfig
from thinktalk.models.qwen3_omni.model import NoSpeechError, Qwen3Omni
from thinktalk.testing.tiny import TINY_QWEN3_OMNI, build_tiny_checkpoint

CASES = thinker_cases()


def test_text_only_checkpoint_generates_text_and_refuses_audio(tiny3_text_only):  # noqa: F811
    model = thinktalk.load(tiny3_text_only)
    assert isinstance(model, Qwen3Omni)
    assert model.talker is None and model.code2wav is None and not model.has_speech
    inputs, _ = CASES["image"]
    res = model.generate(**inputs, max_new_tokens=5, eos_token_id=())
    assert res.text_ids.shape == (1, 5) and res.audio is None
    events = list(model.stream(**inputs, max_new_tokens=5, eos_token_id=(), speaker="ethan"))
    assert events[-1].kind == "done" and {e.kind for e in events[:-1]} <= {"text"}  # no audio
    streamed = [t for e in events for t in e.token_ids]
    assert streamed == res.text_ids[0].tolist()[: len(streamed)]
    with pytest.raises(NoSpeechError, match="Thinking or Captioner"):
        model.generate(**inputs, max_new_tokens=5, return_audio=True)
    with pytest.raises(NoSpeechError, match="text only"):
        model.stream(**inputs, max_new_tokens=5, return_audio=True)


def test_text_only_checkpoint_matches_reference_thinker(tiny3_text_only):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    ref = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny3_text_only, dtype=torch.float32).eval()
    assert not ref.has_talker
    model = thinktalk.load(tiny3_text_only)
    inputs, _ = CASES["audio"]
    with torch.no_grad():
        expected = ref.generate(**inputs, return_audio=False, thinker_max_new_tokens=8, thinker_do_sample=False, thinker_eos_token_id=None)
    res = model.generate(**inputs, max_new_tokens=8, eos_token_id=())
    assert torch.equal(res.text_ids, expected[:, inputs["input_ids"].shape[1] :])


def test_thinker_only_load_of_a_speaking_checkpoint(tiny3_weights):  # noqa: F811
    model = thinktalk.load(tiny3_weights, components=("thinker",))
    inputs, _ = CASES["text"]
    with pytest.raises(NoSpeechError, match="components"):
        model.generate(**inputs, max_new_tokens=2, return_audio=True)
    assert model.generate(**inputs, max_new_tokens=2).text_ids.shape == (1, 2)


def test_config_accepts_the_official_spellings():
    d = copy.deepcopy(TINY_QWEN3_OMNI)
    talker_text = d["talker_config"]["text_config"]
    # Official config.json: rope_theta + rope_scaling, and the Talker's "num_experts" (not num_local_experts).
    for sub in (d["thinker_config"]["text_config"], talker_text):
        params = sub.pop("rope_parameters")
        sub["rope_theta"] = params["rope_theta"]
        sub["rope_scaling"] = {"interleaved": True, "mrope_section": params["mrope_section"], "rope_type": "default"}
    cfg = Qwen3OmniConfig.from_hf(d)
    assert cfg.thinker.text.mrope_section == (2, 1, 1) and cfg.talker.text.num_experts == 8
    assert cfg.talker.text.shared_expert_intermediate_size == 24 and not cfg.talker.text.norm_topk_prob
    assert cfg.thinker.text.is_moe_layer(0) and not cfg.thinker.text.is_moe_layer(1)
    assert cfg.has_speech and cfg.code2wav.samples_per_frame == 1920
    talker_text["num_local_experts"] = talker_text.pop("num_experts")
    assert Qwen3OmniConfig.from_hf(d).talker.text.num_experts == 8


def test_config_errors_name_the_field():
    d = copy.deepcopy(TINY_QWEN3_OMNI)
    d["thinker_config"]["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 2]
    with pytest.raises(ConfigError, match="mrope_section"):
        Qwen3OmniConfig.from_hf(d)
    d = copy.deepcopy(TINY_QWEN3_OMNI)
    d["talker_config"]["thinker_hidden_size"] = 64
    with pytest.raises(ConfigError, match="thinker_hidden_size"):
        Qwen3OmniConfig.from_hf(d)
    d = copy.deepcopy(TINY_QWEN3_OMNI)
    d["enable_audio_output"] = False
    assert Qwen3OmniConfig.from_hf(d).talker is None


def test_demo_builder_checkpoint_speaks(tmp_path):
    build_tiny_checkpoint(str(tmp_path), "qwen3_omni_moe", seed=3)
    model = thinktalk.load(tmp_path)
    assert model.has_speech and set(model.speakers) == {"chelsie", "ethan", "aiden"}
    inputs, _ = CASES["text"]
    res = model.generate(**inputs, return_audio=True, max_new_tokens=4, talker_max_new_tokens=3, talker_do_sample=False)
    assert res.codes[0].shape == (2, 16)
    assert res.audio[0].shape == (model.code2wav.num_samples(2),)
