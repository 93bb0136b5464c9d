"""Talker recipes (talker, dpo, speaker) on tiny checkpoints of both families: the loss falls and, after
training, the Talker speaks the trained codes for the trained prompt and answer (greedy, the Thinker
teacher-forced on the answer as in TTS); the DPO margin rises; a new voice is usable by name; the exported
checkpoints load in the reference (transformers 5.23) with equal Talker logits / codes."""

from __future__ import annotations

import json
import os

import pytest
import torch

import thinktalk
from tests.qwen3_fixtures import tiny3  # noqa: F401
from tests.train_helpers import changed, run, tensors, tone, write_jsonl
from thinktalk.generation import api
from thinktalk.generation.inputs import ModelInputs
from thinktalk.generation.sampling import SamplingParams
from thinktalk.testing.speech import qwen3_reference_speech

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPT, ANSWER = "Say hello.", "Hello there!"
CODES25 = [17, 301, 5, 88, 1200, 64, 64, 9]  # Qwen2.5 Talker codec ids


def codes3(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (n, 16), generator=g).tolist()


def row(codes=None, **extra) -> dict:
    r = {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]}
    if codes is not None:
        r["codes"] = codes
    r.update(extra)
    return r


def spoken_codes(directory, speaker=None, max_codes=20) -> torch.Tensor:
    """Greedy codes the checkpoint speaks for PROMPT / ANSWER (the Thinker reads ANSWER, then its end token)."""
    model = thinktalk.load(str(directory))
    proc = thinktalk.Processor.from_pretrained(str(directory))
    inputs = ModelInputs.from_dict(proc([{"role": "user", "content": PROMPT}]))
    events = api.speak(model, inputs, proc.tokenizer.encode(ANSWER), speaker=speaker, max_new_codes=max_codes,
                       sampling=SamplingParams())  # fmt: skip
    done = [ev for ev in events if ev.kind == "done"][0]
    return done.codes[0]


def reference_matches_qwen25(directory, speaker: str) -> None:
    """The Talker's logits of every step equal the reference's on the exported checkpoint (greedy, padded prompt)."""
    from thinktalk.testing.speech import THINKER_EOS, reference_speech, synthetic_inputs

    ref = transformers.Qwen2_5OmniForConditionalGeneration.from_pretrained(str(directory)).eval()
    model = thinktalk.load(str(directory))
    inputs = synthetic_inputs("text", seed=3)
    gen = {"talker_do_sample": False, "talker_max_new_tokens": 12, "token2wav_num_steps": 2, "speaker": speaker}
    expected = reference_speech(ref, inputs, thinker_max_new_tokens=6, thinker_do_sample=False,
                                thinker_eos_token_id=list(THINKER_EOS), **gen)  # fmt: skip
    logits = []
    hook = model.talker.register_forward_hook(lambda m, args, out: logits.append(out[:, -1]))
    try:
        res = model.generate(**inputs, return_audio=True, max_new_tokens=6, **gen)
    finally:
        hook.remove()
    assert torch.equal(res.text_ids, expected.text_ids)
    torch.testing.assert_close(torch.stack(logits, dim=1), expected.logits, atol=2e-4, rtol=1e-4)


def reference_matches_qwen3(directory, speaker: str) -> torch.Tensor:
    """Greedy text and codes of the reference equal ours on the exported checkpoint; returns the codes."""
    ref = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(directory), dtype=torch.float32).eval()
    model = thinktalk.load(str(directory))
    proc = thinktalk.Processor.from_pretrained(str(directory))
    inputs = proc([{"role": "user", "content": PROMPT}])
    ref_ids, ref_codes, _ = qwen3_reference_speech(ref, inputs, speaker=speaker, thinker_max_new_tokens=6,
                                                   thinker_do_sample=False, thinker_eos_token_id=151645,
                                                   talker_do_sample=False, talker_max_new_tokens=10)  # fmt: skip
    ours = model.generate(**inputs, speaker=speaker, return_audio=True, max_new_tokens=6, eos_token_id=151645,
                          talker_do_sample=False, talker_max_new_tokens=10)  # fmt: skip
    assert torch.equal(ours.text_ids, ref_ids)
    assert torch.equal(ours.codes[0], ref_codes)
    return ours.codes[0]


