"""Two-process DDP (torchrun, gloo on the CPU, loopback only) with one rank text-only and the other with images.

DDP requires every rank to use the same parameters at every step; a text-only rank would leave the image-side
modules unused, so those add an exact zero there (README, "Training on several processes"). Each launch is
bounded by a timeout, so a hang fails instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.parametrize("find_unused", [0, 1], ids=["find_unused_parameters=False", "find_unused_parameters=True"])
@pytest.mark.parametrize("method", ["lavin", "lavin-modality", "v2", "v2-gate-all"])
def test_ranks_of_different_modality_train_to_equal_replicas(tmp_path, method, find_unused):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(WORKER), "--method", method, "--find-unused", str(find_unused), "--out", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=WORKER.parent)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"DDP hung for {error.timeout} s:\n{error.stderr}")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["sums"] == ranks[1]["sums"]  # replicas equal after 3 steps
    # every trainable part moved, but a gate without a prompt (its exact zero keeps DDP whole; zero-init, decay)
    idle = {n for n in ranks[0]["sums"] if method == "v2-gate-all" and ".layers.0." in n and "_gate." in n}
    assert len(idle) == (method == "v2-gate-all")
    assert ranks[0]["changed"] == ranks[1]["changed"] == sorted(set(ranks[0]["sums"]) - idle)
    assert ranks[0]["losses"] != ranks[1]["losses"]  # and the ranks did see different batches
