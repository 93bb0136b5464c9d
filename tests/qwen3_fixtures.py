"""Qwen3-Omni test fixtures: tiny reference checkpoints and synthetic model inputs.

Import the fixtures into a test module (``from tests.qwen3_fixtures import tiny3_weights  # noqa: F401``);
the checkpoints are built once per test session whichever modules use them.

Inputs are built without the processor (placeholder-token runs + random media features of the right
sizes, laid out as the Qwen3-Omni processor lays them out), so model parity does not depend on
tokenizer files.
"""

from __future__ import annotations

import pytest
import torch

from tests.qwen25_inputs import batch  # same batch layout: left padding, media concatenated in row order
from thinktalk.positions import aut_token_count
from thinktalk.testing.tiny import build_reference_checkpoint

AUDIO, AUDIO_START, AUDIO_END = 151675, 151669, 151670
IMAGE, VIDEO, VISION_START, VISION_END = 151655, 151656, 151652, 151653
IM_START, IM_END, NEWLINE = 151644, 151645, 198
SYSTEM, USER, ASSISTANT = 8948, 872, 77091
PATCH_DIM = 3 * 2 * 16 * 16
POSITIONS_PER_SECOND = 13  # the tiny (and the published) config's position_id_per_seconds

_BUILT: dict[tuple, str] = {}


def _build(tmp_path_factory, name: str, **kwargs) -> str:
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _BUILT:
        d = tmp_path_factory.mktemp(name)
        build_reference_checkpoint(str(d), "qwen3_omni_moe", seed=0, **kwargs)
        _BUILT[key] = str(d)
    return _BUILT[key]


@pytest.fixture(scope="session")
def tiny3_weights(tmp_path_factory) -> str:
    """Qwen3-Omni tiny checkpoint (Thinker + Talker + Code2Wav weights and config.json only)."""
    return _build(tmp_path_factory, "tiny3_weights", with_speech=True, extras=False)


@pytest.fixture(scope="session")
def tiny3(tmp_path_factory) -> str:
    """Qwen3-Omni tiny checkpoint with tokenizer, chat template and preprocessor config."""
    return _build(tmp_path_factory, "tiny3", with_speech=True, extras=True)


@pytest.fixture(scope="session")
def tiny3_text_only(tmp_path_factory) -> str:
    """A Thinking/Captioner-like checkpoint: Thinker only, enable_audio_output=false."""
    return _build(tmp_path_factory, "tiny3_text_only", with_speech=False, extras=False)


class InputBuilder:
    """Builds one row of tokens and the media tensors that go with it."""

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.tokens: list[int] = []
        self.audio_feats: list[torch.Tensor] = []
        self.images: list[tuple[torch.Tensor, list[int]]] = []
        self.videos: list[tuple[torch.Tensor, list[int], float]] = []

    def text(self, n: int) -> InputBuilder:
        self.tokens += torch.randint(100, 5000, (n,), generator=self.gen).tolist()
        return self

    def turn(self, role: int) -> InputBuilder:
        """Close the open turn (if any) and open one: <|im_end|>\\n<|im_start|>role\\n."""
        if self.tokens:
            self.tokens += [IM_END, NEWLINE]
        self.tokens += [IM_START, role, NEWLINE]
        return self

    def audio(self, frames: int) -> InputBuilder:
        self.audio_feats.append(torch.randn(128, frames, generator=self.gen))
        self.tokens += [AUDIO_START] + [AUDIO] * aut_token_count(frames) + [AUDIO_END]
        return self

    def image(self, t: int, h: int, w: int) -> InputBuilder:
        self.images.append((torch.randn(t * h * w, PATCH_DIM, generator=self.gen), [t, h, w]))
        self.tokens += [VISION_START] + [IMAGE] * (t * h * w // 4) + [VISION_END]
        return self

    def video(self, t: int, h: int, w: int, second_per_grid: float = 1.0, audio_frames: int | None = None) -> InputBuilder:
        self.videos.append((torch.randn(t * h * w, PATCH_DIM, generator=self.gen), [t, h, w], second_per_grid))
        per_frame = h * w // 4
        if audio_frames is None:
            self.tokens += [VISION_START] + [VIDEO] * (t * per_frame) + [VISION_END]
            return self
        # The processor's audio-in-video layout: video and audio tokens merged by time position.
        self.audio_feats.append(torch.randn(128, audio_frames, generator=self.gen))
        n_audio = aut_token_count(audio_frames)
        v_time = [f * second_per_grid * POSITIONS_PER_SECOND for f in range(t) for _ in range(per_frame)]
        merged, i, j = [], 0, 0
        while i < len(v_time) and j < n_audio:
            if v_time[i] <= j:
                merged.append(VIDEO)
                i += 1
            else:
                merged.append(AUDIO)
                j += 1
        merged += [VIDEO] * (len(v_time) - i) + [AUDIO] * (n_audio - j)
        self.tokens += [VISION_START, AUDIO_START] + merged + [AUDIO_END, VISION_END]
        return self

    def assistant(self) -> InputBuilder:
        """End the prompt with the generation prompt "<|im_end|>\\n<|im_start|>assistant\\n"."""
        return self.turn(ASSISTANT)


def thinker_cases() -> dict[str, tuple[dict, bool]]:
    """name -> (inputs, use_audio_in_video) for Thinker logits / positions parity."""
    B = InputBuilder

    def user(seed: int) -> InputBuilder:
        return B(seed).turn(USER)

    return {
        "text": (batch([user(1).text(12).assistant()]), False),
        "audio": (batch([user(2).text(3).audio(230).text(4).assistant()], pad_to_frames=300), False),
        "image": (batch([user(3).text(3).image(1, 8, 12).text(4).assistant()]), False),
        "video": (batch([user(4).text(3).video(4, 4, 8, second_per_grid=1.0).text(4).assistant()]), False),
        "video_fractional_time": (batch([user(5).text(2).video(6, 4, 4, second_per_grid=0.5).text(2).assistant()]), False),
        "video_with_audio": (batch([user(6).text(3).video(3, 4, 4, second_per_grid=2.0, audio_frames=520).text(3).assistant()]), True),
        "images_and_audios": (batch([user(7).text(2).image(1, 4, 4).audio(120).video(2, 4, 4).image(1, 8, 4).audio(64).text(3).assistant()]), False),
        "batch_left_padding": (batch([user(8).text(4).image(1, 4, 8).text(2).assistant(), user(9).text(9).audio(150).text(6).assistant()]), False),
        "multi_turn": (batch([B(10).turn(SYSTEM).text(5).turn(USER).text(6).turn(ASSISTANT).text(3).turn(USER).audio(90).text(2).assistant()]), False),
    }
