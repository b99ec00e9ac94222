"""Bad input gives a clear ValueError/TypeError and changes nothing."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import LAVIN_VISION as VISION
from conftest import lavin_batch, tiny_llama
from peft import PeftModel, get_peft_model
from transformers import Cache, LlamaForCausalLM

from peft_mma import LaVINConfig


def ids(batch=2, length=6):
    x = torch.randint(3, 97, (batch, length))
    x[:, 0] = 1
    return x


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(adapter_dim=7), "`adapter_groups`=2 must divide `adapter_dim`=7"),
        (dict(adapter_dim=0), "`adapter_dim` must be a positive integer; got 0"),
        (dict(temperature=0.0), r"`temperature` must be > 0 \(10 for LaVIN-7B"),
        (dict(adapter_scale=float("nan")), r"`adapter_scale` must be a finite number \(1 for LaVIN-7B\); got nan"),
        (dict(projector_init_scale=0.0), r"`projector_init_scale` must be > 0 \(1: the official xavier init\)"),
        (dict(adapter_dropout=1.0), r"`adapter_dropout` must be in \[0, 1\); got 1.0"),
        (dict(adapter_placement="ffn"), "`adapter_placement`='ffn' is not one of"),
        (dict(image_token_id=-1), r"`image_token_id` must be a token id >= 0 \(or None\); got -1"),
        (dict(image_token_position="middle"), "`image_token_position`='middle' is not one of"),
        (dict(merge_modality="audio"), "`merge_modality`='audio' is not one of"),
        (dict(task_type="SEQ_CLS"), "`task_type`='SEQ_CLS'; LaVIN adapts causal LMs"),
        (dict(task_type=None), "`task_type`=None; LaVIN adapts causal LMs"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LaVINConfig(**kwargs)


def test_the_modality_router_refuses_mlp_targets():
    with pytest.raises(ValueError, match="`router='modality'` adapts the attention inputs only"):
        LaVINConfig(router="modality", target_modules=["self_attn", "mlp"])


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown LaVIN preset 'lavin-70b'"):
        LaVINConfig.from_preset("lavin-70b")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(adapter_dim=6, adapter_groups=3), "`adapter_groups`=3 must divide the model width 32"),
        (dict(target_modules=["q_proj"]), "LaVIN adapts `self_attn`"),
        (dict(VISION, vision_feature_every=3), "`vision_feature_every`=3 must divide the depth 4"),
        (
            dict(
                VISION,
                adapter_dim=16,
                adapter_groups=16,
                vision_model_kwargs=dict(VISION["vision_model_kwargs"], embed_dim=24, num_heads=4),
            ),
            "`adapter_groups`=16 must divide the vision encoder's width 24 too",
        ),
    ],
)
def test_model_dependent_config_errors_leave_the_model_untouched(kwargs, match):
    model = tiny_llama()
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, LaVINConfig(**kwargs))
    assert [n for n, _ in model.named_modules()] == names


@pytest.mark.parametrize(
    "kwargs, attn, match",
    [
        (
            dict(target_modules=r".*layers\.\d+\.(self_attn|input_layernorm)"),
            "eager",
            r"matches `model\.layers\.0\.input_layernorm`, a LlamaRMSNorm: LaVIN adapts a LLaMA `self_attn`",
        ),
        (dict(layers_to_transform=[0, 10]), "eager", r"`layers_to_transform`=\[0, 10\]: the base has layers 0–3"),
        (dict(), "flex_attention", "LaVIN's learnt router cannot run on attn_implementation='flex_attention'"),
    ],
    ids=["regex-target-matches-a-norm", "layer-index-past-the-depth", "flex-attention"],
)
def test_targets_are_checked_before_anything_is_injected(kwargs, attn, match):
    """A regex `target_modules` whose later matches are no attention block, a layer index past the depth, flex
    attention under the learnt router: refused at `get_peft_model` (and at `add_adapter`), with the base (and the
    first adapter) unchanged."""
    model = tiny_llama(attn_implementation=attn)
    names, implementation = [n for n, _ in model.named_modules()], model.config._attn_implementation
    with torch.no_grad():
        expected = model(input_ids=FIXED_IDS).logits
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, LaVINConfig(**kwargs))
    assert [n for n, _ in model.named_modules()] == names and model.config._attn_implementation == implementation
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=FIXED_IDS).logits, expected, atol=0, rtol=0)
    if attn == "eager":
        peft_model = get_peft_model(model, LaVINConfig(init_weights=False)).eval()
        before = snapshot(peft_model)
        with pytest.raises(ValueError, match=match):
            peft_model.add_adapter("second", LaVINConfig(**kwargs))
        assert_unchanged(peft_model, before)


FIXED_IDS = torch.tensor([[1, 5, 9, 13, 17, 21]])


def snapshot(model) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every tensor of the model, and its logits on a fixed text batch."""
    with torch.no_grad():
        logits = model(input_ids=FIXED_IDS).logits
    return {k: v.clone() for k, v in model.state_dict().items()}, logits


