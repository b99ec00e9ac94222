"""The model card that `save_pretrained` and `push_to_hub` write next to a peft_mma adapter.

PEFT writes its card (README.md: `library_name: peft`, the base model's tags, the PEFT version) before it saves each
adapter; the config's own `save_pretrained` then runs last, and `MMAConfigMixin` completes the card there: the tags
`peft_mma` and the method, `base_model` as a Hub id where one is known (never a local path), and a body that says
what was trained and how to load it, which needs `pip install peft_mma` and `import peft_mma`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData
from safetensors import safe_open

METHODS = {  # peft_type → (tag, name, paper)
    "MMA_ADAPTER_V2": ("llama-adapter-v2", "LLaMA-Adapter V2", "https://arxiv.org/abs/2304.15010"),
    "MMA_LAVIN": ("lavin", "LaVIN (Mixture-of-Modality Adaptation)", "https://arxiv.org/abs/2305.15023"),
}
WEIGHTS = ("adapter_model.safetensors",)


def known_hub_id(base: str | None) -> str | None:
    """The Hub id of a base model: `base` itself unless it is a local folder; the SmolLM2 folder that
    `data.smollm2` converts maps to its Hub id; any other local folder to None."""
    if not base:
        return None
    if not os.path.exists(base):
        return base
    try:
        from .data.smollm2 import HUB_ID, cached_smollm2_dir

        if Path(base).resolve() == cached_smollm2_dir().resolve():
            return HUB_ID
    except (ModuleNotFoundError, OSError):
        pass
    return None


def trainable_parameters(directory: str | os.PathLike) -> int | None:
    """The number of values in the adapter weights saved in `directory` (read from the file's header)."""
    path = Path(directory, WEIGHTS[0])
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as weights:
        total = 0
        for key in weights.keys():
            size = 1
            for dim in weights.get_slice(key).get_shape():
                size *= dim
            total += size
        return total


def matching_preset(config: Any) -> str | None:
    """The name of the released preset that `config` reproduces, if any."""
    from .lavin.presets import PRESETS as LAVIN
    from .llama_adapter_v2.presets import PRESETS as ADAPTER_V2

    presets = {"MMA_ADAPTER_V2": ADAPTER_V2, "MMA_LAVIN": LAVIN}[getattr(config.peft_type, "value", config.peft_type)]
    for name, fields in presets.items():
        if all(getattr(config, key, None) == value for key, value in fields.items()):
            return name
    return None


def write_card(directory: str | os.PathLike, config: Any) -> None:
    """Complete (or create) `directory`/README.md for the adapter `config` saved there."""
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    tag, method, paper = METHODS[peft_type]
    path = Path(directory, "README.md")
    card = ModelCard.load(path) if path.exists() else ModelCard.from_template(ModelCardData())
    base = config.base_model_name_or_path
    hub_id = known_hub_id(base)
    tags = [t for t in (card.data.tags or []) if not t.startswith("base_model:")]
    tags += ["peft_mma", tag] + ([f"base_model:adapter:{hub_id}"] if hub_id else [])
    card.data.tags = sorted(set(tags))
    card.data.library_name = "peft"
    card.data.base_model = hub_id
    card.text = _body(config, method, paper, hub_id or base, directory, card.text)
    card.save(path)


def _body(config: Any, method: str, paper: str, base: str | None, directory, previous: str) -> str:
    count = trainable_parameters(directory)
    preset = matching_preset(config)
    facts = [f"method: {method} ([paper]({paper}))"]
    facts += [f"preset: `{preset}`"] if preset else []
    facts += [f"base model: `{base}`"] if base else []
    facts += [f"trainable parameters: {count:,}"] if count is not None else []
    vision = getattr(config, "vision_model", None)
    facts += [f"vision encoder (frozen, rebuilt from its name, not in this folder): `{vision}`"] if vision else []
    versions = previous.split("### Framework versions", 1)
    framework = "### Framework versions" + versions[1] if len(versions) == 2 else ""
    load_base = base or "<the base model this adapter was trained on>"
    return (
        "\n".join(
            [
                f"# {method} adapter",
                "",
                "A [peft_mma](https://pypi.org/project/peft_mma/) adapter for a Hugging Face LLaMA model.",
                "",
                *[f"- {fact}" for fact in facts],
                "",
                "## How to load",
                "",
                "PEFT reads this adapter only once the `peft_mma` plugin is installed and imported:",
                "",
                "```bash",
                "pip install peft_mma",
                "```",
                "",
                "```python",
                "import peft_mma  # registers the method with PEFT",
                "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM",
                "",
                f'base = AutoModelForCausalLM.from_pretrained("{load_base}")',
                'model = PeftModel.from_pretrained(base, "<this repository or folder>")',
                "```",
                "",
                framework,
            ]
        ).rstrip()
        + "\n"
    )


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
) -> Any:
    """Upload `model`'s adapters to the Hub with their card: `save_pretrained` into a temporary folder (adapter
    weights, config and README.md), then one `HfApi.upload_folder` commit. Returns the commit info.

    `PeftModel.push_to_hub` uploads the same adapter, but on a repository without a card it writes transformers'
    template card over the one `save_pretrained` made; this keeps ours.
    """
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return api.upload_folder(
            repo_id=repo, folder_path=folder, commit_message=commit_message or "Upload peft_mma adapter"
        )


class MMAConfigMixin:
    """Mixed into both configs (before `PeftConfig`): saving the config, which PEFT does last, completes the card."""

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        write_card(save_directory, self)
