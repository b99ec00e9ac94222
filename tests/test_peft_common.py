"""PEFT's own common tests (`PeftCommonTester`, the installed peft's `tests/testing_common.py`) on both methods.

The helpers come from the sdist of the installed peft version, fetched by pip from the package registry once per
session, so a PEFT upgrade that changes a convention shows up here. Each helper that takes `(model_id, config_cls,
config_kwargs)` runs on a tiny LLaMA saved to a folder (V2 text-only; LaVIN text-only). Where our methods differ from
PEFT by design, the test asserts that difference instead:

* V2 with adaption prompts refuses `merge_and_unload` (prompts cannot fold into weights; `merge_adapter` folds the
  rest), so PEFT's merge helpers run on V2 without prompts and assert the refusal with them;
* LaVIN folds one adapter per layer (`merge_layers_multi`);
* the card names `base_model` only as a Hub id, never a local path (a local path is what PEFT writes and what the
  Hub refuses as metadata), so `check_modelcard` is replaced by our own check.

Helpers that skip themselves for a method (mixed adapter batches, prompt learning, weighted combinations, `bias`,
`layers_to_transform` for V2) are reported as skipped by pytest.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tarfile
import types
import warnings
from pathlib import Path

import peft
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from peft_mma import LaVINConfig, LlamaAdapterV2Config

HELPERS = [
    "_test_model_attr",
    "_test_adapter_name",
    "_test_prepare_for_training",
    "_test_load_model_low_cpu_mem_usage",
    "_test_save_pretrained",
    "_test_save_pretrained_selected_adapters",
    "_test_save_pretrained_adapter_name_substring",
    "_test_from_pretrained_config_construction",
    "_test_load_multiple_adapters",
    "_test_merge_layers_fp16",
    "_test_merge_layers_nan",
    "_test_merge_layers",
    "_test_merge_layers_multi",
    "_test_merge_layers_is_idempotent",
    "_test_safe_merge",
    "_test_mixed_adapter_batches",
    "_test_generate_with_mixed_adapter_batches_and_beam_search",
    "_test_generate",
    "_test_generate_half_prec",
    "_test_training",
    "_test_inference_safetensors",
    "_test_training_layer_indexing",
    "_test_training_gradient_checkpointing",
    "_test_peft_model_device_map",
    "_test_training_prompt_learning_tasks",
    "_test_delete_adapter",
    "_test_delete_inactive_adapter",
    "_test_delete_unknown_adapter_raises",
    "_test_unload_adapter",
    "_test_weighted_combination_of_adapters",
    "_test_disable_adapter",
    "_test_adding_multiple_adapters_with_bias_raises",
    "_test_lora_conversion",
    "_test_get_base_model_state_dict",
    "_test_add_adapter_no_autocast_adapter_dtype",
    "_test_generate_pos_args",
]
MERGES = {"_test_merge_layers_fp16", "_test_merge_layers_nan", "_test_merge_layers", "_test_merge_layers_multi",
          "_test_safe_merge"}  # fmt: skip
METHODS = {
    "v2": (LlamaAdapterV2Config, {"init_weights": False}),
    "lavin": (LaVINConfig, {"init_weights": False, "adapter_dropout": 0.0}),
}
# (method, helper) → the error our method raises by design instead of passing
BY_DESIGN = {("v2", name): "has adaption prompts, which cannot be merged" for name in MERGES} | {
    ("lavin", "_test_merge_layers_multi"): "LaVIN folds one adapter per layer",
}


@pytest.fixture(scope="module")
def testing_common(tmp_path_factory):
    """PEFT's `tests.testing_common` of the installed version, from its sdist (skips when the registry is out of
    reach). `diffusers` and `datasets`, which it imports for other model families, are stood in for."""
    folder = tmp_path_factory.mktemp("peft_sdist")
    command = [sys.executable, "-m", "pip", "download", "-q", f"peft=={peft.__version__}", "--no-deps"]
    try:
        subprocess.run([*command, "--no-binary", ":all:", "-d", str(folder)], check=True, timeout=300,
                       capture_output=True)  # fmt: skip
    except (subprocess.SubprocessError, OSError) as error:
        pytest.skip(f"peft {peft.__version__}'s sdist could not be fetched from the package registry: {error}")
    (archive,) = folder.glob("peft-*.tar.gz")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if re.search(r"/tests/(__init__|testing_common|testing_utils)\.py$",
                                                                 m.name)]  # fmt: skip
        tar.extractall(folder, members=members, filter="data")
    root = next(folder.glob("peft-*"))
    (root / "tests" / "__init__.py").touch()
    stand_ins = {}
    for name in ("diffusers", "datasets"):
        module = types.ModuleType(name)
        module.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
        module.load_dataset = lambda *args, **kwargs: None
        stand_ins[name] = sys.modules.get(name)
        sys.modules[name] = module
    sys.path.insert(0, str(root))
    saved_tests = sys.modules.pop("tests", None)
    try:
        yield importlib.import_module("tests.testing_common")
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "tests" or n.startswith("tests.")]:
            del sys.modules[name]
        if saved_tests is not None:
            sys.modules["tests"] = saved_tests
        for name, module in stand_ins.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def model_id(tmp_path_factory) -> str:
    """A tiny LLaMA (GQA) saved to a folder, the `model_id` PEFT's helpers load with `from_pretrained`."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def check_our_card(tmp_dirname, model) -> None:
    """Our card convention in place of PEFT's `check_modelcard`: library `peft`, the `peft_mma` tag and the method's,
    and `base_model` only when it is a Hub id (here a local folder, so none)."""
    readme = Path(tmp_dirname, "README.md").read_text()
    data = yaml.safe_load(re.search(r"---\n(.*?)\n---", readme, re.DOTALL).group(1))
    assert data["library_name"] == "peft" and "peft_mma" in data["tags"]
    assert data.get("base_model") is None and Path(model.config.to_dict()["_name_or_path"]).is_dir()


@pytest.mark.parametrize("helper", HELPERS)
@pytest.mark.parametrize("method", METHODS)
def test_peft_common_helper(testing_common, model_id, method, helper, monkeypatch):
    class Tester(testing_common.PeftCommonTester):
        transformers_class = AutoModelForCausalLM

        def prepare_inputs_for_testing(self):
            return {
                "input_ids": torch.tensor([[1, 1, 1], [1, 2, 1]]),
                "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 1]]),
            }

        check_modelcard = staticmethod(check_our_card)

    config_cls, kwargs = METHODS[method]
    run = getattr(Tester(), helper)
    extra = {"dtype": torch.bfloat16} if helper == "_test_add_adapter_no_autocast_adapter_dtype" else {}
    extra |= {"raises_err": False} if helper == "_test_generate_pos_args" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if (method, helper) in BY_DESIGN:
            with pytest.raises(ValueError, match=BY_DESIGN[method, helper]):
                run(model_id, config_cls, dict(kwargs), **extra)
            if method == "v2":  # without prompts V2 merges as PEFT's methods do
                run(model_id, config_cls, dict(kwargs, prompt_layers=0), **extra)
            return
        run(model_id, config_cls, dict(kwargs), **extra)
