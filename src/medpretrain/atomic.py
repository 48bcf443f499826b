"""Atomic file writes: a temporary file in the destination folder, then ``os.replace``.

A reader never sees a half-written file, and a process killed mid-write leaves the previous version (or
nothing) in place. Every file the toolkit writes goes through here.
"""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np


NAME_MAX_BYTES = 255  # longest file name (one path component) of ext4, XFS, APFS, NTFS, tmpfs


def temporary_name(name: str, keep_suffix: str = "") -> str:
    """A unique hidden temporary name for ``name`` in the same folder, never longer than ``NAME_MAX_BYTES``.

    The name keeps as much of ``name`` as fits: a legal 246-byte file name plus the ~30 bytes of pid, random
    part and ``.tmp`` would otherwise exceed the file system's limit (Errno 36) and fail the write."""
    tail = f".{os.getpid()}.{os.urandom(4).hex()}.tmp{keep_suffix}"
    room = NAME_MAX_BYTES - 1 - len(os.fsencode(tail))  # 1: the leading dot
    stem = os.fsencode(name)[:room]
    # Cutting bytes may split a multi-byte character: decode what is left the way the OS would name it.
    return "." + os.fsdecode(stem) + tail


@contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    Args:
        path: the destination.
        keep_suffix: suffix the temporary name must end with (writers that pick a format from the
            suffix, e.g. nibabel's ``.nii.gz``).
    """
    path = Path(path)
    if len(os.fsencode(path.name)) > NAME_MAX_BYTES:
        # Say so before writing anything (the rename at the end would fail, naming only the temporary).
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / temporary_name(path.name, keep_suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


PATH_MAX_BYTES = 4096  # longest path Linux accepts


def check_writable_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """Refuse, before anything is written, an output folder that cannot be created or written to.

    Checks that the path is not too long, is not an existing file, that the nearest existing folder on the way
    to it is a folder, and that it can be written (a read-only folder, file system or permissions).

    Args:
        path: the output folder (created later by the caller when missing).
        option: the option that named it, for the message.

    Raises:
        ConfigError: one line naming the path, the problem and the fix.
    """
    from medpretrain.errors import ConfigError, short_path

    path = Path(path)
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    if len(os.fsencode(os.path.abspath(path))) >= PATH_MAX_BYTES or longest > NAME_MAX_BYTES:
        raise ConfigError(f"{option} path is too long: {short_path(path)} (at most {PATH_MAX_BYTES} bytes in all and "
                          f"{NAME_MAX_BYTES} per name); choose a shorter {option}")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is an existing file, not a folder; pass a folder (it is created when "
                          "missing), e.g. a new name")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option} {path} cannot be created: {existing} is a file, not a folder; choose another {option}")
    if not _can_write_in(existing):
        where = "" if existing == path.absolute() else f" ({existing}, where it would be created)"
        raise ConfigError(f"{option} {path} is not writable{where}: a read-only folder or file system; choose "
                          f"another {option} or fix its permissions")
    return path


def _can_write_in(folder: Path) -> bool:
    """True when a file can be created in ``folder``. Tried for real: permission bits say nothing for root, and
    neither they nor ``os.access`` see an immutable folder."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    probe = folder / temporary_name("write-probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        return False
    probe.unlink()
    return True


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
    """Write UTF-8 text to ``path`` atomically. A file name that is not valid UTF-8 (Python holds its bytes as
    surrogates) is written as ``\\udce9`` escapes, so that one odd case name cannot fail a whole report."""
    return atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"))


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
