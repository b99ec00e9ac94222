"""Both methods under `torch.compile(fullgraph=True)`: a training step on a mixed image/text batch, and cached
decoding (DESIGN.md decision 8: per-call state on the call stack, no data-dependent Python on the hot path)."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, lavin_batch, model_for, tiny_lavin


def model_and_batch(method: str):
    """A tiny model with random adapters and a batch of one image sample and one text-only sample."""
    if method.startswith("lavin"):
        model = tiny_lavin("gqa", "sdpa", router="modality" if method == "lavin-modality" else "learnt")
        return model, lavin_batch(model, has_image=(True, False))
    model = model_for("v2-image").eval()
    return model, batch_for("v2-image", model)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ["v2", "lavin", "lavin-modality"])
def test_training_step_compiles_as_one_graph_with_the_eager_numbers(method):
    model, batch = model_and_batch(method)
    model.train()

    def loss(**inputs):
        return model(**inputs).loss

    explained = torch._dynamo.explain(loss)(**batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    params = [p for p in model.parameters() if p.requires_grad]
    eager = loss(**batch)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(loss, fullgraph=True)(**batch)
    compiled_grads = torch.autograd.grad(compiled, params)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "method, cache", [("v2", "static"), ("lavin", "static"), ("lavin", "dynamic"), ("lavin-modality", "static")]
)
def test_cached_decoding_compiles_as_full_graphs_with_the_eager_tokens(method, cache):
    """The LLaMA forward that `generate` calls, compiled with `fullgraph=True` (a graph break would raise): prefill
    and decoding steps give the eager tokens."""
    model, batch = model_and_batch(method)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        eager = model.generate(**inputs, **kwargs)
    llama = model.base_model.model
    llama.forward = torch.compile(llama.forward, fullgraph=True)
    try:
        with torch.no_grad():
            compiled = model.generate(**inputs, **kwargs)
    finally:
        del llama.forward  # back to the class's forward
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("method", ["v2", "lavin"])
def test_trainer_with_torch_compile_trains_every_part(method, tmp_path):
    """`TrainingArguments(torch_compile=True)`: the Trainer compiles the model and every adapter part trains, over
    batches of several lengths (each a new shape: the third one runs the graph compiled for dynamic lengths)."""
    from stand_in_tokenizer import word_tokenizer
    from transformers import Trainer, TrainingArguments

    from peft_mma.data import ImageTokens
    from peft_mma.data.collator import CausalLMCollator

    model, _ = model_and_batch(method)
    texts = ["What is shown ?", "It is a cat .", "Say hello .", "hello"]
    samples = [
        {"prompt": " ".join([texts[0]] * n), "response": texts[1], "image": torch.randn(3, 28, 28)}
        if n % 2
        else {"prompt": " ".join([texts[2]] * n), "response": texts[3]}
        for n in range(1, 9)
    ]  # 8 lengths
    tokens = ImageTokens.from_config(model.peft_config["default"]) if method == "lavin" else None
    collator = CausalLMCollator(word_tokenizer(texts=texts, add_bos=True), image_size=28, image_tokens=tokens)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2, report_to=[],
        save_strategy="no", remove_unused_columns=False, use_cpu=True, torch_compile=True,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    Trainer(model=model, args=args, train_dataset=samples, data_collator=collator).train()
    after = dict(model.named_parameters())
    assert not [n for n, p in before.items() if torch.equal(after[n], p)]
