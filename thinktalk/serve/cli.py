"""``thinktalk serve [DIR]`` arguments (wired into thinktalk/cli.py). Imports nothing heavy."""

from __future__ import annotations

import argparse
import sys


def _defaults():
    """ServeSettings' defaults, or None everywhere when the serve extra is missing (main_serve says so)."""
    try:
        from thinktalk.serve.settings import ServeSettings

        return ServeSettings()
    except ImportError:
        return argparse.Namespace(**dict.fromkeys(NUMERIC_FIELDS + ("system_prompt",)))


NUMERIC_FIELDS = ("max_body_bytes", "max_audio_seconds", "max_image_pixels", "max_images", "max_video_frames",
                  "max_prompt_tokens", "max_tokens", "default_max_tokens", "max_speech_seconds", "max_sessions",
                  "queue_timeout_s", "max_realtime_connections", "max_json_values", "max_json_depth",
                  "max_total_image_pixels", "max_prompt_chars", "header_timeout_s", "keep_alive_timeout_s",
                  "body_timeout_s", "max_connections", "edge_workers")  # fmt: skip


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    d = _defaults()
    body_mb = d.max_body_bytes / 2**20 if d.max_body_bytes else None
    p.add_argument("model", nargs="?", help="checkpoint directory (default: the embedded thinktalk-tiny)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the directory name)")
    p.add_argument(
        "--voice", dest="default_voice", default=None, help="default voice (default: the checkpoint's first)"
    )
    p.add_argument("--system-prompt", default=None,
                   help="system message added when a conversation has none ('' to add none; default: Qwen's speech "
                        "prompt, none for the embedded thinktalk-tiny, which was trained without one)")  # fmt: skip
    g = p.add_argument_group("security")
    g.add_argument("--api-key", dest="api_keys", action="append", default=[],
                   help="accepted bearer key (repeatable; also read from $THINKTALK_API_KEY); none: no authentication")  # fmt: skip
    g.add_argument("--cors-origin", dest="cors_origins", action="append", default=[],
                   help="another origin (https://app.example) allowed to call the API and open the realtime WebSocket "
                        "from a browser (repeatable; '*' for any). Default: only the server's own page; clients that "
                        "send no Origin header (SDKs, curl) are not affected")  # fmt: skip
    g.add_argument("--protect-metrics", action=argparse.BooleanOptionalAction, default=True,
                   help="with --api-key, /metrics, /docs and /openapi.json need the key too (default: on; "
                        "--no-protect-metrics opens them, e.g. for a scraper without credentials)")  # fmt: skip
    g.add_argument("--allow-local-media", action="store_true", help="accept file paths / file:// URLs as media")
    g.add_argument("--local-media-dir", dest="local_media_dirs", action="append", default=[],
                   help="with --allow-local-media: only files under this directory (repeatable)")  # fmt: skip
    g = p.add_argument_group("limits")
    g.add_argument("--max-body-mb", type=float, default=body_mb, help="request body size")
    g.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds, help="input audio per request")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="per decoded image")
    g.add_argument("--max-total-image-pixels", type=int, default=d.max_total_image_pixels,
                   help="decoded pixels of all images of a request (or of a realtime conversation)")  # fmt: skip
    g.add_argument("--max-images", type=int, default=d.max_images, help="per request")
    g.add_argument("--max-video-frames", type=int, default=d.max_video_frames, help="sampled frames per request")
    g.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    g.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                   help="text characters per request, checked before tokenizing (default: 16 x --max-prompt-tokens)")  # fmt: skip
    g.add_argument("--max-json-values", type=int, default=d.max_json_values,
                   help="values in a JSON body or realtime event")  # fmt: skip
    g.add_argument("--max-json-depth", type=int, default=d.max_json_depth, help="nesting of a JSON body or event")
    g.add_argument("--max-tokens", type=int, default=d.max_tokens, help="largest max_tokens a client may ask for")
    g.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    g.add_argument("--max-speech-seconds", type=float, default=d.max_speech_seconds, help="speech per answer")
    g.add_argument("--max-sessions", type=int, default=d.max_sessions,
                   help="sessions admitted at once (running + queued); more get 429")  # fmt: skip
    g.add_argument("--queue-timeout", dest="queue_timeout_s", type=float, default=d.queue_timeout_s,
                   help="seconds a session may wait for the model before a 503")  # fmt: skip
    g.add_argument("--max-realtime-connections", type=int, default=d.max_realtime_connections)
    g = p.add_argument_group("scheduling")
    g.add_argument("--scheduler", default=d.scheduler, choices=["batch", "single"],
                   help="batch: continuous batching of every session (default); single: one session at a time")  # fmt: skip
    g.add_argument("--batch-rows", type=int, default=d.batch_rows,
                   help="conversations decoded together (default: --max-sessions)")  # fmt: skip
    g.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk,
                   help="prompt tokens read per engine step, so long prompts do not stall others")  # fmt: skip
    g.add_argument("--kv-cache-gb", type=float, default=d.kv_cache_gb,
                   help="memory for the engine's KV caches (bounds --batch-rows)")  # fmt: skip
    g.add_argument("--no-prefix-reuse", dest="prefix_reuse", action="store_false",
                   help="do not keep finished conversations' KV rows for their next turn")  # fmt: skip
    g.add_argument("--no-short-first", dest="prefill_short_first", action="store_false",
                   help="read prompts in arrival order (a chat turn waits for a long prompt's pieces)")  # fmt: skip
    g.add_argument("--no-encode-async", dest="encode_async", action="store_false",
                   help="run a prompt's media encoders inside the engine step (stalls the others while it runs)")  # fmt: skip
    g.add_argument("--no-realtime-read-ahead", dest="realtime_prefill_while_speaking", action="store_false",
                   help="server VAD: read each turn when it ends, not while it is spoken")  # fmt: skip
    g = p.add_argument_group("scaling")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard the Thinker's LLM over N processes (N GPUs with --device cuda; CPU processes otherwise); "
                        "this process is rank 0 and starts the others")  # fmt: skip
    g.add_argument("--quant-kernel", default="plain", choices=["plain", "int4mm"],
                   help="4-bit (GPTQ/AWQ) checkpoints: plain dequantizes each layer per call; int4mm uses torch's "
                        "int4 matmul where the layer allows it")  # fmt: skip
    g.add_argument("--compile", action="store_true",
                   help="compile the speech decoders (Token2Wav / Code2Wav) with torch.compile at start (a minute or "
                        "more on a CPU, cached on disk for later starts); see docs/benchmarks.md for what it gains")  # fmt: skip
    g.add_argument("--replicas", type=int, default=1,
                   help="N copies of the model behind this one endpoint, on Ray Serve (needs the 'ray' extra)")  # fmt: skip
    g = p.add_argument_group("connections")
    g.add_argument("--header-timeout", dest="header_timeout_s", type=float, default=d.header_timeout_s,
                   help="seconds a client has to send a request's line and headers (slow or idle sockets are closed)")  # fmt: skip
    g.add_argument("--keep-alive-timeout", dest="keep_alive_timeout_s", type=float, default=d.keep_alive_timeout_s,
                   help="seconds an idle kept-alive connection stays open")  # fmt: skip
    g.add_argument("--body-timeout", dest="body_timeout_s", type=float, default=d.body_timeout_s,
                   help="longest pause (seconds) while a request body is received; then 408")  # fmt: skip
    g.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections; past it the idlest are closed (also kept under the ulimit -n)")  # fmt: skip
    g.add_argument("--edge-workers", type=int, default=d.edge_workers,
                   help="threads that parse bodies and decode media at once (more queue; keeps the event loop responsive)")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def settings_from_args(args: argparse.Namespace, directory: str | None = None):
    """ServeSettings from the arguments; ``directory``: the checkpoint served (its default system prompt)."""
    import os

    from thinktalk.default_model import shipped_model_dir
    from thinktalk.serve.settings import QWEN_SPEECH_SYSTEM_PROMPT, ServeSettings

    system_prompt = args.system_prompt
    if system_prompt is None:  # not given: Qwen's speech prompt, except for a model trained without one
        shipped = shipped_model_dir()
        system_prompt = "" if shipped and directory and os.path.abspath(directory) == shipped else QWEN_SPEECH_SYSTEM_PROMPT

    keys = list(args.api_keys)
    if os.environ.get("THINKTALK_API_KEY"):
        keys.append(os.environ["THINKTALK_API_KEY"])
    return ServeSettings(
        model_name=args.model_name,
        default_voice=args.default_voice,
        system_prompt=system_prompt or None,
        api_keys=keys,
        cors_origins=args.cors_origins,
        protect_metrics=args.protect_metrics,
        allow_local_media=args.allow_local_media,
        local_media_dirs=args.local_media_dirs,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_audio_seconds=args.max_audio_seconds,
        max_image_pixels=args.max_image_pixels,
        max_total_image_pixels=args.max_total_image_pixels,
        max_images=args.max_images,
        max_video_frames=args.max_video_frames,
        max_prompt_tokens=args.max_prompt_tokens,
        max_prompt_chars=args.max_prompt_chars,
        max_json_values=args.max_json_values,
        max_json_depth=args.max_json_depth,
        max_tokens=args.max_tokens,
        default_max_tokens=args.default_max_tokens,
        max_speech_seconds=args.max_speech_seconds,
        max_sessions=args.max_sessions,
        queue_timeout_s=args.queue_timeout_s,
        max_realtime_connections=args.max_realtime_connections,
        scheduler=args.scheduler,
        batch_rows=args.batch_rows,
        prefill_chunk=args.prefill_chunk,
        kv_cache_gb=args.kv_cache_gb,
        prefix_reuse=args.prefix_reuse,
        encode_async=args.encode_async,
        prefill_short_first=args.prefill_short_first,
        realtime_prefill_while_speaking=args.realtime_prefill_while_speaking,
        header_timeout_s=args.header_timeout_s,
        keep_alive_timeout_s=args.keep_alive_timeout_s,
        body_timeout_s=args.body_timeout_s,
        max_connections=args.max_connections,
        edge_workers=args.edge_workers,
    )


