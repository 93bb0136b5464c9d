"""The ``thinktalk`` command: info, chat (text and speech, streamed), demo, transcribe, serve, make-tiny, train, plot,
export, eval, bench."""

from __future__ import annotations

import argparse
import os
import sys
import time

from thinktalk.default_model import resolve_model_dir


def _dtype(name: str | None):
    from thinktalk.loading import parse_dtype

    try:
        return parse_dtype(name)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def cmd_info(args) -> int:
    import thinktalk

    directory = resolve_model_dir(args.model)
    model = thinktalk.load(directory, device=args.device, dtype=_dtype(args.dtype))
    from thinktalk.families import family

    print(f"checkpoint : {model.checkpoint_dir}")
    print(f"family     : {family(model.family).name} ({model.family})")
    print(f"dtype      : {str(model.dtype).replace('torch.', '')} on {model.device}")
    print("parameters :")
    for name, n in model.parameter_counts().items():
        print(f"  {name:<22} {_human(n):>10}  ({n:,})")
    speakers = sorted(model.speakers) if getattr(model, "speakers", None) else []
    print(f"speech     : {'yes' if model.has_speech else 'no (text only)'}")
    print(f"speakers   : {', '.join(speakers) if speakers else '-'}")
    return 0


def _conversation(args) -> list[dict]:
    content = []
    for path in args.audio or []:
        content.append({"type": "audio", "audio": path})
    for path in args.image or []:
        content.append({"type": "image", "image": path})
    for path in args.video or []:
        content.append({"type": "video", "video": path})
    if args.text:
        content.append({"type": "text", "text": args.text})
    if not content:
        raise SystemExit("nothing to say: give --text and/or --audio/--image/--video")
    conv = []
    if args.system:
        conv.append({"role": "system", "content": [{"type": "text", "text": args.system}]})
    conv.append({"role": "user", "content": content})
    return conv


