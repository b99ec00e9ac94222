"""Learning quality on SmolLM2-135M-Instruct: what each method learns at equal steps, and at what CPU cost.

    python -m benchmarks.quality                                  # every experiment, all methods
    python -m benchmarks.quality --experiment vqa --methods lavin --lr 5e-3 --steps 300

* ``vqa``: visual QA about procedural scenes (`peft_mma.data.scenes.scene_qa_dataset`: colour, shape, position,
  count, which is larger, read the word; 4 options, chance 25 %), every method reading the same frozen encoder:
  the scene encoder pretrained on captions (`--encoder scenes`, `peft_mma.vision.scene_encoder`) or the same ViT
  randomly initialised (`--encoder random`). Held-out accuracy (the answer letter's logit among A-D,
  teacher-forced), overall and per question kind, every `--eval-every` steps, with the training wall and CPU time
  (`time.process_time`) spent so far; tuned on image questions alone. `--answer-format EA` has every answer state
  what the picture shows first ("The word is CAT. The answer is B.", ScienceQA's "EA" output format) and scores the
  letter of the model's own greedy answer instead, with the share of answers whose statement is right. Before and
  after tuning, the language-modelling loss on held-out English prose (`general_text`, from Python's own
  documentation, text only).
* ``retention``: the same, tuned as LaVIN's ScienceQA recipe is, where about half the questions have no image: a
  share `--text-share` (default 0.5) of the tuning samples is text only (procedural instructions). The MMA claim
  is that routing keeps language ability: the prose loss after tuning within +2 % of before.
* ``joint``: LLaMA-Adapter V2's two parameter groups (`llama_adapter_v2.joint`) at equal steps, on image
  questions and procedural instructions: ``joint`` (the paper's §4.2: one run on the mixed data, image samples
  update only the visual group, text samples only the instruction group), ``staged`` (the official code: the first
  half of the steps on image questions for the visual group, the second half on instructions for the other) and
  ``all`` (every parameter on every mixed batch). Visual QA accuracy, the instructions' held-out loss and the prose
  loss, as above.
* ``expert``: LLaMA-Adapter V2's expert models (`peft_mma.data.experts`): V2 on "which word is written" questions,
  with the Tesseract OCR expert's reading of each image as the prompt's context (``with_ocr``) and without
  (``without``), at equal steps; the OCR's own held-out exact-match rate beside them. Needs the `tesseract` program.
* ``instruction``: the procedural instruction set; V2 bias/scale (no prompts) and V2 default against PEFT LoRA
  r8 q,v at equal steps: held-out loss curve and greedy exact match at the end.

Every method trains with AdamW (β = 0.9, 0.95), linear warm-up over 5 % of the steps then cosine decay, batch
`--batch-size`, the same sample order, one CPU thread by default; `--visual-lr-ratio` gives the visual path of LaVIN
and V2 its own rate, `--gate-lr-ratio` V2's prompt gates theirs (`peft_mma.create_mma_optimizer`). The loss covers
the response tokens only, and only the last positions go through the LM head (left padding, `logits_to_keep`), for
every method alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from peft_mma.data.collator import (
    IGNORE_INDEX,
    CausalLMCollator,
    prompt_and_response,
    response_cross_entropy,
    response_keep_length,
)
from peft_mma.data.experts import TesseractOCR, with_experts
from peft_mma.data.procedural import instruction_dataset
from peft_mma.data.scenes import QUESTIONS, scene_dataset, scene_qa_dataset
from peft_mma.data.templates import OPTION_LETTERS, scienceqa_answer
from peft_mma.llama_adapter_v2.joint import joint_parameter_groups, modality_parts, training_only
from peft_mma.optim import create_mma_optimizer, visual_path_parameters
from peft_mma.utils import warmup_cosine

from .common import RESULTS_DIR, load_average, machine_info, write_json
from .quality_methods import ENCODERS, TEXT_METHODS, VQA_METHODS, Encoder, Method, build_method, encoder

DEFAULT_LR = {"lavin": 2e-3, "v2": 2e-3, "lora_projector": 2e-3, "blind": 2e-3, "v2_bias_scale": 5e-3, "lora_qv": 2e-3}
TEXT_LOSS_GOAL = 0.02  # the prose loss may rise by at most 2 % after multimodal tuning
RETENTION_TEXT_SHARE = 0.5  # ScienceQA: about half of the questions have no image
ACCURACY_GOAL, CPU_MINUTES_GOAL = 0.95, 10.0
CAPTION_PROMPT = "Describe the picture."
ANSWER_FORMATS = ("A", "EA")  # ScienceQA's output formats: the answer alone; what the picture shows, then the answer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--experiment", choices=("vqa", "retention", "joint", "expert", "instruction", "all"), default="all"
    )
    parser.add_argument("--methods", nargs="*", default=None, help="default: every method of the experiment")
    parser.add_argument(
        "--steps", type=int, default=None, help="default: 240 (vqa, retention, joint), 360 (expert), 150 (instruction)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: per method, `DEFAULT_LR`")
    parser.add_argument(
        "--visual-lr-ratio",
        type=float,
        default=1.0,
        help="learning rate of the peft_mma methods' visual path (LaVIN's projector, V2's bridge) over --lr "
        "(`peft_mma.create_mma_optimizer`; vqa and retention); the baselines keep one rate",
    )
    parser.add_argument(
        "--gate-lr-ratio",
        type=float,
        default=1.0,
        help="learning rate of V2's zero-init prompt gates over --lr (`peft_mma.create_mma_optimizer`; vqa and "
        "retention, V2 only)",
    )
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=0.0,
        help="vqa: clip the gradients' global norm to this before each step (0: no clipping, as the official recipe "
        "and every result so far; examples/see.py clips at 1.0)",
    )
    parser.add_argument(
        "--caption-steps",
        type=int,
        default=0,
        help="vqa and retention: first train the visual path of LaVIN and V2 alone for this many steps on the scenes' "
        "captions (LLaVA's stage 1), then the question tuning; counted in the curve's steps and times",
    )
    parser.add_argument(
        "--answer-format",
        choices=ANSWER_FORMATS,
        default="A",
        help='vqa and retention: "A", "The answer is X." scored teacher-forced; "EA", "The word is CAT. The answer '
        'is X." (what the picture shows, then the letter), scored by greedy generation',
    )
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-size", type=int, default=96)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument(
        "--text-share", type=float, default=None, help="share of text-only tuning samples (vqa 0, retention 0.5)"
    )
    parser.add_argument("--encoder", choices=ENCODERS, default="scenes", help="the frozen encoder of visual QA")
    parser.add_argument(
        "--questions", nargs="*", choices=list(QUESTIONS), default=list(QUESTIONS), help="visual QA question kinds"
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="config fields of the peft_mma methods of vqa and retention (and of V2 in joint and expert), VALUE as "
        "JSON (e.g. temperature=1.0)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="train under bf16 autocast (mixed precision; the weights and the evaluation stay fp32)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="default: results/quality_<experiment>.json")
    args = parser.parse_args(argv)
    if args.answer_format != "A" and args.experiment not in ("vqa", "retention"):
        parser.error(f"--answer-format {args.answer_format} is for --experiment vqa or retention")
    if args.max_grad_norm < 0 or (args.max_grad_norm and args.experiment != "vqa"):
        parser.error(f"--max-grad-norm must be >= 0 and is for --experiment vqa, got {args.max_grad_norm}")
    args.overrides = {}
    for item in args.set:
        field_name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes FIELD=VALUE, got {item!r}")
        try:
            args.overrides[field_name] = json.loads(value)
        except json.JSONDecodeError:
            args.overrides[field_name] = value  # a plain string
    return args


# ---------------------------------------------------------------- loss and metrics


def letter_ids(tokenizer) -> tuple[list[int], int]:
    """The token ids of A-D inside "The answer is X.", and the letter's index in that response."""
    rows = [tokenizer(scienceqa_answer(letter), add_special_tokens=False)["input_ids"] for letter in "ABCD"]
    index = next(i for i in range(len(rows[0])) if len({row[i] for row in rows}) == 4)
    return [row[index] for row in rows], index


