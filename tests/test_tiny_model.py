"""thinktalk-tiny foundations: the data generator, its tokenizer, the tiny Qwen3-Omni config, MCD/DTW, the eval."""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import pytest
import torch

from thinktalk.data import mcd, speech, tasks
from thinktalk.data.generate import generate

needs_espeak = pytest.mark.skipif(not speech.have_espeak(), reason="espeak-ng is not installed")


def _digest(directory: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".mp4"):  # the container bytes are not reproducible: its decoded frames are
                import av

                with av.open(path) as container:
                    data = b"".join(f.to_ndarray().tobytes() for f in container.decode(video=0))
            else:
                with open(path, "rb") as fh:
                    data = fh.read()
            out[os.path.relpath(path, directory)] = hashlib.sha256(data).hexdigest()
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("tinydata"))
    if not speech.have_espeak():
        pytest.skip("espeak-ng is not installed")
    generate(d, seed=3, n_train=28, n_val=7, n_test=28)
    return d


@pytest.fixture(scope="module")
def tiny_dir(dataset, tmp_path_factory) -> str:
    from thinktalk.data.model import build_untrained

    return build_untrained(str(tmp_path_factory.mktemp("tinymodel")), dataset, seed=0)


# -- data --------------------------------------------------------------------------------------------


@needs_espeak
def test_generator_is_deterministic_and_seeded(dataset, tmp_path):
    again = str(tmp_path / "again")
    generate(again, seed=3, n_train=28, n_val=7, n_test=28)
    assert _digest(again) == _digest(dataset)  # every byte of JSONL, PNG, WAV, manifest; MP4 frames
    other = str(tmp_path / "other")
    generate(other, seed=4, n_train=28, n_val=0, n_test=0)
    with open(os.path.join(dataset, "train.jsonl")) as a, open(os.path.join(other, "train.jsonl")) as b:
        assert a.read() != b.read()


@needs_espeak
def test_rows_are_trainer_format_with_media_relative_to_the_jsonl(dataset):
    from thinktalk.train.data import read_rows

    for split in ("train", "val", "test"):
        path = os.path.join(dataset, f"{split}.jsonl")
        rows = [json.loads(line) for line in open(path)]
        read, bad = read_rows(path)
        assert not bad and len(read) == len(rows)
        for row in rows:
            user, assistant = row["messages"]
            assert assistant == {"role": "assistant", "content": row["answer"]}
            for item in user["content"]:
                for kind in ("image", "audio", "video"):
                    if kind in item:
                        assert not os.path.isabs(item[kind]) and os.path.exists(os.path.join(dataset, item[kind]))
            assert os.path.exists(os.path.join(dataset, row["answer_audio"]))
            assert row["modality"] == ("spoken" if any(i["type"] == "audio" for i in user["content"]) else "typed")
    test_rows = [json.loads(line) for line in open(os.path.join(dataset, "test.jsonl"))]
    assert {r["task"] for r in test_rows} == set(tasks.TASKS)  # the held-out split covers every task


def test_held_out_combinations_never_train():
    rng = random.Random(0)
    for task in tasks.TASKS:
        for _ in range(300):
            seen = tasks.item_combinations(tasks.make_item(task, rng, held_out=False))
            assert not any(tasks.is_held_out(k, v) for k, v in seen), (task, seen)
            item = tasks.make_item(task, rng, held_out=True)
            held = tasks.item_combinations(item)
            # Arithmetic (and the transcription of an arithmetic answer) is held out by voice only: the row adds
            # it (test_generated_splits_are_disjoint checks every test row).
            if task != "arithmetic" and not (task == "transcribe" and any(op in item.key for op in (" plus ", " minus "))):
                assert any(tasks.is_held_out(k, v) for k, v in held), (task, held)
    assert not set(speech.TRAIN_VOICES) & set(speech.TEST_VOICES)
    assert all(tasks.is_held_out("voice", v) for v in speech.TEST_VOICES)
    assert not any(tasks.is_held_out("voice", v) for v in speech.TRAIN_VOICES)


