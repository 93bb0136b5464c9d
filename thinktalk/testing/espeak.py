"""Speech for tests and demos, spoken by espeak-ng (no downloads): a few sentences × voices × speeds."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Speech codecs turn sound into a short list of numbers.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "She can scoop these things into three red bags, and we will go meet her Wednesday at the train station.",
)
VOICES = ("en", "en-us", "en-gb-x-rp", "en+f3")
SPEEDS = (150, 185)


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def speech_corpus(directory: str | os.PathLike, count: int = 8, sentences=SENTENCES, voices=VOICES, speeds=SPEEDS) -> list[str]:
    """Write ``count`` WAV files (espeak-ng's native 22.05 kHz, mono) into ``directory``; return their paths.

    File i speaks sentence i mod len(sentences) with the i-th (voice, speed) combination, so every file
    differs. Raises FileNotFoundError when espeak-ng is not installed (``apt-get install espeak-ng``).
    """
    if not have_espeak():
        raise FileNotFoundError("espeak-ng is not installed (apt-get install espeak-ng; scripts/setup.sh test does it)")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    combos = list(itertools.product(voices, speeds))
    paths = []
    for i in range(count):
        voice, speed = combos[i % len(combos)]
        path = os.path.join(directory, f"speech_{i:03d}.wav")
        text = sentences[i % len(sentences)]
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", path, text], check=True, capture_output=True)
        paths.append(path)
    return paths


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m thinktalk.testing.espeak", description="write espeak-ng speech WAVs")
    ap.add_argument("directory")
    ap.add_argument("--count", type=int, default=16)
    a = ap.parse_args()
    print(f"wrote {len(speech_corpus(a.directory, a.count))} files to {a.directory}")