def accuracy_by_kind(hits: list[bool], samples: list[dict]) -> dict[str, float]:
    """Share of hits overall (`accuracy`) and per question kind of the samples (`accuracy_<kind>`)."""
    out = {"accuracy": sum(hits) / len(hits)}
    for kind in QUESTIONS:
        picked = [hit for hit, sample in zip(hits, samples) if sample["kind"] == kind]
        if picked:
            out[f"accuracy_{kind}"] = sum(picked) / len(picked)
    return out


@torch.no_grad()
def vqa_accuracy(
    method: Method, samples: list[dict], collator, letters: tuple[list[int], int], batch: int
) -> dict[str, float]:
    """Share of held-out samples whose answer letter scores highest among A-D at its position: overall, and per
    question kind (`accuracy_<kind>`)."""
    ids, offset = letters
    method.eval()
    hits: list[bool] = []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        data = collator(chunk)
        labels = data.pop("labels")
        keep = response_keep_length(labels)
        logits = method.logits(data, keep)  # (B, keep, V)
        first = (labels != IGNORE_INDEX).float().argmax(1)  # response start, per row
        position = first + offset - 1 - (labels.shape[1] - keep)  # logits index that predicts the letter
        scores = logits[torch.arange(len(chunk)), position][:, ids]  # (B, 4)
        truth = torch.tensor([OPTION_LETTERS.index(s["answer"]) for s in chunk])
        hits += (scores.argmax(-1) == truth).tolist()
    return accuracy_by_kind(hits, samples)


