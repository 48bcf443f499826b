"""Pretraining methods, one module each (its pretext task, losses and data), registered by name.

Every module in this package (and every ``medpretrain.methods`` entry point of an installed package) is
imported when the registry is first read, so a method that calls :func:`register_method` in its module joins
``medpretrain methods``, ``pretrain --method`` and the benchmark with no edit elsewhere. What a method
implements is :class:`PretrainMethod` (the record it registers) plus a Lightning module with
``exported_state_dict()`` (what goes downstream); ``docs/adding-a-method.md`` is the checklist and
``tests/test_method_contract.py`` checks every registered method against it.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from medpretrain.errors import ConfigError

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import numpy as np
    import torch
    from torch.utils.data import Dataset

    from medpretrain.config import TrainingConfig
    from medpretrain.data.cache import PreparedData

ENTRY_POINT_GROUP = "medpretrain.methods"
REQUIRED_PRESETS = ("cpu", "paper", "smoke")


@runtime_checkable
class PretrainModule(Protocol):
    """What ``build_module`` returns besides being a ``LightningModule``: the weights that go downstream, with
    the registered network's parameter names (``build_model(cfg.model, ...).state_dict()`` keys), so that
    ``finetune --init RUN/model.pt`` loads them. A module with a student and an EMA teacher says here which one
    goes out (``blocks.teacher.StudentTeacherModule`` wires the teacher)."""

    def exported_state_dict(self) -> dict[str, "torch.Tensor"]: ...


@dataclass(frozen=True)
class PretrainMethod:
    """One pretraining method: the record its module registers with :func:`register_method`.

    Args:
        name: ``--method`` name (lower case, digits and hyphens).
        description: one line for ``medpretrain methods``.
        config_cls: its configuration (a ``TrainingConfig`` subclass); YAML keys are its fields.
        needs_data: whether it reads a prepared pool (``--data``); formula-driven methods do not.
        build_dataset: ``(cfg, data) -> Dataset`` of index-addressed training samples (sample ``i`` a pure
            function of ``(cfg.seed, i)`` and the data: draw it from :meth:`sample_rng`).
        build_module: ``(cfg) -> LightningModule`` implementing :class:`PretrainModule`.
        model_meta: ``(cfg) -> dict`` stored in ``model.pt`` (in/out channels, class names...).
        presets: named settings selectable with ``--preset``; three are required: ``cpu`` (the defaults, may be
            empty), ``paper`` (the publication's recipe: ``benchmarks/paper.yaml`` runs it) and ``smoke`` (a
            tiny network and patch, 2 steps, no loader workers: seconds on a CPU; the contract test and the GPU
            check's dry run train with it).
        models: the registered networks the method can pretrain, by exact name (``"unetr-small"``) or by
            architecture family (``"vit"``, ``"swin"``, ``"cnn"``, ``"pctnet"``: ``ModelSpec.family``); empty =
            any network.
        pretext_baselines: ``(cfg, dataset, samples) -> [PretextBaseline]``: the trivial and perfect losses of
            the terms the method logs (``blocks.pretext``), measured on the run's own data; None = not stated.
        unused_parameters: some parameters get no gradient in some steps (a phase skips the decoder, only the
            encoder is trained...): DDP then runs with ``find_unused_parameters`` (the engine sets it).
        sample_tag: first word of the method's sample seed sequences, keeping its random streams apart from
            every other method's for the same ``(seed, index)``; default: a CRC-32 of the name.
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
    pretext_baselines: Callable[["TrainingConfig", "Dataset", int], list] | None = None
    unused_parameters: bool = False
    sample_tag: int | None = None

    @property
    def tag(self) -> int:
        """The method's sample-stream tag (``sample_tag``, else a CRC-32 of the name)."""
        return self.sample_tag if self.sample_tag is not None else zlib.crc32(self.name.encode())

    def sample_rng(self, seed: int, *words: int) -> "np.random.Generator":
        """A generator for ``(seed, *words)`` (e.g. the sample index) that no other method shares."""
        import numpy as np

        return np.random.default_rng([self.tag, int(seed), *(int(w) for w in words)])

    def supports(self, model: str) -> bool:
        """Whether the method can pretrain the registered network ``model`` (exact name or family)."""
        if not self.models or model in self.models:
            return True
        from medpretrain.models import get_spec

        try:
            return get_spec(model).family in self.models
        except ConfigError:
            return False


_METHODS: dict[str, PretrainMethod] = {}
_ORIGIN: dict[str, str] = {}
_LOADED = False


def register_method(method: PretrainMethod) -> PretrainMethod:
    """Add a method to the registry (call it at the end of the method's module).

    Raises:
        ConfigError: the record breaks the contract (name, presets, configuration class, a name or sample tag
            another module registered), naming what to fix.
    """
    from medpretrain.config import TrainingConfig

    where = f"method '{method.name}'"
    if not re.fullmatch(r"[a-z][a-z0-9-]*", method.name):
        raise ConfigError(f"{where}: a name is lower case letters, digits and hyphens, e.g. 'models-genesis'")
    if not (isinstance(method.config_cls, type) and issubclass(method.config_cls, TrainingConfig)):
        raise ConfigError(f"{where}: config_cls must subclass medpretrain.config.TrainingConfig")
    missing = [p for p in REQUIRED_PRESETS if p not in method.presets]
    if missing:
        raise ConfigError(f"{where} has no preset(s) {missing}: add "
                          "presets={'cpu': {}, 'paper': {...}, 'smoke': {...}} "
                          "(cpu = the defaults; paper = the publication's recipe, run by benchmarks/paper.yaml; "
                          "smoke = seconds on a CPU, see docs/adding-a-method.md)")
    origin = _caller_module()
    if method.name in _METHODS and _ORIGIN.get(method.name) != origin:
        raise ConfigError(f"{where} is registered twice (by {_ORIGIN[method.name]} and {origin}); rename one")
    clash = [m.name for m in _METHODS.values() if m.tag == method.tag and m.name != method.name]
    if clash:
        raise ConfigError(f"{where}: sample_tag {method.tag:#x} is also method '{clash[0]}''s; pick another "
                          "(or leave it None for a CRC-32 of the name)")
    _METHODS[method.name] = method
    _ORIGIN[method.name] = origin
    return method


def _caller_module() -> str:
    import inspect

    frame = inspect.currentframe()
    try:
        caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
        return caller.f_globals.get("__name__", "?") if caller is not None else "?"
    finally:
        del frame


def list_methods() -> list[PretrainMethod]:
    _load_all()
    return [_METHODS[k] for k in sorted(_METHODS)]


def get_method(name: str) -> PretrainMethod:
    """The registered method; ConfigError listing the valid names otherwise."""
    _load_all()
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'; registered methods: {', '.join(sorted(_METHODS))} (a method "
                          "is a module in medpretrain/methods/ that calls register_method, see "
                          "docs/adding-a-method.md)") from None


def _load_all() -> None:
    """Import every module of this package, then the ``medpretrain.methods`` entry points, once.

    Lazily, on the first registry read: method modules pull in torch/MONAI, which the CLI's fast paths avoid.
    """
    global _LOADED
    if _LOADED:
        return
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            _import(f"{__name__}.{info.name}")
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _import(ep.value.split(":")[0], f"entry point '{ep.name}'")
    _LOADED = True


def _import(module: str, what: str | None = None) -> None:
    try:
        importlib.import_module(module)
    except ConfigError:
        raise
    except ImportError as exc:
        raise ConfigError(f"pretraining method module {module}{f' ({what})' if what else ''} does not import: "
                          f"{exc}; install what it needs or remove it") from exc
