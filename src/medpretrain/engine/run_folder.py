"""A run folder's file names, its lock and its ``run.json``: what commands that only read or guard a run need.

Kept apart from ``engine.job`` (the training loop) so that importing them does not import Lightning: the
benchmark driver, ``select-hparams`` and ``evaluate`` start as child processes many times in a benchmark, and
Lightning's import costs seconds each time on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from medpretrain.errors import ConfigError, TrainingError

MODEL_FILE = "model.pt"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"


def is_launcher_child() -> bool:
    """True in every process but global rank 0: those Lightning's DDP launcher starts (they re-run the command;
    rank 0 prepares), and under torchrun the ranks of other nodes (torchrun names the node GROUP_RANK and the
    global rank RANK, never NODE_RANK)."""
    return any(os.environ.get(var, "0") != "0"
               for var in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "RANK", "GROUP_RANK"))


@contextlib.contextmanager
def run_folder_lock(run_dir: Path, what: str = "training"):
    """Hold an exclusive lock on ``run_dir`` while working in it: a second process started on the same folder
    (a re-run while the first is alive, two benchmark drivers) would interleave checkpoints and ``model.pt``.
    The lock is an OS file lock, so it is released when the process dies, however it dies. DDP processes that
    Lightning starts (ranks > 0) share rank 0's run and take no lock; where ``fcntl`` is missing (Windows) the
    folder is not locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    if is_launcher_child():
        yield
        return
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise TrainingError(
                f"{run_dir} is in use by another {what} process (pid {owner}); wait for it to finish or stop it, "
                "then re-run (two processes in one folder would overwrite each other's files)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def read_run(run_dir: str | Path, kind: str = "finetune") -> dict:
    """The run's ``run.json``; ConfigError if the folder is not a run (the message asks for a ``kind`` run)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a medpretrain run (no {RUN_FILE}); pass the --out of a {kind} run")
    return json.loads(path.read_text(encoding="utf-8"))


def run_precision(info: dict) -> str | None:
    """The precision a run trained with, from its ``run.json``: resolved (``bf16-mixed``, ``32-true``...) at the top
    level by medpretrain's training jobs and under ``training`` by the nnU-Net interop; the configured value (maybe
    ``auto``) only for a run that recorded neither."""
    return (info.get("precision") or info.get("training", {}).get("precision")
            or info.get("config", {}).get("precision"))
