"""LLaMA-Adapter V2's joint training (paper §4.2): image samples move only the visual group, text-only samples only
the instruction group, in one `Trainer` run (`peft_mma.llama_adapter_v2.joint`)."""

from __future__ import annotations

import pytest
import torch
from conftest import config_for, tiny_llama
from peft import get_peft_model
from stand_in_tokenizer import word_tokenizer
from transformers import TrainerCallback, TrainingArguments

from peft_mma.data.collator import CausalLMCollator
from peft_mma.llama_adapter_v2.joint import JointTrainer, joint_parameter_groups, modality_parts, training_only


def tiny_v2():
    torch.manual_seed(1)
    return get_peft_model(tiny_llama(), config_for("v2-image", prompt_layers=3, early_fusion_layers=1))


def test_the_groups_split_bridge_and_early_prompts_from_the_rest():
    model = tiny_v2()
    groups = joint_parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    visual = {names[id(p)] for p in groups["visual"]}
    instruction = {names[id(p)] for p in groups["instruction"]}
    assert any("mma_adapter_v2_visual" in n for n in visual)
    assert {n.split(".self_attn")[0].rsplit(".", 1)[-1] for n in visual if "prompt" in n} == {"1"}  # the early layer
    assert any("layers.2.self_attn.o_proj.mma_adapter_v2_prompt" in n for n in instruction)  # a late prompt
    assert any("mma_adapter_v2_bias" in n for n in instruction) and any("norm" in n for n in instruction)
    assert visual.isdisjoint(instruction)
    assert len(visual) + len(instruction) == sum(1 for p in model.parameters() if p.requires_grad)


class InOrder(torch.utils.data.IterableDataset):
    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples

    def __iter__(self):
        return iter(self.samples)


class Recorder(TrainerCallback):
    """The trainable parameters after every optimizer step."""

    def __init__(self, model) -> None:
        self.model = model
        self.states = [self.snapshot()]

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def on_step_end(self, args, state, control, **kwargs):
        self.states.append(self.snapshot())


def test_each_group_moves_only_on_its_kind_of_sample(tmp_path):
    model = tiny_v2()
    texts = ["What is shown ?", "a cat", "Say hello .", "hello"]
    image = {"prompt": texts[0], "response": texts[1], "image": torch.randn(3, 28, 28)}
    text = {"prompt": texts[2], "response": texts[3]}
    samples = [image, image, text, text, image, text]  # batches of 2, in order: image, text, mixed
    collator = CausalLMCollator(word_tokenizer(texts=texts, add_bos=True), image_size=28)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2, report_to=[],
        save_strategy="no", remove_unused_columns=False, use_cpu=True, dataloader_drop_last=False,
    )  # fmt: skip
    recorder = Recorder(model)
    ordered = InOrder(samples)  # an iterable dataset: the Trainer does not shuffle it
    trainer = JointTrainer(model=model, args=args, train_dataset=ordered, data_collator=collator, callbacks=[recorder])
    trainer.train()
    groups = joint_parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    visual = {names[id(p)] for p in groups["visual"]}

    def moved(step: int) -> set[str]:
        before, after = recorder.states[step], recorder.states[step + 1]
        return {n for n in before if not torch.equal(before[n], after[n])}

    assert len(recorder.states) == 4
    assert moved(0) == visual  # image samples: the whole visual group, nothing else
    assert moved(1) == set(recorder.states[0]) - visual  # text samples: the whole instruction group
    assert moved(2) == set(recorder.states[0])  # a mixed batch: both, each from its own samples


def test_the_helpers_give_a_custom_loop_the_same_split(tmp_path):
    """`modality_parts` + `training_only`, as the module docstring's custom loop uses them: each part's gradient
    reaches its own group only, and the frozen group is trainable again after the block, also after an error."""
    model = tiny_v2()
    texts = ["What is shown ?", "a cat", "Say hello .", "hello"]
    image = {"prompt": texts[0], "response": texts[1], "image": torch.randn(3, 28, 28)}
    text = {"prompt": texts[2], "response": texts[3]}
    batch = CausalLMCollator(word_tokenizer(texts=texts, add_bos=True), image_size=28)([text, image, text])
    parts = modality_parts(batch)
    assert [group for group, _ in parts] == ["visual", "instruction"]
    assert len(parts[0][1]["input_ids"]) == 1 and len(parts[1][1]["input_ids"]) == 2
    assert "pixel_values" not in parts[1][1] and "has_image" not in parts[1][1]
    groups = joint_parameter_groups(model)
    for group, part in parts:
        model.zero_grad(set_to_none=True)
        with training_only(groups, group):
            model(**part).loss.backward()
        other = "instruction" if group == "visual" else "visual"
        assert all(p.grad is not None for p in groups[group]), group
        assert all(p.grad is None for p in groups[other]), group
    with pytest.raises(RuntimeError, match="boom"), training_only(groups, "visual"):
        assert not any(p.requires_grad for p in groups["instruction"])
        raise RuntimeError("boom")
    assert all(p.requires_grad for params in groups.values() for p in params)
