"""The one command: speed and memory, learning quality, plots and the README tables.

    python -m benchmarks.run                        # CPU: SmolLM2-135M speed (7 rounds) + quality, ≈ 2 h
    python -m benchmarks.run --device cuda          # adds the 7B-shaped bf16 speed run and the LaVIN-7B projection
    python -m benchmarks.run --only speed           # or: quality, report

Results go to benchmarks/results/ (JSON, PNG, profiles), tables into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import plot, quality, report, speed


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the 7b preset as well")
    parser.add_argument("--only", choices=("speed", "quality", "report"), default=None)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if args.only in (None, "speed"):
        speed.main(["--preset", "smollm2", "--device", "cpu", "--rounds", str(args.rounds)])
        if args.device.startswith("cuda"):
            speed.main(["--preset", "7b", "--device", args.device, "--rounds", str(args.rounds)])
    if args.only in (None, "quality"):
        quality.main([])
    plot.main()
    report.main()


if __name__ == "__main__":
    main()
