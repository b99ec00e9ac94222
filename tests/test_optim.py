"""`peft_mma.create_mma_optimizer`: the visual path at lr × `visual_lr_ratio`, V2's gates at lr × `gate_lr_ratio`,
weight decay on matrices (and V2's gates and `new_gate`) only."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, model_for, tiny_llama
from transformers import Trainer, TrainingArguments

from peft_mma import create_mma_optimizer
from peft_mma.optim import gate_parameters, param_groups, visual_path_parameters

VISUAL = {"lavin-image": ("mma_lavin_proj_in", "mma_lavin_proj_out"), "v2-image": ("mma_adapter_v2_visual",)}


@pytest.mark.parametrize(
    "row, extra", [("lavin-image", {}), ("v2-image", {}), ("v2-image", {"prompt_gate_scale": True})]
)
def test_groups_hold_every_trainable_parameter_once_and_the_visual_path_at_its_rate(row, extra):
    model = model_for(row, **extra)
    groups = param_groups(model, lr=1e-3, visual_lr_ratio=10, weight_decay=0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each once, none frozen
    for group in groups:
        for p in group["params"]:
            visual = any(part in VISUAL[row] for part in names[id(p)].split("."))
            assert group["lr"] == pytest.approx(1e-2 if visual else 1e-3), names[id(p)]
            # 1-D here, (1, H, 1, 1) and (1, 1, 1, 1) and so decayed in the official V2
            gate = any(f"mma_adapter_v2_{g}." in names[id(p)] for g in ("gate", "gate_scale"))
            assert group["weight_decay"] == (0.02 if p.ndim >= 2 or gate else 0.0), names[id(p)]
    if extra:
        scales = [p for n, p in model.named_parameters() if "mma_adapter_v2_gate_scale." in n]
        decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
        assert scales and all(id(p) in decayed for p in scales)
    projector = visual_path_parameters(model)
    assert projector and all(any(part in VISUAL[row] for part in names[id(p)].split(".")) for p in projector)
    if row == "lavin-image":  # the encoder's MM-adapters start as the identity and keep the base rate
        assert not any("mma_lavin_visual" in names[id(p)] for p in projector)


def test_one_adam_step_moves_the_visual_path_ratio_times_as_far():
    """Adam's first step moves every parameter with a gradient by its group's lr (m̂/√v̂ = ±1): the projector by
    10 × lr, the decoder's adapters by lr."""
    model = model_for("lavin-image")
    batch = batch_for("lavin-image", model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = create_mma_optimizer(model, torch.optim.AdamW, lr=1e-3, visual_lr_ratio=10, weight_decay=0.0)
    model(**batch).loss.backward()
    optimizer.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    projector = [m for n, m in moved.items() if "mma_lavin_proj_" in n]
    decoder = [m for n, m in moved.items() if ".layers." in n and "mma_lavin_down" in n]
    assert projector and decoder
    assert max(projector) == pytest.approx(1e-2, rel=1e-3) and max(decoder) == pytest.approx(1e-3, rel=1e-3)


def test_one_adam_step_opens_the_gates_ratio_times_as_far():
    """V2's zero-init gates at lr × `gate_lr_ratio`, every other parameter (visual path at ratio 1) at lr; the gates
    form their own group only when their ratio is not 1."""
    model = model_for("v2-image")
    assert len(param_groups(model, lr=1e-3)) == 4  # base and visual path, each matrices and the rest
    gates = {id(p) for p in gate_parameters(model)}
    assert len(gates) == len([n for n, _ in model.named_parameters() if "mma_adapter_v2_gate." in n]) > 0
    batch = batch_for("v2-image", model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = create_mma_optimizer(model, lr=1e-3, gate_lr_ratio=10)
    assert len(optimizer.param_groups) == 5
    model(**batch).loss.backward()
    optimizer.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    gate_moves = [m for n, m in moved.items() if "mma_adapter_v2_gate." in n and m > 0]
    other = [m for n, m in moved.items() if "mma_adapter_v2_gate." not in n]
    assert gate_moves and max(gate_moves) == pytest.approx(1e-2, rel=1e-3)
    assert max(other) == pytest.approx(1e-3, rel=1e-3)


def test_trainer_schedules_each_group_from_its_own_rate(tmp_path):
    """`Trainer(optimizers=(optimizer, None))` builds its schedule on the groups' own rates."""
    model = model_for("lavin-image", init_weights=True)
    batch = batch_for("lavin-image", model)
    samples = [{k: v[i] for k, v in batch.items()} for i in range(2)] * 2
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1.0,  # not used
        lr_scheduler_type="constant", report_to="none", save_strategy="no", use_cpu=True,
        remove_unused_columns=False,
    )  # fmt: skip
    optimizer = create_mma_optimizer(model, lr=4e-3, visual_lr_ratio=10, betas=(0.9, 0.95))
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    trainer = Trainer(
        model=model, args=args, train_dataset=samples, data_collator=collate, optimizers=(optimizer, None)
    )
    trainer.train()
    assert sorted(set(trainer.lr_scheduler.get_last_lr())) == pytest.approx([4e-3, 4e-2])  # the schedule keeps both


def test_bad_settings_are_refused_before_anything_is_built():
    model = model_for("lavin-image")
    for lr, ratio in [(0.0, 1.0), (1e-3, 0.0), (-1e-3, 10.0)]:
        with pytest.raises(ValueError, match="must be positive"):
            create_mma_optimizer(model, lr=lr, visual_lr_ratio=ratio)
    with pytest.raises(ValueError, match="has none"):
        create_mma_optimizer(model_for("lavin-text"), lr=1e-3, visual_lr_ratio=10)
    for ratio in (0.0, -1.0):
        with pytest.raises(ValueError, match="must be positive"):
            create_mma_optimizer(model_for("v2-text"), lr=1e-3, gate_lr_ratio=ratio)
    with pytest.raises(ValueError, match="prompt gates, and this model has none"):
        create_mma_optimizer(model, lr=1e-3, gate_lr_ratio=10)  # LaVIN has no gates
    assert len(param_groups(model_for("v2-text"), lr=1e-3)) == 2  # ratio 1 needs no visual path: matrices, rest
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_mma_optimizer(tiny_llama().requires_grad_(False), lr=1e-3)


def test_new_gate_keeps_the_base_rate_and_is_decayed_while_the_gates_take_their_ratio():
    """`new_gate` ν starts at one and multiplies the gates: it is no zero-init gate, so `gate_lr_ratio` leaves it at
    the base rate, and it is decayed as the official (1, 1, 1, 1) tensor is."""
    model = model_for("v2-image", prompt_gate_scale=True)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, gate_lr_ratio=5)
    names = {id(p): n for n, p in model.named_parameters()}
    where = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    scales = [n for n in where if "mma_adapter_v2_gate_scale." in n]
    gates = [n for n in where if "mma_adapter_v2_gate." in n]
    assert scales and gates
    assert all(where[n] == (pytest.approx(1e-3), 0.1) for n in scales)
    assert all(where[n] == (pytest.approx(5e-3), 0.1) for n in gates)
