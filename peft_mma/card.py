"""The model card that `save_pretrained` and `push_to_hub` write next to a peft_mma adapter.

PEFT writes its card (README.md: `library_name: peft`, the base model's tags, the PEFT version) before it saves each
adapter; the config's own `save_pretrained` then runs last, and `MMAConfigMixin` completes the card there: the tags
`peft_mma` and the method, `base_model` as a Hub id where one is known (never a local path), and a body that says
what was trained and how to load it, which needs `pip install peft_mma` and `import peft_mma`.
"""

from __future__ import annotations

import json
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
BEGIN, END = "<!-- peft_mma card: begin -->", "<!-- peft_mma card: end -->"  # our part of the card's text
OLD_CARD_LINE = "A [peft_mma](https://pypi.org/project/peft_mma/) adapter"  # in our cards, with markers or before
FRAMEWORK = "### Framework versions"  # PEFT's section, kept last


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


# config fields that name no property of the adapter itself: filled in for the base at injection, bookkeeping, or
# how the weights were initialised and are merged
NOT_PRESET_FIELDS = {
    "base_num_layers", "base_hidden_size", "target_modules", "image_token_id", "num_image_tokens", "inference_mode",
    "base_model_name_or_path", "revision", "peft_version", "task_type", "auto_mapping", "init_weights",
    "merge_modality",
}  # fmt: skip


def matching_preset(config: Any) -> str | None:
    """The name of the released preset that `config` reproduces, if any: every field but `NOT_PRESET_FIELDS` equal
    to the preset's config (`from_preset(name)`, class defaults included)."""
    from .lavin.presets import PRESETS as LAVIN
    from .llama_adapter_v2.presets import PRESETS as ADAPTER_V2

    presets = {"MMA_ADAPTER_V2": ADAPTER_V2, "MMA_LAVIN": LAVIN}[getattr(config.peft_type, "value", config.peft_type)]
    ours = _as_json(config.to_dict())
    for name in presets:
        preset = _as_json(type(config).from_preset(name).to_dict())
        if all(ours.get(key) == value for key, value in preset.items() if key not in NOT_PRESET_FIELDS):
            return name
    return None


def _as_json(fields: dict[str, Any]) -> dict[str, Any]:
    """Config fields as they read back from `adapter_config.json` (tuples become lists)."""
    return json.loads(json.dumps(fields, default=sorted))


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
    card.text = card_text(card.text, _body(config, method, paper, hub_id or base, directory))
    card.save(path)


def card_text(previous: str, block: str) -> str:
    """The card's text with our `block` in it, the rest as PEFT would keep it: our block from an earlier save is
    replaced in place; the empty template PEFT starts a card from (or a card of ours from before the markers) is
    replaced; any other text is the user's and stays, our block after it. PEFT's "Framework versions" stay last."""
    head, heading, framework = previous.partition(FRAMEWORK)
    if BEGIN in head and END in head:
        before, rest = head.split(BEGIN, 1)
        parts = [before, block + rest.split(END, 1)[1]]
    elif head.strip() in ("", _template_text().strip()) or OLD_CARD_LINE in head:
        parts = [block]
    else:
        parts = [head, block]
    return "\n\n".join(part.strip("\n") for part in (*parts, heading + framework) if part.strip()) + "\n"


def _template_text() -> str:
    """The text of the empty template that PEFT's `create_or_update_model_card` starts a new card from."""
    return ModelCard.from_template(ModelCardData()).text.partition(FRAMEWORK)[0]


def _body(config: Any, method: str, paper: str, base: str | None, directory) -> str:
    count = trainable_parameters(directory)
    preset = matching_preset(config)
    facts = [f"method: {method} ([paper]({paper}))"]
    facts += [f"preset: `{preset}`"] if preset else []
    facts += [f"base model: `{base}`"] if base else []
    facts += [f"trainable parameters: {count:,}"] if count is not None else []
    vision = getattr(config, "vision_model", None)
    facts += [f"vision encoder (frozen, rebuilt from its name, not in this folder): `{vision}`"] if vision else []
    load_base = base or "<the base model this adapter was trained on>"
    return "\n".join(
        [
            BEGIN,
            f"# {method} adapter",
            "",
            OLD_CARD_LINE + " for a Hugging Face LLaMA model.",
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
            END,
        ]
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
    """Mixed into both configs (before `PeftConfig`): every field must be writable as JSON (`adapter_config.json`,
    checked when the config is made, not after training); saving the config, which PEFT does last, completes the
    card."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value in self.to_dict().items():
            try:
                json.dumps(value, default=sorted)  # sets (`target_modules`) are saved as lists
            except TypeError:
                raise ValueError(
                    f"`{name}`={value!r} cannot be saved in adapter_config.json; use plain numbers, strings, lists "
                    "and dicts (a vision encoder is rebuilt from them when the adapter is loaded)."
                ) from None

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        write_card(save_directory, self)
