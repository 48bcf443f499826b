"""Errors that tell the user what went wrong, where, and how to fix it."""

from __future__ import annotations


class MedpretrainError(Exception):
    """Base class: every error we raise on purpose. The CLI prints its message without a traceback."""


class DataError(MedpretrainError):
    """A source image, label or dataset description cannot be used as it is."""


class CacheError(MedpretrainError):
    """A prepared cache is missing, incomplete, from another format version, or does not fit the request."""


class ConfigError(MedpretrainError):
    """A config value, model name or option is not valid."""


class CheckpointError(MedpretrainError):
    """A checkpoint cannot be read or does not fit the model."""


class TrainingError(MedpretrainError):
    """Training cannot go on (non-finite loss, nothing to resume from, ...)."""


def short_path(path, limit: int = 160) -> str:
    """``path`` as text for a one-line message: a path longer than ``limit`` characters is shown as its start,
    ``...``, its end and its length (a 10,000-character path would otherwise be the whole message)."""
    text = str(path)
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]}...{text[-(limit // 3):]} ({len(text)} characters)"


def describe_os_error(exc: OSError) -> str:
    """One line for an operating-system error: the path, what is wrong in words, and the fix. The OS's own text
    ("[Errno 28] No space left on device") names neither the path's role nor what to do."""
    import errno

    path = exc.filename if exc.filename is not None else exc.filename2
    shown = short_path(path) if path is not None else "a file"
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return (f"no space left on the device (or over the disk quota) while writing {shown}; free space there or "
                "choose an --out on another disk, then re-run (finished work is kept)")
    if code == errno.EROFS:
        return f"{shown} is on a read-only file system; choose an --out on a writable disk"
    if code in (errno.EACCES, errno.EPERM):
        return (f"permission denied for {shown} (a read-only folder or another user's); choose another path or "
                "fix its permissions")
    if code == errno.ENAMETOOLONG:
        return (f"path or file name too long: {shown} (at most 4096 bytes in all and 255 per name); choose a "
                "shorter path or rename the file")
    if code == errno.ENOTDIR:
        return f"a part of {shown} is a file, not a folder; choose another path"
    if code == errno.EEXIST:
        return f"{shown} already exists and is not a folder; choose another path"
    if code == errno.EISDIR:
        return f"{shown} is a folder where a file is needed; pass a file"
    if code == errno.ENOENT:
        return f"{shown}: no such file or folder; check the path"
    if code == errno.EFBIG:
        return f"{shown} would be larger than the file system (or a size limit) allows; choose an --out on another disk"
    return f"{shown}: {exc.strerror or exc}"