@torch.no_grad()
def generated_vqa_accuracy(
    method: Method, samples: list[dict], prompts: CausalLMCollator, batch: int, max_new_tokens: int | None = None
) -> dict[str, float]:
    """For answers that state what the picture shows before the letter (`scene_qa_dataset(explained=True)`): share
    of held-out samples whose greedy answer names the right letter ("The answer is X.") and no other option's,
    overall and per question kind (`accuracy_<kind>`), and the share whose answer starts with the right statement
    (`stated`). `prompts` gives the prompts alone (`with_response=False`, left padding); `Method.greedy` decodes,
    up to EOS or `max_new_tokens` (default: the longest right answer's tokens and EOS, plus 3)."""
    tokenizer, eos = prompts.tokenizer, prompts.tokenizer.eos_token_id
    if max_new_tokens is None:
        answers = [prompt_and_response(sample)[1] for sample in samples]
        max_new_tokens = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in answers) + 4
    method.eval()
    hits, stated = [], []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        new = method.greedy(prompts(chunk), max_new_tokens, eos, prompts.pad_id)  # prompts only: no labels
        for sample, ids in zip(chunk, new.tolist()):
            text = tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids)
            letters = OPTION_LETTERS[: len(sample["options"])]
            named = [letter for letter in letters if scienceqa_answer(letter) in text]
            hits.append(named == [sample["answer"]])  # one letter named, the right one
            stated.append(text.startswith(sample["explanation"]))
    return accuracy_by_kind(hits, samples) | {"stated": sum(stated) / len(stated)}


@torch.no_grad()
def text_loss(method: Method, samples: list[dict], collator, batch: int) -> float:
    """Mean response-token cross-entropy on text-only samples, with the method used without images."""
    method.eval()
    total, count = 0.0, 0
    for start in range(0, len(samples), batch):
        data = collator(samples[start : start + batch])
        labels = data.pop("labels")
        logits = method.text_logits(data, response_keep_length(labels))
        total += float(response_cross_entropy(logits, labels, reduction="sum"))
        count += int((labels[:, labels.shape[1] - logits.shape[1] + 1 :] != IGNORE_INDEX).sum())
    return total / max(count, 1)


def general_text(tokenizer, count: int = 48, length: int = 64) -> torch.Tensor:
    """`count` held-out chunks of English prose, `length` tokens each: (count, length) token ids.

    The prose paragraphs (three or more lines of plain sentences, no grammar rules or code) of the Python
    reference topics that ship with Python (`pydoc_data.topics`), in sorted topic order, so every machine gets
    the same chunks without a download. None of it is in any tuning set of this benchmark.
    """
    from pydoc_data.topics import topics

    ids: list[int] = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            lines = paragraph.strip().splitlines()
            markup = any(line.startswith((" ", "*", "=", "-", ">>>")) for line in lines) or "::" in paragraph
            if len(lines) < 3 or markup:
                continue
            ids += tokenizer(" ".join(lines) + "\n\n", add_special_tokens=False)["input_ids"]
            if len(ids) >= count * length:
                return torch.tensor(ids[: count * length]).view(count, length)
    raise ValueError(f"Python's documentation has fewer than {count} × {length} tokens of prose.")


@torch.no_grad()
def prose_loss(method: Method, chunks: torch.Tensor, batch: int) -> float:
    """Mean next-token cross-entropy over every token of `chunks` (N, L), the method used without images."""
    method.eval()
    losses = []
    for start in range(0, len(chunks), batch):
        ids = chunks[start : start + batch]
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        logits = method.text_logits(data, ids.shape[1])
        losses.append(response_cross_entropy(logits, ids, reduction="sum"))  # every token is a label
    return float(sum(losses)) / (chunks.shape[0] * (chunks.shape[1] - 1))


