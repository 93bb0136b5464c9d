"""Test media and the reference processor, for the processing tests.

Media are made here, never downloaded: speech with ``espeak-ng`` (resampled with ``sox``), pictures
with Pillow, and MP4 files with PyAV (drawn frames plus an espeak-ng audio track).

The reference (``transformers`` 5.23) runs in a child process (:class:`ReferenceWorker`) so that the
test process never imports it next to thinktalk. Its video processor requires torchvision, and the
torchvision wheels on PyPI are built against CUDA torch: they do not import next to the CPU torch of
this project. When no working torchvision is importable, the worker puts a minimal stand-in on its
``sys.path`` that implements the five ``torchvision.transforms.v2.functional`` calls the reference
makes (``resize``, ``normalize``, ``to_dtype``, ``grayscale_to_rgb``, ``pad``/``crop``) with the same
``torch`` operators torchvision 0.28 calls (read from its source): bicubic antialiased
``torch.nn.functional.interpolate`` on uint8 tensors on CPU, ``sub``/``div_`` for normalize; its
``io.decode_image`` decodes with Pillow (the test pictures are PNG: lossless, the same pixels). Everything
else the reference does (sampling, smart resize, patch order, placeholders, features) is its own code.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import traceback

import numpy as np

# ----------------------------------------------------------------------------------------------
# Media makers


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def speech_wav(
    path: str,
    text: str = "Hello, this is a test of the audio pipeline.",
    sample_rate: int | None = None,
    channels: int = 1,
    voice: str = "en",
    speed: int = 170,
) -> str:
    """Speak ``text`` with espeak-ng into ``path`` (22.05 kHz mono), then resample/upmix with sox if asked."""
    raw = path if sample_rate is None and channels == 1 else path + ".raw.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", raw, text], check=True, capture_output=True)
    if raw != path:
        args = ["sox", raw]
        args += [path]
        if sample_rate is not None:
            args += ["rate", "-v", str(sample_rate)]
        if channels != 1:
            args += ["channels", str(channels)]
        subprocess.run(args, check=True, capture_output=True)
        os.remove(raw)
    return path


def convert_audio(src: str, dst: str) -> str:
    """Re-encode ``src`` into the format ``dst``'s extension names (flac, ogg, mp3...) with soundfile."""
    import soundfile as sf

    data, sr = sf.read(src, dtype="float32")
    sf.write(dst, data, sr)
    return dst