def test_talker_qwen25_speaks_the_trained_codes(tiny25, tmp_path):
    data = write_jsonl(str(tmp_path / "speech.jsonl"), [row(CODES25)])
    out = tmp_path / "talker"
    before = spoken_codes(tiny25)
    res = run(tiny25, data, out, recipe="talker", max_steps=30, lr=2e-2, batch_size=1)
    print("talker qwen2.5 losses", [round(x, 3) for x in res.losses])
    assert res.losses[-1] < 0.1 * res.losses[0]
    diff = changed(tensors(tiny25), tensors(out))
    assert diff and all(n.startswith("talker.") for n in diff)  # the Thinker and Token2Wav are the base's
    after = spoken_codes(out)
    print("before", before.flatten().tolist(), "after", after.flatten().tolist())
    assert after.flatten().tolist() == CODES25
    assert before.flatten().tolist() != CODES25
    reference_matches_qwen25(out, "Chelsie")


def test_talker_qwen3_speaks_the_trained_frames(tiny3, tmp_path):  # noqa: F811
    frames = codes3(5, seed=1)
    data = write_jsonl(str(tmp_path / "speech.jsonl"), [row(frames)])
    out = tmp_path / "talker"
    res = run(tiny3, data, out, recipe="talker", max_steps=30, lr=2e-2, batch_size=1)
    rs = res.records
    print("talker qwen3 losses", [round(x, 3) for x in res.losses])
    assert res.losses[-1] < 0.1 * res.losses[0]
    assert rs[-1]["codec_loss"] < 0.1 * rs[0]["codec_loss"] and rs[-1]["predictor_loss"] < 0.1 * rs[0]["predictor_loss"]
    diff = changed(tensors(tiny3), tensors(out))
    assert any(n.startswith("talker.code_predictor.") for n in diff)  # both trained
    assert any(n.startswith("talker.model.layers.") for n in diff)
    assert all(n.startswith("talker.") for n in diff)
    after = spoken_codes(out)
    assert after.tolist() == frames
    reference_matches_qwen3(out, "ethan")


def test_dpo_margin_rises_qwen25(tiny25, tmp_path):
    rejected = [c + 400 for c in CODES25]
    data = write_jsonl(str(tmp_path / "prefs.jsonl"), [row(chosen=CODES25, rejected=rejected)])
    out = tmp_path / "dpo"
    res = run(tiny25, data, out, recipe="dpo", max_steps=8, lr=5e-3, batch_size=1, beta=0.1)
    rs = res.records
    print("dpo qwen2.5 margin", [round(r["margin"], 3) for r in rs], "loss", [round(x, 3) for x in res.losses])
    assert all({"margin", "reward_chosen", "reward_rejected", "accuracy"} <= set(r) for r in rs)
    assert abs(rs[0]["margin"]) < 1e-4 and abs(rs[0]["loss"] - 0.6931) < 1e-3  # the policy starts as the reference
    assert rs[-1]["margin"] > rs[0]["margin"] + 1.0 and rs[-1]["accuracy"] == 1.0
    assert rs[-1]["reward_chosen"] > 0 > rs[-1]["reward_rejected"]
    assert all(n.startswith("talker.") for n in changed(tensors(tiny25), tensors(out)))
    reference_matches_qwen25(out, "Chelsie")


def test_dpo_margin_rises_qwen3(tiny3, tmp_path):  # noqa: F811
    data = write_jsonl(str(tmp_path / "prefs.jsonl"), [row(chosen=codes3(4, 1), rejected=codes3(4, 2))])
    res = run(tiny3, data, tmp_path / "dpo", recipe="dpo", max_steps=6, lr=5e-3, batch_size=1, beta=0.1)
    rs = res.records
    print("dpo qwen3 margin", [round(r["margin"], 3) for r in rs])
    assert abs(rs[0]["margin"]) < 1e-3
    assert rs[-1]["margin"] > rs[0]["margin"] + 1.0


