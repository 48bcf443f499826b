"""Fine-tuning job: labelled subset, data, module, trainer, resume, exported model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from lightning.pytorch.callbacks import Callback
from monai.losses import DiceCELoss

from medpretrain.config import FinetuneConfig
from medpretrain.data.cache import PreparedData
from medpretrain.data.sampling import PatchDataset
from medpretrain.engine.job import run_training
from medpretrain.engine.module import SegmentationModule
from medpretrain.engine.trainer import is_launcher_child, resolve_precision
from medpretrain.errors import CacheError, ConfigError
from medpretrain.models import get_spec, load_weights

log = logging.getLogger("medpretrain")


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


def check_data_fits(data: PreparedData, cfg: FinetuneConfig) -> None:
    if data.kind != "labelled":
        raise CacheError(
            f"{data.root} is a prepared unlabelled pool; fine-tuning needs labelled data "
            "(run `medpretrain prepare --dataset DIR --out DIR`)"
        )
    get_spec(cfg.model).check_patch(cfg.patch)


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
    subset = labeled_subset(data.split("train"), cfg.seed, cfg.n_labeled, cfg.fraction)
    log.info("fine-tuning %s on %d labelled cases for %d steps (patch %s, batch %d, %s)", cfg.model, len(subset),
             cfg.steps, cfg.patch, cfg.batch, resolve_precision(cfg.precision, cfg.accelerator))

    def build_module(fresh: bool) -> SegmentationModule:
        loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=cfg.loss_lambda_dice,
                          lambda_ce=cfg.loss_lambda_ce)
        module = SegmentationModule(cfg, data.in_channels, data.num_classes, loss, cfg.freeze_encoder)
        if cfg.init is not None and fresh:
            report = load_weights(module.model, module.spec, cfg.init, cfg.init_part)
            if not is_launcher_child():
                report.save(run_dir / "init_report.json")
        return module

    dataset = PatchDataset(data, subset, cfg.patch, cfg.foreground_fraction, seed=cfg.seed, augment=cfg.augment)
    return run_training(
        run_dir, cfg, kind="finetune", build_module=build_module, dataset=dataset, resume=resume,
        callbacks=callbacks,
        run_info={
            "data": str(Path(data_dir).resolve()),
            "labeled_cases": subset,
            "n_labeled": len(subset),
            "in_channels": data.in_channels,
            "out_channels": data.num_classes,
            "labels": data.labels,
        },
        model_meta=lambda module: {
            "in_channels": data.in_channels,
            "out_channels": data.num_classes,
            "labels": {int(k): v for k, v in data.labels.items()},
            "preprocess": data.manifest["preprocess"],
            "inference": cfg.inference.model_dump(),
        },
    )
