"""Checkpoints that survive a kill at any moment: atomic writes, validation, fall-back to the last good one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from medpretrain.atomic import atomic_torch_save
from medpretrain.errors import CheckpointError

log = logging.getLogger("medpretrain")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose saves are atomic (see ``atomic_torch_save``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)


def checkpoint_step(path: Path) -> int | None:
    """The global step of a readable Lightning checkpoint, or None if the file is truncated or foreign."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return None
    if isinstance(obj, dict) and "state_dict" in obj and "global_step" in obj:
        return int(obj["global_step"])
    return None


def find_resume_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The readable checkpoint with the highest global step in ``checkpoint_dir`` (``last.ckpt`` wins ties).

    Truncated or corrupt files are reported and skipped, so the previous good checkpoint is used. The step
    decides, not the name: a kill between Lightning's two writes can leave ``step*.ckpt`` newer than
    ``last.ckpt``.
    """
    if not checkpoint_dir.is_dir():
        return None
    candidates = sorted(checkpoint_dir.glob("*.ckpt"), key=lambda p: p.name != "last.ckpt")
    best, best_step = None, -1
    for path in candidates:
        step = checkpoint_step(path)
        if step is None:
            log.warning("checkpoint %s is truncated or unreadable; trying the previous one", path)
        elif step > best_step:
            best, best_step = path, step
    if candidates and best is None:
        raise CheckpointError(
            f"no readable checkpoint in {checkpoint_dir} (tried {', '.join(p.name for p in candidates)}); "
            "start again without --resume in a new --out"
        )
    return best
