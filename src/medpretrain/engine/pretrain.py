"""Pretraining job: any registered method through the shared training job (logging, resume, DDP, export)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch.callbacks import Callback

from medpretrain.config import TrainingConfig, load_config
from medpretrain.data.cache import PreparedData
from medpretrain.engine.job import run_training
from medpretrain.errors import CacheError, ConfigError
from medpretrain.methods import get_method
from medpretrain.models import get_spec

log = logging.getLogger("medpretrain")


def pretrain_config(method: str, config_file: str | Path | None = None, preset: str | None = None,
                    overrides: dict[str, Any] | None = None) -> TrainingConfig:
    """The method's configuration: its defaults, then a preset, then a YAML file, then ``overrides``."""
    m = get_method(method)
    if preset is not None and preset not in m.presets:
        raise ConfigError(f"method '{method}' has no preset '{preset}'; its presets: {', '.join(m.presets)}")
    return load_config(m.config_cls, config_file, overrides, base=m.presets.get(preset, {}) if preset else None)


def pretrain(method: str, data_dir: str | Path | None, out_dir: str | Path, cfg: TrainingConfig,
             resume: bool = False, callbacks: Sequence[Callback] = ()) -> Path:
    """Pretrain ``cfg.model`` with ``method``; ``RUN/model.pt`` then feeds ``finetune --init``.

    Args:
        method: registered method name (``medpretrain methods``).
        data_dir: prepared unlabelled pool (``prepare --pool``), or None for methods that need no data.
        out_dir: run folder.
        cfg: an instance of the method's configuration class.
        resume: continue from the newest readable checkpoint in ``out_dir``.
        callbacks: extra Lightning callbacks.
    """
    m = get_method(method)
    if not isinstance(cfg, m.config_cls):
        raise ConfigError(f"method '{method}' takes a {m.config_cls.__name__}, got {type(cfg).__name__}")
    get_spec(cfg.model).check_patch(cfg.patch)
    data = None
    if m.needs_data:
        if data_dir is None:
            raise ConfigError(f"method '{method}' needs --data: a pool prepared with `medpretrain prepare --pool`")
        data = PreparedData(data_dir)
        if not data.case_ids:
            raise CacheError(f"{data.root} holds no prepared cases")
    elif data_dir is not None:
        log.warning("method '%s' generates its own data; --data %s is ignored", method, data_dir)
    log.info("pretraining %s with %s for %d steps (patch %s, batch %d)", cfg.model, method, cfg.steps,
             cfg.patch, cfg.batch)
    return run_training(
        out_dir, cfg, kind=f"pretrain:{method}",
        build_module=lambda fresh: m.build_module(cfg),
        dataset=m.build_dataset(cfg, data),
        run_info={"method": method, "data": str(Path(data_dir).resolve()) if data else None, **m.model_meta(cfg)},
        model_meta=lambda module: {"method": method, **m.model_meta(cfg)},
        resume=resume, callbacks=callbacks,
    )
