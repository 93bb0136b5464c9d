"""The tasks of thinktalk-tiny's data: what is asked, what the answer is, and which combinations are held out.

Every task draws its content from a ``random.Random``; ``held_out=True`` draws only combinations that the
training split never contains (a colour x shape pair, a shape x count pair, an arithmetic pair, a phrase),
``held_out=False`` only the others. :func:`is_held_out` is the rule, used by both and by the tests.
"""

from __future__ import annotations

import dataclasses
import random

from thinktalk.data.scenes import COLOURS, PLURALS, SHAPES, Shape, grey, place

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
           "sixteen seventeen eighteen").split()  # fmt: skip
NOUNS = ("ball", "box", "star", "tree", "bird", "boat", "cup", "hat")
GREETINGS = ("good morning", "good night", "thank you", "hello there", "see you soon", "how are you")
DIRECTIONS = ("left", "right", "up", "down")

# Unseen in training: these colour x shape pairs (anywhere: pictures, videos), these shape x count pairs
# in count questions, phrases with (colour + noun) % 5 == 0, and the voices of speech.TEST_VOICES (every spoken
# held-out question). Arithmetic has no combination of the kinds (colour x shape x count x position x
# voice) but the voice: its held-out rows are all spoken, by unseen voices, over every pair of operands.
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})
HELD_OUT_COUNTS = frozenset({("circle", 3), ("triangle", 2), ("square", 4)})
MAX_COUNT = 4

TASKS = ("colour", "shape", "count", "arithmetic", "say", "transcribe", "video")
# Shares of the training rows (the held-out split is balanced over tasks).
TRAIN_WEIGHTS = {
    "colour": 0.2,
    "shape": 0.15,
    "count": 0.2,
    "arithmetic": 0.2,
    "say": 0.1,
    "transcribe": 0.1,
    "video": 0.05,
}
PICTURE = 96  # pixels, square: 6 x 6 patches of 16, 9 merged tokens
GREY_SHARE = 0.5  # training shape and count pictures drawn in unnamed greys (the colour must not tell the form)


@dataclasses.dataclass
class Item:
    """One question: its text, the answer sentence, the word that decides correctness, and its media."""

    task: str
    question: str  # typed question (also what is spoken for a spoken question)
    answer: str
    key: str  # the answer's deciding word(s): "red", "three", "seven", "red boat"
    shapes: list[Shape] = dataclasses.field(default_factory=list)  # picture (colour/shape/count)
    video: dict | None = None  # {"kind", "colour", "direction"}
    spoken_phrase: str | None = None  # transcribe: what the audio says
    speakable: bool = True  # the question can be spoken instead of typed
    combinations: list = dataclasses.field(default_factory=list)  # held-out-relevant content not in shapes/video


def is_held_out(kind: str, value) -> bool:
    if kind == "pair":
        return tuple(value) in HELD_OUT_PAIRS
    if kind == "count":
        return tuple(value) in HELD_OUT_COUNTS
    if kind == "voice":
        from thinktalk.data.speech import TEST_VOICES

        return value in TEST_VOICES
    if kind == "phrase":
        return phrase_held_out(value)
    raise ValueError(f"unknown held-out kind {kind!r}")


def phrases() -> list[str]:
    return [f"{c} {n}" for c in COLOURS for n in NOUNS] + list(GREETINGS)


def phrase_held_out(phrase: str) -> bool:
    words = phrase.split()
    if len(words) == 2 and words[0] in COLOURS and words[1] in NOUNS:
        return (list(COLOURS).index(words[0]) + NOUNS.index(words[1])) % 5 == 0
    return phrase in ("see you soon",)


def _pairs(held_out: bool) -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HELD_OUT_PAIRS) == held_out]


def _seen_pairs() -> list[tuple[str, str]]:
    return _pairs(False)


def number(n: int) -> str:
    return NUMBERS[n]


def colour_item(rng: random.Random, held_out: bool) -> Item:
    colour, kind = rng.choice(_pairs(held_out))
    others = [s for s in SHAPES if s != kind]
    rng.shuffle(others)
    extra = others[: rng.randint(0, 2)]
    kinds_colours = [(kind, colour)] + [(k, rng.choice([c for c, s in _seen_pairs() if s == k])) for k in extra]
    rng.shuffle(kinds_colours)
    shapes = place(rng, kinds_colours, PICTURE, PICTURE)
    return Item("colour", f"What colour is the {kind}?", f"The {kind} is {colour}.", colour, shapes)


def _grey(rng: random.Random) -> str:
    return grey(rng.randint(40, 170))  # the background is 245


def shape_item(rng: random.Random, held_out: bool) -> Item:
    colour, kind = rng.choice(_pairs(held_out))
    if not held_out and rng.random() < GREY_SHARE:
        colour = _grey(rng)
    shapes = place(rng, [(kind, colour)], PICTURE, PICTURE, max_size=48)
    return Item("shape", "What shape is this?", f"It is a {kind}.", kind, shapes)


