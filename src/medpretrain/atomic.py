"""Atomic file writes: a temporary file in the destination folder, then ``os.replace``.

A reader never sees a half-written file, and a process killed mid-write leaves the previous version (or
nothing) in place. Every file the toolkit writes goes through here.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    Args:
        path: the destination.
        keep_suffix: suffix the temporary name must end with (writers that pick a format from the
            suffix, e.g. nibabel's ``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp{keep_suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (``fsync`` also forces it to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (paths and other objects are written with ``str``)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """``np.save`` to ``path`` atomically (no pickles)."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as fh:
            np.save(fh, array, allow_pickle=False)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically, forced to disk before the rename (checkpoints must survive a
    power cut or kill -9 at any moment)."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "xb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)