# ---------------------------------------------------------------- training


def train(
    method: Method,
    train_set: list[dict],
    collator,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    evaluate,
    eval_every: int,
    split: Callable[[dict], list[tuple[str | None, dict]]] | None = None,
    groups: dict[str, list[torch.nn.Parameter]] | None = None,
    visual_lr_ratio: float = 1.0,
    gate_lr_ratio: float = 1.0,
    bf16: bool = False,
    max_grad_norm: float = 0.0,
) -> list[dict[str, Any]]:
    """Train `steps` steps; every `eval_every` steps (and at 0 and the end) record `evaluate()` with the training
    wall and CPU seconds spent so far (evaluation itself not counted). `bf16`: the training forward passes run under
    bf16 autocast (mixed precision, as `Trainer(bf16=True)`); the weights and the evaluation stay fp32.
    `max_grad_norm` > 0: the trainable parameters' gradients are clipped to that global norm before each step, as
    the `Trainer`'s `max_grad_norm` (`examples/see.py` clips at 1.0); 0: no clipping, as the official recipe.

    `split` cuts each batch into parts (group, part), each part's loss reaching only `groups[group]` (every trainable
    parameter where group is None); by default the batch is one part for every parameter."""
    optimizer = create_mma_optimizer(
        method, lr=lr, visual_lr_ratio=visual_lr_ratio, gate_lr_ratio=gate_lr_ratio, betas=(0.9, 0.95)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps))
    order = list(range(len(train_set)))
    random.Random(seed).shuffle(order)
    curve = [{"step": 0, "train_wall_s": 0.0, "train_cpu_s": 0.0, "train_loss": None, **evaluate()}]
    wall = cpu = 0.0
    losses: list[float] = []
    for step in range(1, steps + 1):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        method.train()
        picks = [order[(step * batch + i) % len(order)] for i in range(batch)]
        data = collator([train_set[i] for i in picks])
        parts = split(data) if split else [(None, data)]
        loss = 0.0
        for group, part in parts:
            labels = part.pop("labels")
            with training_only(groups, group) if group else nullcontext():
                with torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = method.logits(part, response_keep_length(labels))
                part_loss = response_cross_entropy(logits, labels)
                part_loss.backward()
            loss += float(part_loss.detach()) / len(parts)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in method.parameters() if p.grad is not None], max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        wall += time.perf_counter() - start_wall
        cpu += time.process_time() - start_cpu
        losses.append(loss)
        if step % eval_every == 0 or step == steps:
            point = {"step": step, "train_wall_s": wall, "train_cpu_s": cpu, "train_loss": sum(losses) / len(losses)}
            curve.append(point | evaluate())
            losses = []
            print(f"  {method.name} {curve[-1]} load {load_average()}", file=sys.stderr, flush=True)
    return curve


# ---------------------------------------------------------------- experiments


def bos_first(bos: str):
    """A collator `prompt_fn` that starts every prompt with the BOS token: LaVIN then puts its visual tokens right
    after it, as its official [BOS, image, text] sequences have them (the soft tokens of `lora_projector` too)."""

    def prompt_fn(sample: dict) -> tuple[str, str]:
        prompt, response = prompt_and_response(sample)
        return bos + prompt, response

    return prompt_fn


@dataclass
class VisualQA:
    """What every visual QA experiment measures with: the frozen encoder, the held-out questions, the held-out prose,
    the collator (left padding, the encoder's image size, and a BOS in front of every prompt where the tokenizer adds
    none, as SmolLM2: the [BOS, image, text] layout), the answer letters and the answer format (`ANSWER_FORMATS`)."""

    vision: Encoder
    held_out: list[dict]
    prose: torch.Tensor
    collator: CausalLMCollator
    letters: tuple[list[int], int]
    answer_format: str = "A"

    @property
    def explained(self) -> bool:
        """Whether answers state what the picture shows first (`scene_qa_dataset(explained=True)`)."""
        return self.answer_format == "EA"

    def accuracy(self, method: Method, batch: int = 16) -> dict[str, float]:
        """Held-out accuracy: the letter's logit teacher-forced ("A"), or the letter of the greedy answer ("EA")."""
        if not self.explained:
            return vqa_accuracy(method, self.held_out, self.collator, self.letters, batch)
        prompts = copy.copy(self.collator)
        prompts.with_response = False
        return generated_vqa_accuracy(method, self.held_out, prompts, batch)


