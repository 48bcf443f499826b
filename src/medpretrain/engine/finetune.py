"""Fine-tuning job: labelled subset, data, module, trainer, resume, exported model."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from medpretrain.config import FinetuneConfig
from medpretrain.data.cache import PreparedData
from medpretrain.data.sampling import PatchDataset, StepSampler
from medpretrain.engine.checkpointing import atomic_torch_save
from medpretrain.engine.module import SegmentationModule, steps_per_epoch
from medpretrain.engine.trainer import (
    build_trainer, check_same_config, is_launcher_child, resolve_precision, resume_or_refuse, update_run_file,
)
from medpretrain.errors import CacheError, ConfigError
from medpretrain.models import get_spec, load_weights

log = logging.getLogger("medpretrain")

MODEL_FILE = "model.pt"
RUN_FILE = "run.json"
# Settings that may change between an interrupted run and its resume.
RESUME_MAY_CHANGE = ("num_workers", "devices", "num_nodes", "strategy", "accelerator")


def labeled_subset(train_ids: Sequence[str], seed: int, n_labeled: int | None = None,
                   fraction: float | None = None) -> list[str]:
    """The labelled cases a run trains on, drawn from ``seed``.

    The draw is one seeded permutation of the sorted ids, cut at ``n``: for a given seed the subsets are
    nested (the 4 cases are among the 8), and identical for every method and backbone.
    """
    ids = sorted(train_ids)
    if n_labeled is None and fraction is None:
        return ids
    n = n_labeled if n_labeled is not None else max(1, int(round(fraction * len(ids))))
    if n > len(ids):
        raise ConfigError(f"--n-labeled {n} exceeds the {len(ids)} training cases of the prepared data")
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:n])


class PatchDataModule(pl.LightningDataModule):
    """Serves ``checkpoint_every`` steps of patches per epoch and process; rank-aware, resumable."""

    def __init__(self, data: PreparedData, case_ids: Sequence[str], cfg: FinetuneConfig):
        super().__init__()
        self.data = data
        self.case_ids = list(case_ids)
        self.cfg = cfg

    def train_dataloader(self):
        cfg = self.cfg
        dataset = PatchDataset(
            self.data, self.case_ids, cfg.patch, cfg.foreground_fraction, seed=cfg.seed, augment=cfg.augment
        )
        trainer = self.trainer
        sampler = StepSampler(
            steps_per_epoch(cfg), cfg.batch, rank=trainer.global_rank, world_size=trainer.world_size,
            current_step=lambda: trainer.global_step,
        )
        return DataLoader(
            dataset, batch_size=cfg.batch, sampler=sampler, num_workers=cfg.num_workers,
            persistent_workers=False, pin_memory=False, drop_last=True,
        )


def check_data_fits(data: PreparedData, cfg: FinetuneConfig) -> None:
    if data.kind != "labelled":
        raise CacheError(
            f"{data.root} is a prepared unlabelled pool; fine-tuning needs labelled data "
            "(run `medpretrain prepare --dataset DIR --out DIR`)"
        )
    get_spec(cfg.model).check_patch(cfg.patch)


def export_model(module: SegmentationModule, run_dir: Path, data: PreparedData, cfg: FinetuneConfig,
                 global_step: int) -> Path:
    """Write ``model.pt``: the network weights plus what inference needs (model, classes, preprocessing)."""
    path = run_dir / MODEL_FILE
    atomic_torch_save({
        "format": "medpretrain-model",
        "format_version": 1,
        "model": cfg.model,
        "model_options": cfg.model_options,
        "in_channels": data.in_channels,
        "out_channels": data.num_classes,
        "patch": list(cfg.patch),
        "labels": {int(k): v for k, v in data.labels.items()},
        "preprocess": data.manifest["preprocess"],
        "inference": cfg.inference.model_dump(),
        "precision": resolve_precision(cfg.precision, cfg.accelerator),
        "global_step": global_step,
        "state_dict": module.model.state_dict(),
    }, path)
    return path


def finetune(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: FinetuneConfig,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
) -> Path:
    """Train a segmentation network on prepared labelled data; returns the run directory.

    Args:
        data_dir: output of ``prepare --dataset``.
        out_dir: run directory (config, subset, logs, checkpoints, ``model.pt``).
        cfg: training settings.
        resume: continue from the newest readable checkpoint in ``out_dir``.
        callbacks: extra Lightning callbacks.
    """
    data = PreparedData(data_dir)
    check_data_fits(data, cfg)
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_file = run_dir / RUN_FILE
    config_dump = cfg.model_dump(mode="json")

    ckpt = resume_or_refuse(run_dir, resume)
    if ckpt is not None:
        check_same_config(run_file, config_dump, ignore=RESUME_MAY_CHANGE)

    subset = labeled_subset(data.split("train"), cfg.seed, cfg.n_labeled, cfg.fraction)
    precision = resolve_precision(cfg.precision, cfg.accelerator)
    if not is_launcher_child():
        update_run_file(run_file, {
            "kind": "finetune",
            "config": config_dump,
            "data": str(Path(data_dir).resolve()),
            "labeled_cases": subset,
            "n_labeled": len(subset),
            "precision": precision,
            "in_channels": data.in_channels,
            "out_channels": data.num_classes,
            "labels": data.labels,
        })
    log.info("fine-tuning %s on %d labelled cases for %d steps (patch %s, batch %d, %s)",
             cfg.model, len(subset), cfg.steps, cfg.patch, cfg.batch, precision)

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = SegmentationModule(cfg, data.in_channels, data.num_classes)
    if cfg.init is not None and ckpt is None:
        report = load_weights(module.model, module.spec, cfg.init, cfg.init_part)
        if not is_launcher_child():
            report.save(run_dir / "init_report.json")

    trainer = build_trainer(
        run_dir,
        max_steps=cfg.steps,
        epoch_steps=steps_per_epoch(cfg),
        precision=precision,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        deterministic=cfg.deterministic,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=PatchDataModule(data, subset, cfg), ckpt_path=str(ckpt) if ckpt else None)
    if trainer.global_step % steps_per_epoch(cfg):
        # The run ended between two checkpoint steps: keep its final state resumable too.
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    if trainer.is_global_zero:
        export_model(module, run_dir, data, cfg, trainer.global_step)
        log.info("run finished at step %d: %s", trainer.global_step, run_dir / MODEL_FILE)
    return run_dir


def read_run(run_dir: str | Path) -> dict:
    """The run's ``run.json``; CacheError-like message if the folder is not a run."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a medpretrain run (no {RUN_FILE}); pass the --out of a finetune run")
    return json.loads(path.read_text())
