"""`examples/finetune.py` run small: its loss helper, the whole job on a tiny LLaMA, and its errors."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import load_example, tiny_llama
from peft import LoraConfig
from stand_in_tokenizer import word_tokenizer

from peft_mma import create_mma_optimizer as create
from peft_mma.data.collator import CausalLMCollator
from peft_mma.data.procedural import instruction_dataset
from peft_mma.data.templates import format_prompt


@pytest.fixture(scope="module")
def finetune():
    return load_example("finetune")


def tokenizer_for(samples):
    texts = [format_prompt(s["instruction"], s["input"]) + " " + s["output"] for s in samples]
    return word_tokenizer(texts=texts)


def small_args(finetune, tmp_path, *extra):
    argv = ["--steps", "12", "--batch-size", "4", "--train-size", "48", "--eval-size", "8", "--generate", "2"]
    return finetune.parse_args([*argv, "--output-dir", str(tmp_path / "adapter"), *extra])


def test_parse_args_defaults(finetune):
    args = finetune.parse_args([])
    assert (args.method, args.steps, args.batch_size, args.output_dir) == ("adapter-v2", 80, 8, "out/adapter-v2")
    assert finetune.parse_args(["--method", "lavin"]).output_dir == "out/lavin"  # each method its own folder
    assert args.tasks == ["last_word", "reverse", "sort"] and args.lr == 3e-3


def test_evaluate_loss_is_the_token_mean_cross_entropy(finetune):
    samples = instruction_dataset(4, seed=0, split="eval")
    tokenizer = tokenizer_for(samples)
    model = tiny_llama(vocab_size=len(tokenizer))
    collator = CausalLMCollator(tokenizer)
    expected = model(**collator(samples)).loss.item()  # one batch: the model's token mean
    torch.testing.assert_close(
        finetune.evaluate_loss(model, samples, collator, batch_size=4), expected, atol=1e-5, rtol=0
    )
    assert not model.training


def test_trainer_logs_the_same_loss_as_the_held_out_measure(finetune):
    """No train/eval-mode gap: at init, V2's loss in training mode, the Trainer's logged first-step loss (one batch
    holding every sample, its loss taken before the update) and `evaluate_loss` in eval mode agree."""
    from peft import get_peft_model

    from peft_mma import LlamaAdapterV2Config

    samples = instruction_dataset(4, seed=0, split="train")
    tokenizer = tokenizer_for(samples)
    model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), LlamaAdapterV2Config(init_weights=False))
    collator = CausalLMCollator(tokenizer)
    held_out = finetune.evaluate_loss(model, samples, collator, batch_size=4)
    model.train()
    training_mode = model(**collator(samples)).loss.item()
    logged = finetune.train(model, samples, collator, steps=1, batch_size=4, lr=1e-3)[0]["loss"]
    torch.testing.assert_close(training_mode, held_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(logged, held_out, atol=1e-5, rtol=0)


def test_job_trains_saves_reloads_and_generates_on_a_tiny_llama(finetune, tmp_path):
    args = small_args(finetune, tmp_path, "--lr", "3e-2")
    train, held_out = finetune.build_datasets(args.train_size, args.eval_size, args.seed)
    tokenizer = tokenizer_for(train + held_out)
    base = tiny_llama(vocab_size=len(tokenizer))
    # LoRA stands in for the method: this test is about the job's plumbing, not the adapter.
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    result = finetune.run(base, tokenizer, config, args)
    assert result["loss_after"] < result["loss_before"]
    assert result["reload_max_diff"] <= 1e-5
    assert len(result["generations"]) == 2 and len(result["train_logs"]) > 0
    assert os.path.exists(tmp_path / "adapter" / "adapter_config.json")


def test_build_peft_config_names_the_missing_method(finetune, monkeypatch):
    import peft_mma

    monkeypatch.delattr(peft_mma, "LaVINConfig", raising=False)
    with pytest.raises(ImportError, match=r"`--method lavin` needs `peft_mma.LaVINConfig`"):
        finetune.build_peft_config("lavin")


@pytest.mark.smollm2
def test_job_with_llama_adapter_v2_on_smollm2(finetune, smollm2, tmp_path):
    import peft_mma

    if not hasattr(peft_mma, "LlamaAdapterV2Config"):
        pytest.skip("peft_mma.LlamaAdapterV2Config is not there yet")
    base, tokenizer = smollm2
    args = small_args(finetune, tmp_path, "--steps", "4", "--train-size", "16", "--max-length", "96")
    result = finetune.run(copy.deepcopy(base), tokenizer, finetune.build_peft_config("adapter-v2"), args)
    assert result["loss_after"] < result["loss_before"] and result["reload_max_diff"] <= 1e-5


def test_the_tasks_option_picks_the_procedural_tasks(finetune):
    from peft_mma.data.procedural import TASKS

    train, held_out = finetune.build_datasets(12, 6, tasks=["reverse", "sort"])
    wanted = {TASKS["reverse"][0], TASKS["sort"][0]}
    assert {s["instruction"] for s in train} == wanted and {s["instruction"] for s in held_out} == wanted
    with pytest.raises(SystemExit):
        finetune.parse_args(["--tasks", "no_such_task"])


def test_training_decays_matrices_and_gates_only(finetune, monkeypatch):
    """The job's optimizer is `create_mma_optimizer`'s (weight decay 0.02 on matrices and V2's gates, as the official
    recipe), not the `Trainer`'s grouping, which would pull V2's scales towards 0."""
    from peft import get_peft_model

    from peft_mma import LlamaAdapterV2Config

    made = []
    monkeypatch.setattr(finetune, "create_mma_optimizer", lambda *a, **k: made.append(create(*a, **k)) or made[-1])
    samples = instruction_dataset(4, seed=0, split="train")
    tokenizer = tokenizer_for(samples)
    model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), LlamaAdapterV2Config())
    finetune.train(model, samples, CausalLMCollator(tokenizer), steps=2, batch_size=4, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in made[0].param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed and all("_prompt." in n or "_gate." in n for n in decayed), decayed
    assert any(made[0].state[p] for g in made[0].param_groups for p in g["params"])  # the Trainer stepped it
