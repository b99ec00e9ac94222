"""`python -m peft_mma.convert`: exit status, summary, and a folder that PEFT loads."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from official_checkpoints import TINY_VIT, lavin, parity_base
from peft import AutoPeftModelForCausalLM

from peft_mma.convert.__main__ import main

SETTINGS = dict(vision_pretrained=False, vision_model_kwargs=TINY_VIT, vision_feature_every=2)


def test_cli_converts_prints_the_summary_and_the_folder_loads(tmp_path, capsys):
    base = parity_base()
    base.save_pretrained(tmp_path / "base")
    checkpoint = lavin(base)
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    argv = ["lavin", str(tmp_path / "checkpoint.pth"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "a")]
    argv += [arg for name, value in SETTINGS.items() for arg in ("--set", f"{name}={json.dumps(value)}")]
    assert main(argv + ["--no-progress"]) == 0
    printed = capsys.readouterr().out
    count = len(checkpoint["model"])
    parameters = sum(t.numel() for t in checkpoint["model"].values())
    size = (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    assert (
        f"checkpoint tensors converted: {count}\n" in printed and f"adapter tensors written:      {count}\n" in printed
    )
    assert f"parameters:                   {parameters:,}\n" in printed and f"({size:,} bytes)" in printed
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a")  # finds the base through the config
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        assert (model(input_ids=ids).logits - plain).abs().max() > 1e-2  # the converted adapter is live

    assert main(argv) == 1  # the folder holds an adapter now
    assert f"error: {str(tmp_path / 'a')!r} already holds an adapter" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--no-progress"]) == 0


def test_cli_reports_a_refused_conversion_on_stderr(tmp_path, capsys):
    base = parity_base()
    base.save_pretrained(tmp_path / "base")
    checkpoint = lavin(base)
    checkpoint["model"]["module.layers.0.adapter_attn.conv_E.weight"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    argv = ["lavin", str(tmp_path / "checkpoint.pth"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "a")]
    assert (
        main(argv + ["--set", "vision_pretrained=false", "--set", "vision_model_kwargs=" + json.dumps(TINY_VIT)]) == 1
    )
    err = capsys.readouterr().err
    assert "error: Cannot convert the checkpoint; nothing was written.\n" in err  # after transformers' save bars
    assert (
        "Unknown checkpoint tensors (1):\n  layers.0.adapter_attn.conv_E.weight" in err
        and not (tmp_path / "a").exists()
    )


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "peft_mma.convert", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "{lavin,llama-adapter-v2}" in done.stdout
