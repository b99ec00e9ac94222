"""Procedural scenes with captions and 4-way questions: pictures a small encoder can learn to see, with no download.

Every scene is one of four kinds, drawn on a dark noisy background (default 64 × 64 px):

* ``object``: one shape (square, circle, triangle, cross) of one colour, small or large, in one quadrant;
* ``count``: one to four small copies of one shape in one colour, in distinct cells of a 3 × 3 grid;
* ``pair``: a large and a small shape of two different colours, in two different quadrants;
* ``word``: a short printed word (`WORDS`, Pillow's built-in bitmap font) in light grey.

A scene has a caption ("a large red circle at the top left", "three blue squares", "a large green cross and a
small red triangle", "the word CAT") and its attributes as a dict of caption slots (`SLOTS`): what an encoder is
pretrained to predict (`peft_mma.vision.scene_encoder`), never in a question/answer format. `scene_qa_dataset` asks
six kinds of 4-way questions about scenes (colour, shape, position, count, which is larger, read the word); chance is
25 %. `scene_dataset` and `scene_qa_dataset` are deterministic per (seed, split), and the "train" and "eval" splits
never share a scene: a scene's split is a hash of its content (kind, attributes and pixel positions), and shapes
are drawn at whole-pixel centres, so that two scenes of different content never draw the same pixels.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .templates import OPTION_LETTERS, balanced_answers

KINDS = ("object", "count", "pair", "word")
SHAPES = ("square", "circle", "triangle", "cross")
COLOURS = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.9, 0.2), "blue": (0.15, 0.35, 1.0), "yellow": (1.0, 0.9, 0.1)}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNTS = ("one", "two", "three", "four")
WORDS = ("CAT", "DOG", "SUN", "BOX", "CUP", "HAT", "PEN", "KEY")
# caption slots an encoder learns to predict, with their values (`None`: the slot does not apply to the scene)
SLOTS: dict[str, tuple[str, ...]] = {
    "kind": KINDS,
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "position": POSITIONS,
    "count": COUNTS,
    "large_colour": tuple(COLOURS),
    "small_colour": tuple(COLOURS),
    "word": WORDS,
}
QUESTIONS = {
    "colour": ("object", "What colour is the shape?"),
    "shape": ("object", "Which shape is in the picture?"),
    "position": ("object", "Where is the shape?"),
    "count": ("count", "How many shapes are there?"),
    "larger": ("pair", "What colour is the larger shape?"),
    "word": ("word", "Which word is written in the picture?"),
}
# what the picture shows, stated before the answer when a dataset is `explained` (ScienceQA's "EA" format)
STATEMENTS = {
    "colour": "The shape is {}.",
    "shape": "The shape is a {}.",
    "position": "The shape is at the {}.",
    "count": "The number of shapes is {}.",
    "larger": "The larger shape is {}.",
    "word": "The word is {}.",
}
EVAL_BUCKETS = 5  # one content-hash bucket in five is held out for evaluation
_HALF = {"small": 0.12, "large": 0.22}  # half the extent of a shape, as a share of the image side


@dataclass
class Scene:
    """One scene: its `kind`, caption slots (`attributes`) and what is drawn: (shape, colour, half size, x, y) per
    shape in pixels, and an optional word at (x, y)."""

    kind: str
    attributes: dict[str, str]
    shapes: list[tuple[str, str, float, float, float]] = field(default_factory=list)
    word: tuple[str, int, int] | None = None
    image_size: int = 64

    @property
    def caption(self) -> str:
        a = self.attributes
        if self.kind == "object":
            return f"a {a['size']} {a['colour']} {a['shape']} at the {a['position']}"
        if self.kind == "count":
            plural = "" if a["count"] == "one" else "es" if a["shape"] == "cross" else "s"
            return f"{a['count']} {a['colour']} {a['shape']}{plural}"
        if self.kind == "pair":
            (large, *_), (small, *_) = self.shapes
            return f"a large {a['large_colour']} {large} and a small {a['small_colour']} {small}"
        return f"the word {a['word']}"

    @property
    def key(self) -> str:
        """The scene's content, rounded to pixels: what decides its split."""
        drawn = sorted((s, c, round(h), round(x), round(y)) for s, c, h, x, y in self.shapes)  # not drawing order
        return f"{self.kind}|{sorted(self.attributes.items())}|{drawn}|{self.word}|{self.image_size}"

    @property
    def split(self) -> str:
        return "eval" if zlib.crc32(self.key.encode()) % EVAL_BUCKETS == 0 else "train"

    def draw(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The (3, S, S) float image in [0, 1]: background tint and noise from `generator`, then the content."""
        size = self.image_size
        image = torch.rand(3, 1, 1, generator=generator) * 0.15 + torch.rand(3, size, size, generator=generator) * 0.04
        grid = torch.arange(size, dtype=torch.float32) + 0.5
        y, x = grid.view(-1, 1), grid.view(1, -1)
        for shape, colour, half, cx, cy in self.shapes:
            brightness = 0.8 + 0.2 * float(torch.rand((), generator=generator))
            mask = _shape_mask(shape, x - cx, y - cy, half)
            rgb = torch.tensor(COLOURS[colour]).view(3, 1, 1) * brightness
            image = torch.where(mask, rgb, image)
        if self.word is not None:
            text, left, top = self.word
            glyphs = _word_mask(text, max(1, size // 32))
            h, w = glyphs.shape
            patch = image[:, top : top + h, left : left + w]
            image[:, top : top + h, left : left + w] = torch.where(glyphs, torch.full_like(patch, 0.9), patch)
        return image.clamp_(0.0, 1.0)


def _shape_mask(shape: str, dx: torch.Tensor, dy: torch.Tensor, half: float) -> torch.Tensor:
    """Pixels of `shape` of half extent `half` around offsets (dx, dy) from its centre: a (S, S) bool mask."""
    ax, ay = dx.abs(), dy.abs()
    if shape == "square":
        return (ax <= half) & (ay <= half)
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "triangle":  # apex up: the width grows from 0 at the top to the full base at the bottom
        return (ay <= half) & (ax <= (dy + half) / 2)
    if shape == "cross":
        bar = half / 3
        return ((ax <= bar) & (ay <= half)) | ((ay <= bar) & (ax <= half))
    raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")


@lru_cache(maxsize=64)
def _word_mask(text: str, scale: int) -> torch.Tensor:
    """`text` in Pillow's built-in bitmap font (6 × 11 px a glyph), each pixel repeated `scale` times: (h, w) bool."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default_imagefont()
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(canvas).text((-left, -top), text, fill=255, font=font)
    mask = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(canvas.height, canvas.width) > 127
    return mask.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def random_scene(rng: random.Random, kind: str, image_size: int = 64) -> Scene:
    """A scene of `kind` with every attribute drawn from `rng`."""
    s = image_size
    colours = list(COLOURS)
    if kind == "object":
        shape, colour, size, quadrant = rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES), rng.randrange(4)
        cx, cy = _quadrant_centre(rng, quadrant, s)
        attributes = {"shape": shape, "colour": colour, "size": size, "position": POSITIONS[quadrant]}
        return Scene(kind, {"kind": kind, **attributes}, [(shape, colour, _HALF[size] * s, cx, cy)], image_size=s)
    if kind == "count":
        count, shape, colour = rng.randint(1, 4), rng.choice(SHAPES), rng.choice(colours)
        cells = rng.sample(range(9), count)
        half = 0.1 * s
        shapes = [
            (
                shape,
                colour,
                half,
                round((c % 3 + 0.5) * s / 3 + rng.uniform(-1.5, 1.5)),
                round((c // 3 + 0.5) * s / 3 + rng.uniform(-1.5, 1.5)),
            )
            for c in cells
        ]
        attributes = {"kind": kind, "shape": shape, "colour": colour, "count": COUNTS[count - 1]}
        return Scene(kind, attributes, shapes, image_size=s)
    if kind == "pair":
        large, small = rng.sample(colours, 2)
        quadrants = rng.sample(range(4), 2)
        shapes = [
            (rng.choice(SHAPES), large, _HALF["large"] * s, *_quadrant_centre(rng, quadrants[0], s)),
            (rng.choice(SHAPES), small, _HALF["small"] * s, *_quadrant_centre(rng, quadrants[1], s)),
        ]
        return Scene(kind, {"kind": kind, "large_colour": large, "small_colour": small}, shapes, image_size=s)
    if kind == "word":
        word = rng.choice(WORDS)
        h, w = _word_mask(word, max(1, s // 32)).shape
        return Scene(
            kind,
            {"kind": kind, "word": word},
            word=(word, rng.randint(1, s - w - 1), rng.randint(1, s - h - 1)),
            image_size=s,
        )
    raise ValueError(f"Unknown scene kind {kind!r}; expected one of {KINDS}.")


def _quadrant_centre(rng: random.Random, quadrant: int, size: int) -> tuple[int, int]:
    """A whole-pixel centre near the middle of `quadrant`: the split key rounds centres to pixels, so a centre that
    is not whole could draw the pixels of a scene whose key, and split, differ."""
    row, col = divmod(quadrant, 2)
    jitter = 0.05 * size
    x = (col + 0.5) * size / 2 + rng.uniform(-jitter, jitter)
    y = (row + 0.5) * size / 2 + rng.uniform(-jitter, jitter)
    return round(x), round(y)


def _check(split: str, image_size: int) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"`split` must be 'train' or 'eval', got {split!r}.")
    if image_size < 32 or image_size % 32:
        raise ValueError(f"`image_size` must be a multiple of 32 (>= 32), got {image_size}.")


def draw_scenes(rng: random.Random, kinds: Sequence[str], n: int, split: str, image_size: int) -> list[Scene]:
    """`n` scenes of `split` drawn from `rng`, kinds in turn; scenes of the other split are skipped."""
    out: list[Scene] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"Could not draw {n} {split} scenes of kinds {list(kinds)}.")
        scene = random_scene(rng, kinds[len(out) % len(kinds)], image_size)
        if scene.split == split:
            out.append(scene)
    return out


def scene_dataset(
    n: int, seed: int = 0, split: str = "train", image_size: int = 64, kinds: Sequence[str] = KINDS
) -> list[dict]:
    """`n` scenes as {"image", "caption", "attributes", "kind", "scene"} dicts, kinds in turn; deterministic per
    (`seed`, `split`)."""
    _check(split, image_size)
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"`kinds` must be a non-empty subset of {KINDS}, got {list(kinds)}.")
    rng = random.Random(f"scenes-{seed}-{split}")
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    return [
        {
            "image": scene.draw(generator),
            "caption": scene.caption,
            "attributes": scene.attributes,
            "kind": scene.kind,
            "scene": scene,
        }
        for scene in draw_scenes(rng, kinds, n, split, image_size)
    ]


def scene_qa_dataset(
    n: int,
    seed: int = 0,
    split: str = "train",
    image_size: int = 64,
    questions: Sequence[str] = tuple(QUESTIONS),
    explained: bool = False,
) -> list[dict]:
    """`n` 4-way questions about scenes as {"image", "question", "options", "answer", "kind", "scene"} dicts (`kind`:
    the question kind; `scene`: what is drawn), question kinds in turn; each kind's answers balanced over A-D
    (exactly when 4 × len(questions) divides n; `templates.balanced_answers`).

    Options: the four colours, shapes, positions or counts in a fixed order (the scene is drawn so that the answer
    falls on the planned letter), or for "word" four of `WORDS` with the right one at the planned letter.

    `explained`: each sample also states what the picture shows before its answer ("The word is CAT. The answer is
    B.", ScienceQA's "EA" output format; keys `explanation` and `explanation_first`, which the collator reads). The
    questions, options and answers are the same as without it.
    """
    _check(split, image_size)
    unknown = [q for q in questions if q not in QUESTIONS]
    if unknown or not questions:
        raise ValueError(f"`questions` must be a non-empty subset of {list(QUESTIONS)}, got {list(questions)}.")
    rng = random.Random(f"scene-qa-{seed}-{split}")
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    plan = balanced_answers(rng, n, len(questions))
    samples = []
    for i, letter in enumerate(plan):
        question = questions[i % len(questions)]
        scene_kind, text = QUESTIONS[question]
        options, slot = _options(rng, question, letter)
        while True:  # the first scene of this split whose answer is the planned option
            scene = random_scene(rng, scene_kind, image_size)
            if scene.split == split and scene.attributes[slot] == options[letter]:
                break
        sample = {
            "image": scene.draw(generator),
            "question": text,
            "options": options,
            "answer": OPTION_LETTERS[letter],
            "kind": question,
            "scene": scene,
        }
        if explained:
            sample |= {"explanation": STATEMENTS[question].format(options[letter]), "explanation_first": True}
        samples.append(sample)
    return samples


def _options(rng: random.Random, question: str, letter: int) -> tuple[list[str], str]:
    """The option list of `question` and the caption slot that holds the answer."""
    fixed = {
        "colour": (list(COLOURS), "colour"),
        "shape": (list(SHAPES), "shape"),
        "position": (list(POSITIONS), "position"),
        "count": (list(COUNTS), "count"),
        "larger": (list(COLOURS), "large_colour"),
    }
    if question in fixed:
        return fixed[question]
    words = rng.sample(WORDS, 4)
    return words, "word"
