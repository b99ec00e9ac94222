"""The user cache of built artefacts (the converted SmolLM2 folder, the scene encoder): where it is, and how a folder
is written there so that it appears whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open


def cache_root() -> Path:
    """`$PEFT_MMA_CACHE`, default `~/.cache/peft_mma`, as an absolute path (`~` expanded): adapter configs name
    folders in it, which must load from any working directory."""
    return Path(os.environ.get("PEFT_MMA_CACHE", Path.home() / ".cache" / "peft_mma")).expanduser().resolve()


def complete(folder: Path, jsons: tuple[str, ...] = ("config.json",)) -> bool:
    """Whether `folder` holds weights whose safetensors header reads and JSON files (`jsons`) that parse: a folder
    that fails (a copy cut short, a full disk, an edited file) is to be set aside and built again."""
    try:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
            weights.keys()
        for name in jsons:
            json.loads((folder / name).read_text())
    except Exception:  # missing, truncated, not safetensors or not JSON
        return False
    return True


def set_aside(folder: Path) -> None:
    """Remove an incomplete `folder` (a copy cut short, a full disk): renamed out of the way first, so that a reader
    never sees it half deleted."""
    stale = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".stale-"))
    try:
        os.replace(folder, stale / folder.name)
    except FileNotFoundError:  # another process set it aside first
        pass
    shutil.rmtree(stale, ignore_errors=True)


def write_folder(folder: Path, write: Callable[[Path], None], marker: str) -> None:
    """Run `write(staging)` on a fresh folder next to `folder`, then rename it to `folder`.

    Concurrent first uses are safe: when the rename fails because another writer finished first (its `folder` holds
    `marker`), that folder is kept; a `folder` without `marker` is incomplete and is replaced; any other failure is
    raised. The staging folder never outlives the call.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
    try:
        write(staging)
        try:
            os.replace(staging, folder)
        except OSError:
            if (folder / marker).exists():  # a concurrent writer finished first
                return
            set_aside(folder)
            os.replace(staging, folder)
    except OSError:
        if not (folder / marker).exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
