"""The model card next to a saved adapter, and the upload to the Hub (with huggingface_hub's HfApi faked)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import tiny_lavin, tiny_llama
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel, get_peft_model

import peft_mma
from peft_mma import LlamaAdapterV2Config


@pytest.mark.parametrize("method", ["llama-adapter-v2", "lavin"])
def test_saved_card_names_plugin_method_parameters_and_how_to_load(tmp_path, method):
    model = tiny_lavin() if method == "lavin" else get_peft_model(tiny_llama(), LlamaAdapterV2Config(prompt_layers=1))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert {"peft_mma", method} <= set(card.data.tags) and card.data.library_name == "peft"
    assert not any(tag.startswith("base_model:") for tag in card.data.tags)  # no Hub id known for an in-memory base
    trainable, _ = model.get_nb_trainable_parameters()
    assert f"trainable parameters: {trainable:,}" in card.text
    assert "pip install peft_mma" in card.text and "import peft_mma" in card.text
    assert "PeftModel.from_pretrained(base" in card.text and "[More Information Needed]" not in card.text
    assert "- PEFT " in card.text  # PEFT's own framework line is kept
    model.save_pretrained(tmp_path)  # saving again updates the card, it does not stack a second one
    assert ModelCard.load(tmp_path / "README.md").text.count("## How to load") == 1
    assert PeftModel.from_pretrained(tiny_llama(), tmp_path) is not None


def test_card_names_a_hub_base_and_the_preset(tmp_path):
    config = LlamaAdapterV2Config.from_preset("CHAT-65B")
    model = get_peft_model(tiny_llama(), config)
    model.peft_config["default"].base_model_name_or_path = "meta-llama/Llama-2-7b-hf"  # a Hub id, not a folder
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "meta-llama/Llama-2-7b-hf"
    assert "base_model:adapter:meta-llama/Llama-2-7b-hf" in card.data.tags
    assert "preset: `CHAT-65B`" in card.text and 'from_pretrained("meta-llama/Llama-2-7b-hf")' in card.text


@pytest.mark.smollm2
def test_an_adapter_on_smollm2_names_its_hub_id(smollm2, tmp_path):
    model = get_peft_model(smollm2[0].__class__(smollm2[0].config), LlamaAdapterV2Config(prompt_layers=1))
    model.peft_config["default"].base_model_name_or_path = smollm2[0].name_or_path  # the cached local folder
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in card.data.tags


def test_push_to_hub_uploads_adapter_config_and_card(monkeypatch):
    uploads = {}

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
        uploads[repo_id] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return SimpleNamespace(commit_message=commit_message)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = tiny_lavin()
    result = peft_mma.push_to_hub(model, "me/tiny-lavin")
    files = uploads["me/tiny-lavin"]
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert b"pip install peft_mma" in files["README.md"] and b"- lavin" in files["README.md"]
    assert b'"MMA_LAVIN"' in files["adapter_config.json"] and result.commit_message == "Upload peft_mma adapter"


def test_the_preset_is_named_only_where_every_field_matches_also_after_reloading(tmp_path):
    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config.from_preset("CHAT-65B"))
    model.save_pretrained(tmp_path / "preset")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "preset")  # its fields come back from JSON
    reloaded.save_pretrained(tmp_path / "again")
    assert "preset: `CHAT-65B`" in ModelCard.load(tmp_path / "again" / "README.md").text
    lora = LlamaAdapterV2Config.from_preset("CHAT-65B", lora_modules=["q_proj", "v_proj"], r=8)  # CHAT-65B has none
    get_peft_model(tiny_llama(), lora).save_pretrained(tmp_path / "lora")
    assert "preset:" not in ModelCard.load(tmp_path / "lora" / "README.md").text


def test_a_card_the_user_wrote_keeps_its_text_and_our_part_is_updated_in_place(tmp_path):
    model = get_peft_model(tiny_llama(), LlamaAdapterV2Config(prompt_layers=1))
    tmp_path.joinpath("README.md").write_text("---\nlicense: mit\n---\n# My adapter\n\nResults: 42 %.\n")
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "mit" and "peft_mma" in card.data.tags
    assert card.text.count("# My adapter") == 1 and "Results: 42 %." in card.text
    assert card.text.count("## How to load") == 1 and card.text.count("- PEFT ") == 1
    assert card.text.index("Results: 42 %.") < card.text.index("## How to load") < card.text.index("- PEFT ")
