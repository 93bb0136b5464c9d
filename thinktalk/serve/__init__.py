"""``thinktalk serve``: an OpenAI-compatible HTTP API, a realtime WebSocket and a browser demo.

    from thinktalk.serve import run
    run("/models/Qwen2.5-Omni-7B", host="0.0.0.0", port=8000, device="cuda", api_keys=["secret"])

or, around a model already loaded::

    from thinktalk.serve.app import create_app
    app = create_app(model, processor, ServeSettings(max_sessions=8))

The HTTP layer reaches the model only through :class:`thinktalk.serve.backend.Backend`.
"""

from __future__ import annotations


def __getattr__(name):
    # pydantic/fastapi come with the ``serve`` extra; importing this package must not need them.
    if name == "ServeSettings":
        from thinktalk.serve.settings import ServeSettings

        return ServeSettings
    raise AttributeError(f"module 'thinktalk.serve' has no attribute '{name}'")


def create_app(model, processor, settings=None, **kwargs):
    """See :func:`thinktalk.serve.app.create_app` (imported lazily: it needs the ``serve`` extra)."""
    from thinktalk.serve.app import create_app as _create_app

    return _create_app(model, processor, settings, **kwargs)


def run(
    directory: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    dtype=None,
    log_level: str = "info",
    **settings,
) -> None:
    """Load ``directory`` and serve it until interrupted; ``settings`` are :class:`ServeSettings` fields."""
    from thinktalk.serve.server import serve_directory
    from thinktalk.serve.settings import ServeSettings

    serve_directory(directory, host=host, port=port, device=device, dtype=dtype, log_level=log_level,
                    settings=ServeSettings(**settings))


__all__ = ["ServeSettings", "create_app", "run"]
