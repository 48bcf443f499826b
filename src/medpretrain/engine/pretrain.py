"""Pretraining job: any registered method through the shared training job (logging, resume, DDP, export)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch.callbacks import Callback

from medpretrain.config import TrainingConfig, load_config, make_config
from medpretrain.data.cache import PreparedData
from medpretrain.engine.job import export_untrained, run_training
from medpretrain.engine.snapshots import SnapshotExporter
from medpretrain.atomic import check_writable_folder
from medpretrain.engine.run_folder import is_launcher_child
from medpretrain.engine.trainer import check_trainer_settings
from medpretrain.errors import CacheError, ConfigError
from medpretrain.methods import get_method
from medpretrain.models import get_spec
from medpretrain.models.registry import check_model_options

log = logging.getLogger("medpretrain")


def pretrain_config(method: str, config_file: str | Path | None = None, preset: str | None = None,
                    overrides: dict[str, Any] | None = None) -> TrainingConfig:
    """The method's configuration: its defaults, then a preset, then a YAML file, then ``overrides``."""
    m = get_method(method)
    if preset is not None and preset not in m.presets:
        raise ConfigError(f"method '{method}' has no preset '{preset}'; its presets: {', '.join(m.presets)}")
    return load_config(m.config_cls, config_file, overrides, base=m.presets.get(preset, {}) if preset else None)


def pretrain(method: str, data_dir: str | Path | None, out_dir: str | Path, cfg: TrainingConfig,
             resume: bool = False, callbacks: Sequence[Callback] = (), untrained: bool = False) -> Path:
    """Pretrain ``cfg.model`` with ``method``; ``RUN/model.pt`` then feeds ``finetune --init``.

    Args:
        method: registered method name (``medpretrain methods``).
        data_dir: prepared unlabelled pool (``prepare --pool``), or None for methods that need no data.
        out_dir: run folder.
        cfg: an instance of the method's configuration class.
        resume: continue from the newest readable checkpoint in ``out_dir``.
        callbacks: extra Lightning callbacks.
        untrained: write the network's initial weights without training (the ``null`` control, see
            ``engine.job.export_untrained``).
    """
    m = get_method(method)
    if not isinstance(cfg, m.config_cls):
        raise ConfigError(f"method '{method}' takes a {m.config_cls.__name__}, got {type(cfg).__name__}")
    get_spec(cfg.model).check_patch(cfg.patch, cfg.model_options)
    check_model_options(cfg.model, 1, 2, cfg.patch, cfg.model_options)  # option values, whatever the head
    check_writable_folder(out_dir, "--out")
    if m.unused_parameters:
        cfg = ddp_allowing_unused_parameters(cfg)
    check_trainer_settings(cfg)  # before anything is written: a run that cannot start leaves no folder
    data = None
    if m.needs_data:
        if data_dir is None:
            raise ConfigError(f"method '{method}' needs --data: a pool prepared with `medpretrain prepare --pool`")
        data = PreparedData(data_dir)
        if not data.case_ids:
            raise CacheError(f"{data.root} holds no prepared cases")
    elif data_dir is not None:
        log.warning("method '%s' generates its own data; --data %s is ignored", method, data_dir)
    run_info = {"method": method, "data": str(Path(data_dir).resolve()) if data else None, **m.model_meta(cfg)}
    build = lambda fresh: m.build_module(cfg)  # noqa: E731
    meta = lambda module: _model_meta(method, cfg)  # noqa: E731
    if untrained:
        return export_untrained(out_dir, cfg, kind=f"pretrain:{method}:null", build_module=build,
                                run_info=run_info, model_meta=meta)
    log.info("pretraining %s with %s for %d steps (patch %s, batch %d)", cfg.model, method, cfg.steps,
             cfg.patch, cfg.batch)
    dataset = m.build_dataset(cfg, data)
    if cfg.export_steps:
        late = [s for s in cfg.export_steps if s > cfg.steps]
        if late:
            log.warning("export_steps %s lie beyond the run's %d steps: no snapshot there", late, cfg.steps)
        callbacks = [*callbacks, SnapshotExporter(out_dir, cfg, f"pretrain:{method}", meta)]
    run = run_training(
        out_dir, cfg, kind=f"pretrain:{method}",
        build_module=build,
        dataset=dataset,
        run_info=run_info,
        model_meta=meta,
        resume=resume, callbacks=callbacks,
    )
    if not is_launcher_child():
        write_pretext_report(run, m, cfg, dataset)
    return run


def _model_meta(method: str, cfg: TrainingConfig) -> dict[str, Any]:
    """What a pretraining's exported networks (model.pt, snapshots) store beside the weights."""
    return {"method": method, **get_method(method).model_meta(cfg)}