def assert_unchanged(model, before: tuple[dict[str, torch.Tensor], torch.Tensor]) -> None:
    state, logits = snapshot(model)
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    torch.testing.assert_close(logits, before[1], atol=0, rtol=0)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("labels", lambda x: x[0], r"`labels` must have the shape \(2, 6\) of the inputs \(B, S\); got \(6,\)"),
        ("labels", lambda x: x[:1], r"`labels` must have the shape \(2, 6\) of the inputs \(B, S\); got \(1, 6\)"),
        ("attention_mask", lambda x: torch.ones(3, 6).long(), r"`attention_mask` must have the shape \(2, 6\)"),
    ],
)
def test_labels_and_mask_of_another_shape_are_refused(field, value, match):
    """Broadcast `labels` of one row would score every row against row 0's targets, as the base LLaMA refuses."""
    model = get_peft_model(tiny_llama(), LaVINConfig(init_weights=False)).eval()
    x = ids()
    with pytest.raises(ValueError, match=match):
        model(input_ids=x, **{field: value(x)})


def test_images_for_a_text_only_adapter_are_refused_and_change_nothing():
    model = get_peft_model(tiny_llama(), LaVINConfig()).eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapter 'default' has no vision model .* build the config with `vision_m"):
        model(input_ids=ids(), pixel_values=torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="adapter 'default' has no vision model"):
        model.generate(input_ids=ids(), pixel_values=torch.randn(2, 3, 28, 28), max_new_tokens=2)
    no_vision = r"Samples have images .* but this adapter has no vision model \(`vision_model`=None\)"
    with pytest.raises(ValueError, match=no_vision):
        model(input_ids=ids(), has_image=torch.tensor([True, False]))
    placeholders = ids().clone()
    placeholders[0, 1:3] = model.peft_config["default"].image_token_id
    with pytest.raises(ValueError, match=no_vision):
        model(input_ids=placeholders)
    assert_unchanged(model, before)


@pytest.fixture
def vision_model():
    return get_peft_model(tiny_llama(), LaVINConfig(**VISION)).eval()


@pytest.mark.parametrize(
    "mask, pixels, match",
    [
        (torch.tensor([1, 0]), torch.randn(2, 3, 28, 28), "`has_image` must be a 1-D bool tensor"),
        (torch.tensor([True]), torch.randn(2, 3, 28, 28), "`has_image` has 1 flags for a batch of 2"),
        (torch.tensor([True, True]), torch.randn(2, 3, 28, 28), "Sample 1 holds 0 image placeholders"),
        (torch.tensor([False, False]), torch.randn(2, 3, 28, 28), "Sample 0 holds 2 image placeholders"),
        (torch.tensor([True, False]), None, r"no `pixel_values` were passed\. \(The HF `Trainer` drops them unless"),
    ],
)
def test_bad_has_image(vision_model, mask, pixels, match):
    batch = lavin_batch(vision_model, has_image=(True, False))
    with pytest.raises(ValueError, match=match):
        vision_model(input_ids=batch["input_ids"], pixel_values=pixels, has_image=mask)


def test_placeholder_count_must_be_that_of_one_image_and_nothing_runs(vision_model, monkeypatch):
    before = snapshot(vision_model)
    batch = lavin_batch(vision_model, has_image=(True, False))
    ids = batch["input_ids"].clone()
    ids[0, 1] = 5  # one of the image's two placeholders lost
    monkeypatch.setattr(vision_model.base_model, "encode_images", lambda *a: pytest.fail("the encoder ran"))
    message = r"Sample 0 holds 1 image placeholders \(`image_token_id`=97\); a sample with an image needs exactly 2"
    with pytest.raises(ValueError, match=message):
        vision_model(input_ids=ids, pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match=message):
        vision_model.generate(input_ids=ids, pixel_values=batch["pixel_values"], max_new_tokens=2)
    monkeypatch.undo()
    assert_unchanged(vision_model, before)


def test_a_filled_cache_is_refused(vision_model):
    with torch.no_grad():
        output = vision_model(input_ids=ids(), use_cache=True)
    cache = next(value for value in output.values() if isinstance(value, Cache))
    assert cache.get_seq_length() == 7  # the modality token and the text
    keyword = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
    with pytest.raises(ValueError, match="cannot continue from a filled KV cache; decode with `generate`"):
        vision_model(input_ids=ids(), **{keyword: cache})  # transformers 5.24 renamed the keyword


def test_calling_the_wrapped_llama_directly_is_refused(vision_model):
    with pytest.raises(ValueError, match="call the model through its `PeftModel`"):
        vision_model.base_model.model(input_ids=ids())


def test_images_need_input_ids():
    model = get_peft_model(tiny_llama(), LaVINConfig(**VISION)).eval()
    with pytest.raises(ValueError, match="Images need `input_ids` holding the image placeholders"):
        model(inputs_embeds=torch.randn(2, 6, 32), pixel_values=torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize(
    "overrides",
    [dict(hidden_size=48), dict(num_hidden_layers=2), dict(num_hidden_layers=6)],
    ids=["wider", "shallower", "deeper"],
)
def test_adapter_onto_a_base_of_another_shape_is_refused_before_anything_changes(tmp_path, overrides):
    get_peft_model(tiny_llama(), LaVINConfig(**VISION)).save_pretrained(tmp_path)
    other = tiny_llama(**overrides)
    names = [n for n, _ in other.named_modules()]
    with pytest.raises(ValueError, match="This adapter was made for a base with 4 layers of width 32; the model has"):
        PeftModel.from_pretrained(other, tmp_path)
    assert [n for n, _ in other.named_modules()] == names


def test_a_saved_image_token_count_that_the_encoder_does_not_give_is_refused():
    with pytest.raises(ValueError, match="`num_image_tokens`=6, but `vision_model`=.* gives 2 visual tokens"):
        get_peft_model(tiny_llama(), LaVINConfig(**VISION, num_image_tokens=6))