def info_speakers(directory) -> str:
    import contextlib
    import io

    from thinktalk.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["info", str(directory)]) == 0
    return next(line for line in buf.getvalue().splitlines() if line.startswith("speakers"))


def served_voices(model) -> list[str]:
    """The voices the server offers for ``model`` (its backend's model card)."""
    from thinktalk.serve.backend import SingleStreamBackend
    from thinktalk.serve.metrics import Metrics
    from thinktalk.serve.settings import ServeSettings

    backend = SingleStreamBackend(model, None, ServeSettings(), Metrics(), "tiny")
    assert backend.info.voice("NEWVOICE", None, "voice").lower() == "newvoice"  # resolved case-insensitively
    return backend.info.voices


def test_speaker_qwen25_new_voice_by_name(tiny25, tmp_path):
    tone(str(tmp_path / "voice.wav"), seconds=1.0, hz=180)
    data = write_jsonl(str(tmp_path / "voice.jsonl"), [row(CODES25, speech="voice.wav")])
    out = tmp_path / "speaker"
    res = run(tiny25, data, out, recipe="speaker", speaker_name="NewVoice", max_steps=30, lr=2e-2, batch_size=1)
    print("speaker qwen2.5 losses", [round(x, 3) for x in res.losses])
    assert res.losses[-1] < 0.1 * res.losses[0]
    base, after = tensors(tiny25), tensors(out)
    diff = changed(base, after)
    assert "thinker.model.embed_tokens.weight" in diff and all(
        n.startswith("talker.") for n in diff - {"thinker.model.embed_tokens.weight"}
    )
    voices = torch.load(out / "spk_dict.pt", weights_only=True)
    new = voices["NewVoice"]
    assert set(voices) == {"Chelsie", "Ethan", "NewVoice"} and new["bos_token"] not in (151870, 151872)
    rows = (after["thinker.model.embed_tokens.weight"] != base["thinker.model.embed_tokens.weight"]).any(-1)
    assert rows.nonzero().flatten().tolist() == [new["bos_token"]]  # one new row: the voice's text-bos token
    assert new["ref_mel"].shape[-1] == voices["Chelsie"]["ref_mel"].shape[-1] and new["ref_mel"].shape[1] == 100
    assert "NewVoice" in info_speakers(out)
    model = thinktalk.load(str(out))
    assert "NewVoice" in model.speakers and "NewVoice" in served_voices(model)
    assert spoken_codes(out, speaker="NewVoice").flatten().tolist() == CODES25
    reference_matches_qwen25(out, "NewVoice")


def test_speaker_qwen3_new_voice_by_name(tiny3, tmp_path):  # noqa: F811
    frames = codes3(4, seed=3)
    data = write_jsonl(str(tmp_path / "voice.jsonl"), [row(frames)])
    out = tmp_path / "speaker"
    res = run(tiny3, data, out, recipe="speaker", speaker_name="NewVoice", train_talker=False, max_steps=10, lr=5e-2,
              batch_size=1)  # fmt: skip
    print("speaker qwen3 losses (voice vector only)", [round(x, 3) for x in res.losses])
    assert res.losses[-1] < res.losses[0] - 0.05
    base, after = tensors(tiny3), tensors(out)
    assert changed(base, after) == {"talker.model.codec_embedding.weight"}
    with open(out / "config.json") as fh:
        ids = json.load(fh)["talker_config"]["speaker_id"]
    assert set(ids) == {"chelsie", "ethan", "aiden", "newvoice"}
    rows = (after["talker.model.codec_embedding.weight"] != base["talker.model.codec_embedding.weight"]).any(-1)
    assert rows.nonzero().flatten().tolist() == [ids["newvoice"]]
    assert "newvoice" in info_speakers(out)
    assert "newvoice" in served_voices(thinktalk.load(str(out)))
    assert spoken_codes(out, speaker="NewVoice").tolist() != spoken_codes(out, speaker="ethan").tolist()
    reference_matches_qwen3(out, "NewVoice")


