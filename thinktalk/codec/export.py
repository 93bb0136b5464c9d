"""Codec directories, and the trained decoder as the ``code2wav`` component of a Qwen3-Omni checkpoint.

A codec directory (what training writes to ``OUTPUT_DIR/codec``):

    config.json        {"model_type": "thinktalk_codec", "encoder": {...}, "quantizer": {...},
                        "code2wav_config": {... the reference's code2wav_config spelling ...}}
    model.safetensors  encoder.*, quantizer.* (codebooks + EMA statistics), output_proj.* (when D ≠ H),
                       code2wav.* — the decoder under Qwen3-Omni's own tensor names, code embedding folded
                       from the codebooks

:func:`export_qwen3_checkpoint` puts that decoder into a Qwen3-Omni checkpoint directory: every file of
the base checkpoint is copied (shards without Code2Wav tensors byte for byte), the ``code2wav.*`` tensors
are replaced, and ``config.json``'s ``code2wav_config`` gets the codec's architecture (other keys kept).
The result loads with ``thinktalk.load`` and with the reference's ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from thinktalk.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, CheckpointError, WeightMap, load_weights
from thinktalk.codec.model import MODEL_TYPE, Codec, CodecConfig, code2wav_hf_dict
from thinktalk.config import ConfigError, read_config

CODE2WAV_PREFIX = "code2wav."


def save_codec(codec: Codec, directory: str | os.PathLike) -> str:
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    codec.sync_code_embedding()
    state = {k: v.detach().contiguous().cpu() for k, v in codec.state_dict().items()}
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(codec.cfg.to_dict(), fh, indent=2)
    save_file(state, os.path.join(directory, SINGLE_FILE), metadata={"format": "pt"})
    return directory


def load_codec_state(codec: Codec, file: str) -> None:
    """Load a codec ``model.safetensors`` strictly (every tensor present, none left over, same shapes)."""
    state = load_file(file)
    expected = codec.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"'{file}' does not match the codec of its config.json: missing {missing[:20]}, unexpected {unexpected[:20]}, "
            f"shapes {shapes[:10]}"
        )
    codec.load_state_dict(state)


def load_codec(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Codec:
    """A codec directory written by :func:`save_codec` (or by training) → :class:`Codec` in eval mode."""
    directory = os.fspath(directory)
    data = read_config(directory)
    if data.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"'{directory}/config.json' is not a thinktalk codec (model_type '{data.get('model_type')}')")
    codec = Codec(CodecConfig.from_dict(data, where=os.path.join(directory, "config.json")))
    load_codec_state(codec, os.path.join(directory, SINGLE_FILE))
    return codec.to(device).eval()


def check_talker_fits(codec_cfg: CodecConfig, base_config: dict, where: str) -> None:
    """The Talker of ``base_config`` must emit exactly the codec's code groups and code range."""
    talker = base_config.get("talker_config") or {}
    groups = talker.get("num_code_groups")
    if groups is not None and groups != codec_cfg.num_quantizers:
        raise ConfigError(
            f"{where}: talker_config.num_code_groups is {groups} but the codec has {codec_cfg.num_quantizers} codebooks "
            "(code2wav_config.num_quantizers must equal it)"
        )
    vocab = (talker.get("code_predictor_config") or {}).get("vocab_size")
    if vocab is not None and vocab != codec_cfg.codebook_size:
        raise ConfigError(
            f"{where}: talker_config.code_predictor_config.vocab_size is {vocab} but the codec has {codec_cfg.codebook_size} "
            "codes per codebook (the code predictor emits codes of codebooks 1.. in that range)"
        )