def visual_qa(tokenizer, args: argparse.Namespace, questions: Sequence[str]) -> VisualQA:
    vision = encoder(args.encoder, seed=args.seed)
    held_out = scene_qa_dataset(
        args.eval_size, seed=args.seed + 1, image_size=vision.image_size, split="eval", questions=questions,
        explained=args.answer_format == "EA",
    )  # fmt: skip
    collator = CausalLMCollator(tokenizer, max_length=128, padding_side="left", image_size=vision.image_size)
    if not collator.bos and tokenizer.bos_token:
        collator.prompt_fn = bos_first(tokenizer.bos_token)
    return VisualQA(vision, held_out, general_text(tokenizer), collator, letter_ids(tokenizer), args.answer_format)


def run_vqa(base, tokenizer, args: argparse.Namespace, text_share: float = 0.0) -> dict[str, Any]:
    """Visual QA accuracy by step and the prose loss before/after, tuned with a share `text_share` of text-only
    samples (`--text-share` overrides it)."""
    text_share = text_share if args.text_share is None else args.text_share
    if not 0 <= text_share < 1:
        raise ValueError(f"`--text-share` must be in [0, 1), got {text_share}.")
    questions = args.questions
    qa = visual_qa(tokenizer, args, questions)
    vision, prose, collator = qa.vision, qa.prose, qa.collator
    train_set = scene_qa_dataset(
        args.train_size, seed=args.seed, image_size=vision.image_size, questions=questions,
        explained=qa.explained,
    )  # fmt: skip
    text_count = round(args.train_size * text_share / (1 - text_share))
    train_set += instruction_dataset(text_count, seed=args.seed, split="train") if text_count else []
    steps = args.steps or 240
    scenes = []
    if args.caption_steps:  # captions of the scene kinds the questions ask about
        kinds = sorted({QUESTIONS[question][0] for question in questions})
        scenes = scene_dataset(args.train_size, seed=args.seed, image_size=vision.image_size, kinds=kinds)
    captions = [{"image": s["image"], "prompt": CAPTION_PROMPT, "response": s["caption"]} for s in scenes]
    runs = {}
    for name in args.methods or VQA_METHODS:
        overrides = args.overrides if name in ("lavin", "v2") else {}
        method = build_method(name, base, multimodal=True, seed=args.seed, vision=vision, **overrides)
        before = prose_loss(method, prose, args.batch_size)
        lr = args.lr or DEFAULT_LR[name]

        def evaluate(method=method) -> dict[str, float]:
            return qa.accuracy(method) | routing_summary(method) | gate_summary(method)

        ratio = args.visual_lr_ratio if name in ("lavin", "v2") else 1.0
        gate_ratio = args.gate_lr_ratio if name == "v2" else 1.0
        curve = []
        if args.caption_steps and name in ("lavin", "v2"):
            curve = caption_stage(method, captions, collator, lr, ratio, evaluate, args)
        tuned = train(
            method, train_set, collator, steps, args.batch_size, lr, args.seed, evaluate, args.eval_every,
            visual_lr_ratio=ratio, gate_lr_ratio=gate_ratio, bf16=args.bf16, max_grad_norm=args.max_grad_norm,
        )  # fmt: skip
        curve = tuned if not curve else curve + [continued(point, curve[-1]) for point in tuned[1:]]
        after = prose_loss(method, prose, args.batch_size)
        runs[name] = summarize_vqa(name, lr, curve, before, after, count_trainable(method))
        runs[name]["visual_lr_ratio"] = ratio
        runs[name]["gate_lr_ratio"] = gate_ratio
        del method
    return {
        "settings": {
            "steps": steps,
            "batch_size": args.batch_size,
            "train_size": args.train_size,
            "text_only_train_samples": text_count,
            "eval_size": args.eval_size,
            "questions": questions,
            "encoder": vision.name,
            "vision_model": vision.vision_model,
            "vision_pretrained": vision.pretrained,
            "vision_kwargs": vision.kwargs,
            "config_overrides": args.overrides,
            "caption_steps": args.caption_steps,
            "answer_format": qa.answer_format,
            "bf16": args.bf16,
            "max_grad_norm": args.max_grad_norm,
            "image_size": vision.image_size,
            "prose_eval_tokens": prose.numel(),
        },
        "runs": runs,
    }


