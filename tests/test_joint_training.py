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


TEXTS = ["What is shown ?", "a cat", "Say hello .", "hello there my good friend how are you"]


def _samples_and_collator():
    torch.manual_seed(5)
    image = {"prompt": TEXTS[0], "response": TEXTS[1], "image": torch.randn(3, 28, 28)}
    text = {"prompt": TEXTS[2], "response": TEXTS[3]}
    return image, text, CausalLMCollator(word_tokenizer(texts=TEXTS, add_bos=True), image_size=28)


def _trainer(model, tmp_path, collator, **overrides) -> JointTrainer:
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], save_strategy="no",
        remove_unused_columns=False, use_cpu=True, **overrides,
    )  # fmt: skip
    trainer = JointTrainer(model=model, args=args, data_collator=collator)
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.current_gradient_accumulation_steps = 1  # what `train` sets before its first step
    return trainer


def test_a_part_without_supervised_tokens_leaves_its_group_untouched(tmp_path):
    """An image sample whose labels are all -100 (its caption cut away) is no visual data: the visual group gets no
    gradient, so neither weight decay nor Adam's momentum moves it; a batch with no supervised token moves nothing."""
    model = tiny_v2()
    image, text, collator = _samples_and_collator()
    trainer = _trainer(model, tmp_path, collator, weight_decay=0.1)
    groups = joint_parameter_groups(model)
    masked = collator([image, text])
    masked["labels"][0] = -100
    assert [group for group, _ in modality_parts(masked)] == ["instruction"]
    before = {id(p): p.detach().clone() for params in groups.values() for p in params}
    loss = trainer.training_step(model, masked)
    assert loss > 0 and all(p.grad is None for p in groups["visual"])
    trainer.optimizer.step()
    assert all(torch.equal(p, before[id(p)]) for p in groups["visual"])
    assert any(not torch.equal(p, before[id(p)]) for p in groups["instruction"])
    model.zero_grad(set_to_none=True)
    nothing = collator([image, text])
    nothing["labels"][:] = -100
    assert modality_parts(nothing) == [] and float(trainer.training_step(model, nothing)) == 0.0
    assert all(p.grad is None for params in groups.values() for p in params)


def test_each_group_gets_its_tokens_share_of_the_batch_loss_however_the_model_normalises(tmp_path):
    """The batch loss is the mean over all its supervised tokens; each group receives the gradient of its own part's
    tokens of it: (Σ part token losses) / N. The same with the Trainer's `num_items_in_batch` and without it (the
    model's mean per part, weighted by the part's share of the tokens), and the returned loss is the batch mean."""
    model = tiny_v2()
    image, text, collator = _samples_and_collator()
    trainer = _trainer(model, tmp_path, collator)
    batch = collator([image, text, text, text])
    groups = joint_parameter_groups(model)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    expected, batch_loss = {}, 0.0
    for group, part in modality_parts(batch):
        part_tokens = int((part["labels"][:, 1:] != -100).sum())
        model.zero_grad(set_to_none=True)
        with training_only(groups, group):
            loss = model(**part).loss * part_tokens / tokens  # the part's summed token losses / N
            loss.backward()
        batch_loss += float(loss.detach())
        expected[group] = [p.grad.clone() for p in groups[group]]
    assert 0 < sum(1 for _ in expected) == 2
    for num_items in (torch.tensor(tokens), None):
        model.zero_grad(set_to_none=True)
        loss = trainer.training_step(model, batch, num_items)
        assert float(loss) == pytest.approx(batch_loss, rel=1e-5)
        for group, grads in expected.items():
            for p, g in zip(groups[group], grads):
                torch.testing.assert_close(p.grad, g, atol=1e-7, rtol=1e-4)


def test_joint_training_refuses_several_processes(tmp_path, monkeypatch):
    model = tiny_v2()
    image, text, collator = _samples_and_collator()
    trainer = _trainer(model, tmp_path, collator)
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="JointTrainer runs in one process"):
        trainer.training_step(model, collator([image, text]))
