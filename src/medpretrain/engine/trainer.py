"""Trainer set-up shared by every training job: precision, logging, progress, checkpoints, DDP, resume."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from medpretrain.atomic import atomic_write_json
from medpretrain.engine.checkpointing import AtomicCheckpointIO, find_resume_checkpoint
from medpretrain.engine.device import (
    cpu_model_name, cpu_supports_bf16, cuda_environment, cuda_memory_gb, lightning_deterministic, resolve_accelerator,
    resolve_precision, uses_cuda,
)
from medpretrain.engine.run_folder import is_launcher_child
from medpretrain.errors import ConfigError, TrainingError

log = logging.getLogger("medpretrain")


class StepLogger(Callback):
    """Plain progress lines (step, loss, speed, ETA) for logs written to files, where a live bar is noise."""

    def __init__(self, total_steps: int, every: int | None = None):
        self.total = total_steps
        self.every = every or max(1, total_steps // 20)
        self._t0 = None
        self._s0 = 0

    def on_train_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()
        self._s0 = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if trainer.is_global_zero and (step % self.every == 0 or step == self.total):
            elapsed = time.perf_counter() - self._t0
            rate = (step - self._s0) / max(elapsed, 1e-9)
            eta = (self.total - step) / max(rate, 1e-9)
            loss = outputs["loss"].item() if isinstance(outputs, dict) else float(outputs)
            memory = cuda_memory_gb(pl_module.device)
            extra = f"  GPU memory peak {memory['max_memory_allocated_gb']:.1f} GB" if memory else ""
            log.info("step %d/%d  loss %.4f  %.2f s/step  ETA %.0f s%s", step, self.total, loss, 1 / max(rate, 1e-9),
                     eta, extra)


class WallClock(Callback):
    """Records training wall time and steps into ``run.json`` at the end."""

    def __init__(self, run_file: Path):
        self.run_file = run_file
        self._t0 = 0.0
        self._s0 = 0

    def on_train_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()
        self._s0 = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        wall = time.perf_counter() - self._t0
        steps = trainer.global_step - self._s0
        update_run_file(self.run_file, {"training": {
            "steps_done": trainer.global_step,
            "steps_this_session": steps,
            "wall_time_s": round(wall, 2),
            "s_per_step": round(wall / max(steps, 1), 4),
            "world_size": trainer.world_size,
            # What the time was measured on: core-hours are compared across sessions that get different machines.
            "threads": torch.get_num_threads(),
            "cpu": cpu_model_name(),
            "cpu_bf16": cpu_supports_bf16(),
            # Rank 0's device; every rank trains the same network and batch size.
            **cuda_memory_gb(pl_module.device),
        }})


def update_run_file(path: Path, values: dict[str, Any]) -> None:
    """Merge ``values`` into a JSON file, atomically."""
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    data.update(values)
    atomic_write_json(path, data)


def quiet_library_chatter() -> None:
    """Keep the console to our own progress lines: Lightning's start-up notes ("GPU available: False", "TPU
    available", the litlogger "Tip", "`Trainer.fit` stopped") and torch pytree deprecation warnings that
    Lightning triggers say nothing a user of this toolkit can act on. Lightning resets its loggers to INFO when
    it is imported, after the CLI set up logging, so this runs where trainers are built. Lightning's warnings
    and errors still show."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|_pytree|pytree).*is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|_pytree|pytree).*is deprecated", category=UserWarning)
    # Our modules' on_after_batch_transfer (augmentation on the device) beside StepDataModule, which has none.
    warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule`")


def check_trainer_settings(cfg) -> None:
    """Refuse hardware settings Lightning cannot use before anything is written (a run folder left behind by a
    run that never started): an accelerator without its device (``--accelerator gpu`` without a GPU), an
    unknown strategy, or devices/precision the accelerator cannot take. Lightning's own refusal is turned into
    one line naming the option and the fix.

    Args:
        cfg: a ``TrainingConfig`` (``accelerator``, ``devices``, ``num_nodes``, ``strategy``, ``precision``).

    Raises:
        ConfigError: the settings cannot run here.
    """
    quiet_library_chatter()
    cuda_environment(cfg.accelerator, cfg.deterministic)  # the entry points call this before CUDA starts
    _check_hardware(cfg.accelerator, cfg.devices if not isinstance(cfg.devices, list) else tuple(cfg.devices),
                    cfg.num_nodes, cfg.strategy, cfg.precision,
                    tuple(os.environ.get(var) for var in _LAUNCHER_VARIABLES))


# What torchrun and SLURM tell a process about the job it belongs to: part of the memo key of the hardware check,
# since the same options are right under one launch and wrong under another.
_LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "SLURM_JOB_ID",
                       "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES")


@functools.lru_cache(maxsize=16)
def _check_hardware(accelerator_option: str, devices, num_nodes: int, strategy: str, precision: str,
                    launcher: tuple = ()) -> None:
    # Memoised: the entry points check before building their data and the shared training job checks again
    # before writing its folder; the throwaway Trainer is built once per setting. (A refusal raises, so it is
    # never cached and is raised again.)
    accelerator = resolve_accelerator(accelerator_option)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--accelerator {accelerator_option}: no CUDA GPU is visible to torch "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --accelerator "
                          "cpu (or auto), or install a CUDA build of torch on a machine with a GPU")
    from lightning.pytorch.strategies import StrategyRegistry

    known = {"auto", *StrategyRegistry.available_strategies()}
    if strategy not in known:
        close = sorted(s for s in known if s.startswith(strategy[:3]))[:6] or ["auto", "ddp"]
        raise ConfigError(f"--strategy {strategy!r} is not a Lightning strategy; use e.g. {', '.join(close)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = pl.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                                 precision=resolve_precision(precision, accelerator_option), logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        # Under torchrun or SLURM the launcher, not Lightning, starts the processes; Lightning compares its
        # devices x nodes with the launcher's world only when fit() launches, after the data were prepared and
        # read. Compare now, so that a wrong --devices/--num-nodes fails in a second with the launcher's numbers.
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if environment is not None and environment.creates_processes_externally:
            environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
    except Exception as exc:  # Lightning's MisconfigurationException, ValueError, RuntimeError...
        reason = (" ".join(str(exc).split()) or type(exc).__name__).rstrip(".")
        raise ConfigError(
            f"Lightning cannot run with --accelerator {accelerator_option} --devices {devices} --strategy "
            f"{strategy} --precision {precision} --num-nodes {num_nodes}: {reason}; change these options "
            "(the defaults --accelerator auto --devices 1 --strategy auto --precision auto run on any machine)"
        ) from None


def check_same_data(run_file: Path, run_info: dict[str, Any], keys: Sequence[str] = ("kind", "data")) -> None:
    """On resume, the data (and kind of job) must be those of the interrupted run: a resumed run trained on
    other data would mix two datasets in one model, and ``run.json`` would then record only the second."""
    if not run_file.exists():
        return
    old = json.loads(run_file.read_text(encoding="utf-8"))
    diff = {k: (old.get(k), run_info.get(k)) for k in keys
            if k in old and k in run_info and old.get(k) != run_info.get(k)}
    if diff:
        described = "; ".join(f"{'--data' if k == 'data' else k}: was {a}, now {b}" for k, (a, b) in diff.items())
        raise ConfigError(f"--resume of the run in {run_file.parent} with other data than it was trained on "
                          f"({described}); resume with the original --data or start a new --out")


class _ResumedMetricsWriter(ExperimentWriter):
    """Lightning's CSV writer, except that a resumed run keeps the rows its earlier sessions logged before the
    checkpoint it resumes from (Lightning's writer deletes ``metrics.csv``: a long pretraining resumed across
    sessions would lose the loss curve its snapshots and pretext report are read from). Rows logged after that
    checkpoint, by the session that was interrupted, are dropped: they are not the trajectory of the run."""

    def __init__(self, log_dir: str, resume_step: int) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        import csv

        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < self._resume_step]
        self.metrics_keys = sorted(keys)
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)


class _ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume (see ``_ResumedMetricsWriter``)."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self._resume_step is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumedMetricsWriter(self.log_dir, self._resume_step)
        return super().experiment


def build_trainer(
    run_dir: Path,
    *,
    max_steps: int,
    epoch_steps: int,
    precision: str,
    accelerator: str,
    devices: int | str,
    num_nodes: int,
    strategy: str,
    deterministic: bool,
    callbacks: Sequence[Callback] = (),
    resume_step: int | None = None,
) -> pl.Trainer:
    """A Lightning Trainer writing checkpoints to ``run_dir/checkpoints`` every ``epoch_steps`` steps
    (atomically; the two newest plus ``last.ckpt``) and logs to ``run_dir/logs`` (CSV and TensorBoard).
    ``resume_step``: the global step of the checkpoint a resumed run continues from (its CSV log keeps the rows
    before it)."""
    quiet_library_chatter()
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        monitor="step",
        mode="max",
        save_top_k=2,
        save_last=True,
        every_n_train_steps=epoch_steps,
    )
    interactive = sys.stderr.isatty() and not is_launcher_child()
    progress: list[Callback] = [RichProgressBar()] if interactive else [StepLogger(max_steps)]
    loggers = [
        _ResumableCSVLogger(run_dir, name="logs", version="csv", resume_step=resume_step),
        TensorBoardLogger(run_dir, name="logs", version="tensorboard", default_hp_metric=False),
    ]
    return pl.Trainer(
        default_root_dir=run_dir,
        max_steps=max_steps,
        max_epochs=-1,
        limit_train_batches=epoch_steps,
        accelerator=resolve_accelerator(accelerator),
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        deterministic=lightning_deterministic(deterministic, accelerator),
        callbacks=[checkpoint, *progress, WallClock(run_dir / "run.json"), *callbacks],
        logger=loggers,
        log_every_n_steps=max(1, min(10, epoch_steps)),
        enable_progress_bar=interactive,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # Our StepSampler splits samples across ranks itself (deterministic and resumable).
        use_distributed_sampler=False,
        plugins=[AtomicCheckpointIO()],
        # cuDNN autotuning on CUDA (fixed patch and batch) unless deterministic; configure_cuda_math explains.
        benchmark=uses_cuda(accelerator) and not deterministic,
    )


def resume_or_refuse(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to overwrite a run silently."""
    ckpt = find_resume_checkpoint(run_dir / "checkpoints")
    if resume:
        if ckpt is None:
            log.warning("--resume given but %s has no checkpoint yet: starting from step 0", run_dir)
        else:
            log.info("resuming from %s", ckpt)
        return ckpt
    if ckpt is not None and not is_launcher_child():
        raise TrainingError(
            f"{run_dir} already holds a run with checkpoints; pass --resume to continue it, or choose a new --out"
        )
    return None


def _recorded_part(new, old):
    """``new`` restricted to the keys ``old`` recorded, in nested sections too: a setting added to medpretrain
    after a run started (absent from its ``run.json``) is not a difference that refuses its resume."""
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: _recorded_part(v, old[k]) for k, v in new.items() if k in old}
    return new


def check_same_config(run_file: Path, config: dict[str, Any], ignore: Sequence[str] = ()) -> None:
    """On resume, the training settings must be those of the interrupted run (settings the interrupted run did
    not record, added since, are not compared)."""
    if not run_file.exists():
        return
    old = json.loads(run_file.read_text(encoding="utf-8")).get("config", {})
    diff = {
        k: (old.get(k), v) for k, v in config.items()
        if k not in ignore and k in old
        and json.dumps(old[k], default=str, sort_keys=True)
        != json.dumps(_recorded_part(v, old[k]), default=str, sort_keys=True)
    }
    if diff:
        raise ConfigError(
            f"--resume with settings that differ from the run in {run_file.parent}: "
            + "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
            + "; resume with the original settings or start a new --out"
        )
