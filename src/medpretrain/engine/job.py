"""One training job, whatever it trains: run folder, resume, seeding, trainer, final checkpoint, export.

Fine-tuning and every pretraining method go through ``run_training``, so they share logging, checkpoints,
resume, DDP and the exported ``model.pt`` layout.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from medpretrain.atomic import atomic_torch_save, check_writable_folder
from medpretrain.config import TrainingConfig
from medpretrain.data.sampling import StepSampler
from medpretrain.engine.checkpointing import checkpoint_step
from medpretrain.engine.device import configure_cuda_math, resolve_precision
from medpretrain.engine.trainer import (
    build_trainer, check_same_config, check_same_data, check_trainer_settings, resume_or_refuse, update_run_file,
)
from medpretrain.engine.run_folder import MODEL_FILE, RUN_FILE, is_launcher_child, run_folder_lock
from medpretrain.errors import TrainingError

log = logging.getLogger("medpretrain")

MODEL_FORMAT_VERSION = 1
# Settings that may change between an interrupted run and its resume.
RESUME_MAY_CHANGE = ("num_workers", "devices", "num_nodes", "strategy", "accelerator")


def steps_per_epoch(cfg: TrainingConfig) -> int:
    """Length of a data epoch: the checkpoint interval, capped by the run length."""
    return min(cfg.checkpoint_every, cfg.steps)


class StepDataModule(pl.LightningDataModule):
    """Serves ``checkpoint_every`` steps of samples per epoch and process from an index-addressed dataset
    (each item a pure function of its index); rank-aware and resumable through ``StepSampler``.

    Loader workers persist across epochs (an epoch is only a checkpoint interval: restarting ``num_workers``
    processes every ``checkpoint_every`` steps would stall the GPU while they start and refill their queues);
    the sampler still reads the trainer's global step whenever an epoch's iterator is created, so resumed and
    uninterrupted runs see the same indices. On CUDA, batches are collated into pinned memory so that
    Lightning's host-to-device copy (``non_blocking=True`` for CUDA targets) overlaps with the step. Worker
    seeding needs nothing: every dataset draws sample ``i`` from a generator seeded with ``(seed, i)``, never
    from the worker's global random state."""

    def __init__(self, dataset: Dataset, cfg: TrainingConfig):
        super().__init__()
        self.dataset = dataset
        self.cfg = cfg

    def train_dataloader(self):
        cfg, trainer = self.cfg, self.trainer
        sampler = StepSampler(
            steps_per_epoch(cfg), cfg.batch, rank=trainer.global_rank, world_size=trainer.world_size,
            current_step=lambda: trainer.global_step,
        )
        workers = cfg.num_workers
        return DataLoader(
            self.dataset, batch_size=cfg.batch, sampler=sampler, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=trainer.strategy.root_device.type == "cuda",
            drop_last=True,
        )


def run_training(
    run_dir: str | Path,
    cfg: TrainingConfig,
    *,
    kind: str,
    build_module: Callable[[bool], pl.LightningModule],
    dataset: Dataset,
    run_info: dict[str, Any],
    model_meta: Callable[[pl.LightningModule], dict[str, Any]],
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
) -> Path:
    """Train ``build_module(fresh)`` on ``dataset`` for ``cfg.steps`` steps in ``run_dir``.

    Args:
        run_dir: run folder (``run.json``, ``checkpoints/``, ``logs/``, ``model.pt``).
        cfg: the job's configuration (saved in ``run.json``; a resume must use the same).
        kind: ``finetune`` or ``pretrain:<method>``, recorded in ``run.json`` and ``model.pt``.
        build_module: returns the LightningModule; its argument is True for a fresh run (load initial weights
            then) and False when the weights come from a checkpoint being resumed.
        dataset: index-addressed training samples.
        run_info: extra facts for ``run.json`` (data, subset, classes...).
        model_meta: returns what ``model.pt`` stores beside the weights (model name, channels, classes...).
        resume: continue from the newest readable checkpoint in ``run_dir``.
        callbacks: extra Lightning callbacks.
    """
    run_dir = check_writable_folder(run_dir, "--out")
    check_trainer_settings(cfg)  # before the run folder exists: a run that cannot start leaves nothing behind
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_folder_lock(run_dir):
        return _run_training_locked(run_dir, cfg, kind=kind, build_module=build_module, dataset=dataset,
                                    run_info=run_info, model_meta=model_meta, resume=resume, callbacks=callbacks)


