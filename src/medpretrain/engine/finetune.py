"""Fine-tuning job: labelled subset, data, module, trainer, resume, exported model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from lightning.pytorch.callbacks import Callback
from monai.losses import DiceCELoss

from medpretrain.atomic import check_writable_folder
from medpretrain.config import FinetuneConfig, curve_file_name
from medpretrain.data.cache import PreparedData
from medpretrain.data.sampling import PatchAugmenter, PatchDataset
from medpretrain.engine.job import export_model, run_training
from medpretrain.engine.module import SegmentationModule
from medpretrain.engine.device import resolve_precision, uses_cuda
from medpretrain.engine.run_folder import is_launcher_child
from medpretrain.engine.trainer import check_trainer_settings
from medpretrain.errors import CacheError, ConfigError
from medpretrain.models import get_spec, load_weights
from medpretrain.models.registry import check_model_options
from medpretrain.planning import padding_fraction

log = logging.getLogger("medpretrain")


def augment_on_device(cfg: FinetuneConfig) -> bool:
    """Whether patch augmentation runs on the training device (``augment.on``; ``auto``: on CUDA GPUs)."""
    if not cfg.augment.enabled or cfg.augment.on == "workers":
        return False
    return cfg.augment.on == "device" or uses_cuda(cfg.accelerator)


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


def validation_split(train_ids: Sequence[str], count: int, seed: int) -> tuple[list[str], list[str]]:
    """``(validation, rest)``: ``count`` training cases set aside for choosing hyper-parameters (the first of a
    permutation of the sorted ids drawn from ``seed``) and the cases labelled subsets are drawn from."""
    ids = sorted(train_ids)
    if count == 0:
        return [], ids
    if count >= len(ids):
        raise ConfigError(f"validation_cases {count} leaves none of the {len(ids)} training cases to train on; "
                          f"set it below {len(ids)}")
    order = np.random.default_rng([0x5641, seed]).permutation(len(ids))  # "VA": independent of subset draws
    val = sorted(ids[i] for i in order[:count])
    return val, [c for c in ids if c not in set(val)]


class CurveExport(Callback):
    """Writes the model, as ``model.pt`` would hold it, at given steps (``RUN/curve/model_stepNNNNNNN.pt``) for
    learning curves: ``evaluate --model-file`` scores each."""

    def __init__(self, steps: Sequence[int], export: Callable[[Path, int, object], None], folder: Path):
        self.steps = set(steps)
        self.export = export
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in self.steps and trainer.is_global_zero:
            self.export(self.folder / curve_file_name(step), step, pl_module)


def check_data_fits(data: PreparedData, cfg: FinetuneConfig) -> None:
    if data.kind != "labelled":
        raise CacheError(
            f"{data.root} is a prepared unlabelled pool; fine-tuning needs labelled data "
            "(run `medpretrain prepare --dataset DIR --out DIR`)"
        )
    if not data.split("train"):
        raise CacheError(f"{data.root}: the train split holds no prepared case (see manifest.json 'skipped' and "
                         "'split'); fix the skipped cases or the split and re-run `medpretrain prepare`")
    get_spec(cfg.model).check_patch(cfg.patch, cfg.model_options)
    check_model_options(cfg.model, data.in_channels, data.num_classes, cfg.patch, cfg.model_options)


REFUSED_PADDING = 0.75  # above this share of padding, a patch that wastes less is required (or --allow-padding)


def padding_check(data: PreparedData, case_ids: Sequence[str], patch: Sequence[int], model: str,
                  model_options: dict | None = None) -> tuple[str | None, bool]:
    """``(warning, refuse)``: a warning when the training patches would be mostly (> 50%) padding, naming the
    fraction and a patch that fits; ``refuse`` when more than ``REFUSED_PADDING`` is padding and the network takes
    a patch that wastes less (8-slice volumes under a 48-slice patch: 83%). Where the network's smallest input
    is itself larger than the data, there is nothing better to ask for: a warning only."""
    shapes = [list(data.case(c)["shape"][1:]) for c in case_ids]
    if not shapes:
        return None, False
    padding = padding_fraction(shapes, patch)
    if padding <= 0.5:
        return None, False
    median = np.median(np.asarray(shapes), axis=0)
    fitted = _fitted_patch(get_spec(model), median, patch, model_options)
    suggestion = f"--patch {' '.join(map(str, fitted))}" if fitted else "a patch closer to the volume size"
    warning = (f"training patches {tuple(patch)} are on average {padding:.0%} padding: the labelled volumes (median "
               f"shape {'x'.join(str(int(v)) for v in median)}) are smaller than the patch; consider {suggestion}, "
               "or a finer --spacing when preparing")
    refuse = padding > REFUSED_PADDING and fitted is not None and padding_fraction(shapes, fitted) < padding - 0.1
    return warning, refuse


def padding_warning(data: PreparedData, case_ids: Sequence[str], patch: Sequence[int], model: str,
                    model_options: dict | None = None) -> str | None:
    """The warning of :func:`padding_check` alone (None when the patches are at most half padding)."""
    return padding_check(data, case_ids, patch, model, model_options)[0]


def _fitted_patch(spec, median, patch: Sequence[int], options: dict | None = None) -> list[int] | None:
    """The smallest valid patch at least the median volume along each side, never larger than ``patch``; None
    when it is ``patch`` itself (nothing smaller fits the network built with ``options``)."""
    divisors = spec.divisors(3, options)
    fitted = [int(min(p, max(spec.min_size, -(-int(m) // d) * d))) for p, m, d in zip(patch, median, divisors)]
    for _ in range(4):  # a network may need more voxels than the volume has (a bottleneck of 2): grow one side
        try:
            spec.check_patch(fitted, options)
        except ConfigError:
            fitted[0] *= 2
            continue
        return fitted if fitted != [int(p) for p in patch] else None
    return None


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
    run_dir = check_writable_folder(out_dir, "--out")
    data = PreparedData(data_dir)
    check_data_fits(data, cfg)
    check_trainer_settings(cfg)
    validation, trainable = validation_split(data.split("train"), cfg.validation_cases, cfg.validation_seed)
    subset = labeled_subset(trainable, cfg.seed, cfg.n_labeled, cfg.fraction)
    warning, refuse = padding_check(data, subset, cfg.patch, cfg.model, cfg.model_options)
    if refuse and not cfg.allow_padding:
        # Mostly padding is mostly wasted compute (and a network that learns "outside" more than anatomy).
        raise ConfigError(f"{warning}; `medpretrain plan --data {data_dir}` chooses a patch from the data, or pass "
                          "--allow-padding to train with this one anyway")
    if warning and not is_launcher_child():
        log.warning(warning)
    log.info("fine-tuning %s on %d labelled cases for %d steps (patch %s, batch %d, %s)", cfg.model, len(subset),
             cfg.steps, cfg.patch, cfg.batch, resolve_precision(cfg.precision, cfg.accelerator))

    on_device = augment_on_device(cfg)

    def build_module(fresh: bool) -> SegmentationModule:
        loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=cfg.loss_lambda_dice,
                          lambda_ce=cfg.loss_lambda_ce)
        module = SegmentationModule(cfg, data.in_channels, data.num_classes, loss, cfg.freeze_encoder)
        if on_device:
            module.batch_transform = PatchAugmenter(cfg.augment, cfg.patch)
        if cfg.init is not None and fresh:
            report = load_weights(module.model, module.spec, cfg.init, cfg.init_part)
            if not is_launcher_child():
                report.save(run_dir / "init_report.json")
        return module

    dataset = PatchDataset(data, subset, cfg.patch, cfg.foreground_fraction, seed=cfg.seed, augment=cfg.augment,
                           augment_on_device=on_device)

    def model_meta(module):
        return {
            "in_channels": data.in_channels,
            "out_channels": data.num_classes,
            "labels": {int(k): v for k, v in data.labels.items()},
            **({"label_values": data.label_values} if data.label_values is not None else {}),
            "preprocess": data.manifest["preprocess"],
            "inference": cfg.inference.model_dump(),
        }

    extra = list(callbacks)
    if cfg.curve_steps():
        precision = resolve_precision(cfg.precision, cfg.accelerator)
        extra.append(CurveExport(cfg.curve_steps(), lambda path, step, module: export_model(
            path, cfg, "finetune", precision, step, module, model_meta(module)), run_dir / "curve"))
    return run_training(
        run_dir, cfg, kind="finetune", build_module=build_module, dataset=dataset, resume=resume,
        callbacks=extra,
        run_info={
            "data": str(Path(data_dir).resolve()),
            "validation_cases": validation,
            "labeled_cases": subset,
            "n_labeled": len(subset),
            "in_channels": data.in_channels,
            "out_channels": data.num_classes,
            "labels": data.labels,
        },
        model_meta=model_meta,
    )
