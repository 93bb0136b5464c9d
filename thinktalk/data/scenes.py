"""Pictures and videos of coloured shapes, drawn with Pillow (and encoded with PyAV), deterministic from a seed.

A scene is a list of :class:`Shape` on a plain background. Every shape is drawn inside its own box, and boxes
never overlap, so a count question always has one right answer however small the picture is.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (235, 200, 20),
           "purple": (140, 50, 170), "orange": (245, 130, 20)}  # fmt: skip
BACKGROUND = (245, 245, 240)
PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles"}


def grey(level: int) -> str:
    """An unnamed colour: a grey of ``level`` (0..255). Shape and count pictures of the training split draw some
    shapes in greys, so the colour of a shape never tells its form (no grey is a named colour: no held-out pair)."""
    return f"grey{int(level)}"


def colour_rgb(colour: str) -> tuple[int, int, int]:
    if colour in COLOURS:
        return COLOURS[colour]
    if colour.startswith("grey") and colour[4:].isdigit() and 0 <= int(colour[4:]) <= 255:
        return (int(colour[4:]),) * 3
    raise ValueError(f"unknown colour {colour!r} (known: {', '.join(COLOURS)}, greyN)")


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS, or an unnamed grey (grey())
    x: int  # left of the box, pixels
    y: int  # top of the box
    size: int  # side of the box


def place(rng: random.Random, kinds_colours: list[tuple[str, str]], width: int, height: int,
          min_size: int = 16, max_size: int = 36, tries: int = 200) -> list[Shape]:  # fmt: skip
    """Random non-overlapping boxes for ``kinds_colours`` (sizes shrink when the picture is crowded)."""
    shapes: list[Shape] = []
    for kind, colour in kinds_colours:
        for attempt in range(tries):
            hi = max(min_size, max_size - attempt // 20 * 4)
            size = rng.randint(min_size, hi)
            x, y = rng.randint(1, width - size - 1), rng.randint(1, height - size - 1)
            if all(
                x + size + 2 <= s.x or s.x + s.size + 2 <= x or y + size + 2 <= s.y or s.y + s.size + 2 <= y
                for s in shapes
            ):
                shapes.append(Shape(kind, colour, x, y, size))
                break
        else:
            raise ValueError(f"cannot place {len(kinds_colours)} shapes on a {width}x{height} picture")
    return shapes


def draw(shapes: list[Shape], width: int, height: int):
    """The PIL image of ``shapes`` on the plain background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for s in shapes:
        box = (s.x, s.y, s.x + s.size - 1, s.y + s.size - 1)
        fill = colour_rgb(s.colour)
        if s.kind == "square":
            pen.rectangle(box, fill=fill)
        elif s.kind == "circle":
            pen.ellipse(box, fill=fill)
        elif s.kind == "triangle":
            pen.polygon(
                [(s.x + s.size / 2, s.y), (s.x, s.y + s.size - 1), (s.x + s.size - 1, s.y + s.size - 1)], fill=fill
            )
        else:
            raise ValueError(f"unknown shape {s.kind!r} (known: {', '.join(SHAPES)})")
    return image


def write_video(path: str, kind: str, colour: str, direction: str, audio: np.ndarray | None, sample_rate: int,
                seconds: float = 4.0, fps: int = 4, width: int = 96, height: int = 96, size: int = 28) -> str:  # fmt: skip
    """An MP4 (H.264, with an AAC track of ``audio`` when given) of one shape moving ``direction``
    (``left``/``right``/``up``/``down``) across the picture."""
    import av

    frames = int(round(seconds * fps))
    container = av.open(path, mode="w")
    vstream = container.add_stream("libx264", rate=fps, options={"threads": "1"})
    vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
    vstream.thread_count = 1
    astream = container.add_stream("aac", rate=sample_rate) if audio is not None else None
    if astream is not None:
        astream.layout = "mono"
    span_x, span_y = width - size - 2, height - size - 2
    for i in range(frames):
        t = i / max(frames - 1, 1)
        fx, fy = {"right": (t, 0.5), "left": (1 - t, 0.5), "down": (0.5, t), "up": (0.5, 1 - t)}[direction]
        img = draw([Shape(kind, colour, 1 + int(fx * span_x), 1 + int(fy * span_y), size)], width, height)
        for packet in vstream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
            container.mux(packet)
    for packet in vstream.encode():
        container.mux(packet)
    if astream is not None:
        planar = np.ascontiguousarray(audio[None, :].astype(np.float32))
        for start in range(0, planar.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(planar[:, start : start + 1024]), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = sample_rate, start
            for packet in astream.encode(frame):
                container.mux(packet)
        for packet in astream.encode():
            container.mux(packet)
    container.close()
    return path