def count_item(rng: random.Random, held_out: bool) -> Item:
    combos = [(k, n) for k in SHAPES for n in range(1, MAX_COUNT + 1) if ((k, n) in HELD_OUT_COUNTS) == held_out]
    kind, n = rng.choice(combos)
    colours = [c for c, s in _seen_pairs() if s == kind]
    greys = not held_out and rng.random() < GREY_SHARE
    kinds_colours = [(kind, _grey(rng) if greys else rng.choice(colours)) for _ in range(n)]
    if rng.random() < 0.5:  # a distractor of another shape
        other = rng.choice([s for s in SHAPES if s != kind])
        kinds_colours.append((other, _grey(rng) if greys else rng.choice([c for c, s in _seen_pairs() if s == other])))
    rng.shuffle(kinds_colours)
    shapes = place(rng, kinds_colours, PICTURE, PICTURE, min_size=14, max_size=28)
    plural = PLURALS[kind]
    answer = f"There is one {kind}." if n == 1 else f"There are {number(n)} {plural}."
    return Item("count", f"How many {plural} are there?", answer, number(n), shapes)


def arithmetic_item(rng: random.Random, held_out: bool) -> Item:
    """Every operand pair in every split: arithmetic is held out by voice only (the split spells it)."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice(("plus", "minus"))
    if op == "minus" and b > a:
        a, b = b, a
    result = a + b if op == "plus" else a - b
    return Item("arithmetic", f"What is {number(a)} {op} {number(b)}?",
                f"{number(a).capitalize()} {op} {number(b)} is {number(result)}.", number(result))  # fmt: skip


def _phrase(rng: random.Random, held_out: bool) -> str:
    return rng.choice([p for p in phrases() if phrase_held_out(p) == held_out])


def say_item(rng: random.Random, held_out: bool) -> Item:
    phrase = _phrase(rng, held_out)
    return Item("say", f"Say {phrase}.", f"{phrase.capitalize()}.", phrase)


# The transcription instructions: the task's own question, and the official Qwen3-Omni speech-recognition prompts
# (thinktalk.asr: what `model.transcribe`, `thinktalk transcribe` and /v1/audio/transcriptions send), whose answer
# is the transcript alone.
OWN_TRANSCRIBE = "What did I say?"
ASR_INSTRUCTIONS = ("Transcribe the audio into text.", "Transcribe the English audio into text.",
                    "Listen to the provided English speech and produce a translation in English text.")  # fmt: skip


def transcribe_item(rng: random.Random, held_out: bool) -> Item:
    """A phrase, or (half of the rows) the answer sentence of another task: the model's own transcription of its
    spoken answers is one of the speech checks, so it must have learned to transcribe such sentences. Half of the
    rows ask "What did I say?" ("You said red boat."), the others one of the official ASR instructions ("Red boat.")."""
    combinations: list = []
    if rng.random() < 0.5:
        source = MAKERS[rng.choice(("colour", "shape", "count", "arithmetic"))](rng, held_out)
        phrase = source.answer.rstrip(".")
        phrase = phrase[0].lower() + phrase[1:]
        combinations = item_combinations(source)
    else:
        phrase = _phrase(rng, held_out)
    if rng.random() < 0.5:
        question, answer = OWN_TRANSCRIBE, f"You said {phrase}."
    else:
        question, answer = rng.choice(ASR_INSTRUCTIONS), f"{phrase[0].upper()}{phrase[1:]}."
    item = Item("transcribe", question, answer, phrase, spoken_phrase=phrase, speakable=False)
    item.combinations = combinations
    return item


def video_item(rng: random.Random, held_out: bool) -> Item:
    colour, kind = rng.choice(_pairs(held_out))
    direction = rng.choice(DIRECTIONS)
    return Item("video", "What is in the video?", f"A {colour} {kind} moving {direction}.", f"{colour} {kind} {direction}",
                video={"kind": kind, "colour": colour, "direction": direction})  # fmt: skip


MAKERS = {"colour": colour_item, "shape": shape_item, "count": count_item, "arithmetic": arithmetic_item,
          "say": say_item, "transcribe": transcribe_item, "video": video_item}  # fmt: skip


def make_item(task: str, rng: random.Random, held_out: bool) -> Item:
    if task not in MAKERS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    return MAKERS[task](rng, held_out)


def item_combinations(item: Item) -> list[tuple[str, object]]:
    """The held-out-relevant combinations an item contains (for the disjointness check)."""
    combos: list[tuple[str, object]] = [("pair", (s.colour, s.kind)) for s in item.shapes] + list(item.combinations)
    if item.video:
        combos.append(("pair", (item.video["colour"], item.video["kind"])))
    if item.task == "count":
        n = NUMBERS.index(item.key)
        kind = item.question.split()[2]
        combos.append(("count", (next(k for k, p in PLURALS.items() if p == kind), n)))
    if item.task in ("say", "transcribe") and item.key in phrases():
        combos.append(("phrase", item.key))
    return combos
