"""Write thinktalk-tiny's data set: JSONL conversations (the trainer's format) + pictures, videos and speech.

``generate(out, seed, n_train, n_val, n_test)`` writes::

    out/train.jsonl   seen combinations, questions spoken by the training voices
    out/val.jsonl     seen combinations, new pictures/voices draws (in-distribution check)
    out/test.jsonl    held-out combinations only (tasks.HELD_OUT_*), spoken by voices never heard in training
    out/text.txt      every question and answer (the tokenizer's training text)
    out/media/...     PNG pictures, MP4 videos, 16 kHz question WAVs
    out/answers/...   each distinct answer spoken by espeak-ng in the target voice (22.05 kHz WAV)
    out/manifest.json the settings and the counts per split x task x modality

Each row: ``messages`` (user content = media + typed text or spoken audio; assistant = the answer sentence),
and ``task``, ``modality`` (``typed``/``spoken``), ``question``, ``answer``, ``key``, ``answer_audio``, ``split``,
``id``. Media paths are relative to the JSONL. Every row is drawn from its own ``random.Random`` seeded by
(seed, split, index), so the output is the same bytes for the same arguments.
"""

from __future__ import annotations

import json
import os
import random
import re

import numpy as np

from thinktalk.data import scenes, speech, tasks

SPLITS = ("train", "val", "test")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60]


def _task_for(rng: random.Random, split: str, index: int, kinds: tuple[str, ...]) -> str:
    if split == "train":
        weights = [tasks.TRAIN_WEIGHTS[t] for t in kinds]
        return rng.choices(kinds, weights)[0]
    return kinds[index % len(kinds)]


def make_row(out: str, seed: int, split: str, index: int, kinds: tuple[str, ...] = tasks.TASKS,
             spoken_share: float = 0.5) -> tuple[dict, list[str]]:  # fmt: skip
    """One row of ``split`` (media written under ``out/media/split``); returns (row, texts for the tokenizer)."""
    rng = random.Random(f"thinktalk-tiny/{seed}/{split}/{index}")
    task = _task_for(rng, split, index, kinds)
    item = tasks.make_item(task, rng, held_out=split == "test")
    voices = speech.TEST_VOICES if split == "test" else speech.TRAIN_VOICES
    media_dir = os.path.join(out, "media", split)
    os.makedirs(media_dir, exist_ok=True)
    stem = f"{index:06d}"
    content: list[dict] = []
    heard: list[str] = []  # voices of this row's speech (a held-out combination in the test split)

    def spoken(text: str, suffix: str) -> str:
        voice, speed = rng.choice(voices), rng.choice(speech.SPEEDS)
        heard.append(voice)
        pitch, snr = rng.randint(35, 65), rng.uniform(18.0, 30.0)
        wave = speech.question_audio(text, voice, speed, pitch, snr, seed=rng.getrandbits(32))
        rel = f"media/{split}/{stem}_{suffix}.wav"
        speech.write_wav(os.path.join(out, rel), wave, speech.QUESTION_RATE)
        return rel

    if item.shapes:
        rel = f"media/{split}/{stem}.png"
        scenes.draw(item.shapes, tasks.PICTURE, tasks.PICTURE).save(os.path.join(out, rel))
        content.append({"type": "image", "image": rel})
    if item.video:
        # The shape's name is spoken at 0 s and 2 s of the 4 s clip (the audio-in-video interleave).
        word, rate = speech.espeak(item.video["kind"], rng.choice(voices), rng.choice(speech.SPEEDS))
        word = speech.resample(word, rate, speech.QUESTION_RATE)[: 2 * speech.QUESTION_RATE]
        track = np.zeros(4 * speech.QUESTION_RATE, dtype=np.float32)
        track[: len(word)] = word
        track[2 * speech.QUESTION_RATE : 2 * speech.QUESTION_RATE + len(word)] = word
        rel = f"media/{split}/{stem}.mp4"
        scenes.write_video(os.path.join(out, rel), item.video["kind"], item.video["colour"], item.video["direction"],
                           track, speech.QUESTION_RATE)  # fmt: skip
        content.append({"type": "video", "video": rel})
    if item.spoken_phrase is not None:
        content.append({"type": "audio", "audio": spoken(item.spoken_phrase, "said")})
    modality = "spoken" if item.spoken_phrase is not None else "typed"
    # Held-out arithmetic is spoken by the unseen voices (its only held-out kind); elsewhere spoken_share decides.
    if item.speakable and (rng.random() < spoken_share or (split == "test" and task == "arithmetic")):
        modality = "spoken"
        content.append({"type": "audio", "audio": spoken(item.question, "q")})
    else:
        content.append({"type": "text", "text": item.question})
    row = {
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": item.answer}],
        "id": f"{split}-{stem}",
        "split": split,
        "task": task,
        "modality": modality,
        "question": item.question,
        "answer": item.answer,
        "key": item.key,
        "answer_audio": f"answers/{_slug(item.answer)}.wav",
        "combinations": [[k, list(v) if isinstance(v, tuple) else v]
                         for k, v in tasks.item_combinations(item) + [("voice", v) for v in heard]],  # fmt: skip
    }
    texts = [item.question, item.answer] + ([item.spoken_phrase] if item.spoken_phrase else [])
    return row, texts


def generate(out: str, seed: int = 0, n_train: int = 2000, n_val: int = 100, n_test: int = 210,
             tasks_: tuple[str, ...] = tasks.TASKS, spoken_share: float = 0.5, answer_voice: str = speech.ANSWER_VOICE,
             answer_speed: int = speech.ANSWER_SPEED, progress: bool = False) -> dict:  # fmt: skip
    """Write the data set into ``out`` (see the module doc); returns the manifest."""
    for t in tasks_:
        if t not in tasks.TASKS:
            raise ValueError(f"unknown task {t!r} (known: {', '.join(tasks.TASKS)})")
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if not speech.have_espeak():
        raise FileNotFoundError("espeak-ng is not installed (apt-get install espeak-ng; scripts/setup.sh test does it)")
    os.makedirs(os.path.join(out, "answers"), exist_ok=True)
    texts: set[str] = set()
    answers: set[str] = set()
    counts: dict[str, dict[str, int]] = {}
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
        counts[split] = {}
        with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as fh:
            for i in range(n):
                row, row_texts = make_row(out, seed, split, i, tasks_, spoken_share)
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                texts.update(row_texts)
                answers.add(row["answer"])
                key = f"{row['task']}/{row['modality']}"
                counts[split][key] = counts[split].get(key, 0) + 1
                if progress and (i + 1) % 200 == 0:
                    print(f"{split}: {i + 1}/{n}", flush=True)
    for answer in sorted(answers):
        path = os.path.join(out, "answers", f"{_slug(answer)}.wav")
        if not os.path.exists(path):
            wave, rate = speech.espeak(answer, answer_voice, answer_speed)
            speech.write_wav(path, wave, rate)
    with open(os.path.join(out, "text.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(sorted(texts)) + "\n")
    manifest = {
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "tasks": list(tasks_),
        "spoken_share": spoken_share,
        "answer_voice": answer_voice,
        "answer_speed": answer_speed,
        "train_voices": list(speech.TRAIN_VOICES),
        "test_voices": list(speech.TEST_VOICES),
        "held_out_pairs": sorted(map(list, tasks.HELD_OUT_PAIRS)),
        "held_out_counts": sorted(map(list, tasks.HELD_OUT_COUNTS)),
        "answers": len(answers),
        "counts": counts,
    }
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
    return manifest
