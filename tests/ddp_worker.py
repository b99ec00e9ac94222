"""One rank of the DDP test (`test_ddp.py` launches two with torchrun, gloo on the CPU).

Rank 0 trains on text only (no `pixel_values`), rank 1 on a batch with an image; three AdamW steps under
`DistributedDataParallel`, then each rank writes a digest of its trainable parameters to `<out>/rank<r>.json`.

    torchrun --nproc_per_node 2 tests/ddp_worker.py --method lavin --find-unused 0 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import lavin_batch, model_for, tiny_lavin, train_steps
from torch.nn.parallel import DistributedDataParallel


def build(method: str):
    if method == "lavin":
        return tiny_lavin("gqa", "sdpa", seed=3)
    if method == "lavin-modality":  # no modality token: the text-only rank's zero goes into the embeddings
        return tiny_lavin("gqa", "sdpa", seed=3, router="modality")
    if method == "v2-gate-all":  # the official layout: a gate in every layer, prompts in the top ones (unused gate)
        return model_for("v2-image", seed=3, init_weights=True, gate_layers="all")
    return model_for("v2-image", seed=3, init_weights=True)


def batch_of(method: str, model, rank: int) -> dict:
    """Rank 0: text only, no images at all. Rank 1: one sample with an image and one without."""
    if method.startswith("lavin"):
        batch = lavin_batch(model, has_image=(False, False) if rank == 0 else (True, False), seed=rank)
    else:
        generator = torch.Generator().manual_seed(rank)
        ids = torch.randint(3, 97, (2, 7), generator=generator)
        batch = {"input_ids": ids, "labels": ids, "pixel_values": torch.randn(2, 3, 28, 28, generator=generator)}
        batch["has_image"] = torch.tensor([True, False])
    if rank == 0:
        batch = {k: v for k, v in batch.items() if k not in ("pixel_values", "has_image")}
    return batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=("lavin", "lavin-modality", "v2", "v2-gate-all"), required=True)
    parser.add_argument("--find-unused", type=int, choices=(0, 1), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model = build(args.method).train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ddp = DistributedDataParallel(model, find_unused_parameters=bool(args.find_unused))
    batch = batch_of(args.method, model, rank)
    losses = train_steps(ddp, batch, 3)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    digest = {
        "losses": losses,
        "sums": {n: float(p.double().sum()) for n, p in params.items()},
        "changed": sorted(n for n, p in params.items() if not torch.equal(p, initial[n])),
        "world": dist.get_world_size(),
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(digest))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
