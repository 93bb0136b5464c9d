"""Mel-cepstral distance (MCD) between two utterances, aligned by dynamic time warping (DTW): numpy only.

Speech is judged without any external ASR: a spoken answer should be nearer (in DTW-aligned MCD) to espeak-ng's
rendering of its own text than to the renderings of other answers.

``mel_cepstrum``: pre-emphasis, 25 ms Hann windows every 10 ms, power spectrum, a triangular mel filterbank
(HTK mel scale), log, DCT-II; coefficients 1..``order`` (c0, the loudness, is dropped). Frames quieter than
the utterance's peak by more than ``silence_db`` are removed first, so leading/trailing silence does not count.

``dtw``: the classic symmetric recursion D[i, j] = d(i, j) + min(D[i-1, j], D[i, j-1], D[i-1, j-1]); the distance
is averaged over the optimal path's steps. ``mcd_dtw``: MCD = 10 / ln 10 * sqrt(2 * sum_k (c_k - c'_k)^2) per
aligned frame pair, averaged over the path (dB).
"""

from __future__ import annotations

import math

import numpy as np

RATE = 16000


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int, rate: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular filters, equally spaced on the HTK mel scale."""
    fmax = rate / 2 if fmax is None else fmax
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    freqs = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
    bank = np.zeros((n_mels, freqs.size))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        rise = (freqs - lo) / max(mid - lo, 1e-9)
        fall = (hi - freqs) / max(hi - mid, 1e-9)
        bank[m] = np.clip(np.minimum(rise, fall), 0.0, None)
    return bank


def dct_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Orthonormal DCT-II, [n_out, n_in]."""
    k = np.arange(n_out)[:, None]
    n = np.arange(n_in)[None, :]
    m = np.cos(math.pi / n_in * (n + 0.5) * k) * math.sqrt(2.0 / n_in)
    m[0] /= math.sqrt(2.0)
    return m


def resample(wave: np.ndarray, source: int, target: int = RATE) -> np.ndarray:
    if source == target:
        return np.asarray(wave, dtype=np.float64)
    import soxr

    return soxr.resample(np.asarray(wave, dtype=np.float64), source, target, quality="soxr_hq")


def mel_cepstrum(
    wave: np.ndarray, rate: int, order: int = 24, n_mels: int = 40, silence_db: float = 40.0
) -> np.ndarray:
    """[frames, order] mel cepstra c1..c_order of a mono waveform (resampled to 16 kHz first)."""
    x = resample(np.asarray(wave, dtype=np.float64).reshape(-1), rate)
    if x.size < 400:
        raise ValueError(f"an utterance of {x.size} samples at 16 kHz is too short for a 25 ms window")
    x = np.append(x[0], x[1:] - 0.97 * x[:-1])
    win, hop, n_fft = 400, 160, 512
    frames = 1 + (x.size - win) // hop
    idx = np.arange(win)[None, :] + hop * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(win), n_fft)) ** 2
    energy = 10 * np.log10(spec.sum(axis=1) + 1e-12)
    spec = spec[energy > energy.max() - silence_db]
    # natural log of the mel *amplitude* (half the log power), the cepstrum of the usual MCD definition
    logmel = 0.5 * np.log(spec @ mel_filterbank(n_mels, n_fft, RATE).T + 1e-10)
    return logmel @ dct_matrix(n_mels, order + 1)[1:].T


def dtw(a: np.ndarray, b: np.ndarray) -> tuple[float, list[tuple[int, int]]]:
    """(accumulated cost / path length, the optimal path) between sequences of vectors ``a`` [n, d], ``b`` [m, d]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"dtw needs two non-empty [frames, dim] arrays of the same dim, got {a.shape} and {b.shape}")
    cost = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for s in range(2, n + m + 1):
        # one anti-diagonal i + j = s at a time: every cell it reads lies on the two diagonals before it
        i = np.arange(max(1, s - m), min(n, s - 1) + 1)
        j = s - i
        acc[i, j] = cost[i - 1, j - 1] + np.minimum(np.minimum(acc[i - 1, j], acc[i, j - 1]), acc[i - 1, j - 1])
    path = []
    i, j = n, m
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        step = int(np.argmin((acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])))
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    path.reverse()
    return float(acc[n, m] / len(path)), path


def dtw_plain(a: np.ndarray, b: np.ndarray) -> float:
    """The same accumulated-cost recursion written cell by cell (the test's check of :func:`dtw`)."""
    cost = np.sqrt(((np.asarray(a)[:, None, :] - np.asarray(b)[None, :, :]) ** 2).sum(-1))
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            acc[i, j] = cost[i - 1, j - 1] + min(acc[i - 1, j], acc[i, j - 1], acc[i - 1, j - 1])
    return float(acc[n, m])


MCD_SCALE = 10.0 / math.log(10.0) * math.sqrt(2.0)


def mcd_dtw(wave_a: np.ndarray, rate_a: int, wave_b: np.ndarray, rate_b: int, order: int = 24) -> float:
    """DTW-aligned mel-cepstral distance in dB between two utterances."""
    mean, _ = dtw(mel_cepstrum(wave_a, rate_a, order), mel_cepstrum(wave_b, rate_b, order))
    return MCD_SCALE * mean


def nearest_check(spoken: list[tuple[np.ndarray, int]], references: list[tuple[np.ndarray, int]]) -> dict:
    """Utterance i of ``spoken`` should be nearest to reference i. Returns the hit rate, the distance matrix
    [len(spoken), len(references)] (dB) and the mean distance to the own vs to the other references."""
    if len(spoken) != len(references) or len(spoken) < 2:
        raise ValueError("nearest_check needs as many spoken utterances as references, at least 2")
    refs = [mel_cepstrum(w, r) for w, r in references]
    dist = np.zeros((len(spoken), len(refs)))
    for i, (w, r) in enumerate(spoken):
        c = mel_cepstrum(w, r)
        for j, ref in enumerate(refs):
            dist[i, j] = MCD_SCALE * dtw(c, ref)[0]
    own = np.diag(dist)
    others = dist[~np.eye(len(refs), dtype=bool)]
    return {"nearest_own": float(np.mean(dist.argmin(axis=1) == np.arange(len(refs)))),
            "mean_mcd_own": float(own.mean()), "mean_mcd_other": float(others.mean()), "matrix": dist.tolist()}  # fmt: skip
