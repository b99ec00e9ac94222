"""`python -m peft_mma.convert {llama-adapter-v2,lavin} CHECKPOINT --base HF_LLAMA_DIR --out OUT_DIR`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import ConversionError, convert_lavin, convert_llama_adapter_v2

CONVERTERS = {"llama-adapter-v2": convert_llama_adapter_v2, "lavin": convert_lavin}


def _setting(text: str) -> tuple[str, object]:
    """`FIELD=VALUE`, VALUE read as JSON when it parses (numbers, booleans, null, lists, objects), else a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m peft_mma.convert",
        description="Convert an official LLaMA-Adapter V2 or LaVIN checkpoint into a PEFT adapter folder.",
    )
    parser.add_argument("family", choices=sorted(CONVERTERS), help="which official code base saved the checkpoint")
    parser.add_argument("checkpoint", help="the official .pth (read with torch.load(weights_only=True))")
    parser.add_argument("--base", required=True, help="Hugging Face LLaMA directory the adapter is for")
    parser.add_argument("--out", required=True, help="adapter folder to write")
    parser.add_argument(
        "--preset", help="BIAS-7B, LORA-BIAS-7B, CHAT-65B (V2) or lavin-7b, lavin-13b; detected when omitted"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=_setting,
        default=[],
        metavar="FIELD=VALUE",
        help="override an adapter config field, e.g. --set vision_pretrained=false (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 done, 1 conversion refused, 2 bad arguments)."""
    args = parser().parse_args(argv)
    try:
        summary = CONVERTERS[args.family](
            args.checkpoint,
            args.base,
            args.out,
            preset=args.preset,
            overrides=dict(args.overrides),
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
