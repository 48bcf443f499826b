"""The label-efficiency benchmark: every pretraining method, several labelled-set sizes and seeds, one report.

``medpretrain benchmark --config benchmarks/NAME.yaml --out DIR`` prepares the downstream dataset and the
unlabelled pool, pretrains each (method, backbone) once, fine-tunes every (method, backbone, n labelled,
seed) with the backbone's budget, evaluates on the test split, and writes ``results.csv``,
``summary.json``, ``report.md`` and ``label_efficiency.png`` (``evaluation/benchmark_report.py``).

Fair by construction: a backbone's fine-tuning budget (steps, patch, batch, lr, precision) is one object used
for every method, ``scratch`` included; the labelled subset is a function of (seed, n) only
(``engine.finetune.labeled_subset``), so it is identical across methods.

Every job is a ``medpretrain`` command run in a child process (so each gets tcmalloc, its own memory and
its own thread count) whose output goes to ``OUT/logs/JOB.log``. A finished job leaves a file that marks
it done (``model.pt`` for a pretraining, ``eval/metrics.json`` for a fine-tuning run); a re-run after a crash
or Ctrl-C skips those and resumes interrupted trainings from their last checkpoint. ``OUT/jobs.json``
records each job's exact command: a later run with other settings for the same job is refused instead of
silently mixing results.

``parallel`` runs that many jobs side by side with ``cores / parallel`` threads each: on our 2-core CPU two
one-thread trainings do 1.1x the steps per second of one two-thread training
(``benchmarks/parallel_lanes.py``, ``docs/results/benchmark/parallel_lanes.json``), and the single-threaded
parts of a job (start-up, evaluation) overlap with another job's training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medpretrain.atomic import atomic_write_json, atomic_write_text
from medpretrain.config import curve_file_name, make_config, read_yaml_mapping
from medpretrain.errors import ConfigError, MedpretrainError

log = logging.getLogger("medpretrain")

SCRATCH = "scratch"
FAILED_EXTRA = "extra_run_failed.json"  # an extra validation run that could not train: worst score, not re-tried
TIMINGS = "timings.json"  # OUT/timings.json: seconds each finished job took (ETA and --time-limit of later runs)
WAIT = "wait"  # kind of a job without commands: done when its marker file appears (written by the job it needs)
SNAPSHOT_SEP = "@"  # volume-fusion@2000: fine-tuned from the snapshot at pretraining step 2000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackboneBudget(_Strict):
    """One downstream network and the fine-tuning budget every method gets with it.

    Args:
        model: registered network (``medpretrain models``); pretraining methods pretrain this network.
        steps, patch, batch, lr, precision: the fine-tuning budget, identical for every method.
        finetune: further ``FinetuneConfig`` keys for every fine-tuning run (e.g. ``augment``).
        init_part: what a pretrained checkpoint gives the fine-tuning run: ``all`` (encoder and decoder; the
            head is replaced) or ``encoder``.
        pretrain: config keys given to every method's pretraining of this backbone (e.g. ``patch``).
            Backbones with the same ``model`` and ``pretrain`` share one pretraining per method (e.g. a
            linear-probing twin: ``finetune: {freeze_encoder: true}``, ``init_part: encoder``).
    """

    model: str
    steps: int = 600
    patch: tuple[int, int, int] = (64, 64, 48)
    batch: int = 2
    lr: float = 1e-3
    precision: str = "auto"
    finetune: dict[str, Any] = {}
    init_part: Literal["all", "encoder"] = "all"
    pretrain: dict[str, Any] = {}


class MethodSettings(_Strict):
    """How one pretraining method is run in the benchmark.

    Args:
        preset: the method's named settings (``medpretrain methods``); unset = the benchmark's ``preset`` when
            the method has it, else its defaults; None = its defaults.
        steps: pretraining steps (None = the preset's).
        config: further keys of the method's config (as in a ``pretrain --config`` YAML).
        backbones: the backbones it is run with (None = every backbone the method supports).
        method: the registered method this entry runs; set it to add a variant under a new name (an
            ablation arm, e.g. ``volume-fusion-k1: {method: volume-fusion, config: {k: 1}}``), which then runs
            beside the method's own entry. None = the entry's name is the method.
        untrained: export the initial weights without training (the ``null`` control).
        snapshots: pretraining steps (below the run's length) at which the pretraining also writes the network
            (``export_steps``); each is fine-tuned as an arm of its own, ``<entry>@<step>`` (the run's final
            ``model.pt`` is the entry's own arm): the points of a pretraining-budget curve from one long run.
        n_labeled: the labelled-set sizes its arms (snapshots included) are fine-tuned at, a subset of the
            profile's (None = all of them): scratch runs every size, a costly pretrained arm the ones that matter
            (e.g. a budget curve at n = 4 beside scratch's full label-efficiency curve). Its runs stay paired
            with scratch's at the same size and seed.
        lr_from: fine-tune with what another entry's validation grid chose (its name) instead of a grid of its
            own, snapshot arms included: a longer run of a budget curve (``volume-fusion-64k: {method:
            volume-fusion, lr_from: volume-fusion}``) whose points then all share the lr validation chose for
            one network of the curve, as snapshot arms do under ``validation.snapshots: method``, at no grid
            cost. Needs the profile's ``validation``; None = a grid of its own.
    """

    preset: str | None = "default"
    method: str | None = None
    steps: int | None = None
    config: dict[str, Any] = {}
    backbones: list[str] | None = None
    untrained: bool = False
    snapshots: list[int] = []
    n_labeled: list[int | Literal["all"]] | None = None
    lr_from: str | None = None

    @field_validator("snapshots")
    @classmethod
    def _snapshot_steps(cls, v: list[int]) -> list[int]:
        if any(s < 1 for s in v) or len(set(v)) != len(v):
            raise ValueError(f"snapshots must list distinct optimizer steps >= 1, got {v}")
        return sorted(v)


class ValidationSettings(_Strict):
    """Fine-tuning hyper-parameters chosen on validation cases, never on test, with the same grid for every arm
    (scratch included).

    Args:
        cases: training cases set aside as the validation set (never in a labelled subset, never test); the same
            cases for every run of the benchmark (``FinetuneConfig.validation_cases``).
        seed: seed of that draw.
        n_labeled, run_seed: the labelled-set size and seed the grid runs at (one run per arm and grid point).
        lr: the learning rates tried; each arm then runs with the one of best validation Dice.
        snapshots: ``own``: every snapshot arm (``<method>@<step>``) runs the grid too; ``method``: snapshot arms
            use the lr their method's final network chose (a budget curve with many points at a fraction of the
            cost; the earlier points may then be a little under-tuned).
        only: run the grid and nothing else (no test runs): calibrating a recipe, e.g. backbones that differ in
            patch or steps compared on validation Dice, never on test.
        extend: when an arm's best lr is the grid's largest (or smallest), try up to this many more beyond that
            end, each one grid step further (the ratio of the grid's two outermost values on that side), until the
            best is inside: a search that stops at its edge may leave an arm, scratch above all, under-tuned. Every
            arm gets the same rule; the extra runs sit beside the grid's in ``validation/`` and the selection's
            JSON lists them.
        all_includes_validation: the ``all`` labelled-set size trains on every training case, the validation cases
            too (as nnU-Net's final training does): they chose the lr before and are not scored again, and the
            test cases stay unseen. Off: ``all`` is every case outside the validation set. The labelled subsets
            of the other sizes never hold a validation case either way.
        controls: ``own``: the null control (``untrained: true``) runs the grid like any arm; ``scratch``: it uses
            the lr scratch chose, so that null vs scratch differs by the ``--init`` path alone (the control's
            question) and the grid's cost goes to the arms that compete.
        curves: also score every grid run's learning-curve exports (``curve_fractions``) on the validation cases:
            validation Dice vs fine-tuning step per arm and lr, in the report, so that a calibration can choose the
            step budget too (where the curve flattens), still without touching test.
    """

    cases: int = 8
    seed: int = 0
    n_labeled: int = 4
    run_seed: int = 0
    lr: list[float] = [3e-4, 1e-3, 3e-3]
    snapshots: Literal["own", "method"] = "own"
    only: bool = False
    extend: int = Field(0, ge=0, le=4)
    all_includes_validation: bool = False
    controls: Literal["own", "scratch"] = "own"
    curves: bool = False

    @field_validator("lr")
    @classmethod
    def _grid(cls, v):
        if not v or any(x <= 0 for x in v) or len(set(v)) != len(v):
            raise ValueError(f"lr must list distinct learning rates > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _extend_needs_a_step(self):
        if self.extend and len(self.lr) < 2:
            raise ValueError(f"extend: {self.extend} steps one grid ratio beyond an end of lr, which needs at least "
                             f"2 learning rates; got lr {self.lr}")
        return self


class NnunetScratchSettings(_Strict):
    """nnU-Net v2's own scratch training as an arm of the benchmark, ``nnunet-scratch`` (``medpretrain
    nnunet-scratch``, ``interop/nnunet_scratch.py``): nnU-Net's planning, preprocessing, trainer and predictor on the
    same labelled cases as every other arm (same n, seed and validation set-aside), scored on the same test cases
    with our metrics, with a short CPU budget; one run per labelled-set size and seed, ``runs/nnunet-scratch-nN-sS``.

    Args:
        backbone: the backbone whose ``scratch`` arm it stands beside in the report (same rows, paired by seed);
            None = the first backbone.
        max_seconds: training time of each run in seconds, or ``scratch``: the training wall time the paired scratch
            run (that backbone, same n and seed) recorded in its run.json, so that both trained for the same time
            (the job then waits for that run).
        iterations: or a number of nnU-Net iterations (exactly one of the two).
        gpu_memory_target: GB given to nnU-Net's planner, which sizes its patch and batch with it (small: a CPU).
        workers: nnU-Net's data-augmentation processes per run (0: in the training process).
        mirroring: nnU-Net's test-time mirroring (its default; off: 8x cheaper prediction in 3D).
    """

    backbone: str | None = None
    max_seconds: float | Literal["scratch"] | None = None
    iterations: int | None = None
    gpu_memory_target: float = 0.25
    workers: int = 1
    mirroring: bool = True

    @model_validator(mode="after")
    def _budget(self):
        if (self.max_seconds is None) == (self.iterations is None):
            raise ValueError("nnunet_scratch needs exactly one budget: max_seconds (seconds, or 'scratch': the wall "
                             "time of the paired scratch run) or iterations")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"nnunet_scratch iterations must be >= 1, got {self.iterations}")
        if isinstance(self.max_seconds, float) and not self.max_seconds > 0:
            raise ValueError(f"nnunet_scratch max_seconds must be > 0 or 'scratch', got {self.max_seconds}")
        if not self.gpu_memory_target > 0 or self.workers < 0:
            raise ValueError("nnunet_scratch gpu_memory_target must be > 0 and workers >= 0")
        return self


class BenchmarkConfig(_Strict):
    """A label-efficiency benchmark (``benchmarks/*.yaml``).

    Args:
        name: profile name, shown in the report.
        dataset: the labelled downstream dataset (MSD, nnU-Net v2 raw or images/labels folders; its
            ``splits.json`` or a seeded 80/20 split decides train and test).
        preprocess: ``PreprocessConfig`` keys for the downstream dataset (e.g. ``spacing``, ``modality``).
        pool: unlabelled pool sources (folders, globs or JSON lists, as ``prepare --pool`` takes them).
        pool_add_downstream_train: add the downstream TRAIN images (labels unused) to the pool.
        pool_preprocess: ``PreprocessConfig`` keys for the pool; None = the downstream spacing, modality
            per image.
        backbones: name -> network and fine-tuning budget.
        preset: the preset every method runs with when it has one (``cpu``, ``paper``) and its entry in
            ``methods`` does not name another.
        methods: per-method settings. Every registered method runs (a method registered later joins without
            editing this code or the profile), on every backbone it supports, unless listed in ``exclude`` or
            left out of ``only``; ``scratch`` always runs.
        exclude: registered methods not to run.
        only: run these registered methods and no other (None = every registered method): a profile measuring
            chosen methods stays the same when methods are added to the registry. Variants (entries of
            ``methods`` with ``method:``) run whatever ``only`` says.
        n_labeled: labelled-set sizes; ``all`` = every training case.
        seeds: seeds of initialisation, labelled subset and patches.
        parallel: jobs run side by side (each with ``cores / parallel`` threads).
        overlays: overlay PNGs per evaluated run (half best, half worst cases).
        workers: processes for data preparation.
        pretrain_seed: the seed of every pretraining (initialisation and samples), distinct from every
            fine-tuning seed: a pretraining started from the exact initial weights of a scratch run would equal
            that run by construction where it learnt little. The ``null`` control (``untrained: true``) uses it
            too, so it holds exactly the weights the pretrainings started from.
        validation: choose each arm's fine-tuning learning rate on validation cases (see
            ``ValidationSettings``); None = every arm uses the backbone's ``lr``.
        curve_fractions: each fine-tuning run is also evaluated at these fractions of its steps (learning
            curves, and the steps a pretrained arm needs to reach scratch's final Dice).
        nnunet_scratch: add the arm ``nnunet-scratch``, nnU-Net v2's own training from scratch at a stated budget
            (see ``NnunetScratchSettings``); None = not run.
        original_space: every run's test evaluation (the final model; learning-curve points stay on the prepared
            grid) also scores each case in its source file's geometry (``EvaluateConfig.original_space``); the
            report adds per-class tables there. For data prepared coarser than distributed.
    """

    name: str
    dataset: Path
    preprocess: dict[str, Any] = {}
    pool: list[str] = []
    pool_add_downstream_train: bool = True
    pool_preprocess: dict[str, Any] | None = None
    backbones: dict[str, BackboneBudget]
    preset: str | None = "cpu"
    methods: dict[str, MethodSettings] = {}
    exclude: list[str] = []
    only: list[str] | None = None
    n_labeled: list[int | Literal["all"]] = [2, 4, 8, "all"]
    seeds: list[int] = [0, 1, 2]
    parallel: int = 1
    overlays: int = 2
    workers: int = 2
    pretrain_seed: int = 1000
    validation: ValidationSettings | None = None
    curve_fractions: list[float] = [0.25, 0.5]
    nnunet_scratch: NnunetScratchSettings | None = None
    original_space: bool = False

    @field_validator("n_labeled")
    @classmethod
    def _sizes(cls, v):
        if not v or any(isinstance(n, int) and n < 1 for n in v):
            raise ValueError(f"n_labeled must list sizes >= 1 or 'all', got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"n_labeled lists a size twice: {v}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError(f"seeds must be a non-empty list without repeats, got {v}")
        return v

    @field_validator("parallel")
    @classmethod
    def _parallel(cls, v):
        if v < 1:
            raise ValueError(f"parallel must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _backbones(self):
        if not self.backbones:
            raise ValueError("backbones must name at least one network and its fine-tuning budget")
        if self.pretrain_seed in self.seeds or (self.validation and self.pretrain_seed == self.validation.run_seed):
            raise ValueError(f"pretrain_seed {self.pretrain_seed} is also a fine-tuning seed; give the pretrainings "
                             f"a seed of their own (e.g. 1000)")
        for name, m in self.methods.items():
            if m.n_labeled is not None and (not m.n_labeled or not set(m.n_labeled) <= set(self.n_labeled)):
                raise ValueError(f"methods.{name}.n_labeled {m.n_labeled}: must be some of the profile's n_labeled "
                                 f"{self.n_labeled} (its runs pair with scratch's at the same size)")
        ns = self.nnunet_scratch
        if ns is not None and ns.backbone is not None and ns.backbone not in self.backbones:
            raise ValueError(f"nnunet_scratch backbone '{ns.backbone}' is not a backbone of the profile "
                             f"({', '.join(self.backbones)})")
        return self


def load_benchmark_config(path: str | Path, overrides: dict[str, Any] | None = None) -> BenchmarkConfig:
    """Read and validate a benchmark YAML; ConfigError naming the file, key and valid keys otherwise."""
    values = read_yaml_mapping(path, "benchmark config")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return make_config(BenchmarkConfig, values, str(path))


# --- the plan ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One command of the benchmark.

    Attributes:
        name: unique name (also its log file name).
        kind: ``prepare``, ``pretrain``, ``finetune`` (fine-tuning then evaluation), ``select`` (the validation
            choice) or ``wait`` (no command: done when a file another job writes appears, e.g. a snapshot of a
            pretraining that is still running).
        commands: the ``medpretrain`` argument lists, run in order.
        done_marker: the file whose existence means the job is finished.
        needs: names of the jobs that must finish first.
        info: what the report needs to know about it (method, backbone, n_labeled, seed, run folder).
    """

    name: str
    kind: str
    commands: list[list[str]]
    done_marker: Path
    needs: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.done_marker.exists()


def _base(name: str, settings: MethodSettings) -> str:
    """The registered method a benchmark entry runs (a variant names it in ``method``)."""
    return settings.method or name


def _methods(cfg: BenchmarkConfig) -> dict[str, MethodSettings]:
    """Every registered method not excluded plus the profile's variants, with their settings resolved
    (preset), checked against the registry."""
    from medpretrain.methods import get_method, list_methods

    registered = {m.name for m in list_methods()}
    for name in [*cfg.exclude, *(cfg.only or [])]:
        if name != SCRATCH:
            get_method(name)  # ConfigError listing the registered methods
    if cfg.only is not None:
        registered &= set(cfg.only)
    for name, settings in cfg.methods.items():
        if SNAPSHOT_SEP in name:
            raise ConfigError(f"benchmark method '{name}': '{SNAPSHOT_SEP}' marks snapshot arms (snapshots: [...]); "
                              "rename the entry")
        if name == SCRATCH:
            raise ConfigError("benchmark methods: 'scratch' always runs with the backbone's budget and takes no "
                              "settings; remove its entry")
        if settings.method is None and name not in registered:
            raise ConfigError(f"benchmark method '{name}' is not a registered method (registered: "
                              f"{', '.join(sorted(registered))}); to add a variant of one, give it "
                              f"'method: <registered name>'")
        if settings.method not in (None, name) and name in registered:
            raise ConfigError(f"benchmark method '{name}' is a registered method and cannot run "
                              f"'{settings.method}'; give the variant a name of its own")
        get_method(_base(name, settings))  # ConfigError listing the registered methods
    names = sorted(registered - set(cfg.exclude)) + sorted(
        n for n, s in cfg.methods.items() if s.method is not None and n not in registered and n not in cfg.exclude)
    methods = {}
    for name in names:
        settings = cfg.methods.get(name, MethodSettings())
        base = get_method(_base(name, settings))
        if settings.preset == "default":
            settings = settings.model_copy(update={"preset": cfg.preset if cfg.preset in base.presets else None})
        elif settings.preset is not None and settings.preset not in base.presets:
            raise ConfigError(f"benchmark method '{name}': no preset '{settings.preset}'; its presets: "
                              f"{', '.join(base.presets) or 'none'} (or preset: null for its defaults)")
        for b in settings.backbones or []:
            if b not in cfg.backbones:
                raise ConfigError(f"benchmark method '{name}' names backbone '{b}'; backbones: "
                                  f"{', '.join(cfg.backbones)}")
            if not base.supports(cfg.backbones[b].model):
                raise ConfigError(f"benchmark method '{name}' cannot pretrain '{cfg.backbones[b].model}' (backbone "
                                  f"'{b}'); it pretrains {', '.join(base.models)}")
        methods[name] = settings
    return methods


def _method_runs_on(name: str, settings: MethodSettings, backbone: str, model: str) -> bool:
    from medpretrain.methods import get_method

    if settings.backbones is not None:
        return backbone in settings.backbones
    return get_method(_base(name, settings)).supports(model)


def _n_label(n: int | str) -> str:
    return "all" if n == "all" else f"n{n}"


def plan(cfg: BenchmarkConfig, out: Path) -> list[Job]:
    """Every job of the benchmark, in an order that respects their dependencies."""
    from medpretrain.methods import get_method

    out = Path(out).resolve()  # absolute paths in the commands: the same job whatever the working folder
    cfg_dir = out / "configs"
    prepared, pool = out / "prepared" / "downstream", out / "prepared" / "pool"
    methods = _methods(cfg)
    jobs = [Job("prepare-downstream", "prepare",
                [["prepare", "--dataset", str(cfg.dataset), "--out", str(prepared), "--workers", str(cfg.workers),
                  "--config", str(cfg_dir / "preprocess-downstream.yaml")]],
                prepared / "manifest.json")]
    needs_pool = any(get_method(_base(m, s)).needs_data and _method_runs_on(m, s, b_name, b.model)
                     for m, s in methods.items() for b_name, b in cfg.backbones.items())
    if needs_pool:
        jobs.append(Job("prepare-pool", "prepare",
                        [["prepare", "--pool", str(out / "pool.json"), "--out", str(pool), "--workers",
                          str(cfg.workers), "--config", str(cfg_dir / "preprocess-pool.yaml")]],
                        pool / "manifest.json", needs=["prepare-downstream"]))
    pretrain_jobs: dict[tuple[str, str], Job] = {}
    shared: dict[tuple[str, str, str], Job] = {}
    for b_name, b in cfg.backbones.items():
        for m_name, m in methods.items():
            if not _method_runs_on(m_name, m, b_name, b.model):
                continue
            # Backbones that differ only in fine-tuning (e.g. a linear-probing twin with a frozen encoder)
            # share one pretraining.
            key = (m_name, b.model, json.dumps(b.pretrain, sort_keys=True))
            if key in shared:
                pretrain_jobs[(m_name, b_name)] = shared[key]
                continue
            base = get_method(_base(m_name, m))
            run = out / "pretrain" / f"{m_name}-{b_name}"
            cmd = ["pretrain", "--method", base.name, "--model", b.model, "--out", str(run),
                   "--config", str(cfg_dir / f"pretrain-{m_name}-{b_name}.yaml"), "--seed", str(cfg.pretrain_seed)]
            if m.preset:
                cmd += ["--preset", m.preset]
            if m.untrained:
                cmd += ["--untrained"]
            if base.needs_data:
                cmd += ["--data", str(pool)]
            job = Job(f"pretrain-{m_name}-{b_name}", "pretrain", [cmd], run / "model.pt",
                      needs=["prepare-pool"] if base.needs_data else [],
                      info={"method": m_name, "backbone": b_name, "run": str(run)})
            jobs.append(job)
            pretrain_jobs[(m_name, b_name)] = shared[key] = job
    from medpretrain.engine.snapshots import snapshot_path

    snapshot_jobs: dict[Path, Job] = {}

    def init_args(m_name: str, b_name: str) -> tuple[list[str], list[str]]:
        if m_name == SCRATCH:
            return [], []
        entry, _, step = m_name.partition(SNAPSHOT_SEP)
        pre = pretrain_jobs[(entry, b_name)]
        if not step:
            return ["--init", str(Path(pre.info["run"]) / "model.pt"), "--init-part", cfg.backbones[b_name].init_part], \
                [pre.name]
        # A snapshot arm waits for its snapshot file only, not for the end of the long pretraining: its
        # fine-tunings run beside the pretraining that is still going, and a session that ends mid-way keeps them.
        model = snapshot_path(pre.info["run"], int(step))
        if model not in snapshot_jobs:
            snapshot_jobs[model] = Job(f"snapshot-{pre.name.removeprefix('pretrain-')}{SNAPSHOT_SEP}{step}", WAIT, [],
                                       model, needs=[pre.name], info={"run": pre.info["run"], "step": int(step)})
            jobs.append(snapshot_jobs[model])
        return ["--init", str(model), "--init-part", cfg.backbones[b_name].init_part], [snapshot_jobs[model].name]

    arms = [(m_name, b_name) for b_name in cfg.backbones for m_name in [SCRATCH, *methods]
            if m_name == SCRATCH or (m_name, b_name) in pretrain_jobs]
    # Snapshot arms of a long pretraining, beside the arm of its final model.pt.
    arms += [(f"{m_name}{SNAPSHOT_SEP}{step}", b_name) for m_name, b_name in list(arms) if m_name != SCRATCH
             for step in methods[m_name].snapshots]
    # Validation grid first: one run per arm and learning rate, scored on the validation cases; a selection job
    # then writes the arm's fine-tuning config with the chosen value.
    selected: dict[tuple[str, str], Job] = {}
    if cfg.validation is None and (borrowing := [m for m, settings in methods.items() if settings.lr_from]):
        raise ConfigError(f"benchmark methods {borrowing}: lr_from takes another entry's validation choice, and "
                          "this profile has no validation grid; add 'validation:' or remove lr_from")
    if cfg.validation is not None:
        v = cfg.validation
        for m_name, b_name in arms:
            if SNAPSHOT_SEP in m_name and v.snapshots == "method":
                continue  # uses its method's choice (below)
            if m_name != SCRATCH and methods[m_name.partition(SNAPSHOT_SEP)[0]].untrained and v.controls == SCRATCH:
                continue  # the null control uses scratch's choice (below)
            if m_name != SCRATCH and methods[m_name.partition(SNAPSHOT_SEP)[0]].lr_from:
                continue  # uses another entry's choice (below)
            grid_runs, grid_jobs = [], []
            for lr in v.lr:
                run = out / "validation" / f"{m_name}-{b_name}-lr{lr:g}"
                init, init_needs = init_args(m_name, b_name)
                ft = ["finetune", "--data", str(prepared), "--out", str(run), "--seed", str(v.run_seed),
                      "--config", str(cfg_dir / f"finetune-{b_name}.yaml"), "--n-labeled", str(v.n_labeled),
                      "--lr", f"{lr:g}", *init]
                ev = ["evaluate", "--run", str(run), "--data", str(prepared), "--split", "validation",
                      "--overlays", "0"]
                curve = [[*ev, "--model-file", str(run / "curve" / curve_file_name(step)),
                          "--out", str(run / "curve" / f"eval-step{step:07d}")]
                         for step in (_curve_steps(cfg, cfg.backbones[b_name]) if v.curves else [])]
                job = Job(f"val-{m_name}-{b_name}-lr{lr:g}", "finetune", [ft, *curve, ev], run / "eval" / "metrics.json",
                          needs=["prepare-downstream", *init_needs],
                          info={"method": m_name, "backbone": b_name, "n_labeled": v.n_labeled, "seed": v.run_seed,
                                "run": str(run), "validation": True, "lr": lr})
                jobs.append(job)
                grid_runs.append(str(run))
                grid_jobs.append(job.name)
            target = cfg_dir / f"finetune-{b_name}-{m_name}.yaml"
            select = ["select-hparams", "--base", str(cfg_dir / f"finetune-{b_name}.yaml"), "--out", str(target),
                      *[a for r in grid_runs for a in ("--runs", r)]]
            if v.extend:
                select += ["--extend", str(v.extend), "--finetune-args", json.dumps(grid_finetune_args(ft))]
            sel = Job(f"select-{m_name}-{b_name}", "select", [select], target, needs=grid_jobs,
                      info={"method": m_name, "backbone": b_name})
            jobs.append(sel)
            selected[(m_name, b_name)] = sel
        graded = dict(selected)  # the arms that ran a grid of their own
        for m_name, b_name in arms:
            if (m_name, b_name) not in selected:
                base = m_name.partition(SNAPSHOT_SEP)[0]
                if source := base != SCRATCH and methods[base].lr_from:
                    if (source, b_name) not in graded:
                        raise ConfigError(f"benchmark method '{base}': lr_from '{source}' is not an entry with a "
                                          f"validation grid of its own on backbone '{b_name}' (those: "
                                          f"{', '.join(sorted(m for m, b in graded if b == b_name))}); name one of "
                                          "them (lr_from does not chain)")
                    base = source
                selected[(m_name, b_name)] = graded[(base if (base, b_name) in graded else SCRATCH, b_name)]
        if v.only:
            return _checked(jobs)
    # Seeds outermost: a partial benchmark has complete seeds rather than one method at every seed.
    for seed in cfg.seeds:
        for n in cfg.n_labeled:
            for m_name, b_name in sorted(arms, key=lambda a: list(cfg.backbones).index(a[1])):
                sizes = methods[m_name.partition(SNAPSHOT_SEP)[0]].n_labeled if m_name != SCRATCH else None
                if sizes is not None and n not in sizes:
                    continue  # the arm runs at other labelled-set sizes only (MethodSettings.n_labeled)
                b = cfg.backbones[b_name]
                run = out / "runs" / f"{m_name}-{b_name}-{_n_label(n)}-s{seed}"
                sel = selected.get((m_name, b_name))
                config = Path(sel.done_marker) if sel else cfg_dir / f"finetune-{b_name}.yaml"
                ft = ["finetune", "--data", str(prepared), "--out", str(run), "--seed", str(seed),
                      "--config", str(config)]
                ft += ["--fraction", "1.0"] if n == "all" else ["--n-labeled", str(n)]
                if _cases_set_aside(cfg, n) == 0:  # else the fine-tuning config sets the validation cases aside
                    ft += ["--validation-cases", "0"]
                init, init_needs = init_args(m_name, b_name)
                ft += init
                needs = ["prepare-downstream", *init_needs, *([sel.name] if sel else [])]
                curve = [["evaluate", "--run", str(run), "--data", str(prepared), "--overlays", "0",
                          "--model-file", str(run / "curve" / curve_file_name(step)),
                          "--out", str(run / "curve" / f"eval-step{step:07d}")]
                         for step in _curve_steps(cfg, b)]
                ev = ["evaluate", "--run", str(run), "--data", str(prepared), "--overlays", str(cfg.overlays),
                      *(["--original-space"] if cfg.original_space else [])]
                jobs.append(Job(run.name, "finetune", [ft, *curve, ev], run / "eval" / "metrics.json", needs=needs,
                                info={"method": m_name, "backbone": b_name, "n_labeled": n, "seed": seed,
                                      "run": str(run)}))
            if cfg.nnunet_scratch is not None:
                jobs.append(_nnunet_scratch_job(cfg, out, prepared, n, seed))
    return _checked(jobs)


def select_jobs(jobs: list[Job], patterns: list[str]) -> list[Job]:
    """The jobs whose names match any of the glob ``patterns``, with every job they need (transitively), in plan
    order: run one part of a profile now (e.g. one method's arms with ``'*volume-fusion*'``) and the rest later,
    in the same folder."""
    from fnmatch import fnmatchcase

    by_name = {j.name: j for j in jobs}
    chosen = {j.name for j in jobs if any(fnmatchcase(j.name, p) for p in patterns)}
    if not chosen:
        raise ConfigError(f"--jobs {' '.join(patterns)}: matches none of the benchmark's {len(jobs)} jobs (e.g. "
                          f"{', '.join(j.name for j in jobs[-3:])}); list them with --dry-run")
    stack = list(chosen)
    while stack:
        for need in by_name[stack.pop()].needs:
            if need not in chosen:
                chosen.add(need)
                stack.append(need)
    return [j for j in jobs if j.name in chosen]


def unneeded_jobs(jobs: list[Job]) -> set[str]:
    """Unfinished jobs whose every dependent is finished (or itself unneeded): their product is no longer needed.

    A benchmark folder restored from kept results (``benchmarks/keep_runs.py``: metrics, curves and choices,
    without checkpoints or prepared arrays) has its fine-tunings done but no ``model.pt`` of their pretrainings;
    those pretrainings, snapshots and preparations are not re-run unless an unfinished job still needs them."""
    dependents: dict[str, list[str]] = {j.name: [] for j in jobs}
    for j in jobs:
        for need in j.needs:
            dependents[need].append(j.name)
    settled = {j.name for j in jobs if j.done}  # finished, or not needed any more
    unneeded: set[str] = set()
    for j in reversed(jobs):  # plan order respects dependencies: a job's dependents are decided before it
        if j.name not in settled and dependents[j.name] and all(d in settled for d in dependents[j.name]):
            unneeded.add(j.name)
            settled.add(j.name)
    return unneeded


def _checked(jobs: list[Job]) -> list[Job]:
    names = {j.name for j in jobs}
    assert all(n in names for j in jobs for n in j.needs), "a job needs a job that is not planned"
    return jobs


def _nnunet_backbone(cfg: BenchmarkConfig) -> str:
    return (cfg.nnunet_scratch.backbone if cfg.nnunet_scratch and cfg.nnunet_scratch.backbone
            else next(iter(cfg.backbones)))


def _nnunet_scratch_job(cfg: BenchmarkConfig, out: Path, prepared: Path, n: int | str, seed: int) -> Job:
    """The ``nnunet-scratch`` run at labelled-set size ``n`` and ``seed``: nnU-Net's own training on the subset every
    arm gets, then our evaluation of its test predictions."""
    from medpretrain.interop.nnunet_scratch import ARM

    ns = cfg.nnunet_scratch
    assert ns is not None
    b_name = _nnunet_backbone(cfg)
    run = out / "runs" / f"{ARM}-{_n_label(n)}-s{seed}"
    cmd = ["nnunet-scratch", "--data", str(prepared), "--out", str(run), "--seed", str(seed)]
    cmd += ["--fraction", "1.0"] if n == "all" else ["--n-labeled", str(n)]
    aside = _cases_set_aside(cfg, n)
    if aside is not None:  # the cases the fine-tuning runs of this size set aside
        cmd += ["--validation-cases", str(aside), "--validation-seed", str(cfg.validation.seed)]
    needs = ["prepare-downstream"]
    if ns.iterations is not None:
        cmd += ["--iterations", str(ns.iterations)]
    elif ns.max_seconds == "scratch":
        scratch = out / "runs" / f"{SCRATCH}-{b_name}-{_n_label(n)}-s{seed}"
        cmd += ["--max-seconds-from", str(scratch)]
        needs.append(scratch.name)
    else:
        cmd += ["--max-seconds", f"{ns.max_seconds:g}"]
    cmd += ["--gpu-memory-target", f"{ns.gpu_memory_target:g}", "--workers", str(ns.workers),
            "--mirroring" if ns.mirroring else "--no-mirroring"]
    ev = ["evaluate", "--run", str(run), "--data", str(prepared), "--overlays", str(cfg.overlays)]
    return Job(run.name, "finetune", [cmd, ev], run / "eval" / "metrics.json", needs=needs,
               info={"method": ARM, "backbone": b_name, "n_labeled": n, "seed": seed, "run": str(run),
                     "nnunet": True})


def _cases_set_aside(cfg: BenchmarkConfig, n: int | str) -> int | None:
    """Training cases the runs of labelled-set size ``n`` set aside for validation: None without a validation
    grid, 0 for the ``all`` size with ``validation.all_includes_validation``."""
    if cfg.validation is None:
        return None
    return 0 if n == "all" and cfg.validation.all_includes_validation else cfg.validation.cases


def _curve_steps(cfg: BenchmarkConfig, b: BackboneBudget) -> list[int]:
    from medpretrain.config import FinetuneConfig

    return FinetuneConfig(steps=b.steps, curve_fractions=cfg.curve_fractions).curve_steps()


def _finetune_keys(cfg: BenchmarkConfig, b: BackboneBudget) -> dict[str, Any]:
    """Every fine-tuning run's config keys of backbone ``b`` (the validation arm's lr is set on top)."""
    keys = {**b.finetune, "model": b.model, "steps": b.steps, "patch": list(b.patch), "batch": b.batch,
            "lr": b.lr, "precision": b.precision}
    if cfg.curve_fractions:
        keys["curve_fractions"] = list(cfg.curve_fractions)
    if cfg.validation is not None:
        keys.update(validation_cases=cfg.validation.cases, validation_seed=cfg.validation.seed)
    return keys


def grid_finetune_args(command: list[str]) -> list[str]:
    """A validation grid run's ``finetune`` command without the verb, ``--out`` and ``--lr``: what a selection
    with ``extend`` runs again at another lr in another folder."""
    return [a for i, a in enumerate(command[1:]) if a not in ("--out", "--lr") and command[i] not in ("--out", "--lr")]


def select_hyperparameters(base: Path, runs: list[Path], out: Path, extend: int = 0,
                           finetune_args: list[str] | None = None) -> dict[str, Any]:
    """Choose among validation runs the one of best mean validation Dice (ties: the first listed) and write
    ``out``: the ``base`` fine-tuning config with that run's learning rate; ``out`` with ``.json`` beside it
    records every run's validation Dice, the validation cases and the choice.

    ``extend`` > 0: while the best lr is the largest (smallest) tried and fewer than ``extend`` extra runs were
    made, fine-tune once more at that lr times (divided by) the grid's outermost ratio on that side, with
    ``medpretrain finetune FINETUNE_ARGS --out ... --lr ...`` (the grid's own command), evaluate it on the
    validation cases, and choose again. An extra run already finished (an interrupted selection re-run) is
    reused; an interrupted one resumes from its checkpoint."""
    from medpretrain.engine.run_folder import read_run

    def score(run: Path) -> dict[str, Any]:
        metrics_path = Path(run) / "eval" / "metrics.json"
        failed = Path(run) / FAILED_EXTRA
        if failed.is_file():  # an extra run that did not train (e.g. diverged): the worst score, never chosen
            return {"run": str(run), **json.loads(failed.read_text(encoding="utf-8")), "validation_dice": None}
        if not metrics_path.is_file():
            raise ConfigError(f"validation run {run} has no eval/metrics.json; finish it (evaluate --split validation)")
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        info = read_run(run)
        return {"run": str(run), "lr": info["config"]["lr"], "validation_dice": metrics["overall"]["dice"]["mean"],
                "validation_cases": info.get("validation_cases", [])}

    scores = [score(Path(r)) for r in runs]
    if extend:
        if len(scores) < 2:
            raise ConfigError(f"select-hparams --extend {extend}: needs a grid of at least 2 learning rates to step "
                              f"beyond its ends, got {len(scores)} run(s)")
        if finetune_args is None:
            raise ConfigError("select-hparams --extend needs --finetune-args (the grid's fine-tuning command)")
        if "--data" not in finetune_args:
            raise ConfigError(f"select-hparams --finetune-args {finetune_args}: has no --data (the prepared folder "
                              "the grid fine-tuned on)")
    extra = 0
    while True:
        scored = [s for s in scores if s["validation_dice"] is not None]
        best = max(scored, key=lambda s: (s["validation_dice"], -scores.index(s)))
        lrs = sorted(s["lr"] for s in scores)
        if extra >= extend or best["lr"] not in (lrs[0], lrs[-1]) or scored[-1] is not scores[-1]:
            break  # inside the grid, out of extensions, or the last step beyond failed: no further that way
        next_lr = lrs[-1] ** 2 / lrs[-2] if best["lr"] == lrs[-1] else lrs[0] ** 2 / lrs[1]
        next_lr = float(f"{next_lr:.3g}")
        if not (next_lr > lrs[-1] or next_lr < lrs[0]):
            break  # grid values so close that the rounded step lands inside: nothing new to try
        stem = Path(best["run"]).name.rsplit("-lr", 1)[0]
        run = Path(best["run"]).parent / f"{stem}-lr{next_lr:g}"
        # The grid's runs scored their learning-curve exports (validation.curves): so does the extra run.
        curves = any(any((Path(s["run"]) / "curve").glob("eval-step*/metrics.json")) for s in scores)
        _extra_validation_run(run, next_lr, finetune_args, curves=curves)
        scores.append({**score(run), "extended": True})
        extra += 1
    values = read_yaml_mapping(base, "fine-tuning config")
    values["lr"] = best["lr"]
    chosen = {"chosen": {"lr": best["lr"]}, "runs": scores}
    if extend:
        chosen["extend"] = {"allowed": extend, "made": extra,
                            "edge": best["lr"] in (min(s["lr"] for s in scores), max(s["lr"] for s in scores))}
    atomic_write_json(Path(out).with_suffix(".json"), chosen)
    atomic_write_text(Path(out), yaml.safe_dump(values, sort_keys=True))
    return chosen


def _extra_validation_run(run: Path, lr: float, finetune_args: list[str], curves: bool = False) -> None:
    """One more validation run of the grid at ``lr``: the grid's fine-tuning command, then its evaluation on the
    validation cases (and, with ``curves``, of each learning-curve export), each in a child process like the
    benchmark's own jobs (skipped when already done).

    A fine-tuning that fails (a larger lr diverging, most likely) is recorded in ``RUN/extra_run_failed.json`` and
    scored as the worst run rather than failing the selection: re-trying it would only diverge again. An interrupt
    (the driver stopping its jobs: SIGINT to the process group, which the fine-tuning child receives too) waits for
    the child to stop cleanly before passing on."""
    if (run / "eval" / "metrics.json").is_file() or (run / FAILED_EXTRA).is_file():
        return
    data = finetune_args[finetune_args.index("--data") + 1]

    def child(cmd: list[str]) -> int:
        log.info("validation grid extended: medpretrain %s", " ".join(cmd))
        proc = subprocess.Popen([sys.executable, "-m", "medpretrain", *cmd], stdin=subprocess.DEVNULL)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            try:
                proc.wait(timeout=50)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise

    if not (run / "model.pt").is_file():
        resume = ["--resume"] if any((run / "checkpoints").glob("*.ckpt")) else []
        cmd = ["finetune", *finetune_args, "--out", str(run), "--lr", f"{lr:g}", *resume]
        code = child(cmd)
        if code != 0:
            log.warning("validation run %s at lr %g failed (exit %d): scored as the worst, not chosen", run, lr, code)
            atomic_write_json(run / FAILED_EXTRA, {"lr": lr, "failed": f"exit {code}: medpretrain {' '.join(cmd)}"})
            return
    ev = ["evaluate", "--run", str(run), "--data", data, "--split", "validation", "--overlays", "0"]
    evaluations = []
    if curves:  # the learning-curve exports, scored like the grid's own (validation.curves)
        for model in sorted((run / "curve").glob("model_step*.pt")):
            eval_dir = run / "curve" / f"eval-step{int(model.stem.removeprefix('model_step')):07d}"
            if not (eval_dir / "metrics.json").is_file():
                evaluations.append([*ev, "--model-file", str(model), "--out", str(eval_dir)])
    for cmd in [*evaluations, ev]:
        code = child(cmd)
        if code != 0:
            raise ConfigError(f"validation run {run} at lr {lr:g}: evaluation failed (exit {code}): "
                              f"medpretrain {' '.join(cmd)}")


def job_files(cfg: BenchmarkConfig, out: Path, methods: dict[str, MethodSettings]) -> dict[Path, str]:
    """The files the jobs' commands read, by path: one YAML per budget, and the pool list."""
    from medpretrain.data.datasets import discover_dataset, discover_pool

    cfg_dir = out / "configs"
    files: dict[Path, str] = {}

    def dump(name: str, values: dict) -> None:
        files[cfg_dir / name] = yaml.safe_dump(json.loads(json.dumps(values)), sort_keys=True)

    dump("preprocess-downstream.yaml", cfg.preprocess)
    for b_name, b in cfg.backbones.items():
        dump(f"finetune-{b_name}.yaml", _finetune_keys(cfg, b))
        for m_name, m in methods.items():
            if _method_runs_on(m_name, m, b_name, b.model):
                dump(f"pretrain-{m_name}-{b_name}.yaml",
                     {**b.pretrain, **m.config, **({"steps": m.steps} if m.steps else {}),
                      **({"export_steps": list(m.snapshots)} if m.snapshots else {})})
    pool_pre = cfg.pool_preprocess
    if pool_pre is None:
        spacing = cfg.preprocess.get("spacing")
        pool_pre = {"spacing": spacing} if spacing else {}
    dump("preprocess-pool.yaml", pool_pre)
    entries = []
    for source in cfg.pool:
        entries += [{"image": str(Path(p).resolve()), **({"modality": c.modality} if c.modality else {})}
                    for c in discover_pool(source) for p in c.images[:1]]
    if cfg.pool_add_downstream_train:
        ds = discover_dataset(cfg.dataset)
        train = set(ds.split["train"]) if ds.split else None
        modality = cfg.preprocess.get("modality") or ds.modality
        for c in ds.cases:
            # Without a split file the benchmark's split is drawn at prepare time; the pool then takes the
            # cases the prepared manifest puts in train (read below, once it exists).
            if train is None or c.case_id in train:
                entries.append({"image": str(Path(c.images[0]).resolve()), **({"modality": modality} if modality else {})})
    if entries:
        files[out / "pool.json"] = json.dumps(entries, indent=1) + "\n"
    return files


def _restrict_pool_to_prepared_train(out: Path) -> None:
    """Drop downstream test images from the pool list when the split was drawn at prepare time."""
    manifest = json.loads((out / "prepared" / "downstream" / "manifest.json").read_text(encoding="utf-8"))
    entries = json.loads((out / "pool.json").read_text(encoding="utf-8"))
    test = set(manifest["split"].get("test", []))
    sources = {cid: c.get("source_image", []) for cid, c in manifest["cases"].items()} if test else {}
    test_files = {str(Path(p).resolve()) for cid in test for p in sources.get(cid, [])}
    if test_files:
        atomic_write_json(out / "pool.json", [e for e in entries if e["image"] not in test_files])


# --- running -------------------------------------------------------------------------------------------------


def _threads_per_job(parallel: int) -> int:
    return max(1, (os.cpu_count() or 1) // parallel)


def _check_recorded_commands(jobs: list[Job], out: Path, files: dict[Path, str], record: bool = True) -> dict[str, list]:
    """Refuse to mix results made with other settings into this benchmark's folder; ``record`` = note the
    finished jobs' settings in ``jobs.json``."""
    path = out / "jobs.json"
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def signature(job: Job) -> list:
        # The commands plus what the files they read hold: a changed budget or pool is a changed job. Options
        # that change only speed or extra outputs (--workers, --overlays) are not part of it.
        sig: list = []
        for cmd in job.commands:
            kept = [a for i, a in enumerate(cmd) if a not in ("--workers", "--overlays")
                    and (i == 0 or cmd[i - 1] not in ("--workers", "--overlays"))]
            read = [cmd[i + 1] for i, a in enumerate(cmd) if a in ("--config", "--pool")]
            sig.append([kept, [files.get(Path(f), "") for f in read]])
        return sig

    current = {j.name: signature(j) for j in jobs}
    changed = [j.name for j in jobs if j.name in recorded
               and _without_output_only(recorded[j.name]) != _without_output_only(current[j.name])]
    if changed:
        raise ConfigError(
            f"{out}: job(s) {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} were run with other "
            "settings; use another --out, or delete those jobs' folders and their entries in jobs.json"
        )
    if record:
        # Record the finished jobs now and the others when they start: unstarted jobs stay free to change.
        recorded.update({j.name: current[j.name] for j in jobs if j.done})
        atomic_write_json(path, recorded)
    return current


# Settings of a job's --config file that add outputs without changing its network: a snapshot step added to a
# budget curve after its pretraining ran (written then from a kept checkpoint: `medpretrain snapshot`) leaves the
# finished pretraining valid.
_OUTPUT_ONLY_SETTINGS = ("export_steps",)


def _without_output_only(signature: list) -> list:
    """A job signature with the output-only settings of the config files it read left out (compared, not stored:
    signatures recorded before this rule compare the same way)."""
    def settings(text: str):
        try:
            values = yaml.safe_load(text) if text else text
        except yaml.YAMLError:
            return text
        if not isinstance(values, dict):
            return text
        return {k: v for k, v in values.items() if k not in _OUTPUT_ONLY_SETTINGS}

    return [[cmd, [settings(t) for t in read]] for cmd, read in signature]


def _not_written(job: Job) -> str:
    """Why a wait job failed whose writers all finished (a snapshot: how to write it after the fact)."""
    why = f"{', '.join(job.needs)} finished without writing {job.done_marker}"
    if "step" in job.info:
        why += (" (a snapshot step added after the run passed it: write it from a kept checkpoint, "
                f"`medpretrain snapshot --run {job.info['run']} --checkpoint CKPT`)")
    return why


def _record_started(out: Path, name: str, signature: list) -> None:
    path = out / "jobs.json"
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    recorded[name] = signature
    atomic_write_json(path, recorded)


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class _Runner:
    """Runs jobs in up to ``parallel`` child processes, respecting dependencies, with a progress line per job.

    Children run in their own process groups (so a terminal's Ctrl-C reaches the driver only, which then stops
    them in order); any exit of the driver, an error or a signal included, stops and reaps them first.
    """

    def __init__(self, jobs: list[Job], out: Path, parallel: int, signatures: dict[str, list],
                 time_limit: float | None = None):
        self.jobs = {j.name: j for j in jobs}
        self.out = out
        self.parallel = parallel
        self.signatures = signatures
        self.failed: dict[str, str] = {}
        self.durations: dict[tuple[str, str | None], list[float]] = {}  # by (kind, backbone)
        self.trained: set[str] = set()  # jobs whose run includes their first command (not evaluate-only)
        self.running: dict[str, tuple[subprocess.Popen, float, int, Any]] = {}
        self.deadline = None if time_limit is None else time.monotonic() + time_limit
        self.deferred: list[str] = []  # left for the next run by the time limit
        # Jobs of this folder finished by earlier runs (OUT/timings.json: start to end, evaluation included) time
        # the rest from the start: the ETA, and what fits in a time limit.
        self.timings: dict[str, float] = {}
        with contextlib.suppress(OSError, ValueError):
            self.timings = {k: float(v) for k, v in
                            json.loads((out / TIMINGS).read_text(encoding="utf-8")).items()}
        for j in jobs:
            if j.done and j.name in self.timings:
                self.durations.setdefault((j.kind, j.info.get("backbone")), []).append(self.timings[j.name])

    def _expected_seconds(self, job: Job) -> float | None:
        known = self.durations.get((job.kind, job.info.get("backbone")))
        return sum(known) / len(known) if known else None

    def _defer(self, pending: list[Job]) -> None:
        """Under a time limit: leave for the next run every pending job that would not end before the deadline
        (by the mean duration of its kind and backbone so far; a job of a kind not timed yet is started), and
        every job that needs a deferred one."""
        if self.deadline is None:
            return
        left = self.deadline - time.monotonic()
        changed = True
        while changed:
            changed = False
            for job in list(pending):
                expected = self._expected_seconds(job) if job.kind != WAIT else None
                waits_on_deferred = any(n in self.deferred for n in job.needs)
                ready = all(self.jobs[n].done for n in job.needs)
                if waits_on_deferred or (job.kind != WAIT and ready and (
                        left <= 0 or (expected is not None and expected > left))):
                    pending.remove(job)
                    self.deferred.append(job.name)
                    changed = True

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if "OMP_NUM_THREADS" not in os.environ and self.parallel > 1:
            env["OMP_NUM_THREADS"] = str(_threads_per_job(self.parallel))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _start(self, job: Job, step: int) -> None:
        args = job.commands[step]
        if args[0] == "nnunet-scratch":
            from medpretrain.interop.nnunet_scratch import is_finished

            if is_finished(Path(args[args.index("--out") + 1])):
                step, args = step + 1, job.commands[step + 1]  # trained and predicted already: evaluate only
        elif args[0] in ("finetune", "pretrain"):
            run = Path(args[args.index("--out") + 1])
            if args[0] == "finetune" and (run / "model.pt").exists():
                step, args = step + 1, job.commands[step + 1]  # trained already: evaluate only
            elif (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("*.ckpt")):
                args = [*args, "--resume"]  # an interrupted training continues from its last checkpoint
        if step == 0:
            self.trained.add(job.name)
            _record_started(self.out, job.name, self.signatures[job.name])
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        fh = open(logs / f"{job.name}.log", "a", encoding="utf-8")
        fh.write(f"$ medpretrain {' '.join(args)}\n")
        fh.flush()
        start = self.running[job.name][1] if job.name in self.running else time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "medpretrain", *args], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=self._env(), start_new_session=True,
                                preexec_fn=_default_sigint)
        self.running[job.name] = (proc, start, step, fh)

    def _eta(self, remaining: list[Job]) -> str:
        # Per (kind, backbone): a PCT-Net fine-tuning takes several times a U-Net's; a backbone not timed yet
        # borrows the mean of its kind.
        by_kind: dict[str, list[float]] = {}
        for (kind, _), v in self.durations.items():
            by_kind.setdefault(kind, []).extend(v)
        if not all(j.kind in by_kind for j in remaining):
            return "ETA after the first job of each kind"
        seconds = sum(self._expected_seconds(j) or sum(by_kind[j.kind]) / len(by_kind[j.kind]) for j in remaining)
        return "ETA " + _fmt_s(seconds / self.parallel)

    def _stop_children(self) -> None:
        for proc, _, _, _ in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)  # Lightning saves nothing half-written on SIGINT
        deadline = time.monotonic() + 60
        for proc, _, _, fh in self.running.values():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            fh.close()
        self.running.clear()

    def run(self) -> None:
        todo = [j for j in self.jobs.values() if not j.done]
        total = sum(j.kind != WAIT for j in self.jobs.values())
        finished = total - sum(j.kind != WAIT for j in todo)
        todo_count = len(todo) - sum(j.kind == WAIT for j in todo)
        log.info("benchmark: %d job(s), %d done already, %d to run, %d at a time", total, finished, todo_count,
                 self.parallel)
        pending = list(todo)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            while pending or self.running:
                if self.deadline is not None and time.monotonic() >= self.deadline and self.running:
                    log.warning("time limit reached: stopping %d running job(s) at their last checkpoint (%s)",
                                len(self.running), ", ".join(self.running))
                    self.deferred += list(self.running)
                    self._stop_children()
                    self.deferred += [j.name for j in pending]
                    pending.clear()
                    break
                for name in list(self.running):
                    proc, start, step, fh = self.running[name]
                    if proc.poll() is None:
                        continue
                    fh.close()
                    job = self.jobs[name]
                    if proc.returncode == 0 and step + 1 < len(job.commands):
                        self._start(job, step + 1)
                        continue
                    del self.running[name]
                    if proc.returncode != 0 or not job.done:
                        why = (f"exit code {proc.returncode}" if proc.returncode != 0
                               else f"finished without writing {job.done_marker}")
                        self.failed[name] = f"{why}; see {self.out / 'logs' / (name + '.log')}"
                        finished += 1
                        log.error("[%d/%d] FAILED %s: %s", finished, total, name, self.failed[name])
                        continue
                    seconds = time.perf_counter() - start
                    if name in self.trained:  # evaluate-only jobs would make the ETA optimistic
                        self.durations.setdefault((job.kind, job.info.get("backbone")), []).append(seconds)
                        self.timings[name] = round(seconds, 1)
                        atomic_write_json(self.out / TIMINGS, self.timings)
                    finished += 1
                    left = [j for j in pending if j.kind != WAIT] + [self.jobs[n] for n in self.running]
                    log.info("[%d/%d] %s done in %s; %s", finished, total, name, _fmt_s(seconds), self._eta(left))
                for job in [j for j in pending if j.kind == WAIT]:
                    if job.done:
                        pending.remove(job)
                    elif any(n in self.failed for n in job.needs) or all(self.jobs[n].done for n in job.needs):
                        pending.remove(job)  # its writer failed, or finished without writing it
                        self.failed[job.name] = (_not_written(job) if all(self.jobs[n].done for n in job.needs) else
                                                 "skipped: " + ", ".join(n for n in job.needs if n in self.failed)
                                                 + " failed")
                        log.error("%s: %s", job.name, self.failed[job.name])
                if len(self.running) < self.parallel:
                    self._defer(pending)
                for job in list(pending):
                    if len(self.running) >= self.parallel:
                        break
                    if job.kind == WAIT:
                        continue
                    if any(n in self.failed for n in job.needs):
                        pending.remove(job)
                        self.failed[job.name] = "skipped: " + ", ".join(n for n in job.needs if n in self.failed) \
                            + " failed"
                        finished += 1
                        log.warning("[%d/%d] skipped %s: %s", finished, total, job.name, self.failed[job.name])
                        continue
                    if all(self.jobs[n].done for n in job.needs):
                        pending.remove(job)
                        if job.name == "prepare-pool":
                            _restrict_pool_to_prepared_train(self.out)
                        self._start(job, 0)
                if not self.running and pending and not any(
                        all(self.jobs[n].done for n in j.needs) or any(n in self.failed for n in j.needs)
                        for j in pending):
                    raise MedpretrainError(f"benchmark stuck: {', '.join(j.name for j in pending[:5])} wait for "
                                           "jobs that are neither done nor running")
                time.sleep(0.5)
        except KeyboardInterrupt:
            log.warning("interrupted: stopping %d running job(s); re-run the same command to continue (finished "
                        "jobs are kept, interrupted trainings resume from their last checkpoint)", len(self.running))
            raise
        finally:
            self._stop_children()
            signal.signal(signal.SIGTERM, previous)
        if self.deferred:
            log.warning("time limit: %d job(s) left for the next run (%s); re-run the same command to continue",
                        len(self.deferred), ", ".join(self.deferred[:5]) + (" ..." if len(self.deferred) > 5 else ""))


def _default_sigint() -> None:
    # A driver started in the background (`nohup ... &`) inherits an ignored SIGINT and would pass that on,
    # so the SIGINT that stops a job cleanly (Lightning saves nothing half-written) would be ignored and the
    # job killed after the grace period instead.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _validate_job_settings(cfg: BenchmarkConfig, methods: dict[str, MethodSettings]) -> None:
    """Check every job's settings before the first job starts, not an hour into the run."""
    from medpretrain.config import FinetuneConfig
    from medpretrain.data.preprocess import PreprocessConfig
    from medpretrain.engine.pretrain import pretrain_config
    from medpretrain.models import get_spec

    make_config(PreprocessConfig, cfg.preprocess, "the benchmark's preprocess")
    if cfg.pool_preprocess is not None:
        make_config(PreprocessConfig, cfg.pool_preprocess, "the benchmark's pool_preprocess")
    for b_name, b in cfg.backbones.items():
        if {"n_labeled", "fraction", "seed", "init"} & set(b.finetune):
            raise ConfigError(f"backbone '{b_name}': finetune sets n_labeled/fraction/seed/init, which the benchmark "
                              "sets per run; remove them")
        ft = make_config(FinetuneConfig, _finetune_keys(cfg, b), f"backbone '{b_name}'")
        get_spec(ft.model).check_patch(ft.patch, ft.model_options)
        for m_name, m in methods.items():
            if _method_runs_on(m_name, m, b_name, b.model):
                pre = pretrain_config(_base(m_name, m), None, m.preset, {**b.pretrain, **m.config, "model": b.model,
                                                                **({"steps": m.steps} if m.steps else {})})
                get_spec(pre.model).check_patch(pre.patch, pre.model_options)
                if late := [s for s in m.snapshots if s >= pre.steps]:
                    raise ConfigError(f"benchmark method '{m_name}': snapshots {late} are not below its {pre.steps} "
                                      "pretraining steps (the run's own model.pt is the arm of its last step); list "
                                      "earlier steps or raise steps")


def parse_duration(text: str) -> float:
    """Seconds from ``3600``, ``90s``, ``170m``, ``2h50m`` or ``1h30m15s``."""
    import re

    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", t)
    if not t or not m:
        raise ConfigError(f"time limit {text!r}: give seconds (3600) or hours/minutes/seconds (2h50m, 170m, 90s)")
    h, mi, se = (int(g) if g else 0 for g in m.groups())
    return float(h * 3600 + mi * 60 + se)


def run_benchmark(config: str | Path | BenchmarkConfig, out: str | Path, parallel: int | None = None,
                  dry_run: bool = False, report_only: bool = False, select: list[str] | None = None,
                  time_limit: float | None = None) -> Path:
    """Run (or continue) a benchmark and write its report.

    Args:
        config: a ``BenchmarkConfig`` or the path of its YAML.
        out: the benchmark's folder (prepared data, pretrained checkpoints, runs, logs, report).
        parallel: override of ``config.parallel``.
        dry_run: print the jobs and their commands, run nothing.
        report_only: write the report of the runs finished so far (e.g. while the benchmark runs, or after
            stopping it), run nothing.
        select: run only the jobs whose names match these globs, and the jobs they need (``select_jobs``); the
            report still covers every finished job of the folder.
        time_limit: seconds this run may take (a session, a cluster job's walltime): a job is not started when
            the mean duration of finished jobs of its kind and backbone says it would end after the limit (a kind
            not timed yet is started), and at the limit the running jobs stop at their last checkpoint. What is
            left runs on the next call of the same command; the report covers what finished.

    Returns:
        The path of ``report.md``.
    """
    cfg = config if isinstance(config, BenchmarkConfig) else load_benchmark_config(config)
    if parallel is not None:
        cfg = make_config(BenchmarkConfig, {**cfg.model_dump(), "parallel": parallel}, "--parallel")
    out = Path(out).resolve()
    if not Path(cfg.dataset).exists():
        raise ConfigError(f"benchmark dataset {cfg.dataset} does not exist (paths are relative to the current folder)")
    jobs = plan(cfg, out)
    unneeded = unneeded_jobs(jobs)
    # Select in the whole plan, then drop what is not needed: a selected job that is finished may need one that
    # is not needed any more, and a still-needed unfinished job never needs an unneeded one.
    runnable = [j for j in (select_jobs(jobs, select) if select else jobs) if j.name not in unneeded]
    if dry_run:
        for j in jobs:
            state = "done" if j.done else "unneeded" if j.name in unneeded else "todo" if j in runnable else "-"
            print(f"{state:8s}  {j.name}")
            for c in j.commands:
                print("      medpretrain " + " ".join(c))
        return out / "report.md"
    out.mkdir(parents=True, exist_ok=True)
    methods = _methods(cfg)
    files = job_files(cfg, out, methods)
    if any("prepare-pool" in j.needs for j in jobs) and (out / "pool.json") not in files:
        raise ConfigError("the benchmark's methods "
                          f"{sorted({j.info['method'] for j in jobs if 'prepare-pool' in j.needs})} need an unlabelled "
                          "pool: list sources under 'pool:' or set pool_add_downstream_train: true")
    _validate_job_settings(cfg, methods)
    if report_only:  # reads only: a benchmark may be running in this folder
        _check_recorded_commands(jobs, out, files, record=False)
        return _write_report(cfg, out, jobs, methods, {})
    if any(j.info.get("nnunet") and not j.done for j in jobs):
        from medpretrain.interop.nnunet_scratch import require_nnunet

        require_nnunet()  # the arm needs nnU-Net v2: say so now, not when its first job fails
    from medpretrain.engine.run_folder import run_folder_lock

    with run_folder_lock(out, "benchmark"):
        signatures = _check_recorded_commands(jobs, out, files)  # before writing: a refused run changes nothing
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.name != "pool.json" or not (out / "prepared" / "pool" / "manifest.json").exists():
                atomic_write_text(path, text)
        atomic_write_json(out / "benchmark.json", json.loads(cfg.model_dump_json()))
        if unneeded:
            log.info("benchmark: %d unfinished job(s) not needed any more (every job that needs them is finished): "
                     "%s", len(unneeded), ", ".join(sorted(unneeded)[:5]) + (" ..." if len(unneeded) > 5 else ""))
        runner = _Runner(runnable, out, cfg.parallel, signatures, time_limit=time_limit)
        runner.run()
    report = _write_report(cfg, out, jobs, methods, runner.failed)
    if runner.failed:
        raise MedpretrainError(f"{len(runner.failed)} job(s) failed or were skipped "
                               f"({', '.join(list(runner.failed)[:5])}); the report covers the finished ones: "
                               f"{report}. Fix the cause (logs in {out / 'logs'}) and re-run the same command")
    return report


def _write_report(cfg: BenchmarkConfig, out: Path, jobs: list[Job], methods: dict[str, MethodSettings],
                  failed: dict[str, str]) -> Path:
    from medpretrain.evaluation.benchmark_report import write_benchmark_report
    from medpretrain.methods import get_method

    not_run = {m: [b for b, bb in cfg.backbones.items() if not _method_runs_on(m, s, b, bb.model)]
               for m, s in methods.items()}
    notes = [f"{m}: not run on backbone(s) {', '.join(bs)} (" + (
        f"the profile gives it {', '.join(methods[m].backbones)}" if methods[m].backbones is not None else
        f"it pretrains {', '.join(get_method(_base(m, methods[m])).models) or 'any network'}") + ")"
             for m, bs in not_run.items() if bs]
    notes += [f"{m}: " + (f"the null control: {s.method}'s network as its pretraining starts it, exported untrained "
                          f"(seed {cfg.pretrain_seed})" if s.untrained
                          else f"variant of {s.method} with {json.dumps(s.config, sort_keys=True)}")
              for m, s in methods.items() if s.method is not None]
    if cfg.validation is not None:
        notes.append(f"learning rate: chosen per arm on {cfg.validation.cases} validation cases (grid "
                     f"{', '.join(f'{x:g}' for x in cfg.validation.lr)}; see below), not the budget table's lr"
                     + ("; the null control uses scratch's (validation.controls: scratch)"
                        if cfg.validation.controls == SCRATCH else "")
                     + "".join(f"; {m} (snapshots included) uses {s.lr_from}'s (lr_from)"
                               for m, s in methods.items() if s.lr_from))
    if cfg.original_space:
        notes.append("every test evaluation is also scored in the source files' geometry (the predictions mapped back "
                     "as `predict` writes them, against the label files as distributed): tables at the end")
    notes += [f"excluded by the profile: {', '.join(cfg.exclude)}"] if cfg.exclude else []
    ns = cfg.nnunet_scratch
    if ns is not None:
        budget = (f"{ns.iterations} iterations" if ns.iterations is not None else
                  "the training wall time of the paired scratch run (same n and seed)" if ns.max_seconds == "scratch"
                  else f"{ns.max_seconds:g} s of training")
        notes.append(f"nnunet-scratch: nnU-Net v2 itself (its planning with a {ns.gpu_memory_target:g} GB memory "
                     f"target, preprocessing, trainer, predictor{' with mirroring' if ns.mirroring else ''}) from "
                     f"scratch on the same labelled cases, CPU, budget {budget}; its own patch, batch, network and lr "
                     f"(runs/nnunet-scratch-*/run.json), scored with our metrics on the prepared grid; paired with "
                     f"scratch of backbone {_nnunet_backbone(cfg)}")
    return write_benchmark_report(cfg, out, [j for j in jobs if j.kind == "finetune" and not j.info.get("validation")],
                                  [j for j in jobs if j.kind == "pretrain"], failed, notes,
                                  validation_jobs=[j for j in jobs if j.info.get("validation")])
