"""The paper's joint training with disjoint parameter groups (spec `llama_adapter_v2.md` §4; paper §4.2).

Image–text data trains the visual group: the visual bridge (projection, blocks, queries) and the zero-init attention
of the early layers, where the visual tokens enter the prompts (`visual_fused`). Text-only instructions train the
instruction group: every other parameter (late prompts and gates, biases, scales, norms, LoRA). The official code
runs the two as sequential stages instead; `JointTrainer` runs them in one `Trainer` run:

    trainer = JointTrainer(model=model, args=args, train_dataset=mixed, data_collator=collator)
    trainer.train()

Each micro-batch is split into its image samples and its text-only samples (`modality_parts`), and each part's
backward reaches only its own group (`training_only`: the other group's `requires_grad` is off for that part). A
part without a supervised token (every label -100, e.g. a caption cut by truncation) is left out. A group that saw no
data in an optimizer step has no gradient and does not move at all (AdamW skips it, weight decay included). The
loss is the batch's: the mean over all its supervised tokens, of which each group receives the gradient of its own
samples' tokens, whether the model normalises by the Trainer's `num_items_in_batch` or returns each part's mean
(weighted here by the part's share of the tokens): both give the same gradients. A custom training loop does the
same with the helpers:

    groups, tokens = joint_parameter_groups(model), supervised_tokens(batch["labels"])
    for group, part in modality_parts(batch):
        with training_only(groups, group):
            (model(**part).loss * supervised_tokens(part["labels"]) / tokens).backward()
    optimizer.step()

One process: under `torch.distributed` each part's backward would be one gradient all-reduce, and ranks whose
batches mix the modalities differently would pair them wrongly, so `JointTrainer` refuses several processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..data.collator import IGNORE_INDEX
from .layer import OutputProjection


def joint_parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{"visual": …, "instruction": …}: the trainable parameters of a LLaMA-Adapter V2 `PeftModel`, split as above."""
    visual: list[nn.Parameter] = []
    for name, module in model.named_modules():
        if name.endswith("mma_adapter_v2_visual"):
            visual += list(module.parameters())
        elif isinstance(module, OutputProjection):
            for adapter, fused in module.visual_fused.items():
                if fused:
                    visual += [c[adapter] for c in (module.mma_adapter_v2_prompt, module.mma_adapter_v2_gate,
                                                    module.mma_adapter_v2_gate_scale) if adapter in c]  # fmt: skip
    chosen = {id(p) for p in visual}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "visual": [p for p in trainable if id(p) in chosen],
        "instruction": [p for p in trainable if id(p) not in chosen],
    }


def modality_parts(inputs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A collated batch split by `has_image`: ("visual", its image samples) and ("instruction", its text-only
    samples, without image inputs), each present only where the batch has such samples with a supervised token (a
    label other than -100 after the first position; every part counts where there are no `labels`). A batch without
    `has_image` is all image samples when it has `pixel_values`, else all text."""
    flags = inputs.get("has_image")
    if flags is None:
        flags = torch.full((len(inputs["input_ids"]),), "pixel_values" in inputs)
    parts = []
    for group, rows in (("visual", flags.bool()), ("instruction", ~flags.bool())):
        if not bool(rows.any()):
            continue
        part = {k: v[rows.to(v.device)] if _per_sample(v, rows) else v for k, v in inputs.items()}
        if "labels" in part and not supervised_tokens(part["labels"]):
            continue
        if group == "instruction":  # text-only samples: no images at all
            part = {k: v for k, v in part.items() if k not in ("pixel_values", "has_image")}
        parts.append((group, part))
    return parts


@contextmanager
def training_only(groups: dict[str, list[nn.Parameter]], group: str) -> Iterator[None]:
    """Inside the block only `group` of `groups` (`joint_parameter_groups`) requires gradients; the other group is
    frozen, and unfrozen again on leaving, also on an error."""
    frozen = [p for name, params in groups.items() if name != group for p in params]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def supervised_tokens(labels: torch.Tensor) -> int:
    """The tokens a causal LM is scored on: labels other than -100 after the first position (it predicts none)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


class JointTrainer(Trainer):
    """A `transformers.Trainer` for `joint_parameter_groups`: image samples update the visual group, text-only
    samples the instruction group, in one run (module docstring)."""

    _part_weight = 1.0  # the running part's share of the batch's supervised tokens, where its loss is its own mean

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        if self.args.world_size > 1:
            raise ValueError(
                f"JointTrainer runs in one process (this run has {self.args.world_size}): each modality's backward "
                "is a gradient all-reduce of its own, which ranks with differently mixed batches would pair wrongly. "
                "Train the two groups in stages, or in one process."
            )
        groups = joint_parameter_groups(model)
        # the loss of a part is its own mean unless the model divides its sum by `num_items_in_batch` (as Trainer
        # decides in `training_step`) or a `compute_loss_func` normalises it
        own_mean = not (self.model_accepts_loss_kwargs and num_items_in_batch is not None) and (
            self.compute_loss_func is None
        )
        total = supervised_tokens(inputs["labels"]) if own_mean and "labels" in inputs else 0
        loss = None
        for group, part in modality_parts(inputs):
            self._part_weight = supervised_tokens(part["labels"]) / total if total else 1.0
            try:
                with training_only(groups, group):
                    loss_part = super().training_step(model, part, num_items_in_batch)
            finally:
                self._part_weight = 1.0
            loss = loss_part if loss is None else loss + loss_part
        if loss is None:  # no supervised token in the batch: nothing to learn, nothing moves
            loss = torch.zeros((), device=self.args.device)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss, times the part's share of the batch's supervised tokens where it is the part's mean."""
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self._part_weight == 1.0:
            return result
        if return_outputs:
            loss, outputs = result
            return loss * self._part_weight, outputs
        return result * self._part_weight


def _per_sample(value: Any, rows: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim >= 1 and len(value) == len(rows)