def _run_training_locked(run_dir: Path, cfg: TrainingConfig, *, kind, build_module, dataset, run_info, model_meta,
                         resume, callbacks) -> Path:
    run_file = run_dir / RUN_FILE
    config_dump = cfg.model_dump(mode="json")
    ckpt = resume_or_refuse(run_dir, resume)
    if ckpt is not None:
        check_same_config(run_file, config_dump, ignore=RESUME_MAY_CHANGE)
        check_same_data(run_file, {"kind": kind, **run_info})
    cuda = configure_cuda_math(cfg.accelerator, cfg.deterministic)  # before anything runs on the GPU
    precision = resolve_precision(cfg.precision, cfg.accelerator)
    if not is_launcher_child():
        update_run_file(run_file, {"kind": kind, "config": config_dump, "precision": precision, **run_info,
                                   **_network_entry(cfg),
                                   **({"cuda": {"device": _cuda_device_name(), **cuda}} if cuda else {})})

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(ckpt is None)
    epoch_steps = steps_per_epoch(cfg)
    trainer = build_trainer(
        run_dir,
        max_steps=cfg.steps,
        epoch_steps=epoch_steps,
        precision=precision,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        deterministic=cfg.deterministic,
        callbacks=callbacks,
        resume_step=checkpoint_step(ckpt) if ckpt is not None else None,
    )
    trainer.fit(module, datamodule=StepDataModule(dataset, cfg), ckpt_path=str(ckpt) if ckpt else None)
    if trainer.interrupted or trainer.global_step < cfg.steps:
        # Some Lightning versions return from fit() on Ctrl-C: never export a half-trained model as finished.
        raise TrainingError(f"training in {run_dir} stopped at step {trainer.global_step} of {cfg.steps}; "
                            "re-run the same command with --resume to continue from the last checkpoint")
    if trainer.global_step % epoch_steps:
        # The run ended between two checkpoint steps: keep its final state resumable too.
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    if trainer.is_global_zero:
        export_model(run_dir / MODEL_FILE, cfg, kind, precision, trainer.global_step, module, model_meta(module))
        log.info("run finished at step %d: %s", trainer.global_step, run_dir / MODEL_FILE)
    return run_dir


def _network_entry(cfg: TrainingConfig) -> dict[str, Any]:
    """``{"network": {kernels, strides, divisors}}`` for a network built from per-stage kernels and strides
    (DynUNet, planned or the preset's), {} for the others: what ``run.json`` records of the topology."""
    from medpretrain.models.registry import network_layout

    layout = network_layout(cfg.model, cfg.model_options)
    return {"network": layout} if layout is not None else {}


def _cuda_device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def export_model(path: Path, cfg: TrainingConfig, kind: str, precision: str, global_step: int,
                 module: pl.LightningModule, meta: dict[str, Any]) -> None:
    """Write ``model.pt``: the network that goes downstream, with what loading it needs (atomically)."""
    atomic_torch_save({
        "format": "medpretrain-model",
        "format_version": MODEL_FORMAT_VERSION,
        "kind": kind,
        "model": cfg.model,
        "model_options": cfg.model_options,
        "patch": list(cfg.patch),
        "precision": precision,
        "global_step": global_step,
        **meta,
        # A method whose module holds several networks (student and EMA teacher) says which one goes out.
        "state_dict": (module.exported_state_dict() if hasattr(module, "exported_state_dict")
                       else module.model.state_dict()),
    }, path)


def export_untrained(run_dir: str | Path, cfg: TrainingConfig, *, kind: str,
                     build_module: Callable[[bool], pl.LightningModule], run_info: dict[str, Any],
                     model_meta: Callable[[pl.LightningModule], dict[str, Any]]) -> Path:
    """The ``null`` control: export the network exactly as a training job with ``cfg`` would start it (same
    seeding, same construction), without a single step, so that it travels the same ``--init`` path as a
    pretrained one. Fine-tuning from it must match training from scratch within seed noise; if it does not,
    the difference comes from the transfer path, not from what a pretraining learnt."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_folder_lock(run_dir):
        if (run_dir / MODEL_FILE).exists():
            raise TrainingError(f"{run_dir} already holds {MODEL_FILE}; choose a new --out")
        precision = resolve_precision(cfg.precision, cfg.accelerator)
        update_run_file(run_dir / RUN_FILE, {"kind": kind, "config": cfg.model_dump(mode="json"),
                                             "precision": precision, "untrained": True, **run_info,
                                             **_network_entry(cfg)})
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        module = build_module(True)
        export_model(run_dir / MODEL_FILE, cfg, kind, precision, 0, module, {**model_meta(module), "untrained": True})
        log.info("untrained (null control) network written: %s", run_dir / MODEL_FILE)
    return run_dir
