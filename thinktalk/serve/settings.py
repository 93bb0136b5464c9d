"""Server settings: every limit the server applies before work starts, in one validated object."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The system prompt the Qwen-Omni checkpoints were trained with for speech output; the official
# examples use it, and the reference warns when audio output is asked for without it.
QWEN_SPEECH_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)


class ServeSettings(BaseModel):
    """Limits, security and defaults of ``thinktalk serve`` (every field has a CLI flag)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- identity and defaults -------------------------------------------------------------------
    model_name: str | None = Field(None, description="id in /v1/models (default: the checkpoint directory name)")
    default_voice: str | None = Field(None, description="voice when a request names none (default: the first)")
    system_prompt: str | None = Field(
        QWEN_SPEECH_SYSTEM_PROMPT, description="system message added when a conversation has none (None: add nothing)"
    )
    # -- security ------------------------------------------------------------------------------------
    api_keys: list[str] = Field(default_factory=list, description="accepted bearer keys; empty: no authentication")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="other origins browsers may call the API and open the WebSocket from ('*' for any); the server's "
        "own origin is always allowed, requests without an Origin header (non-browser clients) too",
    )
    protect_metrics: bool = Field(True, description="with api_keys: /metrics, /docs and /openapi.json need a key too")
    allow_local_media: bool = Field(False, description="accept file paths / file:// URLs as media (trusted clients)")
    local_media_dirs: list[str] = Field(
        default_factory=list, description="with allow_local_media: the directories paths must lie in (empty: any)"
    )
    # -- request limits ---------------------------------------------------------------------------
    max_body_bytes: int = Field(64 * 2**20, ge=1024)
    max_json_values: int = Field(100_000, ge=16, description="values in a JSON body or realtime event")
    max_json_depth: int = Field(32, ge=4, le=200, description="nesting of a JSON body or realtime event")
    max_audio_seconds: float = Field(300.0, gt=0, description="total input audio per request")
    max_image_pixels: int = Field(16_000_000, ge=1, description="width x height of each decoded image")
    max_total_image_pixels: int = Field(32_000_000, ge=1, description="decoded pixels of all images of a request")
    max_images: int = Field(16, ge=0)
    max_video_frames: int = Field(256, ge=1, description="frames sampled at video_fps, per request")
    video_fps: float = Field(2.0, gt=0, description="frame rate the processor samples videos at")
    max_prompt_tokens: int = Field(32768, ge=16)
    max_prompt_chars: int | None = Field(
        None, ge=16, description="text characters per request, checked before tokenizing (None: 16 x max_prompt_tokens)"
    )
    max_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(512, ge=1)
    max_speech_seconds: float = Field(300.0, gt=0, description="speech per answer (the Talker stops there)")
    # -- scheduling ---------------------------------------------------------------------------------
    max_sessions: int = Field(16, ge=1, description="sessions admitted at once (running + queued); more get 429")
    queue_timeout_s: float = Field(120.0, gt=0, description="a session that waited this long gets 503")
    max_session_seconds: float = Field(600.0, gt=0, description="generation time after which a session is stopped")
    scheduler: Literal["batch", "single"] = Field(
        "batch", description="batch: every session in one engine (continuous batching); single: one at a time"
    )
    batch_rows: int | None = Field(None, ge=1, description="conversations the engine holds at once (default: max_sessions)")
    prefill_chunk: int | None = Field(512, ge=16, description="prompt tokens read per engine step (None: whole prompts)")
    kv_cache_gb: float | None = Field(None, gt=0, description="KV-cache memory of the engine; bounds batch_rows")
    prefix_reuse: bool = Field(True, description="keep finished conversations' KV rows for their next turn")
    prefill_short_first: bool = Field(True, description="read short prompts (a chat turn) before long ones' pieces")
    encode_async: bool = Field(True, description="run media encoders on the engine's encoder thread, beside its steps")
    max_realtime_connections: int = Field(32, ge=1)
    realtime_max_items: int = Field(40, ge=2, description="conversation items a realtime session keeps")
    realtime_prefill_while_speaking: bool = Field(True, description="server VAD: read each turn into the engine while spoken")
    audio_ttl_s: int = Field(3600, ge=0, description="how long answer transcripts stay referable by audio id")
    # -- connections ---------------------------------------------------------------------------------
    header_timeout_s: float = Field(10.0, gt=0, le=300, description="time to send a request's line and headers")
    keep_alive_timeout_s: float = Field(5.0, gt=0, le=300, description="idle time before a kept-alive connection closes")
    body_timeout_s: float = Field(30.0, gt=0, description="longest pause while a request body is being received")
    max_connections: int = Field(1024, ge=4, description="open connections; past it the idlest are closed")
    edge_workers: int = Field(2, ge=1, le=64, description="threads parsing bodies and decoding media at once")

    @property
    def prompt_chars_limit(self) -> int:
        """Characters of text a request may carry (checked before tokenizing: text that long never fits)."""
        return self.max_prompt_chars if self.max_prompt_chars is not None else 16 * self.max_prompt_tokens