def export_qwen3_checkpoint(codec: Codec | str | os.PathLike, base_dir: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Write ``out_dir`` = the Qwen3-Omni checkpoint ``base_dir`` with its Code2Wav replaced by the codec's decoder."""
    if not isinstance(codec, Codec):
        codec = load_codec(codec)
    base_dir, out_dir = os.fspath(base_dir), os.fspath(out_dir)
    if os.path.abspath(base_dir) == os.path.abspath(out_dir):
        raise ValueError("export_qwen3_checkpoint writes a new directory: out_dir must differ from base_dir")
    config = read_config(base_dir)
    if config.get("model_type") != "qwen3_omni_moe":
        raise ConfigError(f"'{base_dir}' is not a Qwen3-Omni checkpoint (model_type '{config.get('model_type')}')")
    check_talker_fits(codec.cfg, config, os.path.join(base_dir, "config.json"))
    ours = codec.code2wav_state_dict()

    os.makedirs(out_dir, exist_ok=True)
    index_path = os.path.join(base_dir, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as fh:
            index = json.load(fh)
        files = sorted(set(index["weight_map"].values()))
    elif os.path.exists(os.path.join(base_dir, SINGLE_FILE)):
        index, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in '{base_dir}'")
    target_file = None
    for name in files:
        src = os.path.join(base_dir, name)
        with safe_open(src, framework="pt") as f:
            has_code2wav = any(k.startswith(CODE2WAV_PREFIX) for k in f.keys())
        if not has_code2wav:
            shutil.copyfile(src, os.path.join(out_dir, name))
            continue
        tensors = {k: v for k, v in load_file(src).items() if not k.startswith(CODE2WAV_PREFIX)}
        if target_file is None:  # all new Code2Wav tensors go where the first old ones were
            target_file = name
            tensors.update(ours)
        save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
    if target_file is None:  # the base had no Code2Wav (a Thinking/Captioner checkpoint): add a shard
        if index is None:
            raise CheckpointError(f"'{base_dir}' has no code2wav.* tensors: export needs a checkpoint with speech output")
        target_file = "model-code2wav.safetensors"
        save_file(ours, os.path.join(out_dir, target_file), metadata={"format": "pt"})
    if index is not None:
        weight_map = {k: v for k, v in index["weight_map"].items() if not k.startswith(CODE2WAV_PREFIX)}
        weight_map.update({k: target_file for k in ours})
        index = {**index, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)

    config["code2wav_config"] = {**(config.get("code2wav_config") or {}), **code2wav_hf_dict(codec.cfg.decoder)}
    config["code2wav_config"].pop("rope_theta", None)  # the rotary settings now live in rope_parameters
    config["enable_audio_output"] = True
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    skip = {"config.json", INDEX_FILE, *files}
    for name in os.listdir(base_dir):
        src = os.path.join(base_dir, name)
        if name not in skip and os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
    return out_dir


class _Code2WavHolder(torch.nn.Module):
    """A module whose only child is ``code2wav``, so the checkpoint's names load unchanged."""

    def __init__(self, cfg):
        super().__init__()
        from thinktalk.models.qwen3_omni.code2wav import Code2Wav

        self.code2wav = Code2Wav(cfg)


def load_code2wav(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """Only the Code2Wav of a Qwen3-Omni checkpoint (reads just its ``code2wav.*`` tensors; the same module
    and names as ``thinktalk.load(directory).code2wav``, without building the 30B Thinker and Talker)."""
    from thinktalk.models.qwen3_omni.config import Code2WavConfig

    directory = os.fspath(directory)
    config = read_config(directory)
    if config.get("model_type") != "qwen3_omni_moe" or not config.get("code2wav_config"):
        raise ConfigError(f"'{directory}' is not a Qwen3-Omni checkpoint with a code2wav_config")
    with torch.device("meta"):
        holder = _Code2WavHolder(Code2WavConfig.from_hf(config["code2wav_config"]))
    load_weights(holder, Checkpoint.open(directory), prefixes=(CODE2WAV_PREFIX,), weight_map=WeightMap(),
                 dtype_for=lambda name: torch.float32, device=torch.device(device))
    return holder.code2wav.eval()
