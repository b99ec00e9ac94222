"""What each method's visual path hands the LLM at init: how plainly it carries each scene attribute.

    python -m benchmarks.visual_probe [--seed 0]

For the frozen scene encoder of the quality benchmark (`benchmarks.quality_methods.encoder`), and LaVIN and V2 as
that benchmark builds them on SmolLM2-135M-Instruct (same seed, so the same init as its runs; V2 with fusion "all"),
`peft_mma.vision.scene_encoder.slot_probe` of:

* ``encoder_class_token``: the encoder's last class token (what its linear probe reads);
* ``encoder_token_mean``: the mean of all its tokens;
* ``v2_visual_tokens``: V2's bridge output V (K × C, flattened), which is added to every layer's prompts;
* ``lavin_visual_tokens``: LaVIN's visual tokens (n × C, flattened), placed after BOS.

Per attribute (caption slot): held-out linear-probe accuracy, and the share of the features' spread that the
attribute explains. A probe can read an attribute out of a direction that carries little of the spread; a layer
that starts from random weights and learns through small gradients mostly meets the large directions first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch

from peft_mma.llama_adapter_v2.model import BACKBONE_ATTR
from peft_mma.vision.scene_encoder import slot_probe

from .common import RESULTS_DIR, machine_info, write_json
from .quality_methods import Encoder, build_method, encoder

FEATURES = ("encoder_class_token", "encoder_token_mean", "v2_visual_tokens", "lavin_visual_tokens")


def feature_functions(base: torch.nn.Module, vision: Encoder, seed: int) -> dict[str, Any]:
    """{name: images → features (N, …)} for `FEATURES`, at init, without gradients: LaVIN and V2 on `base`
    reading `vision`, built as the quality benchmark builds them."""
    v2 = build_method("v2", base, multimodal=True, seed=seed, vision=vision, visual_fusion="all").eval()
    lavin = build_method("lavin", base, multimodal=True, seed=seed, vision=vision).eval()

    backbone = getattr(v2.model.base_model, BACKBONE_ATTR)["default"]  # the frozen encoder, no adapters
    bridge = v2.model.base_model.mma_adapter_v2_visual["default"]
    functions = {
        "encoder_class_token": lambda images: backbone.tokens(images)[:, 0],
        "encoder_token_mean": lambda images: backbone.tokens(images).mean(1),
        "v2_visual_tokens": lambda images: bridge(backbone.tokens(images)),  # V: (N, K, C)
        "lavin_visual_tokens": lambda images: lavin.model.base_model.encode_images(images),  # (N, n, C)
    }
    return {name: torch.no_grad()(fn) for name, fn in functions.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the scene encoder's and the adapters' seed")
    parser.add_argument("--encoder", choices=("scenes", "scenes_patches"), default="scenes")
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--eval-size", type=int, default=512)
    parser.add_argument("--out", default=str(RESULTS_DIR / "visual_probe.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from peft_mma.data.smollm2 import load_smollm2

    base, _ = load_smollm2(dtype=torch.float32)
    base.requires_grad_(False)
    probes = {
        name: slot_probe(fn, args.seed, args.train_size, args.eval_size)
        for name, fn in feature_functions(base, encoder(args.encoder, seed=args.seed), args.seed).items()
    }
    command = "python -m benchmarks.visual_probe " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"benchmark": "visual_probe", "command": command.strip(), "machine": machine_info("cpu")}
    result |= {"seed": args.seed, "encoder": args.encoder, "train_size": args.train_size, "eval_size": args.eval_size}
    result["probes"] = probes
    write_json(result, args.out)
    slots = list(next(iter(probes.values())))
    print("accuracy / variance share | " + " | ".join(slots))
    for name, probed in probes.items():
        cells = [f"{probed[slot]['accuracy']:.2f} / {probed[slot]['variance_share']:.3f}" for slot in slots]
        print(name + " | " + " | ".join(cells))
    return result


if __name__ == "__main__":
    main()