@pytest.mark.parametrize(
    "recipe,data", [("talker", "speech.jsonl"), ("dpo", "speech_preferences.jsonl"), ("speaker", "voice.jsonl")]
)
def test_resume_continues_the_identical_loss_sequence(tiny25, tmp_path, recipe, data):
    import shutil

    data = os.path.join(ROOT, "recipes", "data", data)  # text, image and audio prompts
    extra = {"speaker_name": "NewVoice"} if recipe == "speaker" else {}
    common = dict(recipe=recipe, max_steps=4, batch_size=2, grad_accum=1, save_every=2, save_final=False, **extra)
    first = run(tiny25, data, tmp_path / "a", **common)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    second = run(tiny25, data, tmp_path / "b", **common)
    assert second.start_step == 2
    assert second.losses == first.losses[2:]  # bit for bit
    if recipe == "dpo":
        assert [r["margin"] for r in second.records] == [r["margin"] for r in first.records[2:]]


def test_speaker_qwen3_example_config_with_mimi_codes(tiny3, tmp_path):  # noqa: F811
    """recipes/speaker_qwen3.yaml from the command line: its recording is encoded by a (tiny) Mimi checkpoint."""
    import subprocess
    import sys

    from thinktalk.codec import load_mimi, qwen3_codes
    from thinktalk.processing.media import load_audio
    from thinktalk.testing.mimi import build_reference_mimi
    from thinktalk.train.data import Row
    from thinktalk.train.speech import CodeSource

    mimi = tmp_path / "mimi"
    build_reference_mimi(str(mimi), seed=0)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "thinktalk", "train", "recipes/speaker_qwen3.yaml", f"model={tiny3}", f"output_dir={out}",
         f"codec_model={mimi}", "max_steps=3", "lr=1e-2", "grad_accum=1", "save_every=0", "progress=false",
         "gradient_checkpointing=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "config.json") as fh:
        assert "newvoice" in json.load(fh)["talker_config"]["speaker_id"]
    enc = load_mimi(str(mimi))
    wav = load_audio(os.path.join(ROOT, "recipes", "data", "media", "new_voice.wav"), target_rate=enc.cfg.sampling_rate)
    codes = qwen3_codes(enc, wav, enc.cfg.sampling_rate)
    assert codes.shape[0] == 16 and codes.shape[1] == 19  # 1.5 s at 12.5 Hz
    path = os.path.join(ROOT, "recipes", "data", "voice_qwen3.jsonl")
    with open(path) as fh:
        first = Row(path, 1, json.loads(fh.readline()))
    source = CodeSource(thinktalk.load(tiny3, components=("thinker", "talker")), str(mimi))
    assert torch.equal(source(first, "codes"), codes.T)  # the row's recording, as the Talker's frames
    assert "newvoice" in info_speakers(out)


def test_bad_codes_are_clear_errors(tiny25, tmp_path):
    from thinktalk.train.data import DataError

    cases = [
        (row([[1, 2], [3, 4]]), "Qwen2.5-Omni codes are a flat list"),
        (row([1, 2, 99999]), r"codec ids must lie in 0 \.\. 8291"),
        (row([]), "is empty"),
        (row(speech="x.wav"), "Qwen2.5-Omni's codec encoder is not released"),
        (row(), "the row needs 'codes'"),
        ({"messages": [{"role": "user", "content": PROMPT}], "codes": [1]}, "the spoken answer as the last"),
    ]
    for i, (r, message) in enumerate(cases):
        data = write_jsonl(str(tmp_path / f"bad{i}.jsonl"), [r])
        with pytest.raises(DataError, match=message):
            run(tiny25, data, tmp_path / f"out{i}", recipe="talker", max_steps=1)
    data = write_jsonl(str(tmp_path / "prefs.jsonl"), [row(chosen=[1, 2])])
    with pytest.raises(DataError, match="the row needs 'rejected'"):
        run(tiny25, data, tmp_path / "dpo", recipe="dpo", max_steps=1)
    data = write_jsonl(str(tmp_path / "ok.jsonl"), [row([1, 2])])
    with pytest.raises(ValueError, match="already has a voice 'chelsie'"):
        run(tiny25, data, tmp_path / "sp", recipe="speaker", speaker_name="chelsie", max_steps=1)
    with pytest.raises(ValueError, match="set speaker_name"):
        run(tiny25, data, tmp_path / "sp2", recipe="speaker", max_steps=1)


