"""Pretraining methods, one module each (its pretext task, losses and data), registered by name.

A method registered here appears in ``medpretrain pretrain --method`` and in the benchmark without edits
elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from medpretrain.errors import ConfigError

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.utils.data import Dataset

    from medpretrain.config import TrainingConfig
    from medpretrain.data.cache import PreparedData


@dataclass(frozen=True)
class PretrainMethod:
    """One pretraining method.

    Args:
        name: ``--method`` name.
        description: one line for ``medpretrain methods``.
        config_cls: its configuration (a ``TrainingConfig`` subclass); YAML keys are its fields.
        needs_data: whether it reads a prepared pool (``--data``); formula-driven methods do not.
        build_dataset: ``(cfg, data) -> Dataset`` of index-addressed training samples.
        build_module: ``(cfg) -> LightningModule`` whose ``.model`` is the registered network that goes
            downstream.
        model_meta: ``(cfg) -> dict`` stored in ``model.pt`` (in/out channels, class names...).
        presets: named settings (e.g. ``cpu``, ``paper``) selectable with ``--preset``.
        models: name prefixes of the registered networks the method can pretrain (e.g. ``("swinunetr",)``
            for a method built on the Swin encoder); empty = any network.
        pretext_baselines: ``(cfg, dataset) -> [PretextBaseline]``: the trivial and perfect losses of the terms
            the method logs (``blocks.pretext``), measured on the run's own data; None = not stated.
    """

    name: str
    description: str
    config_cls: type["TrainingConfig"]
    needs_data: bool
    build_dataset: Callable[["TrainingConfig", "PreparedData | None"], "Dataset"]
    build_module: Callable[["TrainingConfig"], "pl.LightningModule"]
    model_meta: Callable[["TrainingConfig"], dict[str, Any]]
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    pretext_baselines: Callable[["TrainingConfig", "Dataset"], list] | None = None

    def supports(self, model: str) -> bool:
        """Whether the method can pretrain the registered network ``model``."""
        return not self.models or model.startswith(self.models)


_METHODS: dict[str, PretrainMethod] = {}


def register_method(method: PretrainMethod) -> PretrainMethod:
    _METHODS[method.name] = method
    return method


def list_methods() -> list[PretrainMethod]:
    _load_builtin()
    return [_METHODS[k] for k in sorted(_METHODS)]


def get_method(name: str) -> PretrainMethod:
    """The registered method; ConfigError listing the valid names otherwise."""
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'; registered methods: {', '.join(sorted(_METHODS))}") from None


def _load_builtin() -> None:
    # Imported lazily: method modules pull in torch/MONAI, which the CLI's fast paths avoid.
    from medpretrain.methods import alice, asa, avsdb, volume_fusion  # noqa: F401
