"""A spoken answer next to espeak-ng's rendering of the same text: log-mel spectrograms and their DTW path.

    python scripts/tiny_spectrogram.py OUT.png --text "The circle is red." [--wav SPOKEN.wav] [--other "It is a square."]

Without ``--wav`` the "spoken answer" is espeak-ng in another voice (``--voice``, the control of the speech
check); with it, e.g. the model's own answer. ``--other`` adds the DTW path to a different text's rendering.
"""

from __future__ import annotations

import argparse

import numpy as np


def log_mel(wave: np.ndarray, rate: int) -> np.ndarray:
    from thinktalk.data import mcd

    x = mcd.resample(wave, rate)
    win, hop = 400, 160
    idx = np.arange(win)[None, :] + hop * np.arange(1 + (x.size - win) // hop)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(win), 512)) ** 2
    return np.log(spec @ mcd.mel_filterbank(40, 512, mcd.RATE).T + 1e-10).T


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import soundfile as sf

    from thinktalk.data import mcd, speech

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--text", default="The circle is red.")
    ap.add_argument("--wav", help="the spoken answer (default: espeak-ng in --voice)")
    ap.add_argument("--voice", default="en+m3")
    ap.add_argument("--other", default="It is a square.")
    a = ap.parse_args()
    reference = speech.espeak(a.text)
    spoken = sf.read(a.wav, dtype="float32") if a.wav else speech.espeak(a.text, a.voice, 185)
    other = speech.espeak(a.other)
    own_mcd = mcd.mcd_dtw(*spoken, *reference)
    other_mcd = mcd.mcd_dtw(*spoken, *other)
    _, path = mcd.dtw(mcd.mel_cepstrum(*spoken), mcd.mel_cepstrum(*reference))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    label = a.wav or f"espeak-ng {a.voice}"
    axes[0].imshow(log_mel(*spoken), origin="lower", aspect="auto", cmap="magma")
    axes[0].set_title(f"spoken: {label}", fontsize=9)
    axes[1].imshow(log_mel(*reference), origin="lower", aspect="auto", cmap="magma")
    axes[1].set_title(f"espeak-ng {speech.ANSWER_VOICE} rendering: {a.text!r}", fontsize=9)
    for ax in axes[:2]:
        ax.set_xlabel("frame (10 ms)")
        ax.set_ylabel("mel band")
    p = np.array(path)
    axes[2].plot(p[:, 1], p[:, 0])
    axes[2].set_xlabel("rendering frame (speech only)")
    axes[2].set_ylabel("spoken frame (speech only)")
    axes[2].set_title(f"DTW path; MCD {own_mcd:.1f} dB (vs {other_mcd:.1f} dB to {a.other!r})", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)
    print(f"{a.out}: MCD own {own_mcd:.1f} dB, other {other_mcd:.1f} dB")


if __name__ == "__main__":
    main()