@needs_espeak
def test_generated_splits_are_disjoint(dataset):
    def combos(split):
        rows = [json.loads(line) for line in open(os.path.join(dataset, f"{split}.jsonl"))]
        return [[(k, tuple(v) if isinstance(v, list) else v) for k, v in r["combinations"]] for r in rows]

    for row in combos("train") + combos("val"):
        assert not any(tasks.is_held_out(k, v) for k, v in row)
    for row in combos("test"):
        assert any(tasks.is_held_out(k, v) for k, v in row)
    test_rows = [json.loads(line) for line in open(os.path.join(dataset, "test.jsonl"))]
    assert all(r["modality"] == "spoken" for r in test_rows if r["task"] == "arithmetic")


def test_generator_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'juggling'"):
        generate(str(tmp_path), n_train=1, tasks_=("juggling",))
    with pytest.raises(ValueError, match="n_test must be >= 0"):
        generate(str(tmp_path), n_test=-1)


# -- tokenizer and model --------------------------------------------------------------------------------


@needs_espeak
def test_tokenizer_round_trip_and_reference(tiny_dir, dataset):
    from tests.media import reference
    from thinktalk.data.tokenizer import read_texts
    from thinktalk.processing.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_dir)
    texts = read_texts(dataset)
    for text in texts + ["Unseen words: zebra 42, ünïcode!"]:
        assert tok.decode(tok.encode(text)) == text
    with open(os.path.join(tiny_dir, "tokenizer.json")) as fh:
        vocab = len(json.load(fh)["model"]["vocab"])
    assert vocab < 600  # a small vocabulary of its own, not Qwen's 151k
    assert np.mean([len(tok.encode(t)) for t in texts]) < 8  # the merges learned the data's words
    ref = reference()
    sample = (
        "<|im_start|>user\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\nThe circle is red.<|im_end|>"
    )
    assert ref("encode", tiny_dir, sample) == tok.encode(sample)
    ids = tok.encode(sample)
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[1] == tok.token_to_id("user")
    assert ref("decode", tiny_dir, ids) == tok.decode(ids, skip_special_tokens=False) == sample
    assert ref("decode", tiny_dir, ids, skip_special_tokens=True) == tok.decode(ids)


@needs_espeak
def test_processor_matches_reference_on_generated_rows(tiny_dir, dataset):
    import soundfile as sf
    from PIL import Image

    import thinktalk
    from tests.media import reference
    from thinktalk.data.evaluate import prompt_of, read_rows

    proc = thinktalk.Processor.from_pretrained(tiny_dir)
    ref = reference()
    rows = [r for r in read_rows(os.path.join(dataset, "test.jsonl")) if r["task"] in ("colour", "shape", "count")]
    row = next(r for r in rows if r["modality"] == "spoken")
    conversation = prompt_of(row, dataset)
    ours = proc(conversation)
    text = ref("apply_chat_template", tiny_dir, conversation, add_generation_prompt=True, tokenize=False)
    assert text == proc.apply_chat_template(conversation)
    image = next(i["image"] for i in conversation[0]["content"] if i["type"] == "image")
    audio = next(i["audio"] for i in conversation[0]["content"] if i["type"] == "audio")
    theirs = ref("call", tiny_dir, text=[text], images=[Image.open(image).convert("RGB")],
                 audio=[sf.read(audio, dtype="float32")[0]])  # fmt: skip
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["input_features"], theirs["input_features"], atol=1e-4, rtol=0)
    assert ours["image_grid_thw"].tolist() == [[1, 6, 6]]  # a 96 x 96 picture: 9 merged tokens