def tone(seconds: float, sample_rate: int = 16000, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """A sine with a little noise (float32, mono)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape)
    return wave.astype(np.float32)


def picture(width: int, height: int, seed: int = 0, mode: str = "RGB"):
    """A PIL image with a gradient background and a few coloured shapes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(2, max(3, width // 2))), y0 + int(rng.integers(2, max(3, height // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
    return img.convert(mode) if mode != "RGB" else img


def png(path: str, width: int, height: int, seed: int = 0) -> str:
    picture(width, height, seed).save(path)
    return path


def mp4(
    path: str,
    seconds: float = 3.0,
    fps: int = 10,
    width: int = 64,
    height: int = 48,
    audio_wav: str | None = None,
    seed: int = 0,
) -> str:
    """An H.264 MP4 of ``seconds`` with moving shapes; with ``audio_wav``, an AAC track of that file."""
    import av

    rng = np.random.default_rng(seed)
    frames = int(round(seconds * fps))
    container = av.open(path, mode="w")
    vstream = container.add_stream("libx264", rate=fps)
    vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
    astream = None
    audio = None
    if audio_wav is not None:
        import soundfile as sf

        audio, sr = sf.read(audio_wav, dtype="float32", always_2d=True)
        astream = container.add_stream("aac", rate=sr)
        astream.layout = "mono" if audio.shape[1] == 1 else "stereo"
    colour = rng.integers(0, 256, 3)
    for i in range(frames):
        y, x = np.mgrid[0:height, 0:width]
        img = np.stack([(x * 4 + i * 8) % 256, (y * 4) % 256, np.full_like(x, (i * 20) % 256)], -1).astype(np.uint8)
        cx = (i * 5) % max(width - 8, 1)
        img[8:20, cx : cx + 8] = colour
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        for packet in vstream.encode(frame):
            container.mux(packet)
    for packet in vstream.encode():
        container.mux(packet)
    if astream is not None:
        block = 1024
        planar = np.ascontiguousarray(audio.T)
        for start in range(0, planar.shape[1], block):
            chunk = np.ascontiguousarray(planar[:, start : start + block])
            aframe = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=astream.layout.name)
            aframe.sample_rate = astream.rate
            aframe.pts = start
            for packet in astream.encode(aframe):
                container.mux(packet)
        for packet in astream.encode():
            container.mux(packet)
    container.close()
    return path


# ----------------------------------------------------------------------------------------------
# The reference, in a child process


class ReferenceError_(RuntimeError):
    """An exception raised inside the reference worker (its traceback is the message)."""


class ReferenceWorker:
    """Runs functions of this module's ``_ref_*`` family in a child process with transformers loaded."""

    def __init__(self):
        env = dict(os.environ)
        env["TRANSFORMERS_VERBOSITY"] = "error"
        env["TOKENIZERS_PARALLELISM"] = "false"
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--reference-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )

    def __call__(self, name: str, *args, **kwargs):
        pickle.dump((name, args, kwargs), self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.flush()
        ok, value = pickle.load(self.proc.stdout)
        if not ok:
            raise ReferenceError_(value)
        return value

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_WORKER: ReferenceWorker | None = None


def reference() -> ReferenceWorker:
    """The process-wide reference worker (started on first use, closed at exit).

    Skips the calling test when transformers is not installed (it is in the ``test`` extra).
    """
    global _WORKER
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        import pytest

        pytest.skip("the reference (transformers) is not installed")
    if _WORKER is None or _WORKER.proc.poll() is not None:
        import atexit

        _WORKER = ReferenceWorker()
        atexit.register(_WORKER.close)
    return _WORKER


def tiny_processor_dir(root: str, family: str) -> str:
    """A directory with a tiny checkpoint's tokenizer/template/preprocessor files and a minimal config.json."""
    import json

    from thinktalk.testing.tokenizer import write_tokenizer_files

    directory = os.path.join(root, family)
    write_tokenizer_files(directory, family)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": family}, f)
    return directory


_TORCHVISION_STANDIN = {
    "torchvision/__init__.py": '__version__ = "0.28.0"\nfrom . import io, transforms  # noqa\n',
    "torchvision/io.py": """
import io

import numpy as np
import torch


class ImageReadMode:
    UNCHANGED = "UNCHANGED"
    GRAY = "L"
    RGB = "RGB"
    RGB_ALPHA = "RGBA"


def decode_image(source, mode=ImageReadMode.UNCHANGED, apply_exif_orientation=False):
    # Pillow decoding (lossless formats decode to the same pixels as torchvision's libpng)
    from PIL import Image, ImageOps

    if isinstance(source, torch.Tensor):
        source = io.BytesIO(source.numpy().tobytes())
    img = Image.open(source)
    if apply_exif_orientation:
        img = ImageOps.exif_transpose(img)
    if mode != ImageReadMode.UNCHANGED:
        img = img.convert(mode)
    arr = np.array(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
""",
    "torchvision/transforms/__init__.py": "from .functional import InterpolationMode  # noqa\nfrom . import v2  # noqa\n",
    "torchvision/transforms/functional.py": """
import enum
import numpy as np
import torch


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def pil_to_tensor(pic):
    arr = np.array(pic, copy=True)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
""",
    "torchvision/transforms/v2/__init__.py": "from . import functional  # noqa\n",
    "torchvision/transforms/v2/functional.py": """
import torch
import torch.nn.functional as F

from ..functional import InterpolationMode, pil_to_tensor  # noqa


def resize(image, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    # torchvision 0.28 resize_image: uint8 stays uint8 for bicubic on CPU (native kernel);
    # otherwise float32, then clamp + round back to the input integer dtype.
    if isinstance(interpolation, str):
        interpolation = InterpolationMode(interpolation)
    align_corners = None
    if interpolation in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC):
        align_corners = False
    else:
        antialias = False
    shape = image.shape
    c, h, w = shape[-3:]
    new_h, new_w = int(size[0]), int(size[1])
    if (new_h, new_w) == (h, w):
        return image
    dtype = image.dtype
    acceptable = [torch.float32, torch.float64]
    if interpolation in (InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT):
        acceptable.append(torch.uint8)
    elif image.device.type == "cpu":
        if interpolation == InterpolationMode.BICUBIC:
            acceptable.append(torch.uint8)
        elif interpolation == InterpolationMode.BILINEAR and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            acceptable.append(torch.uint8)
    image = image.reshape(-1, c, h, w)
    need_cast = dtype not in acceptable
    if need_cast:
        image = image.to(torch.float32)
    image = F.interpolate(image, size=[new_h, new_w], mode=interpolation.value, align_corners=align_corners,
                          antialias=antialias)
    if need_cast:
        if interpolation == InterpolationMode.BICUBIC and dtype == torch.uint8:
            image = image.clamp_(min=0, max=255)
        if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            image = image.round_()
        image = image.to(dtype)
    return image.reshape(shape[:-3] + (c, new_h, new_w))


def normalize(image, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device)
    std = torch.as_tensor(std, dtype=image.dtype, device=image.device)
    if mean.ndim == 1:
        mean = mean.view(-1, 1, 1)
    if std.ndim == 1:
        std = std.view(-1, 1, 1)
    image = image.sub_(mean) if inplace else image.sub(mean)
    return image.div_(std)


def to_dtype(image, dtype=torch.float32, scale=False):
    if image.dtype == dtype:
        return image
    if not scale:
        return image.to(dtype)
    if not image.is_floating_point() and dtype.is_floating_point:
        return image.to(dtype).mul_(1.0 / 255)
    if image.is_floating_point() and not dtype.is_floating_point:
        return image.mul(255 + 1.0 - 1e-3).to(dtype)
    return image.to(dtype)


def grayscale_to_rgb(image):
    return image if image.shape[-3] == 3 else image.repeat_interleave(3, dim=-3)


def to_tensor(pic):
    return to_dtype(pil_to_tensor(pic), torch.float32, scale=True)


def crop(image, top, left, height, width):
    return image[..., top : top + height, left : left + width]


def pad(image, padding, fill=0, padding_mode="constant"):
    left, top, right, bottom = padding if len(padding) == 4 else (padding[0], padding[1], padding[0], padding[1])
    return F.pad(image, [left, right, top, bottom], mode=padding_mode, value=fill)
""",
}


def _install_torchvision_standin() -> str:
    root = tempfile.mkdtemp(prefix="tv-standin-")
    for rel, text in _TORCHVISION_STANDIN.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.path.insert(0, root)
    import importlib

    importlib.invalidate_caches()
    return root


_REF_CACHE: dict = {}


def _ref_processor(directory: str, backend: str | None = None):
    key = (directory, backend)
    if key not in _REF_CACHE:
        import copy

        from transformers import AutoImageProcessor, AutoProcessor

        if backend is None:
            _REF_CACHE[key] = AutoProcessor.from_pretrained(directory)
        else:
            # Only the image processor has two backends; the video processor is torchvision-only.
            processor = copy.copy(_ref_processor(directory))
            processor.image_processor = AutoImageProcessor.from_pretrained(directory, backend=backend)
            _REF_CACHE[key] = processor
    return _REF_CACHE[key]


def _to_plain(out) -> dict:
    import torch

    result = {}
    for k, v in dict(out).items():
        if isinstance(v, torch.Tensor):
            result[k] = v.detach().cpu()
        elif isinstance(v, np.ndarray):
            result[k] = torch.from_numpy(v)
        else:
            result[k] = v
    return result


def _ref_describe(directory: str, backend: str | None = None) -> dict:
    p = _ref_processor(directory, backend)
    return {
        "processor": type(p).__name__,
        "tokenizer": type(p.tokenizer).__name__,
        "image_processor": type(p.image_processor).__name__,
        "video_processor": type(p.video_processor).__name__,
        "feature_extractor": type(p.feature_extractor).__name__,
        "tokens": {n: getattr(p, n) for n in ("image_token", "audio_token", "video_token")},
        "token_ids": {n: getattr(p, n) for n in ("image_token_id", "audio_token_id", "video_token_id")},
        "eos_token_id": p.tokenizer.eos_token_id,
        "pad_token_id": p.tokenizer.pad_token_id,
    }


def _ref_call(directory: str, backend: str | None = None, **kwargs) -> dict:
    p = _ref_processor(directory, backend)
    kwargs.setdefault("return_tensors", "pt")
    return _to_plain(p(**kwargs))


def _ref_apply_chat_template(directory: str, conversation, **kwargs):
    return _ref_processor(directory).apply_chat_template(conversation, **kwargs)


def _ref_encode(directory: str, text: str) -> list[int]:
    return _ref_processor(directory).tokenizer.encode(text, add_special_tokens=False)


def _ref_encode_split(directory: str, text: str) -> list[int]:
    """The reference tokenizer reading special-token strings as plain text (``split_special_tokens``)."""
    return _ref_processor(directory).tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _ref_decode(directory: str, ids, **kwargs) -> str:
    return _ref_processor(directory).tokenizer.decode(ids, **kwargs)


def _ref_features(directory: str, audio, **kwargs) -> dict:
    kwargs.setdefault("return_tensors", "pt")
    return _to_plain(_ref_processor(directory).feature_extractor(audio, **kwargs))


def _ref_images(directory: str, images, backend: str | None = None, **kwargs) -> dict:
    kwargs.setdefault("return_tensors", "pt")
    return _to_plain(_ref_processor(directory, backend).image_processor(images, **kwargs))


def _ref_load_audio(path: str, sampling_rate: int = 16000) -> np.ndarray:
    from transformers.audio_utils import load_audio

    return load_audio(path, sampling_rate=sampling_rate, backend="soundfile")


def _ref_audio_token_counts(family: str, frames: list[int], n_window: int = 50) -> list[int]:
    import torch

    lengths = torch.tensor(frames)
    if family == "qwen2_5_omni":
        from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

        return _get_feat_extract_output_lengths(lengths).tolist()
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

    return _get_feat_extract_output_lengths(lengths, n_window).tolist()


def _ref_mel_filters(directory: str) -> np.ndarray:
    return np.asarray(_ref_processor(directory).feature_extractor.mel_filters)


def _ref_smart_resize(height: int, width: int, **kwargs) -> tuple[int, int]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, **kwargs)


def _ref_load_video_frames(path: str) -> np.ndarray:
    from transformers.video_utils import load_video

    frames, _ = load_video(path, backend="pyav")
    return np.asarray(frames)


def _worker_main() -> None:
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # anything the reference prints must not corrupt the pickle stream
    try:
        import torchvision  # noqa: F401
    except Exception:
        _install_torchvision_standin()
    inp = sys.stdin.buffer
    while True:
        try:
            name, args, kwargs = pickle.load(inp)
        except EOFError:
            return
        try:
            value = (True, globals()["_ref_" + name](*args, **kwargs))
        except Exception:
            value = (False, traceback.format_exc())
        pickle.dump(value, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()


if __name__ == "__main__" and "--reference-worker" in sys.argv:
    _worker_main()