def caption_stage(method: Method, captions: list[dict], collator, lr: float, ratio: float, evaluate, args):
    """LLaVA's stage 1 for `method`'s visual path: only it trains, for `args.caption_steps` steps on "Describe the
    picture." → the scene's caption, so that the visual tokens come to say in the LLM's own terms what the captions
    say (for instance the word a picture shows) before the question tuning starts. The path is LaVIN's projector
    (`visual_path_parameters`) and V2's visual group (`joint_parameter_groups`: the bridge with the gates and
    prompts that read it, without which its zero-init gates would pass it no gradient). Returns the stage's curve,
    evaluated on the held-out questions."""
    if method.name == "v2":
        visual = joint_parameter_groups(method.model)["visual"]
    else:
        visual = visual_path_parameters(method.model)
    chosen = {id(p) for p in visual}
    rest = [p for p in method.model.parameters() if p.requires_grad and id(p) not in chosen]
    groups = {"visual": visual, "rest": rest}
    return train(
        method, captions, collator, args.caption_steps, args.batch_size, lr, args.seed + 1, evaluate,
        args.eval_every, lambda data: [("visual", data)], groups, visual_lr_ratio=ratio, bf16=args.bf16,
    )  # fmt: skip


def run_joint(base, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    """V2's parameter groups trained jointly, staged and together at equal steps (the module docstring)."""
    questions = args.questions
    qa = visual_qa(tokenizer, args, questions)
    vision, held_out, prose, collator, letters = qa.vision, qa.held_out, qa.prose, qa.collator, qa.letters
    images = scene_qa_dataset(args.train_size, seed=args.seed, image_size=vision.image_size, questions=questions)
    texts = instruction_dataset(args.train_size, seed=args.seed, split="train")
    held_out_texts = instruction_dataset(48, seed=args.seed, split="eval")
    steps = args.steps or 240
    lr = args.lr or DEFAULT_LR["v2"]
    runs = {}
    for arm in args.methods or ("joint", "staged", "all"):
        if arm not in ("joint", "staged", "all"):
            raise ValueError(f"`--methods` of the joint experiment are joint, staged and all; got {arm!r}.")
        method = build_method("v2", base, multimodal=True, seed=args.seed, vision=vision, **args.overrides)
        method.name = f"v2 {arm}"
        groups = joint_parameter_groups(method.model)
        before = prose_loss(method, prose, args.batch_size), text_loss(method, held_out_texts, collator, 16)

        def evaluate(method=method) -> dict[str, float]:
            instruction = text_loss(method, held_out_texts, collator, 16)
            return vqa_accuracy(method, held_out, collator, letters, 16) | {"instruction_loss": instruction}

        common = (args.batch_size, lr, args.seed, evaluate, args.eval_every)
        if arm == "staged":  # the visual group on images, then the instruction group on texts: two optimizers
            half = steps // 2
            curve = train(method, images, collator, half, *common, lambda d: [("visual", d)], groups, bf16=args.bf16)
            second = train(
                method, texts, collator, steps - half, *common, lambda d: [("instruction", d)], groups, bf16=args.bf16
            )
            curve += [continued(point, curve[-1]) for point in second[1:]]
        else:
            mixed = images + texts
            split = modality_parts if arm == "joint" else None
            curve = train(method, mixed, collator, steps, *common, split, groups, bf16=args.bf16)
        after = prose_loss(method, prose, args.batch_size)
        runs[arm] = summarize_vqa(arm, lr, curve, before[0], after, count_trainable(method))
        runs[arm] |= {"instruction_loss_before": before[1], "instruction_loss_after": curve[-1]["instruction_loss"]}
        runs[arm]["group_sizes"] = {name: sum(p.numel() for p in params) for name, params in groups.items()}
        del method
    return {
        "settings": {
            "method": "v2",
            "config_overrides": args.overrides,
            "steps": steps,
            "batch_size": args.batch_size,
            "image_train_samples": len(images),
            "text_train_samples": len(texts),
            "eval_size": args.eval_size,
            "instruction_eval_size": len(held_out_texts),
            "questions": questions,
            "encoder": vision.name,
            "vision_model": vision.vision_model,
            "image_size": vision.image_size,
        },
        "runs": runs,
    }


def run_expert(base, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    """V2 on "which word is written" questions with and without the OCR expert's reading as context, at equal steps
    (`peft_mma.data.experts`; the module docstring)."""
    ocr = TesseractOCR()
    qa = visual_qa(tokenizer, args, ["word"])
    vision, held_out, prose, collator, letters = qa.vision, qa.held_out, qa.prose, qa.collator, qa.letters
    steps = args.steps or 360
    count = min(args.train_size, steps * args.batch_size)  # the samples the steps draw, each read once by the OCR
    plain = scene_qa_dataset(count, seed=args.seed, image_size=vision.image_size, questions=["word"])
    started = time.perf_counter()
    read, held_out_read = with_experts(plain, {"OCR": ocr}), with_experts(held_out, {"OCR": ocr})
    ocr_wall_s = time.perf_counter() - started  # Tesseract runs in its own processes
    right = [s["context"].upper() == f"OCR: {s['scene'].attributes['word']}" for s in held_out_read if s["context"]]
    lr = args.lr or DEFAULT_LR["v2"]
    runs = {}
    arms = {"without": (plain, held_out), "with_ocr": (read, held_out_read)}
    unknown = set(args.methods or ()) - set(arms)
    if unknown:
        raise ValueError(f"`--methods` of the expert experiment are {list(arms)}; got {sorted(unknown)}.")
    for arm, (train_set, eval_set) in arms.items():
        if args.methods and arm not in args.methods:
            continue
        method = build_method("v2", base, multimodal=True, seed=args.seed, vision=vision, **args.overrides)
        method.name = f"v2 {arm}"
        before = prose_loss(method, prose, args.batch_size)

        def evaluate(method=method, eval_set=eval_set) -> dict[str, float]:
            return vqa_accuracy(method, eval_set, collator, letters, 16)

        curve = train(
            method, train_set, collator, steps, args.batch_size, lr, args.seed, evaluate, args.eval_every,
            bf16=args.bf16,
        )  # fmt: skip
        after = prose_loss(method, prose, args.batch_size)
        runs[arm] = summarize_vqa(arm, lr, curve, before, after, count_trainable(method))
        del method
    return {
        "settings": {
            "method": "v2",
            "config_overrides": args.overrides,
            "steps": steps,
            "batch_size": args.batch_size,
            "train_size": count,
            "eval_size": args.eval_size,
            "questions": ["word"],
            "encoder": vision.name,
            "expert": f"Tesseract ({' '.join(ocr.command[1:])}), min height {ocr.min_height} px",
        },
        "ocr_exact_held_out": sum(right) / len(held_out_read),
        "ocr_wall_s": ocr_wall_s,
        "lift": runs["with_ocr"]["final_accuracy"] - runs["without"]["final_accuracy"] if len(runs) == 2 else None,
        "runs": runs,
    }


def continued(point: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """A point of a second stage's curve, counted on from the first stage's `last` point."""
    counters = ("step", "train_wall_s", "train_cpu_s")
    return point | {key: point[key] + last[key] for key in counters}


@torch.no_grad()
def routing_summary(method: Method) -> dict[str, float]:
    """LaVIN's routing per modality (`LaVINModel.modality_routing`), averaged over its decoder adapters: the weight
    of the first up-path for the text and the image token, their largest gap over the adapters, and how far the two
    up-paths have grown apart, √(Σ ‖B − D‖²) / √(Σ (‖B‖ + ‖D‖)²) summed over every adapter's weights and biases (0
    while they are equal; weights alone with `adapter_bias=False`). {} for other methods."""
    model = method.model.base_model
    if not hasattr(model, "modality_routing"):
        return {}
    weights = torch.stack(list(model.modality_routing().values())).float()  # (adapters, 2 modalities, 2 paths)
    apart, size = 0.0, 0.0
    for module in model.modules():
        if hasattr(module, "mma_lavin_up0") and getattr(module, "routing", None) == "sample":
            for adapter in module.mma_lavin_up0:
                up0, up1 = module.mma_lavin_up0[adapter], module.mma_lavin_up1[adapter]
                for a, b in ((up0.weight, up1.weight), (up0.bias, up1.bias)):
                    if a is None:  # `adapter_bias=False`: no biases
                        continue
                    apart += float((a - b).float().pow(2).sum())
                    size += float(a.float().pow(2).sum().sqrt() + b.float().pow(2).sum().sqrt()) ** 2
    return {
        "route_text_w0": float(weights[:, 0, 0].mean()),
        "route_image_w0": float(weights[:, 1, 0].mean()),
        "route_gap_max": float((weights[:, 1, 0] - weights[:, 0, 0]).abs().max()),
        "up_paths_apart": (apart / size) ** 0.5 if size else 0.0,
    }


@torch.no_grad()
def gate_summary(method: Method) -> dict[str, float]:
    """How far V2's prompt gates have opened: the mean and the largest gate as the layers apply it (|tanh g| by
    default, times `new_gate` where there is one) over every layer's heads. {} for a model without gates."""
    gates = [
        module._gate(adapter).float().abs().flatten()
        for module in method.model.modules()
        if isinstance(getattr(module, "mma_adapter_v2_gate", None), torch.nn.ParameterDict)
        for adapter in module.mma_adapter_v2_gate
    ]
    if not gates:
        return {}
    every = torch.cat(gates)
    return {"gate_mean": float(every.mean()), "gate_max": float(every.max())}


def count_trainable(method: Method) -> int:
    return sum(p.numel() for p in method.parameters() if p.requires_grad)


def summarize_vqa(name, lr, curve, before: float, after: float, trainable: int) -> dict[str, Any]:
    """The curve, when (step, CPU minutes) the accuracy goal was first reached, and the text-loss change."""
    reached = next((p for p in curve if p["accuracy"] >= ACCURACY_GOAL), None)
    change = (after - before) / before
    return {
        "lr": lr,
        "trainable_params": trainable,
        "curve": curve,
        "final_accuracy": curve[-1]["accuracy"],
        "best_accuracy": max(p["accuracy"] for p in curve),
        "reached_goal_at_step": reached and reached["step"],
        "reached_goal_at_cpu_min": reached and reached["train_cpu_s"] / 60,
        "goal_met": reached is not None and reached["train_cpu_s"] / 60 <= CPU_MINUTES_GOAL,
        "text_loss_before": before,
        "text_loss_after": after,
        "text_loss_change": change,
        "text_loss_goal_met": change <= TEXT_LOSS_GOAL,
    }


@torch.no_grad()
def exact_match(method: Method, tokenizer, samples: list[dict], batch: int, max_new_tokens: int = 24) -> float:
    """Share of held-out instructions whose greedy answer equals the expected output."""
    method.eval()
    collator = CausalLMCollator(tokenizer, max_length=96, padding_side="left", with_response=False)
    hits = 0
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        data = collator(chunk)
        out = method.model.generate(
            **data,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=collator.pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers = tokenizer.batch_decode(out[:, data["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += sum(a.strip() == s["output"].strip() for a, s in zip(answers, chunk))
    return hits / len(samples)


def run_instruction(base, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    train_set = instruction_dataset(args.train_size, seed=args.seed, split="train")
    held_out = instruction_dataset(48, seed=args.seed, split="eval")
    collator = CausalLMCollator(tokenizer, max_length=96, padding_side="left")
    steps = args.steps or 150
    runs = {}
    for name in args.methods or TEXT_METHODS:
        method = build_method(name, base, multimodal=False, seed=args.seed)
        lr = args.lr or DEFAULT_LR[name]

        def evaluate(method=method) -> dict[str, float]:
            return {"held_out_loss": text_loss(method, held_out, collator, args.batch_size)}

        curve = train(
            method, train_set, collator, steps, args.batch_size, lr, args.seed, evaluate, args.eval_every,
            bf16=args.bf16,
        )  # fmt: skip
        runs[name] = {
            "lr": lr,
            "trainable_params": count_trainable(method),
            "curve": curve,
            "final_loss": curve[-1]["held_out_loss"],
            "exact_match": exact_match(method, tokenizer, held_out, 16),
        }
        del method
    return {
        "settings": {
            "steps": steps,
            "batch_size": args.batch_size,
            "train_size": args.train_size,
            "eval_size": len(held_out),
        },
        "runs": runs,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from peft_mma.data.smollm2 import load_smollm2

    base, tokenizer = load_smollm2(dtype=torch.float32)
    base.requires_grad_(False)
    command = "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {}
    experiments = {
        "vqa": run_vqa,
        "retention": lambda *a: run_vqa(*a, text_share=RETENTION_TEXT_SHARE),
        "joint": run_joint,
        "expert": run_expert,
        "instruction": run_instruction,
    }
    for experiment, run in experiments.items():
        if args.experiment not in (experiment, "all"):
            continue
        if experiment == "expert" and args.experiment == "all" and not TesseractOCR.available():
            print("skipping the expert experiment: the `tesseract` program is not installed", file=sys.stderr)
            continue
        started = time.time()
        result = {"benchmark": f"quality_{experiment}", "command": command.strip(), "machine": machine_info("cpu")}
        result |= run(base, tokenizer, args)
        result["load_after"], result["elapsed_s"] = load_average(), round(time.time() - started, 1)
        path = args.out or RESULTS_DIR / f"quality_{experiment}.json"
        write_json(result, path)
        print(f"wrote {path}")
        results[experiment] = result
    return results


if __name__ == "__main__":
    main()