def test_activation_checkpointing_keeps_the_numbers(tiny3, tmp_path):  # noqa: F811
    from thinktalk.train.distributed import decoder_layers

    model = thinktalk.load(tiny3, components=("thinker", "talker"))
    names = {n for n, m in model.named_modules() if any(m is layer for layer in decoder_layers(model))}
    assert any(n.startswith("talker.model.layers.") for n in names)
    assert any(n.startswith("talker.code_predictor.model.layers.") for n in names)
    data = write_jsonl(str(tmp_path / "speech.jsonl"), [row(codes3(3, 1))])
    plain = run(tiny3, data, tmp_path / "a", recipe="talker", max_steps=3, batch_size=1, save_final=False)
    ckpt = run(tiny3, data, tmp_path / "b", recipe="talker", max_steps=3, batch_size=1, save_final=False,
               gradient_checkpointing=True)  # fmt: skip
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6)


def test_two_processes_track_one(tiny25, tmp_path):
    """FSDP2 over 2 gloo processes (Talker layers sharded) tracks the one-process run of the same global batch."""
    from tests.test_train_distributed import losses, torchrun

    data = os.path.join(ROOT, "recipes", "data", "speech.jsonl")
    single = run(tiny25, data, tmp_path / "one", recipe="talker", max_steps=3, batch_size=4, lr=3e-3)
    config = tmp_path / "talker.yaml"
    config.write_text(f"recipe: talker\nmodel: {tiny25}\ndata: {data}\nmax_steps: 3\nlr: 3.0e-3\nprogress: false\n"
                      "tensorboard: false\nlength_bucketing: false\nsave_every: 0\n")  # fmt: skip
    torchrun(str(config), f"output_dir={tmp_path / 'two'}", "batch_size=2", "gradient_checkpointing=true")
    two = losses(tmp_path / "two")
    print("1 process", single.losses, "\n2 processes", two)
    assert two == pytest.approx(single.losses, rel=1e-4)
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4)


def recipe_for(directory, name: str = "talker", **options):
    """A recipe on a loaded checkpoint, outside the trainer (set up; data encoded by the caller)."""
    import contextlib

    from thinktalk.train.config import load_config
    from thinktalk.train.recipes import recipe_class
    from thinktalk.train.recipes.base import RecipeContext

    base = {"recipe": name, "model": str(directory), "data": "unused.jsonl", "output_dir": "unused", **options}
    loaded = load_config(None, base=base)
    model = thinktalk.load(str(directory))
    proc = thinktalk.Processor.from_pretrained(str(directory))
    ctx = RecipeContext(
        cfg=loaded.train, options=loaded.options, model=model, processor=proc, device=torch.device("cpu")
    )
    ctx.generation = contextlib.nullcontext  # one process: the weights are whole
    recipe = recipe_class(name)(ctx)
    recipe.setup()
    return recipe


