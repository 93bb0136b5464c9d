"""Qwen2.5-Omni voices: ``spk_dict.pt`` beside the weights.

The official file (Qwen/Qwen2.5-Omni-7B and -3B) maps a speaker name to::

    {"bos_token": 151872,               # Chelsie (Ethan: 151870): the Talker's text-bos token for this voice
     "cond":      Tensor[1, 192],       # the DiT's speaker vector (enc_emb_dim)
     "ref_mel":   Tensor[1, 400, 80]}   # a reference log-mel (ECAPA input), 4 s at 100 frames/s

It is read with ``torch.load(weights_only=True)`` — plain tensors and ints, no pickled code.
"""

from __future__ import annotations

import os

import torch

SPEAKER_FILE = "spk_dict.pt"
SPEAKER_KEYS = ("bos_token", "cond", "ref_mel")
# The official voices and their text-bos tokens.
OFFICIAL_BOS = {"Chelsie": 151872, "Ethan": 151870}


def load_speakers(directory: str | os.PathLike) -> dict[str, dict]:
    """The voices of a checkpoint directory; ``{}`` when it has no ``spk_dict.pt``.

    An empty result is not an error here (a text-only checkpoint needs none): asking for speech with it
    is, and :func:`speaker_params` says which file is missing.
    """
    path = os.path.join(os.fspath(directory), SPEAKER_FILE)
    if not os.path.exists(path):
        return {}
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' should hold a dict of speakers, found {type(data).__name__}")
    speakers = {}
    for name, entry in data.items():
        missing = [k for k in SPEAKER_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f"speaker '{name}' in '{path}' lacks {', '.join(missing)} (needs {', '.join(SPEAKER_KEYS)})")
        speakers[str(name)] = {
            "bos_token": int(entry["bos_token"]),
            "cond": entry["cond"].float().reshape(1, -1),
            "ref_mel": entry["ref_mel"].float().reshape(1, -1, entry["ref_mel"].shape[-1]),
        }
    return speakers


def speaker_params(speakers: dict[str, dict], name: str | None, where: str | None = None) -> tuple[str, dict]:
    """(canonical name, entry) of speaker ``name`` (case-insensitive; None = the first voice).

    Errors name the missing file when there are no voices at all, and list the voices otherwise.
    """
    if not speakers:
        place = os.path.join(where, SPEAKER_FILE) if where else SPEAKER_FILE
        raise ValueError(f"speech needs the voices of '{place}', which was not found when the model was loaded")
    if name is None:
        name = "Chelsie" if "Chelsie" in speakers else next(iter(speakers))
    if name in speakers:
        return name, speakers[name]
    folded = {k.lower(): k for k in speakers}
    if name.lower() in folded:
        key = folded[name.lower()]
        return key, speakers[key]
    raise ValueError(f"unknown speaker '{name}'; available: {', '.join(sorted(speakers))}")


def write_tiny_speakers(directory: str | os.PathLike, seed: int = 0, enc_emb_dim: int | None = None, mel_dim: int = 80) -> str:
    """Write a ``spk_dict.pt`` in the official format with random voices fitting the tiny config.

    ``enc_emb_dim`` defaults to the DiT's in ``config.json`` of ``directory`` (16 for the tiny config).
    """
    directory = os.fspath(directory)
    if enc_emb_dim is None:
        import json

        with open(os.path.join(directory, "config.json"), encoding="utf-8") as fh:
            dit = (json.load(fh).get("token2wav_config") or {}).get("dit_config") or {}
        enc_emb_dim = int(dit.get("enc_emb_dim", 192))
        mel_dim = int(dit.get("mel_dim", mel_dim))
    gen = torch.Generator().manual_seed(seed + 1234)
    data = {}
    for name, bos in OFFICIAL_BOS.items():
        data[name] = {
            "bos_token": bos,
            "cond": torch.randn(1, enc_emb_dim, generator=gen),
            # Log-mel values of speech sit around -12 (silence) .. 2.
            "ref_mel": torch.randn(1, 400, mel_dim, generator=gen) * 2 - 5,
        }
    path = os.path.join(directory, SPEAKER_FILE)
    torch.save(data, path)
    return path