def cmd_chat(args) -> int:
    import torch

    import thinktalk

    directory = resolve_model_dir(args.model)
    t0 = time.perf_counter()
    model = thinktalk.load(directory, device=args.device, dtype=_dtype(args.dtype),
                           components=None if args.speak else ("thinker",))
    proc = thinktalk.Processor.from_pretrained(directory)
    load_s = time.perf_counter() - t0
    inputs = proc(_conversation(args), use_audio_in_video=args.use_audio_in_video)
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_p=args.top_p,
        top_k=args.top_k,
        use_audio_in_video=args.use_audio_in_video,
    )
    if args.seed is not None:
        torch.manual_seed(args.seed)
        kwargs["seed"] = args.seed
    start = time.perf_counter()
    first_text = first_audio = None
    chunks = []
    rate = 24000
    if args.speak:
        if not model.has_speech:
            raise SystemExit(f"'{directory}' has no talker/vocoder weights: it cannot --speak (text only)")
        kwargs["speaker"] = args.speaker
        kwargs["return_audio"] = True
        if args.max_speech_seconds:
            kwargs["talker_max_new_tokens"] = max(1, int(args.max_speech_seconds * model.codec_rate_hz))
    for ev in model.stream(**inputs, **kwargs):
        if ev.kind == "text":
            if first_text is None:
                first_text = time.perf_counter() - start
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        elif ev.kind == "audio":
            if first_audio is None:
                first_audio = time.perf_counter() - start
            chunks.append(ev.audio.float().cpu())
            rate = ev.sample_rate
    total = time.perf_counter() - start
    sys.stdout.write("\n")
    report = [f"load {load_s:.2f}s", f"first text token {first_text or 0:.3f}s"]
    if args.speak:
        import soundfile as sf

        audio = torch.cat(chunks) if chunks else torch.zeros(0)
        sf.write(args.speak, audio.numpy(), rate, subtype="PCM_16")
        seconds = audio.numel() / rate
        rtf = total / seconds if seconds > 0 else float("inf")
        report += [f"first audio {first_audio or 0:.3f}s", f"{seconds:.2f}s of speech -> {args.speak}", f"RTF {rtf:.2f}"]
        if args.max_speech_seconds and seconds >= args.max_speech_seconds - 0.5:
            print(f"note: speech stopped at the --max-speech-seconds limit ({args.max_speech_seconds:g} s); "
                  "the Talker had not ended it", file=sys.stderr)
    report.append(f"total {total:.2f}s")
    print("[" + ", ".join(report) + "]", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from thinktalk.demo import run_demo

    directory = resolve_model_dir(args.model)
    run_demo(directory, args.out, speak=not args.no_speech, speaker=args.speaker, device=args.device)
    return 0


def cmd_transcribe(args) -> int:
    """Speech -> text (``--translate``: -> English) with the model's ASR prompt; the text goes to stdout."""
    import thinktalk
    from thinktalk.asr import language_name

    try:
        language_name(args.language)
    except ValueError as e:
        raise SystemExit(f"--language: {e}") from None
    if not os.path.isfile(args.file):
        raise SystemExit(f"no such audio file: {args.file}")
    model = thinktalk.load(resolve_model_dir(args.model), device=args.device, dtype=_dtype(args.dtype), components=("thinker",))
    run = model.translate if args.translate else model.transcribe
    text = run(args.file, language=args.language, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    print(text)
    return 0


def cmd_make_tiny(args) -> int:
    from thinktalk.testing.tiny import build_tiny_checkpoint

    build_tiny_checkpoint(args.directory, args.family, seed=args.seed, with_speech=not args.text_only)
    print(f"tiny random {args.family} checkpoint written to {args.directory}")
    return 0


def _recipe_of(path: str) -> str | None:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return None  # load_config reports it
    return data.get("recipe") if isinstance(data, dict) else None


def cmd_train(args) -> int:
    from thinktalk.train.config import TrainConfigError, load_config
    from thinktalk.train.data import DataError

    if _recipe_of(args.config) == "codec":  # the codec trains waveforms, not a checkpoint: its own loop
        from thinktalk.codec.__main__ import main as codec_main

        return codec_main(["train", args.config, *args.overrides])

    try:
        loaded = load_config(args.config, args.overrides)
    except TrainConfigError as e:
        raise SystemExit(f"thinktalk train: {e}") from None
    from thinktalk.checkpoint import CheckpointError
    from thinktalk.config import ConfigError
    from thinktalk.train.trainer import train

    try:
        result = train(loaded)
    except (DataError, CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        # bad input (data, checkpoint, config values a recipe rejects): the message names the problem
        raise SystemExit(f"thinktalk train: {e}") from None
    if result.records and int(os.environ.get("RANK", "0")) == 0:
        last = result.records[-1]
        print(f"done: step {last['step']}, loss {last['loss']:.4f}; metrics in {loaded.train.output_dir}/metrics.jsonl"
              + (f"; model in {result.final_dir}" if result.final_dir else ""), file=sys.stderr)
    return 0


def cmd_plot(args) -> int:
    from thinktalk.train.metrics import plot

    keys = [k for k in args.keys.split(",") if k] if args.keys else None
    try:
        print(plot(args.output_dir, args.out, keys, args.title))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"thinktalk plot: {e}") from None
    return 0


def cmd_export(args) -> int:
    from thinktalk.train.lora import export

    adapter = args.adapter
    if os.path.isdir(os.path.join(adapter, "adapter")) and not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        adapter = os.path.join(adapter, "adapter")  # a lora run's output_dir
    from thinktalk.checkpoint import CheckpointError

    try:
        print(export(adapter, args.output, base=args.base))
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        raise SystemExit(f"thinktalk export: {e}") from None
    return 0


def cmd_bench(args) -> int:
    import json

    from thinktalk.benchmark import format_table, run

    result = run(args.shapes, args.device, args.dtype, args.text_tokens, args.codes, args.audio_seconds, args.repeats,
                 args.threads, reference=not args.skip_reference, compile=args.compile)  # fmt: skip
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def add_bench_parser(sub) -> None:
    sp = sub.add_parser("bench", help="thinktalk vs the reference (transformers) side by side, same process and weights")
    sp.add_argument("--shapes", default="tiny", choices=["tiny", "small", "7b"], help="Qwen2.5-Omni shapes (random weights)")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on CUDA, fp32 on CPU")
    sp.add_argument("--text-tokens", type=int, default=16)
    sp.add_argument("--codes", type=int, default=100, help="codec ids to speak (50 per second)")
    sp.add_argument("--audio-seconds", type=float, default=2.0, help="audio prompt length")
    sp.add_argument("--repeats", type=int, default=3, help="timed runs per row; the fastest counts")
    sp.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    sp.add_argument("--skip-reference", action="store_true", help="thinktalk only (no transformers needed)")
    sp.add_argument("--compile", action="store_true",
                    help="also measure thinktalk with its speech decoders and decode steps compiled (thinktalk.compile_speech; compiling takes minutes on a CPU)")
    sp.add_argument("--json", action="store_true", help="print the results as JSON")
    sp.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="thinktalk", description="Qwen-Omni Thinker–Talker models: run, stream, serve, train.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("model", nargs="?", help="checkpoint directory or Hub id (default: the embedded tiny model)")
        sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: cpu)")
        sp.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")

    sp = sub.add_parser("info", help="family, parameter counts, dtype and speakers of a checkpoint")
    common(sp)
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("chat", help="answer one turn, streaming the text (and speech with --speak)")
    common(sp)
    sp.add_argument("--text", help="the user's text")
    sp.add_argument("--audio", action="append", help="audio file (wav/flac/mp3/ogg...), repeatable")
    sp.add_argument("--image", action="append", help="image file, repeatable")
    sp.add_argument("--video", action="append", help="video file, repeatable")
    sp.add_argument("--use-audio-in-video", action="store_true", help="also listen to the videos' audio tracks")
    sp.add_argument("--system", help="system prompt")
    sp.add_argument("--speak", metavar="OUT.wav", help="also speak the answer into this WAV file (24 kHz)")
    sp.add_argument("--speaker", default=None, help="voice for --speak (see `thinktalk info`; default: the model's first)")
    sp.add_argument("--max-speech-seconds", type=float, default=0,
                    help="stop the Talker after this much speech (0 = the model's own limit)")
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--top-k", type=int, default=0)
    sp.add_argument("--seed", type=int, default=None)
    sp.set_defaults(func=cmd_chat)

    sp = sub.add_parser("demo", help="a scripted conversation (pictures it draws, typed and spoken questions): "
                        "prints the answers and latencies, writes the spoken answers as WAV files")
    sp.add_argument("model", nargs="?", help="checkpoint directory (default: the embedded thinktalk-tiny)")
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: cpu)")
    sp.add_argument("--out", default="demo_out", help="directory for the pictures and WAV files (default: demo_out)")
    sp.add_argument("--speaker", default=None, help="voice (see `thinktalk info`; default: the model's first)")
    sp.add_argument("--no-speech", action="store_true", help="text answers only")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("transcribe", help="speech to text (or to English with --translate), printed to stdout")
    sp.add_argument("file", help="audio file (wav/flac/mp3/ogg/m4a/webm...)")
    sp.add_argument("--model", help="checkpoint directory (default: the embedded tiny model)")
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: cpu)")
    sp.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    sp.add_argument("--language", help="the spoken language (ISO-639-1 code or English name), a hint in the prompt")
    sp.add_argument("--translate", action="store_true", help="translate into English instead of transcribing")
    sp.add_argument("--prompt", help="context: names, spellings, the previous segment's text")
    sp.add_argument("--max-new-tokens", type=int, default=1024)
    sp.set_defaults(func=cmd_transcribe)

    sp = sub.add_parser("make-tiny", help="write a tiny random checkpoint (for tests and demos)")
    sp.add_argument("directory")
    sp.add_argument("--family", default="qwen2_5_omni", choices=["qwen2_5_omni", "qwen3_omni_moe"])
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--text-only", action="store_true", help="no talker/vocoder")
    sp.set_defaults(func=cmd_make_tiny)

    sp = sub.add_parser("train", help="train with a recipe: thinktalk train CONFIG.yaml [key=value ...] (see docs/training.md)")
    sp.add_argument("config", help="YAML config (examples in recipes/)")
    sp.add_argument("overrides", nargs="*", metavar="key=value", help="override any key of the config")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("plot", help="draw a training run's metrics.jsonl curves into a PNG")
    sp.add_argument("output_dir", help="a training output_dir (or its metrics.jsonl)")
    sp.add_argument("--out", help="PNG path (default: OUTPUT_DIR/curves.png)")
    sp.add_argument("--keys", help="comma-separated metrics to draw (default: all)")
    sp.add_argument("--title")
    sp.set_defaults(func=cmd_plot)

    sp = sub.add_parser("export", help="merge LoRA adapters into their base checkpoint and write a plain checkpoint")
    sp.add_argument("adapter", help="adapter directory (or a lora run's output_dir)")
    sp.add_argument("output", help="directory for the merged checkpoint")
    sp.add_argument("--base", help="base checkpoint (default: the one the adapter was trained on)")
    sp.set_defaults(func=cmd_export)

    from thinktalk.data import evaluate as _evaluate

    sp = sub.add_parser("eval", help="thinktalk-tiny on a held-out split: text accuracy per task, speech checks (docs/tiny-model.md)")
    _evaluate.add_arguments(sp)
    sp.set_defaults(func=_evaluate.main_args)

    add_bench_parser(sub)

    try:
        from thinktalk.serve.cli import add_serve_arguments, main_serve

        sp = sub.add_parser("serve", help="OpenAI-compatible HTTP + realtime WebSocket server with a web demo")
        add_serve_arguments(sp)
        sp.set_defaults(func=main_serve)
    except ImportError:
        pass
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
