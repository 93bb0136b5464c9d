#!/usr/bin/env python
"""Round trip on real weights: speech → Mimi codes (16 × 12.5 Hz) → a Qwen3-Omni checkpoint's own Code2Wav.

Checks the claim thinktalk's Mimi path rests on — that Qwen3-Omni's Talker codes are the first 16
residual levels of Kyutai's Mimi — where the weights exist (they cannot be downloaded in thinktalk's CI):

    python scripts/check_codec_roundtrip.py --mimi /models/mimi --qwen3 /models/Qwen3-Omni-30B-A3B-Instruct \\
        --wav speech.wav --out roundtrip.wav          # or --espeak "Some text to speak" (needs espeak-ng)

``--mimi``: a Mimi checkpoint in the transformers layout (``huggingface-cli download kyutai/mimi``).
``--qwen3``: a Qwen3-Omni checkpoint with speech output. By default only its ``code2wav.*`` tensors
are read (:func:`thinktalk.codec.load_code2wav`, the module ``thinktalk.load(dir).code2wav`` builds);
``--full-load`` uses ``thinktalk.load(dir).code2wav`` itself (needs memory for the whole model).

Prints one JSON object: frames, the lag (samples) that best aligns decoded with input, SNR at that
lag, the multi-scale log-mel L1 distance, and the same distance for two controls decoded by the same
Code2Wav — random codes, and the real codebook 0 with random codebooks 1..15. If the codes are
Qwen3-Omni's, the real distance is far below both controls and the decoded WAV is intelligible
speech; a codec mismatch gives distances near the controls (noise or babble). A neural codec does
not keep the waveform's phase, so SNR is low even for a good round trip; the mel distance and
listening are what count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from thinktalk.codec.export import load_code2wav  # noqa: E402
from thinktalk.codec.losses import MultiScaleMelLoss  # noqa: E402
from thinktalk.codec.mimi import load_mimi, qwen3_codes  # noqa: E402
from thinktalk.processing.audio import decode_audio, resample, to_mono  # noqa: E402

RATE = 24000


def speech(args) -> np.ndarray:
    if args.wav:
        wav, rate = decode_audio(args.wav)
        return resample(to_mono(wav), rate, RATE)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "speech.wav")
        subprocess.run(["espeak-ng", "-w", path, args.espeak], check=True, capture_output=True)
        wav, rate = decode_audio(path)
    return resample(to_mono(wav), rate, RATE)


def best_lag(ref: np.ndarray, out: np.ndarray, max_lag: int) -> int:
    """Lag L in [-max_lag, max_lag] maximising the correlation of out[n + L] with ref[n]."""
    best, best_score = 0, -np.inf
    for lag in range(-max_lag, max_lag + 1, 8):
        a, b = aligned(ref, out, lag)
        score = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
        if score > best_score:
            best, best_score = lag, score
    return best


def aligned(ref: np.ndarray, out: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    if lag >= 0:
        out = out[lag:]
    else:
        ref = ref[-lag:]
    n = min(len(ref), len(out))
    return ref[:n], out[:n]


def snr_db(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((ref - out) ** 2), 1e-20)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--mimi", required=True, help="Mimi checkpoint directory (transformers layout)")
    ap.add_argument("--qwen3", required=True, help="Qwen3-Omni checkpoint directory with code2wav")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--wav", help="speech file (any rate; resampled to 24 kHz with soxr)")
    src.add_argument("--espeak", help="text spoken by espeak-ng")
    ap.add_argument("--out", help="write the decoded waveform here (24 kHz WAV)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full-load", action="store_true", help="thinktalk.load(dir).code2wav instead of the Code2Wav tensors only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    wav = speech(args)
    mimi = load_mimi(args.mimi, device=args.device)
    codes = qwen3_codes(mimi, wav, RATE)  # [16, T]
    if args.full_load:
        import thinktalk

        code2wav = thinktalk.load(args.qwen3, device=args.device, components=("code2wav",)).code2wav
    else:
        code2wav = load_code2wav(args.qwen3, device=args.device)
    if code2wav.cfg.num_quantizers != codes.shape[0]:
        raise SystemExit(f"the checkpoint's Code2Wav takes {code2wav.cfg.num_quantizers} codebooks, Mimi gave {codes.shape[0]}")

    g = torch.Generator().manual_seed(args.seed)
    random_codes = torch.randint(0, code2wav.cfg.codebook_size, codes.shape, generator=g)
    semantic_only = random_codes.clone()
    semantic_only[0] = codes[0]
    mel = MultiScaleMelLoss(RATE)

    def decode(c: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return code2wav.decode(c[None].to(args.device))[0, 0].float().cpu().numpy()

    out = decode(codes)
    lag = best_lag(wav, out, max_lag=2 * code2wav.samples_per_frame)

    def mel_distance(decoded: np.ndarray) -> float:
        a, b = aligned(wav, decoded, lag)
        return float(mel(torch.from_numpy(b.copy())[None], torch.from_numpy(a.copy())[None]))

    ref_al, out_al = aligned(wav, out, lag)
    report = {
        "seconds": round(len(wav) / RATE, 3),
        "frames": int(codes.shape[1]),
        "decoded_samples": int(len(out)),
        "lag_samples": lag,
        "snr_db": round(snr_db(ref_al, out_al), 2),
        "mel_distance": round(mel_distance(out), 4),
        "mel_distance_random_codes": round(mel_distance(decode(random_codes)), 4),
        "mel_distance_codebook0_only": round(mel_distance(decode(semantic_only)), 4),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        import soundfile as sf

        sf.write(args.out, out, RATE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