def export_snapshot_from_checkpoint(run_dir: str | Path, checkpoint: str | Path) -> Path:
    """Write the snapshot a pretraining run would have written at a kept checkpoint's step.

    A budget curve that wants a point its run did not list in ``export_steps`` (decided after the run passed that
    step) reads it from a Lightning checkpoint the run kept: the method's module is rebuilt from ``run.json``'s
    configuration, the checkpoint's weights loaded, and ``snapshots/model-stepNNNNNNN.pt`` written exactly as the
    run's own exporter writes it (the checkpoint and the exporter see the same weights after that optimizer step),
    plus ``from_checkpoint`` naming the source. An existing snapshot is not overwritten.

    Args:
        run_dir: the pretraining's run folder (``run.json``).
        checkpoint: a checkpoint of that run (``RUN/checkpoints/step0008000.ckpt``, or a copy of it).
    """
    import torch

    from medpretrain.engine.device import resolve_precision
    from medpretrain.engine.job import export_model
    from medpretrain.engine.run_folder import RUN_FILE, read_run
    from medpretrain.engine.snapshots import snapshot_path

    run_dir, checkpoint = Path(run_dir), Path(checkpoint)
    run_file = run_dir / RUN_FILE
    info = read_run(run_dir, kind="pretrain")
    kind = str(info.get("kind", ""))
    if not kind.startswith("pretrain:") or info.get("untrained"):
        raise ConfigError(f"{run_file}: kind {kind!r} is not a trained pretraining; snapshots come from one")
    method = info.get("method") or kind.split(":")[1]
    m = get_method(method)
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        state, step = ckpt["state_dict"], int(ckpt["global_step"])
    except Exception as err:  # truncated, foreign or not a Lightning checkpoint
        raise ConfigError(f"{checkpoint}: not a readable Lightning checkpoint ({err}); give one of "
                          f"{run_dir / 'checkpoints'}/*.ckpt") from err
    out = snapshot_path(run_dir, step)
    if out.exists():
        raise ConfigError(f"{out} exists already (step {step}); delete it first to write it again")
    cfg = make_config(m.config_cls, info["config"], str(run_file))
    module = m.build_module(cfg)
    module.load_state_dict(state)  # strict: a checkpoint of another method or network fails here
    out.parent.mkdir(parents=True, exist_ok=True)
    precision = info.get("precision") or resolve_precision(cfg.precision, cfg.accelerator)
    export_model(out, cfg, kind, precision, step, module,
                 {**_model_meta(method, cfg), "snapshot": True, "from_checkpoint": checkpoint.name})
    log.info("snapshot at step %d from %s: %s", step, checkpoint, out)
    return out


_DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def ddp_allowing_unused_parameters(cfg: TrainingConfig) -> TrainingConfig:
    """``cfg`` with its DDP strategy switched to the ``find_unused_parameters`` variant, for methods that leave
    some parameters without gradient in some steps (plain DDP stops at the first such step). ``auto`` on more
    than one device or node is DDP too."""
    several = cfg.devices not in (1, "1") or cfg.num_nodes > 1
    if cfg.strategy in _DDP_STRATEGIES:
        strategy = f"{cfg.strategy}_find_unused_parameters_true"
    elif cfg.strategy == "auto" and several:
        strategy = "ddp_find_unused_parameters_true"
    else:
        return cfg
    return cfg.model_copy(update={"strategy": strategy})


def write_pretext_report(run_dir: Path, method, cfg: TrainingConfig, dataset, samples: int = 16) -> dict:
    """Measure the method's trivial and perfect pretext losses on its own data and write them, with the final
    logged losses and the fraction learnt, into ``run.json`` (``pretext``) and ``pretext.json``."""
    from medpretrain.atomic import atomic_write_json
    from medpretrain.blocks.pretext import pretext_report
    from medpretrain.engine.trainer import update_run_file

    if method.pretext_baselines is None:
        return {}
    baselines = method.pretext_baselines(cfg, dataset, samples)
    report = pretext_report(baselines, Path(run_dir) / "logs" / "csv" / "metrics.csv")
    atomic_write_json(Path(run_dir) / "pretext.json", report)
    update_run_file(Path(run_dir) / "run.json", {"pretext": report})
    for term, r in report.items():
        frac = r["fraction_learnt"]
        log.info("pretext %s: trivial %.4f, perfect %.4f, final %s -> fraction learnt %s", term, r["trivial"],
                 r["perfect"], "?" if r["final"] is None else f"{r['final']:.4f}",
                 "?" if frac is None else f"{frac:.1%}")
    return report
