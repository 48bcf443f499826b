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