@needs_espeak
def test_tiny_config_loads_in_thinktalk_and_the_reference(tiny_dir, dataset):
    import transformers

    import thinktalk
    from thinktalk.data.evaluate import prompt_of, read_rows
    from thinktalk.data.model import parameter_count

    size = sum(os.path.getsize(os.path.join(tiny_dir, f)) for f in os.listdir(tiny_dir))
    assert size < 30e6 and sum(parameter_count(tiny_dir).values()) < 6e6
    model = thinktalk.load(tiny_dir)
    assert model.has_speech and model.eos_token_ids[0] == model.tokenizer.token_to_id("<|im_end|>")
    ref = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_dir).eval()
    proc = thinktalk.Processor.from_pretrained(tiny_dir)
    row = next(
        r
        for r in read_rows(os.path.join(dataset, "test.jsonl"))
        if r["task"] in ("colour", "shape", "count") and r["modality"] == "spoken"
    )
    inputs = proc(prompt_of(row, dataset))
    with torch.no_grad():
        ours = model.thinker(**inputs).logits
        theirs = ref.thinker(**inputs).logits
        blind = model.thinker(**{**inputs, "pixel_values": inputs["pixel_values"].flip(0)}).logits
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
    assert (blind - ours).abs().max() > 1e-2  # the picture moves the logits: the comparison can fail
    res = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_audio=True, talker_max_new_tokens=4)
    assert res.audio[0].numel() > 0 and res.codes[0].shape[-1] == 8  # the 8 codebooks of the project's codec


# -- MCD / DTW -----------------------------------------------------------------------------------------


def test_dtw_matches_the_plain_recursion_and_ignores_time_stretch():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((23, 4)), rng.standard_normal((31, 4))
    mean, path = mcd.dtw(a, b)
    assert mean * len(path) == pytest.approx(mcd.dtw_plain(a, b), rel=1e-12)
    assert path[0] == (0, 0) and path[-1] == (22, 30)
    stretched = np.repeat(a, 2, axis=0)  # the same sequence, twice as slow
    assert mcd.dtw(a, stretched)[0] == pytest.approx(0.0, abs=1e-12)
    assert mcd.dtw(a, a[::-1])[0] > 0.5
    with pytest.raises(ValueError, match="same dim"):
        mcd.dtw(a, rng.standard_normal((5, 3)))


@needs_espeak
def test_mcd_nearest_rendering_is_the_same_text():
    texts = [
        "The circle is red.",
        "There are three squares.",
        "Seven plus two is nine.",
        "It is a triangle.",
        "You said good morning.",
    ]
    references = [speech.espeak(t, speech.ANSWER_VOICE, speech.ANSWER_SPEED) for t in texts]
    wave, rate = references[0]
    assert mcd.mcd_dtw(wave, rate, wave, rate) == pytest.approx(0.0, abs=1e-9)
    for voice in ("en-gb-x-rp", "en+m3"):
        spoken = [speech.espeak(t, voice, 185) for t in texts]
        result = mcd.nearest_check(spoken, references)
        assert result["nearest_own"] == 1.0, (voice, np.round(result["matrix"], 1))
        assert result["mean_mcd_own"] < 0.8 * result["mean_mcd_other"]
    shuffled = mcd.nearest_check(spoken[1:] + spoken[:1], references)  # wrong pairing: the check fails
    assert shuffled["nearest_own"] == 0.0


# -- evaluation ----------------------------------------------------------------------------------------


def test_key_correct_and_word_accuracy():
    from thinktalk.data.evaluate import key_correct, word_accuracy

    assert key_correct("colour", "red", "The circle is red.")
    assert not key_correct("colour", "red", "The circle is red and blue.")
    assert key_correct("count", "three", "There are three circles.") and not key_correct(
        "count", "three", "There are two."
    )
    assert key_correct("arithmetic", "nine", "Seven plus two is nine.")
    assert not key_correct("arithmetic", "nine", "Seven plus two is eight.")
    assert key_correct("say", "good morning", "Good morning.") and key_correct(
        "transcribe", "red boat", "You said red boat."
    )
    assert word_accuracy("red boat", "red boat") == 1.0 and word_accuracy("red boat", "red cup") == 0.5
    assert word_accuracy("a b", "x y z w") == 0.0


