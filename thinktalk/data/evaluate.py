"""``thinktalk eval``: thinktalk-tiny on a held-out split — text accuracy per task x modality, and speech checks.

Text: every row's question (typed or spoken) is answered greedily; a row is ``exact`` when the normalised answer
equals the expected sentence and ``key`` when its deciding word is right (the colour, the shape, the count, the
result, the phrase). ``target`` is the issue's figure: key accuracy over the picture, count and arithmetic tasks.

Speech, without any external ASR (``--speech N``): the model speaks the answers of N rows with distinct answers;
(a) its own transcription task ("What did I say?") on each spoken answer, word accuracy against the text it
spoke, and (b) DTW-aligned mel-cepstral distance (:mod:`thinktalk.data.mcd`) from each spoken answer to
espeak-ng's rendering of the same text (``answers/`` of the data set) against the renderings of the other
answers: the share nearest to its own. ``--speech-source espeak-VOICE`` runs the same checks with espeak-ng
speaking in VOICE instead of the model (what a perfect Talker with another voice would score);
``--speech-source codec:DIR`` with each answer's own rendering sent through the codec in DIR (encode, decode: the
codec round trip, the best a Talker predicting that codec's codes can sound).
"""

from __future__ import annotations

import json
import os
import re
import time

import numpy as np

from thinktalk.data.scenes import COLOURS, SHAPES
from thinktalk.data.tasks import DIRECTIONS, NUMBERS

TARGET_TASKS = ("colour", "shape", "count", "arithmetic")


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def key_correct(task: str, key: str, prediction: str) -> bool:
    """Whether ``prediction`` gives the deciding word(s) ``key`` of a ``task`` answer (and no competing one)."""
    words = normalise(prediction).split()
    if task in ("colour", "shape"):
        vocab = COLOURS if task == "colour" else SHAPES
        return {w for w in words if w in vocab} == {key}
    if task in ("count", "arithmetic"):
        numbers = [w for w in words if w in NUMBERS]
        if not numbers:
            return False
        return (numbers[0] if task == "count" else numbers[-1]) == key
    if task == "video":
        wanted = key.split()
        return all(w in words for w in wanted) and {w for w in words if w in (*COLOURS, *SHAPES, *DIRECTIONS)} == set(
            wanted
        )
    if task in ("say", "transcribe"):
        said = normalise(prediction)
        return said == normalise(key) or said == normalise(f"you said {key}")
    raise ValueError(f"unknown task {task!r}")


def word_accuracy(reference: str, hypothesis: str) -> float:
    """1 - word error rate (Levenshtein over words), floored at 0."""
    ref, hyp = normalise(reference).split(), normalise(hypothesis).split()
    if not ref:
        raise ValueError("word_accuracy: empty reference")
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return max(0.0, 1.0 - prev[-1] / len(ref))


def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def prompt_of(row: dict, base: str) -> list[dict]:
    """The row's conversation without its assistant answer, media paths made absolute."""
    messages = []
    for m in row["messages"]:
        if m["role"] == "assistant":
            break
        content = m["content"]
        if isinstance(content, list):
            content = [dict(item) for item in content]
            for item in content:
                for kind in ("image", "audio", "video"):
                    if isinstance(item.get(kind), str) and not os.path.isabs(item[kind]):
                        item[kind] = os.path.join(base, item[kind])
        messages.append({"role": m["role"], "content": content})
    return messages


def answer(model, processor, conversation: list[dict], max_new_tokens: int = 24) -> str:
    inputs = processor(conversation)
    res = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return res.text[0] if res.text else ""