def main_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import pydantic  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"thinktalk serve needs the serve extra ({e.name} is missing): pip install 'thinktalk[serve]'",
              file=sys.stderr)  # fmt: skip
        return 2
    import logging

    from pydantic import ValidationError

    from thinktalk.serve.server import serve_directory

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from thinktalk.default_model import resolve_model_dir
    from thinktalk.loading import parse_dtype

    directory = resolve_model_dir(args.model)
    try:
        settings = settings_from_args(args, directory)
    except ValidationError as e:
        print(f"invalid serve settings: {e}", file=sys.stderr)
        return 2
    try:
        dtype = parse_dtype(args.dtype)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    if args.tensor_parallel_size < 1 or args.replicas < 1:
        print("--tensor-parallel-size and --replicas must be >= 1", file=sys.stderr)
        return 2
    if args.replicas > 1:
        if args.compile:
            print("--compile is for one process (--replicas 1)", file=sys.stderr)
            return 2
        from thinktalk.serve.replicas import serve_replicas

        return serve_replicas(directory, replicas=args.replicas, host=args.host, port=args.port, device=args.device,
                              dtype=dtype, log_level=args.log_level, settings=settings,
                              tensor_parallel_size=args.tensor_parallel_size, quant_kernel=args.quant_kernel)  # fmt: skip
    serve_directory(directory, host=args.host, port=args.port, device=args.device, dtype=dtype,
                    log_level=args.log_level, settings=settings,
                    tensor_parallel_size=args.tensor_parallel_size, quant_kernel=args.quant_kernel,
                    compile=args.compile)  # fmt: skip
    return 0
