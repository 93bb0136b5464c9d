"""``python -m thinktalk.codec``: train a codec, encode audio to codes, export the decoder.

    python -m thinktalk.codec train recipes/codec_tiny.yaml [key=value ...]     # e.g. max_steps=50 codec.encoder.channels=8
    python -m thinktalk.codec encode --mimi DIR speech.wav codes.pt              # Qwen3-Omni Talker codes [16, frames]
    python -m thinktalk.codec encode --codec RUN/codec speech.wav codes.pt       # the project's codec
    python -m thinktalk.codec export RUN/codec BASE_QWEN3_DIR OUT_DIR            # decoder → code2wav of a checkpoint

``train`` is the ``codec`` recipe of ``thinktalk train`` (same YAML keys).
"""

from __future__ import annotations

import argparse
import sys

import yaml


def parse_overrides(pairs: list[str]) -> dict:
    """["a.b=3", "c=[1, 2]"] → {"a": {"b": 3}, "c": [1, 2]} (values parsed as YAML)."""
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"override '{pair}' is not key=value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_yaml_config(path: str, overrides: list[str]) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise SystemExit(f"config file '{path}' does not exist") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"config file '{path}' must hold a mapping of keys")
    return merge(data, parse_overrides(overrides))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m thinktalk.codec", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a codec from a YAML config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key=value (dots for nested keys)")
    e = sub.add_parser("encode", help="audio file → codes tensor [G, frames] (torch.save)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--mimi", help="a Mimi checkpoint directory (transformers layout)")
    src.add_argument("--codec", help="a codec directory written by training")
    e.add_argument("audio")
    e.add_argument("output")
    x = sub.add_parser("export", help="put a codec's decoder into a Qwen3-Omni checkpoint as its code2wav")
    x.add_argument("codec")
    x.add_argument("base")
    x.add_argument("output")
    args = ap.parse_args(argv)

    if args.cmd == "train":
        from thinktalk.codec.train import CodecTrainConfig, train_codec
        from thinktalk.config import ConfigError

        try:
            cfg = CodecTrainConfig.from_dict(load_yaml_config(args.config, args.overrides), where=args.config)
        except ConfigError as err:
            raise SystemExit(str(err)) from None
        res = train_codec(cfg)
        last = next((r for r in reversed(res.metrics) if "loss" in r), {})
        print(f"trained {res.steps} steps; last loss {last.get('loss', float('nan')):.4f}; codec in {res.codec_dir}")
        return 0

    import torch

    if args.cmd == "encode":
        from thinktalk.processing.audio import decode_audio

        wav, rate = decode_audio(args.audio)
        if args.mimi:
            from thinktalk.codec.mimi import load_mimi, qwen3_codes

            codes = qwen3_codes(load_mimi(args.mimi), wav, rate)
        else:
            from thinktalk.codec.export import load_codec
            from thinktalk.processing.audio import resample, to_mono

            codec = load_codec(args.codec)
            x = torch.from_numpy(resample(to_mono(wav), rate, codec.cfg.sample_rate))[None, None]
            codes = codec.encode(x)[0]
        torch.save(codes, args.output)
        print(f"{args.audio}: codes {list(codes.shape)} → {args.output}")
        return 0

    from thinktalk.codec.export import export_qwen3_checkpoint

    print(f"wrote {export_qwen3_checkpoint(args.codec, args.base, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
