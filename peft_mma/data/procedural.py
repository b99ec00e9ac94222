"""Small seeded procedural datasets: no downloads, the same samples for the same seed on every machine.

- `instruction_dataset`: short instruction-following tasks with one right answer, as
  {"instruction", "input", "output", "task"} dicts for the Alpaca template (`templates.format_prompt`).
  Train and eval samples are told apart by a hash of their content, so the two splits never share a sample
  whatever the seeds.
- `visual_qa_dataset`: 4-way multiple-choice questions about a procedurally drawn image (chance is 25%), as
  {"image", "question", "options", "answer"} dicts for LaVIN's prompt (`templates.scienceqa_prompt`). The cues
  are large and simple (which quadrant holds the coloured square, and its colour) so that a frozen randomly
  initialised ViT plus a trainable projector can learn them; `pixel_rule_answer` reads them back exactly.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence

import torch

from .templates import OPTION_LETTERS, balanced_answers

WORDS = (
    "apple river stone cloud green house music paper light water tiger bread chair table dream "
    "smile ocean train plant night storm field glass honey lemon mouse piano queen robot sugar "
    "tower violet winter yellow zebra candle forest garden island jacket"
).split()
EVAL_BUCKETS = 5  # one content-hash bucket in five is held out for evaluation


def _words(rng: random.Random, low: int = 3, high: int = 5) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = _words(rng)
    return " ".join(words), " ".join(reversed(words))


def _uppercase(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 2, 4)
    return " ".join(words), " ".join(words).upper()


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(100), rng.randint(3, 5))
    return " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a} + {b}", str(a + b)


def _last_word(rng: random.Random) -> tuple[str, str]:
    words = _words(rng)
    return " ".join(words), words[-1]


def _count_letters(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
    return word, str(len(word))


# task name -> (instruction, generator of (input, output))
TASKS: dict[str, tuple[str, Callable[[random.Random], tuple[str, str]]]] = {
    "reverse": ("Reverse the order of the words.", _reverse),
    "uppercase": ("Rewrite the words in uppercase letters.", _uppercase),
    "sort": ("Sort the numbers from smallest to largest.", _sort),
    "add": ("Add the two numbers.", _add),
    "last_word": ("Repeat the last word.", _last_word),
    "count_letters": ("Count the letters in the word.", _count_letters),
}


def split_of(task: str, input: str) -> str:
    """The split of a sample: "eval" for one content-hash bucket in `EVAL_BUCKETS`, else "train"; never varies."""
    return "eval" if zlib.crc32(f"{task}|{input}".encode()) % EVAL_BUCKETS == 0 else "train"


def instruction_dataset(
    n: int, seed: int = 0, split: str = "train", tasks: Sequence[str] | None = None
) -> list[dict[str, str]]:
    """`n` distinct instruction samples of `split` ("train" or "eval"), cycling through `tasks` (default: all).

    Deterministic per (`seed`, `split`); samples of different splits never coincide (see `split_of`).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"`split` must be 'train' or 'eval', got {split!r}.")
    names = list(tasks) if tasks is not None else list(TASKS)
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise ValueError(f"`tasks` must be a non-empty subset of {sorted(TASKS)}, got {names}.")
    rng = random.Random(f"instruction-{seed}-{split}")
    samples: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    attempts = 0
    while len(samples) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"Could not draw {n} distinct {split} samples from tasks {names}; ask for fewer.")
        task = names[len(samples) % len(names)]
        instruction, generate = TASKS[task]
        input, output = generate(rng)
        if (task, input) in seen or split_of(task, input) != split:
            continue
        seen.add((task, input))
        samples.append({"instruction": instruction, "input": input, "output": output, "task": task})
    rng.shuffle(samples)
    return samples


POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
QUESTIONS = {"position": "Where is the coloured square?", "colour": "What colour is the square?"}


def draw_quadrant_image(
    quadrant: int, colour: str, image_size: int = 224, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A (3, S, S) float image in [0, 1]: a dark noisy background with one quadrant filled by `colour`.

    Quadrants are numbered as `POSITIONS`: 0 top left, 1 top right, 2 bottom left, 3 bottom right.
    """
    if image_size < 2 or image_size % 2:
        raise ValueError(f"`image_size` must be an even number >= 2, got {image_size}.")
    half = image_size // 2
    background = torch.rand(3, 1, 1, generator=generator) * 0.15  # dim tint, at most 0.15
    image = background + torch.rand(3, image_size, image_size, generator=generator) * 0.03
    brightness = 0.8 + 0.2 * torch.rand(1, generator=generator)
    row, col = divmod(quadrant, 2)
    rgb = torch.tensor(COLOURS[colour]).view(3, 1, 1)
    image[:, row * half : (row + 1) * half, col * half : (col + 1) * half] += rgb * brightness
    return image.clamp_(0.0, 1.0)


def visual_qa_dataset(
    n: int,
    seed: int = 0,
    image_size: int = 224,
    kinds: Sequence[str] = ("position", "colour"),
    shuffle_options: bool = False,
    split: str = "train",
) -> list[dict]:
    """`n` 4-way questions about `draw_quadrant_image` pictures; each kind's answers are balanced over A-D (exactly
    when 4 × len(kinds) divides n; `templates.balanced_answers`).

    `kinds` picks the questions asked, in turn: "position" (which quadrant) and/or "colour". With
    `shuffle_options` the option order varies per sample (the answer letter still follows the balanced plan),
    so the model must read the options; without it each question kind keeps one order.
    """
    unknown = [kind for kind in kinds if kind not in QUESTIONS]
    if unknown or not kinds:
        raise ValueError(f"`kinds` must be a non-empty subset of {list(QUESTIONS)}, got {list(kinds)}.")
    rng = random.Random(f"visual-qa-{seed}-{split}")
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    answers = balanced_answers(rng, n, len(kinds))
    colour_names = list(COLOURS)
    samples = []
    for i, answer in enumerate(answers):
        kind = kinds[i % len(kinds)]
        quadrant, colour = rng.randrange(4), rng.randrange(4)
        options = list(POSITIONS) if kind == "position" else list(colour_names)
        correct = quadrant if kind == "position" else colour
        if shuffle_options:
            others = [option for j, option in enumerate(options) if j != correct]
            rng.shuffle(others)
            options = others[:answer] + [options[correct]] + others[answer:]
        elif kind == "position":
            quadrant = answer
        else:
            colour = answer
        image = draw_quadrant_image(quadrant, colour_names[colour], image_size, generator)
        samples.append(
            {"image": image, "question": QUESTIONS[kind], "options": options, "answer": OPTION_LETTERS[answer]}
        )
    return samples


def pixel_rule_answer(sample: dict) -> str:
    """Answer a `visual_qa_dataset` sample from its pixels alone: the brightest quadrant and its strongest colour."""
    image = sample["image"]
    half = image.shape[-1] // 2
    quadrants = [image[:, r * half : (r + 1) * half, c * half : (c + 1) * half] for r in (0, 1) for c in (0, 1)]
    peak = torch.stack([q.amax(dim=0).mean() for q in quadrants])
    quadrant = int(peak.argmax())
    if sample["question"] == QUESTIONS["position"]:
        found = POSITIONS[quadrant]
    else:
        mean_rgb = quadrants[quadrant].mean(dim=(1, 2))
        normalised = mean_rgb / mean_rgb.max()
        found = min(COLOURS, key=lambda name: float((normalised - torch.tensor(COLOURS[name])).abs().sum()))
    return OPTION_LETTERS[sample["options"].index(found)]
