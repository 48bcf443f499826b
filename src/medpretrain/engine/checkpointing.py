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


def is_readable_checkpoint(path: Path) -> bool:
    """True if the file loads as a Lightning checkpoint with a global step."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return False
    return isinstance(obj, dict) and "state_dict" in obj and "global_step" in obj


def find_resume_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest readable checkpoint in ``checkpoint_dir``: ``last.ckpt`` first, then ``step*.ckpt`` by step.

    Truncated or corrupt files are reported and skipped, so the previous good checkpoint is used.
    """
    if not checkpoint_dir.is_dir():
        return None
    candidates = []
    last = checkpoint_dir / "last.ckpt"
    if last.exists():
        candidates.append(last)
    candidates += sorted(checkpoint_dir.glob("step*.ckpt"), reverse=True)
    for path in candidates:
        if is_readable_checkpoint(path):
            return path
        log.warning("checkpoint %s is truncated or unreadable; trying the previous one", path)
    if candidates:
        raise CheckpointError(
            f"no readable checkpoint in {checkpoint_dir} (tried {', '.join(p.name for p in candidates)}); "
            "start again without --resume in a new --out"
        )
    return None