@needs_espeak
def test_eval_runs_end_to_end_on_the_untrained_model(tiny_dir, dataset):
    from thinktalk.data.evaluate import format_report, run

    result = run(tiny_dir, os.path.join(dataset, "test.jsonl"), limit=7, speech_rows=3, speech_source="espeak-en+m3")
    assert sum(g["rows"] for g in result["groups"].values()) == 7
    assert result["key_all"] < 0.5  # random weights do not answer
    assert result["speech"]["nearest_own"] == 1.0  # espeak itself as the speaker passes the MCD check
    assert "target (picture, count, arithmetic" in format_report(result)


# -- recipes -------------------------------------------------------------------------------------------


@needs_espeak
def test_tiny_thinker_recipe_trains_on_generated_data(tiny_dir, dataset, tmp_path):
    from safetensors import safe_open

    from thinktalk.codec.__main__ import load_yaml_config
    from thinktalk.data.model import CODE2WAV
    from thinktalk.train.config import load_config
    from thinktalk.train.trainer import train

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    codec = load_yaml_config(os.path.join(root, "recipes/tiny/codec.yaml"), [])
    assert codec["codec"]["code2wav_config"] == CODE2WAV  # the codec's decoder fits the tiny model's Code2Wav
    assert load_config(os.path.join(root, "recipes/tiny/sft.yaml")).train.recipe == "sft"
    out = str(tmp_path / "stage2")
    overrides = [f"model={tiny_dir}", f"data={dataset}/train.jsonl", f"output_dir={out}", "max_steps=10", "batch_size=4",
                 "warmup_steps=0", "save_every=0", "progress=false", "log_every=1"]  # fmt: skip
    result = train(load_config(os.path.join(root, "recipes/tiny/stage2.yaml"), overrides))
    losses = result.losses
    assert len(losses) == 10 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses
    with (
        safe_open(os.path.join(tiny_dir, "model.safetensors"), "pt") as a,
        safe_open(os.path.join(out, "model.safetensors"), "pt") as b,
    ):
        assert torch.equal(a.get_tensor("talker.codec_head.weight"), b.get_tensor("talker.codec_head.weight"))
        key = "thinker.model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(a.get_tensor(key), b.get_tensor(key))
    # The chain's next recipe starts from this run's output: its own records stay its own (not the base run's).
    out2 = str(tmp_path / "sft")
    overrides = [f"model={out}", f"data={dataset}/train.jsonl", f"output_dir={out2}", "max_steps=2", "batch_size=2",
                 "save_every=0", "progress=false", "log_every=1"]  # fmt: skip
    second = train(load_config(os.path.join(root, "recipes/tiny/sft.yaml"), overrides))
    with open(os.path.join(out2, "metrics.jsonl")) as fh:
        assert [json.loads(line)["loss"] for line in fh] == second.losses
    with open(os.path.join(out2, "train_config.yaml")) as fh:
        assert "recipe: sft" in fh.read()