def evaluate_text(model, processor, rows: list[dict], base: str, progress: bool = False) -> dict:
    """Per ``task/modality``: rows, exact and key accuracy; plus ``target`` and the predictions."""
    from thinktalk.data.tasks import ASR_INSTRUCTIONS

    groups: dict[str, dict] = {}
    predictions, asr = [], []
    for n, row in enumerate(rows, 1):
        pred = answer(model, processor, prompt_of(row, base))
        exact = normalise(pred) == normalise(row["answer"])
        key = key_correct(row["task"], row["key"], pred)
        if row["task"] == "transcribe" and row["question"] in ASR_INSTRUCTIONS:
            asr.append(word_accuracy(row["key"], pred))  # the prompt model.transcribe and the server send
        g = groups.setdefault(f"{row['task']}/{row['modality']}", {"rows": 0, "exact": 0, "key": 0})
        g["rows"] += 1
        g["exact"] += exact
        g["key"] += key
        predictions.append({"id": row["id"], "expected": row["answer"], "predicted": pred, "exact": exact, "key": key})
        if progress and n % 50 == 0:
            print(f"  {n}/{len(rows)} rows", flush=True)
    summary = {
        name: {"rows": g["rows"], "exact": g["exact"] / g["rows"], "key": g["key"] / g["rows"]}
        for name, g in sorted(groups.items())
    }
    result = {"groups": summary, "predictions": predictions}
    for modality in ("typed", "spoken"):
        sel = [g for name, g in groups.items() if name.split("/")[0] in TARGET_TASKS and name.endswith(modality)]
        if sel:
            result[f"target_{modality}"] = sum(g["key"] for g in sel) / sum(g["rows"] for g in sel)
    if asr:  # word accuracy of the transcripts asked with the official ASR instructions
        result["asr_word_accuracy"], result["asr_rows"] = float(np.mean(asr)), len(asr)
    result["exact_all"] = sum(p["exact"] for p in predictions) / max(1, len(predictions))
    result["key_all"] = sum(p["key"] for p in predictions) / max(1, len(predictions))
    return result


