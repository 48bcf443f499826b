"""Snapshots of a long pretraining: the network that goes downstream, written at chosen optimizer steps.

A pretraining-budget curve fine-tunes from several points of ONE long run (``export_steps``) instead of
training one run per budget. Each snapshot has ``model.pt``'s format and metadata (``global_step`` says where
it was taken), so ``finetune --init RUN/snapshots/model-step0002000.pt`` loads it like any export. Combine with
``lr_schedule: warmup-constant`` so that no snapshot is taken mid-decay of a schedule tied to the run's end.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from medpretrain.config import TrainingConfig

log = logging.getLogger("medpretrain")

SNAPSHOT_DIR = "snapshots"


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    """Where the snapshot of optimizer step ``step`` of a run lives."""
    return Path(run_dir) / SNAPSHOT_DIR / f"model-step{int(step):07d}.pt"


class SnapshotExporter(Callback):
    """Write the downstream network at each of ``cfg.export_steps`` (rank 0 only; a snapshot already on disk, from
    before a resume, is kept).

    Args:
        run_dir: the run folder.
        cfg: the run's configuration (``export_steps``, and what ``model.pt`` records).
        kind: the run's kind (``pretrain:<method>``).
        model_meta: what ``model.pt`` stores beside the weights, as the job's final export.
    """

    def __init__(self, run_dir: str | Path, cfg: TrainingConfig, kind: str,
                 model_meta: Callable[[pl.LightningModule], dict[str, Any]]):
        self.run_dir, self.cfg, self.kind, self.model_meta = Path(run_dir), cfg, kind, model_meta
        self.steps = set(cfg.export_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps done, teachers already updated
        if step not in self.steps or not trainer.is_global_zero:
            return
        path = snapshot_path(self.run_dir, step)
        if path.is_file():
            return
        from medpretrain.engine.job import export_model
        from medpretrain.engine.device import resolve_precision

        path.parent.mkdir(parents=True, exist_ok=True)
        precision = resolve_precision(self.cfg.precision, self.cfg.accelerator)
        export_model(path, self.cfg, self.kind, precision, step, pl_module,
                     {**self.model_meta(pl_module), "snapshot": True})
        log.info("snapshot at step %d: %s", step, path)
