"""`accelerate launch` really starts two processes on the CPU and the `Trainer` keeps their replicas equal, for both
methods with images (`examples/several_processes.py`; loopback only, bounded by a timeout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "several_processes.py"


@pytest.mark.parametrize("method", ["lavin", "adapter-v2"])
def test_accelerate_launch_trains_two_processes_to_equal_replicas(tmp_path, method):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(EXAMPLE), "--tiny", "--method", method, "--output-dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"accelerate launch hung for {error.timeout} s:\n{error.stderr}")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2  # two processes, one group
    assert ranks[0]["sums"] == ranks[1]["sums"]  # equal replicas
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert "2 processes trained 3 steps" in done.stdout