@needs_espeak
def test_tiny_talker_step_trains_on_the_answer_renderings(tiny_dir, dataset, tmp_path):
    """The chain's talker step (recipes/tiny/talker.yaml): the codec step's codec (a few steps here) encodes each
    row's ``answer_audio``; Talker + code predictor train and their loss falls; Thinker and Code2Wav stay."""
    from safetensors import safe_open

    from thinktalk.codec import CodecTrainConfig, export_qwen3_checkpoint, train_codec
    from thinktalk.codec.__main__ import load_yaml_config
    from thinktalk.train.config import load_config
    from thinktalk.train.trainer import train

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    codec_cfg = load_yaml_config(os.path.join(root, "recipes/tiny/codec.yaml"), [])
    codec_cfg.update(output_dir=str(tmp_path / "codec"), data=[os.path.join(dataset, "answers")], max_steps=3,
                     eval_every=0, save_every=0, progress=False)  # fmt: skip
    train_codec(CodecTrainConfig.from_dict(codec_cfg))
    codec = str(tmp_path / "codec" / "codec")
    base = str(tmp_path / "base")
    export_qwen3_checkpoint(codec, tiny_dir, base)
    out = str(tmp_path / "talker")
    overrides = [f"model={base}", f"data={dataset}/train.jsonl", f"output_dir={out}", f"codec_model={codec}",
                 "max_steps=12", "batch_size=4", "warmup_steps=0", "lr=1e-2", "save_every=0", "progress=false",
                 "log_every=1"]  # fmt: skip
    result = train(load_config(os.path.join(root, "recipes/tiny/talker.yaml"), overrides))
    losses = result.losses
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        last = [json.loads(line) for line in fh][-1]
    assert "codec_loss" in last and "predictor_loss" in last, last
    with (
        safe_open(os.path.join(base, "model.safetensors"), "pt") as a,
        safe_open(os.path.join(out, "model.safetensors"), "pt") as b,
    ):
        for key in ("thinker.model.layers.0.self_attn.q_proj.weight", "thinker.visual.patch_embed.proj.weight",
                    "code2wav.code_embedding.weight", "code2wav.decoder.0.conv.weight"):  # fmt: skip
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
        assert not torch.equal(a.get_tensor("talker.codec_head.weight"), b.get_tensor("talker.codec_head.weight"))
        predictor = [k for k in a.keys() if k.startswith("talker.code_predictor.") and k.endswith("weight")][0]
        assert not torch.equal(a.get_tensor(predictor), b.get_tensor(predictor)), predictor
    # The codec round-trip check of `thinktalk eval --speech-source codec:DIR` runs on the same codec.
    import thinktalk
    from thinktalk.data.evaluate import evaluate_speech, read_rows

    model = thinktalk.load(tiny_dir, components=("thinker",))
    processor = thinktalk.Processor.from_pretrained(tiny_dir)
    rows = read_rows(os.path.join(dataset, "val.jsonl"))
    check = evaluate_speech(model, processor, rows, dataset, count=3, source=f"codec:{codec}")
    assert check["rows"] == 3 and 0 <= check["nearest_own"] <= 1 and check["mean_mcd_own"] > 0
    with pytest.raises(ValueError, match="unknown speech source"):
        evaluate_speech(model, processor, rows, dataset, count=3, source="cassette")


def test_vision_warm_up_learns_labels_and_changes_only_the_vision(tiny_dir, tmp_path):
    """``python -m thinktalk.data.vision_warmup``: the vision encoder learns from the pictures' labels; the
    output checkpoint differs from its input in ``thinker.visual.*`` only, and never draws a held-out pair."""
    from safetensors import safe_open

    from thinktalk.data.vision_warmup import pictures, warm_up

    _, shape, colour = pictures(random.Random(0), 400)
    from thinktalk.data.scenes import SHAPES
    from thinktalk.data.vision_warmup import COLOUR_NAMES

    drawn = {(COLOUR_NAMES[c], SHAPES[s]) for s, c in zip(shape, colour)}
    assert drawn and not drawn & set(tasks.HELD_OUT_PAIRS)
    out = str(tmp_path / "warm")
    from thinktalk.data.vision_warmup import count_pictures

    _, counts = count_pictures(random.Random(0), 300)  # count pictures: only seen shape x count pairs
    drawn_counts = {(kind, int(n)) for c in counts for kind, n in zip(SHAPES, c) if n > 1}
    assert drawn_counts and not drawn_counts & set(tasks.HELD_OUT_COUNTS)
    result = warm_up(tiny_dir, out, steps=60, batch=16, lr=3e-3, log_every=60)
    first, last = result["log"][0], result["log"][-1]
    assert last["colour"] > first["colour"] + 0.3, result["log"]
    with (
        safe_open(os.path.join(tiny_dir, "model.safetensors"), "pt") as a,
        safe_open(os.path.join(out, "model.safetensors"), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        changed = {k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))}
    assert changed and all(k.startswith("thinker.visual.") for k in changed), sorted(changed)[:5]
    with pytest.raises(ValueError, match="must differ"):
        warm_up(tiny_dir, tiny_dir, steps=1)
