"""Speech by espeak-ng (no downloads): questions in many voices/speeds with light noise, answers in a target voice."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np

# Voices of the spoken questions; the held-out split speaks with voices never heard in training.
TRAIN_VOICES = ("en-us", "en", "en-gb-x-rp", "en+f3", "en+m3", "en-029")
TEST_VOICES = ("en-gb-scotland", "en+f2")
SPEEDS = (140, 160, 180)
# The voice the answers are rendered in (codec and Talker training targets; the MCD reference).
ANSWER_VOICE = "en-us"
ANSWER_SPEED = 160
QUESTION_RATE = 16000  # the processor's audio rate


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak(text: str, voice: str = ANSWER_VOICE, speed: int = ANSWER_SPEED, pitch: int = 50) -> tuple[np.ndarray, int]:
    """``text`` spoken by espeak-ng: (float32 mono waveform, its sample rate: espeak's native 22050 Hz)."""
    import soundfile as sf

    if not have_espeak():
        raise FileNotFoundError("espeak-ng is not installed (apt-get install espeak-ng; scripts/setup.sh test does it)")
    if not text.strip():
        raise ValueError("espeak: empty text")
    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text]
    out = subprocess.run(cmd, check=True, capture_output=True).stdout
    wave, rate = sf.read(io.BytesIO(out), dtype="float32")
    return wave, rate


def resample(wave: np.ndarray, source: int, target: int) -> np.ndarray:
    import soxr

    return wave if source == target else soxr.resample(wave, source, target, quality="soxr_hq").astype(np.float32)


def add_noise(wave: np.ndarray, rng: np.random.Generator, snr_db: float, power: float | None = None) -> np.ndarray:
    """White noise at ``snr_db`` below the speech's power (``power``; default: the wave's), then a peak limit of 0.99."""
    power = float(np.mean(wave**2)) + 1e-12 if power is None else power
    noisy = wave + rng.standard_normal(wave.shape).astype(np.float32) * np.sqrt(power / 10 ** (snr_db / 10))
    peak = float(np.max(np.abs(noisy))) or 1.0
    return (noisy / max(1.0, peak / 0.99)).astype(np.float32)


LEAD_S, TAIL_S = 0.8, 1.0  # silence before / after a question: up to this much (a microphone's recording has some)
GAIN = (0.25, 1.0)  # the question's peak level


def question_audio(text: str, voice: str, speed: int, pitch: int, snr_db: float, seed: int) -> np.ndarray:
    """A spoken question at 16 kHz as a microphone records it (deterministic from ``seed``): a random stretch of
    silence before and after (up to LEAD_S / TAIL_S), a random level (GAIN), light noise over all of it."""
    wave, rate = espeak(text, voice, speed, pitch)
    wave = resample(wave, rate, QUESTION_RATE)
    rng = np.random.default_rng(seed)
    lead, tail = (int(rng.uniform(0, s) * QUESTION_RATE) for s in (LEAD_S, TAIL_S))
    peak = float(np.max(np.abs(wave))) or 1.0
    wave = wave * (rng.uniform(*GAIN) / peak)
    power = float(np.mean(wave**2)) + 1e-12  # the noise is set against the speech, not the silences
    padded = np.concatenate([np.zeros(lead, np.float32), wave.astype(np.float32), np.zeros(tail, np.float32)])
    return add_noise(padded, rng, snr_db, power)


def write_wav(path: str, wave: np.ndarray, rate: int) -> str:
    import soundfile as sf

    sf.write(path, wave, rate, subtype="PCM_16")
    return path