def transcribe_own(model, processor, wave: np.ndarray, rate: int) -> str:
    """The model's own transcription task on a waveform: the phrase it says it heard ("You said X." -> "X")."""
    from thinktalk.data.mcd import resample

    audio = resample(wave, rate, 16000).astype(np.float32)
    conversation = [
        {"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "What did I say?"}]}
    ]
    text = answer(model, processor, conversation)
    said = re.sub(r"^\s*you said\s*", "", text, flags=re.IGNORECASE)
    return said.strip().rstrip(".")


def evaluate_speech(model, processor, rows: list[dict], base: str, count: int = 8, source: str = "model",
                    speaker: str | None = None) -> dict:  # fmt: skip
    """The two speech checks on ``count`` rows with distinct answers (see the module doc)."""
    import soundfile as sf

    from thinktalk.data import mcd, speech

    chosen, seen = [], set()
    for row in rows:
        if row["answer"] not in seen:
            seen.add(row["answer"])
            chosen.append(row)
        if len(chosen) == count:
            break
    if len(chosen) < 2:
        raise ValueError("the speech checks need at least 2 rows with distinct answers")
    spoken, references, accuracy = [], [], []
    codec = None
    if source.startswith("codec:"):
        import torch

        from thinktalk.codec import load_codec
        from thinktalk.processing.media import load_audio

        codec = load_codec(source[len("codec:") :]).eval()
    for row in chosen:
        if source in ("model", "model-sampled"):  # the Talker greedy, or sampling as the family's defaults do
            inputs = processor(prompt_of(row, base))
            sampled = {"seed": len(spoken)} if source == "model-sampled" else {"talker_do_sample": False}
            res = model.generate(**inputs, max_new_tokens=24, do_sample=False, return_audio=True, speaker=speaker,
                                 **sampled)  # fmt: skip
            wave, rate = res.audio[0].float().cpu().numpy().reshape(-1), res.sample_rate
            text = res.text[0]
        elif source.startswith("espeak-"):
            wave, rate = speech.espeak(row["answer"], source[len("espeak-") :], 175)
            text = row["answer"]
        elif codec is not None:
            rate = codec.cfg.sample_rate
            wav = torch.as_tensor(load_audio(os.path.join(base, row["answer_audio"]), target_rate=rate))
            with torch.no_grad():
                wave = codec.decode(codec.encode(wav.float().reshape(1, 1, -1))).reshape(-1).numpy()
            text = row["answer"]
        else:
            raise ValueError(f"unknown speech source {source!r} (model, model-sampled, espeak-VOICE or codec:DIR)")
        if wave.size < 800:
            wave = np.concatenate([wave, np.zeros(800 - wave.size, dtype=np.float32)])
        spoken.append((wave, rate))
        ref, ref_rate = sf.read(os.path.join(base, row["answer_audio"]), dtype="float32")
        references.append((ref, ref_rate))
        said = transcribe_own(model, processor, wave, rate)
        accuracy.append(
            {"text": text, "transcribed": said, "word_accuracy": word_accuracy(re.sub(r"[.?!]", "", text) or "x", said)}
        )
    check = mcd.nearest_check(spoken, references)
    return {"source": source, "rows": len(chosen), "nearest_own": check["nearest_own"], "mean_mcd_own": check["mean_mcd_own"],
            "mean_mcd_other": check["mean_mcd_other"],
            "own_transcription_word_accuracy": float(np.mean([a["word_accuracy"] for a in accuracy])),
            "transcriptions": accuracy}  # fmt: skip


def run(model_dir: str, data: str, limit: int | None = None, speech_rows: int = 0, speech_source: str = "model",
        out: str | None = None, progress: bool = True) -> dict:  # fmt: skip
    import thinktalk

    start = time.perf_counter()
    components = None if speech_rows and speech_source in ("model", "model-sampled") else ("thinker",)
    model = thinktalk.load(model_dir, components=components)
    processor = thinktalk.Processor.from_pretrained(model_dir)
    rows = read_rows(data)[:limit] if limit else read_rows(data)
    base = os.path.dirname(os.path.abspath(data))
    result = {"model": model_dir, "data": data, **evaluate_text(model, processor, rows, base, progress)}
    if speech_rows:
        result["speech"] = evaluate_speech(model, processor, rows, base, speech_rows, speech_source)
    result["seconds"] = time.perf_counter() - start
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return result


def format_report(result: dict) -> str:
    lines = [f"{'task/modality':24s} {'rows':>5s} {'exact':>7s} {'key':>7s}"]
    for name, g in result["groups"].items():
        lines.append(f"{name:24s} {g['rows']:5d} {g['exact']:7.1%} {g['key']:7.1%}")
    lines.append(f"{'all':24s} {len(result['predictions']):5d} {result['exact_all']:7.1%} {result['key_all']:7.1%}")
    for modality in ("typed", "spoken"):
        if f"target_{modality}" in result:
            lines.append(f"target (picture, count, arithmetic; {modality}): {result[f'target_{modality}']:.1%}")
    if "asr_word_accuracy" in result:
        lines.append(f"transcription with the official ASR instructions: word accuracy {result['asr_word_accuracy']:.1%} "
                     f"({result['asr_rows']} rows)")  # fmt: skip
    s = result.get("speech")
    if s:
        lines.append(f"speech ({s['source']}, {s['rows']} answers): nearest own rendering {s['nearest_own']:.0%}, "
                     f"MCD own {s['mean_mcd_own']:.1f} dB vs other {s['mean_mcd_other']:.1f} dB, "
                     f"own transcription word accuracy {s['own_transcription_word_accuracy']:.0%}")  # fmt: skip
    return "\n".join(lines)


def add_arguments(ap) -> None:
    ap.add_argument("model", help="checkpoint directory")
    ap.add_argument("data", help="a JSONL split written by python -m thinktalk.data (test.jsonl: held out)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N rows")
    ap.add_argument(
        "--speech", type=int, default=0, metavar="N", help="also run the speech checks on N distinct answers"
    )
    ap.add_argument(
        "--speech-source",
        default="model",
        help="model (the Talker speaks, greedy), model-sampled (sampling as the family defaults, as chat and serve do), "
        "espeak-VOICE (a control) or codec:DIR (codec round trips of the renderings)",
    )
    ap.add_argument("--out", default=None, help="write the full result (predictions included) as JSON")


def main_args(a) -> int:
    result = run(a.model, a.data, a.limit, a.speech, a.speech_source, a.out)
    print(format_report(result))
    print(f"[{result['seconds']:.1f} s]")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="thinktalk eval", description="thinktalk-tiny on a held-out split")
    add_arguments(ap)
    return main_args(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