@pytest.mark.parametrize("media", ["text", "image", "audio"])
@pytest.mark.parametrize("family", ["qwen2_5_omni", "qwen3_omni_moe"])
def test_teacher_forced_talker_equals_inference(request, tmp_path, family, media):
    """The training sequence is the inference sequence: teacher-forced on the codes the Talker chose greedily
    (the Thinker reading the answer), every position's logits equal those generation computed — codebook 0
    and, for Qwen3-Omni, every code predictor step."""
    from tests.train_helpers import picture
    from thinktalk.train import speech
    from thinktalk.train.data import Row, collate
    from thinktalk.train.recipes.base import StepInfo

    directory = request.getfixturevalue("tiny25" if family == "qwen2_5_omni" else "tiny3")
    recipe = recipe_for(directory)
    model, proc = recipe.model, recipe.processor
    content = [{"type": "text", "text": PROMPT}]
    if media == "image":
        content.insert(0, {"type": "image", "image": picture(str(tmp_path / "p.png"), seed=1)})
    elif media == "audio":
        content.insert(0, {"type": "audio", "audio": tone(str(tmp_path / "t.wav"), seconds=1.0, hz=330)})
    messages = [{"role": "user", "content": content}]
    talker = model.talker
    codec_steps, predictor_steps = [], {}
    if family == "qwen2_5_omni":
        c = talker.cfg
        with torch.no_grad():  # the tiny random head favours ids above the specials, which are no speech
            talker.codec_head.weight[
                max(c.tts_codec_pad_token_id, c.tts_codec_end_token_id, c.tts_codec_mask_token_id) + 1 :
            ] = 0
        hooks = [talker.register_forward_hook(lambda m, a, out: codec_steps.append(out[0, -1].clone()))]
    else:
        hooks = [talker.codec_head.register_forward_hook(lambda m, a, out: codec_steps.append(out[0].clone()))]
        for j, head in enumerate(talker.code_predictor.lm_head):
            hooks.append(
                head.register_forward_hook(
                    lambda m, a, out, j=j: predictor_steps.setdefault(j, []).append(out[0].clone())
                )
            )
    try:
        inputs = ModelInputs.from_dict(proc(messages))
        events = api.speak(model, inputs, proc.tokenizer.encode(ANSWER), max_new_codes=8, sampling=SamplingParams())
        codes = [ev for ev in events if ev.kind == "done"][0].codes[0]
    finally:
        for h in hooks:
            h.remove()
    codes = codes.reshape(-1) if family == "qwen2_5_omni" else codes  # logits are suppressed in place: cloned
    assert codes.shape[0] > 0
    data = {"messages": [*messages, {"role": "assistant", "content": ANSWER}], "codes": codes.tolist()}
    ex = recipe.encode(Row(str(tmp_path / "rows.jsonl"), 1, data))
    batch = recipe.prepare(collate([[ex]], proc.tokenizer.pad_token_id), StepInfo(step=1, micro=0))
    with torch.no_grad():
        codec, predictor = speech.sequence_logits(model, talker, recipe.sequences(talker, batch, "codes"))
    steps = min(len(codec_steps), codec[0].shape[0])
    assert steps >= codes.shape[0]
    torch.testing.assert_close(codec[0][:steps], torch.stack(codec_steps[:steps]).float(), atol=2e-4, rtol=1e-4)
    if predictor is not None:
        n = codes.shape[0]
        expected = torch.stack([torch.stack(predictor_steps[j][:n]) for j in sorted(predictor_steps)], dim=1)
        torch.testing.assert_close(predictor[0], expected.float(), atol=2e-4, rtol=1e-4)


def test_codes_from_the_projects_codec(tiny3, tmp_path):  # noqa: F811
    """A row's recording encoded by a codec of thinktalk.codec (16 codebooks at 12.5 Hz fit the Talker)."""
    from thinktalk.codec import Codec, CodecConfig, save_codec
    from thinktalk.processing.media import load_audio
    from thinktalk.train.data import Row
    from thinktalk.train.speech import CodeSource

    cfg = {
        "code2wav_config": {"codebook_size": 64, "num_quantizers": 16, "hidden_size": 16, "intermediate_size": 32,
                            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                            "sliding_window": 4, "decoder_dim": 16},
        "encoder": {"channels": 8, "max_channels": 16, "residual_dilations": [1], "frontend_mels": 32},
        "quantizer": {"codebook_dim": 8, "kmeans_iters": 2},
    }  # fmt: skip
    torch.manual_seed(0)
    codec = Codec(CodecConfig.from_dict(cfg)).eval()
    save_codec(codec, tmp_path / "codec")
    wav_path = tone(str(tmp_path / "voice.wav"), seconds=0.8, hz=200)
    source = CodeSource(thinktalk.load(tiny3, components=("thinker", "talker")), str(tmp_path / "codec"))
    codes = source(Row(str(tmp_path / "rows.jsonl"), 1, row(speech="voice.wav")), "codes")
    wav = torch.as_tensor(load_audio(wav_path, target_rate=24000), dtype=torch.float32)
    assert torch.equal(codes, codec.encode(wav.reshape(1, 1, -1))[0].T)
    assert codes.shape == (10, 16)  # 0.8 s at 12.5 Hz
