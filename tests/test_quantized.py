"""Both methods on bitsandbytes 4-bit (NF4) and 8-bit LLaMA bases, on the CPU (bitsandbytes >= 0.46.1 runs there)
and, where torch sees one, on a CUDA device.

The frozen base weights stay quantized; the adapter parameters are fp32. What is checked: identity at init, that
training changes the adapters and never the quantized weights, bitwise reload onto a fresh quantized base, and
merging into 4-/8-bit weights (which re-quantizes, so it is exact only up to the quantization step).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, train_steps
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_mma import LaVINConfig, LlamaAdapterV2Config

pytest.importorskip("bitsandbytes")

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    """A tiny GQA LLaMA (width 64: whole 4-bit blocks) saved in HF format, plus its fp32 logits on `IDS`."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama("gqa", "sdpa", hidden_size=64, intermediate_size=128).save_pretrained(path)
    return str(path)


IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [1, 30, 40, 50, 60, 70, 80, 90]])
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def load_quantized(base_dir: str, kind: str, device: str = "cpu"):
    config = BitsAndBytesConfig(**QUANT[kind])
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, device_map=device).eval()


def quantized_state(model) -> dict[str, torch.Tensor]:
    """Copies of every frozen base tensor (packed 4-bit / int8 weights included)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "mma_" not in n}


def logits(model, **kwargs) -> torch.Tensor:
    kwargs.setdefault("input_ids", IDS.to(model.device))
    with torch.no_grad():
        return model(**kwargs).logits.cpu()


def logits_as_lavin_calls(model) -> torch.Tensor:
    """The base's logits on `IDS` with one more position in front, masked as padding, and the text's own positions:
    how LaVIN calls the LLaMA (its modality token, `lavin.inputs`). Other tokens never see that position, yet the
    base's kernels round by sequence length (≈1e-7 between an 8- and a 9-position call, 4-bit or fp32), so LaVIN's
    identity at init is exact against this call, not against the plain 8-position one."""
    ids = torch.cat([torch.full((len(IDS), 1), 3), IDS], dim=1)
    mask = torch.ones_like(ids)
    mask[:, 0] = 0
    positions = torch.cat([torch.zeros(len(IDS), 1, dtype=torch.long), torch.arange(IDS.shape[1]).expand_as(IDS)], 1)
    device = model.device
    return logits(model, input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device))[
        :, 1:
    ]


def fp32_quantization_error(base_dir: str, kind: str, device: str = "cpu") -> float:
    """max |logits(quantized base) − logits(fp32 base)|: the scale against which re-quantization noise is judged."""
    fp32 = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return (logits(load_quantized(base_dir, kind, device)) - logits(fp32)).abs().max().item()


CONFIGS = {
    "v2": lambda: LlamaAdapterV2Config(),
    "lavin": lambda: LaVINConfig(),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(QUANT))
@pytest.mark.parametrize("method", list(CONFIGS))
def test_identity_train_and_reload(base_dir, tmp_path, kind, method, device):
    base = prepare_model_for_kbit_training(load_quantized(base_dir, kind, device), use_gradient_checkpointing=False)
    model = get_peft_model(base, CONFIGS[method]()).eval()
    with model.disable_adapter():
        expected = logits(model) if method == "v2" else logits_as_lavin_calls(model)
    assert (logits(model) - expected).abs().max().item() == 0.0

    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("mma_" in n for n in trainable)
    frozen = quantized_state(model)
    ids = IDS.to(device)
    losses = train_steps(model, {"input_ids": ids, "labels": ids}, 4)
    model.eval()
    after = quantized_state(model)
    assert all(torch.equal(after[n], frozen[n]) for n in frozen), "a quantized base tensor changed in training"
    assert losses[-1] < losses[0]
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert len(changed) == len(trainable), f"no gradient reached {sorted(set(trainable) - set(changed))[:3]}"

    trained = logits(model)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load_quantized(base_dir, kind, device), tmp_path).eval()
    assert torch.equal(logits(reloaded), trained)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(QUANT))
def test_v2_merge_into_quantized_weights(base_dir, kind, device):
    """Merging re-quantizes W′ = diag(s) W (+ bias in fp32): off by much less than quantizing the base itself."""
    model = get_peft_model(load_quantized(base_dir, kind, device), LlamaAdapterV2Config(init_weights=False)).eval()
    unmerged = logits(model)  # an eval forward first, where bitsandbytes would repack 4-bit weights on the CPU
    model.merge_adapter()
    merged = logits(model)
    model.unmerge_adapter()
    restored = logits(model)
    scale = fp32_quantization_error(base_dir, kind, device)
    assert (merged - unmerged).abs().max().item() < 0.25 * scale
    assert (restored - unmerged).abs().max().item() < 0.25 * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(QUANT))
def test_v2_merge_and_unload_biases_some_linears_of_a_quantized_base(base_dir, kind, device):
    """Biases on q and down only: unloading gives every other linear of those groups a zero bias of its own width
    and the merged biases' dtype (a 4-bit weight is packed, its shape is not the layer's), and the logits stay."""
    config = LlamaAdapterV2Config(init_weights=False, prompt_layers=0, bias_modules=["q_proj", "down_proj"])
    model = get_peft_model(load_quantized(base_dir, kind, device), config).eval()
    unmerged = logits(model)
    merged = model.merge_and_unload()
    attention = merged.model.layers[0].self_attn
    for linear in (attention.k_proj, attention.o_proj, merged.model.layers[0].mlp.up_proj):
        assert linear.bias.shape == (linear.out_features,) and linear.bias.dtype == attention.q_proj.bias.dtype
        assert not linear.bias.any()
    assert (logits(merged) - unmerged).abs().max().item() < 0.25 * fp32_quantization_error(base_dir, kind, device)


def test_lavin_merge_refuses_quantized_weights(base_dir):
    model = get_peft_model(load_quantized(base_dir, "nf4"), LaVINConfig(init_weights=False)).eval()
    before = logits(model)
    state = quantized_state(model)
    with pytest.raises(TypeError, match="nn.Linear"):
        model.merge_adapter()
    assert torch.equal(logits(model), before)
    assert all(torch.equal(p, state[n]) for n, p in quantized_state(model).items())


def dequantized(model) -> dict[str, torch.Tensor]:
    from bitsandbytes.functional import dequantize_4bit

    return {
        n: dequantize_4bit(m.weight.data, m.weight.quant_state)
        for n, m in model.named_modules()
        if type(m).__name__ == "Linear4bit"
    }


@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_base_used_before_injection(tmp_path, double_quant):
    """bitsandbytes repacks 4-bit weights at the first inference forward on the CPU (AVX512-BF16), in a layout
    that PEFT cannot dequantize and that has no autograd. A base used for inference before `get_peft_model` is
    restored at injection (to the loaded weights, up to absmax rounded to bf16 by bitsandbytes: within 2⁻⁷ of the
    largest weight with double quantization), and gradients reach every adapter parameter. A width of 256 gives
    several 4-bit blocks per row."""
    tiny_llama("gqa", "sdpa", hidden_size=256, intermediate_size=256, num_hidden_layers=2).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(**QUANT["nf4"], bnb_4bit_use_double_quant=double_quant)

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu").eval()

    fresh = dequantized(load())
    base = load()
    logits(base)  # repacks here, where the CPU supports it
    model = get_peft_model(base, LlamaAdapterV2Config(init_weights=False))  # non-zero gates: prompts get gradients
    restored = dequantized(model)
    assert restored.keys() == {f"base_model.model.{n}.base_layer" for n in fresh}
    for name, weight in fresh.items():
        error = (restored[f"base_model.model.{name}.base_layer"] - weight).abs().max()
        assert error <= 2**-7 * weight.abs().max(), name
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
