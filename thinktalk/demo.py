"""``thinktalk demo``: a scripted conversation with the model — pictures it draws, typed and spoken questions —
that prints each answer and its latencies and writes the spoken answers as WAV files.

On the embedded default model (thinktalk-tiny, trained by ``scripts/train_tiny.sh`` on pictures of coloured
shapes, small sums, repeated phrases and transcription) every question is of a kind it was trained on; the
spoken question is a recording shipped with the package (espeak-ng, a voice it never heard in training), so the
demo needs no speech tools. Any other Qwen-Omni checkpoint answers the same questions in its own way.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import time

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
SPOKEN_QUESTION = os.path.join(ASSETS, "demo", "what_colour_is_the_circle.wav")  # "What colour is the circle?"


@dataclasses.dataclass
class Turn:
    """One scripted question: what is shown (picture shapes, or a recording) and what is asked."""

    title: str
    text: str | None = None
    shapes: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (kind, colour) drawn on a picture
    audio: str | None = None
    seed: int = 0


def script() -> list[Turn]:
    return [
        Turn("a picture, typed question", "What colour is the circle?", [("circle", "blue"), ("square", "yellow")], seed=1),
        Turn("a picture, typed question", "What shape is this?", [("triangle", "orange")], seed=2),
        Turn("a picture, typed question", "How many squares are there?", [("square", "red")] * 2 + [("circle", "yellow")], seed=3),
        Turn("typed question", "What is three plus four?"),
        Turn("a picture, spoken question", None, [("circle", "purple"), ("triangle", "green")], audio=SPOKEN_QUESTION, seed=4),
        Turn("typed request", "Say good morning."),
    ]  # fmt: skip


def _picture(turn: Turn, path: str) -> str:
    from thinktalk.data.scenes import draw, place
    from thinktalk.data.tasks import PICTURE

    max_size = 48 if len(turn.shapes) == 1 else 28
    shapes = place(random.Random(turn.seed), turn.shapes, PICTURE, PICTURE, min_size=16, max_size=max_size)
    draw(shapes, PICTURE, PICTURE).save(path)
    return path


def run_demo(model_dir: str, out_dir: str = "demo_out", speak: bool = True, speaker: str | None = None,
             device: str = "cpu", max_new_tokens: int = 32, out=sys.stdout) -> list[dict]:  # fmt: skip
    """Run :func:`script` on ``model_dir``; returns one dict per turn (question, answer, latencies, files)."""
    import soundfile as sf
    import torch

    import thinktalk

    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    model = thinktalk.load(model_dir, device=device, components=None if speak else ("thinker",))
    proc = thinktalk.Processor.from_pretrained(model_dir)
    speak = speak and model.has_speech
    print(f"loaded {model_dir} in {time.perf_counter() - t0:.2f} s; answers and pictures go to {out_dir}/", file=out)
    results = []
    for i, turn in enumerate(script(), 1):
        content, shown = [], []
        if turn.shapes:
            picture = _picture(turn, os.path.join(out_dir, f"turn{i}.png"))
            content.append({"type": "image", "image": picture})
            shown.append(f"picture {picture} ({', '.join(f'{c} {k}' for k, c in turn.shapes)})")
        if turn.audio:
            content.append({"type": "audio", "audio": turn.audio})
            shown.append(f"spoken question {turn.audio}")
        if turn.text:
            content.append({"type": "text", "text": turn.text})
        inputs = proc([{"role": "user", "content": content}])
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False}
        if speak:
            kwargs.update(return_audio=True, talker_do_sample=False)
            if speaker:
                kwargs["speaker"] = speaker
        start = time.perf_counter()
        first_text = first_audio = None
        text, chunks, rate = [], [], 24000
        for ev in model.stream(**inputs, **kwargs):
            if ev.kind == "text":
                first_text = first_text if first_text is not None else time.perf_counter() - start
                text.append(ev.text)
            elif ev.kind == "audio":
                first_audio = first_audio if first_audio is not None else time.perf_counter() - start
                chunks.append(ev.audio.float().cpu().reshape(-1))
                rate = ev.sample_rate
        total = time.perf_counter() - start
        answer = "".join(text).strip()
        row = {"turn": i, "shown": shown, "question": turn.text or "(spoken) What colour is the circle?",
               "answer": answer, "first_text_s": first_text, "first_audio_s": first_audio, "total_s": total}  # fmt: skip
        print(f"\n[{i}] {turn.title}: " + "; ".join(shown) if shown else f"\n[{i}] {turn.title}", file=out)
        print(f"  Q: {row['question']}", file=out)
        print(f"  A: {answer}", file=out)
        timing = f"  first text {first_text or 0:.3f} s"
        if speak:
            audio = torch.cat(chunks) if chunks else torch.zeros(0)
            wav = os.path.join(out_dir, f"turn{i}.wav")
            sf.write(wav, audio.numpy(), rate, subtype="PCM_16")
            row.update(wav=wav, speech_s=audio.numel() / rate)
            timing += f", first audio {first_audio or 0:.3f} s, {row['speech_s']:.2f} s of speech -> {wav}"
        print(timing + f", total {total:.2f} s", file=out)
        results.append(row)
    return results
