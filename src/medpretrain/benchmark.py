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
one-thread trainings do more work per hour than one two-thread training (measured by
``benchmarks/parallel_lanes.py``, ``docs/results/benchmark/parallel_lanes.json``).
"""

from __future__ import annotations

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
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from medpretrain.atomic import atomic_write_json, atomic_write_text
from medpretrain.config import make_config
from medpretrain.errors import ConfigError, MedpretrainError

log = logging.getLogger("medpretrain")

SCRATCH = "scratch"


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
        preset: the method's named settings (``medpretrain methods``); None = its defaults.
        steps: pretraining steps (None = the preset's).
        config: further keys of the method's config (as in a ``pretrain --config`` YAML).
        backbones: the backbones it is run with (None = every backbone the method supports).
    """

    preset: str | None = "cpu"
    steps: int | None = None
    config: dict[str, Any] = {}
    backbones: list[str] | None = None


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
        methods: method -> settings; None = ``scratch`` and every registered method (a method registered
            later joins without editing this code). ``scratch`` is always run.
        n_labeled: labelled-set sizes; ``all`` = every training case.
        seeds: seeds of initialisation, labelled subset and patches.
        parallel: jobs run side by side (each with ``cores / parallel`` threads).
        overlays: overlay PNGs per evaluated run (half best, half worst cases).
        workers: processes for data preparation.
    """

    name: str
    dataset: Path
    preprocess: dict[str, Any] = {}
    pool: list[str] = []
    pool_add_downstream_train: bool = True
    pool_preprocess: dict[str, Any] | None = None
    backbones: dict[str, BackboneBudget]
    methods: dict[str, MethodSettings] | None = None
    n_labeled: list[int | Literal["all"]] = [2, 4, 8, "all"]
    seeds: list[int] = [0, 1, 2]
    parallel: int = 1
    overlays: int = 2
    workers: int = 2

    @field_validator("n_labeled")
    @classmethod
    def _sizes(cls, v):
        if not v or any(isinstance(n, int) and n < 1 for n in v):
            raise ValueError(f"n_labeled must list sizes >= 1 or 'all', got {v}")
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
        return self


def load_benchmark_config(path: str | Path, overrides: dict[str, Any] | None = None) -> BenchmarkConfig:
    """Read and validate a benchmark YAML; ConfigError naming the file, key and valid keys otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"benchmark config {path} does not exist (profiles: benchmarks/*.yaml)")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse YAML benchmark config {path}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"benchmark config {path} must hold a mapping of keys to values")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return make_config(BenchmarkConfig, values, str(path))


# --- the plan ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One command of the benchmark.

    Attributes:
        name: unique name (also its log file name).
        kind: ``prepare``, ``pretrain`` or ``finetune`` (fine-tuning then evaluation).
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


def _methods(cfg: BenchmarkConfig) -> dict[str, MethodSettings]:
    from medpretrain.methods import get_method, list_methods

    if cfg.methods is None:
        methods = {m.name: MethodSettings() for m in list_methods()}
    else:
        methods = {k: v for k, v in cfg.methods.items() if k != SCRATCH}
        for name in methods:
            get_method(name)  # ConfigError listing the registered methods
    for name, settings in methods.items():
        presets = get_method(name).presets
        if settings.preset is not None and settings.preset not in presets:
            raise ConfigError(f"benchmark method '{name}': no preset '{settings.preset}'; its presets: "
                              f"{', '.join(presets) or 'none'} (or preset: null for its defaults)")
        for b in settings.backbones or []:
            if b not in cfg.backbones:
                raise ConfigError(f"benchmark method '{name}' names backbone '{b}'; backbones: "
                                  f"{', '.join(cfg.backbones)}")
    return methods


def _method_runs_on(name: str, settings: MethodSettings, backbone: str, model: str) -> bool:
    from medpretrain.methods import get_method

    if settings.backbones is not None:
        return backbone in settings.backbones
    return get_method(name).supports(model)


def _n_label(n: int | str) -> str:
    return "all" if n == "all" else f"n{n}"


def plan(cfg: BenchmarkConfig, out: Path) -> list[Job]:
    """Every job of the benchmark, in an order that respects their dependencies."""
    from medpretrain.methods import get_method

    out = Path(out)
    cfg_dir = out / "configs"
    prepared, pool = out / "prepared" / "downstream", out / "prepared" / "pool"
    methods = _methods(cfg)
    jobs = [Job("prepare-downstream", "prepare",
                [["prepare", "--dataset", str(cfg.dataset), "--out", str(prepared), "--workers", str(cfg.workers),
                  "--config", str(cfg_dir / "preprocess-downstream.yaml")]],
                prepared / "manifest.json")]
    needs_pool = any(get_method(m).needs_data for m in methods)
    if needs_pool:
        jobs.append(Job("prepare-pool", "prepare",
                        [["prepare", "--pool", str(out / "pool.json"), "--out", str(pool), "--workers",
                          str(cfg.workers), "--config", str(cfg_dir / "preprocess-pool.yaml")]],
                        pool / "manifest.json", needs=["prepare-downstream"]))
    for b_name, b in cfg.backbones.items():
        for m_name, m in methods.items():
            if not _method_runs_on(m_name, m, b_name, b.model):
                continue
            run = out / "pretrain" / f"{m_name}-{b_name}"
            cmd = ["pretrain", "--method", m_name, "--model", b.model, "--out", str(run),
                   "--config", str(cfg_dir / f"pretrain-{m_name}-{b_name}.yaml")]
            if m.preset:
                cmd += ["--preset", m.preset]
            if get_method(m_name).needs_data:
                cmd += ["--data", str(pool)]
            jobs.append(Job(f"pretrain-{m_name}-{b_name}", "pretrain", [cmd], run / "model.pt",
                            needs=["prepare-pool"] if get_method(m_name).needs_data else [],
                            info={"method": m_name, "backbone": b_name, "run": str(run)}))
    pretrain_jobs = {(j.info["method"], j.info["backbone"]): j for j in jobs if j.kind == "pretrain"}
    # Seeds outermost: a partial benchmark has complete seeds rather than one method at every seed.
    for seed in cfg.seeds:
        for n in cfg.n_labeled:
            for b_name, b in cfg.backbones.items():
                for m_name in [SCRATCH, *methods]:
                    if m_name != SCRATCH and (m_name, b_name) not in pretrain_jobs:
                        continue
                    run = out / "runs" / f"{m_name}-{b_name}-{_n_label(n)}-s{seed}"
                    ft = ["finetune", "--data", str(prepared), "--out", str(run), "--seed", str(seed),
                          "--config", str(cfg_dir / f"finetune-{b_name}.yaml")]
                    ft += ["--fraction", "1.0"] if n == "all" else ["--n-labeled", str(n)]
                    needs = ["prepare-downstream"]
                    if m_name != SCRATCH:
                        pre = pretrain_jobs[(m_name, b_name)]
                        ft += ["--init", str(Path(pre.info["run"]) / "model.pt"), "--init-part", b.init_part]
                        needs.append(pre.name)
                    ev = ["evaluate", "--run", str(run), "--data", str(prepared), "--overlays", str(cfg.overlays)]
                    jobs.append(Job(run.name, "finetune", [ft, ev], run / "eval" / "metrics.json", needs=needs,
                                    info={"method": m_name, "backbone": b_name, "n_labeled": n, "seed": seed,
                                          "run": str(run)}))
    return jobs


def job_files(cfg: BenchmarkConfig, out: Path, methods: dict[str, MethodSettings]) -> dict[Path, str]:
    """The files the jobs' commands read, by path: one YAML per budget, and the pool list."""
    from medpretrain.data.datasets import discover_dataset, discover_pool

    cfg_dir = out / "configs"
    files: dict[Path, str] = {}

    def dump(name: str, values: dict) -> None:
        files[cfg_dir / name] = yaml.safe_dump(json.loads(json.dumps(values)), sort_keys=True)

    dump("preprocess-downstream.yaml", cfg.preprocess)
    for b_name, b in cfg.backbones.items():
        dump(f"finetune-{b_name}.yaml", {**b.finetune, "model": b.model, "steps": b.steps, "patch": list(b.patch),
                                         "batch": b.batch, "lr": b.lr, "precision": b.precision})
        for m_name, m in methods.items():
            if _method_runs_on(m_name, m, b_name, b.model):
                dump(f"pretrain-{m_name}-{b_name}.yaml",
                     {**b.pretrain, **m.config, **({"steps": m.steps} if m.steps else {})})
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


def _check_recorded_commands(jobs: list[Job], out: Path, files: dict[Path, str]) -> None:
    """Refuse to mix results made with other settings into this benchmark's folder."""
    path = out / "jobs.json"
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def signature(job: Job) -> list:
        # the commands plus the settings in the config files they read: a changed budget is a changed job
        sig: list = []
        for cmd in job.commands:
            config_files = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
            sig.append([cmd, [files.get(Path(f), "") for f in config_files]])
        return sig

    current = {j.name: signature(j) for j in jobs}
    changed = [j.name for j in jobs if j.name in recorded and recorded[j.name] != current[j.name]]
    if changed:
        raise ConfigError(
            f"{out}: job(s) {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} were run with other "
            "settings; use another --out, or delete those jobs' folders and their entries in jobs.json"
        )
    recorded.update(current)
    atomic_write_json(path, recorded)


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class _Runner:
    """Runs jobs in up to ``parallel`` child processes, respecting dependencies, with a progress line per job."""

    def __init__(self, jobs: list[Job], out: Path, parallel: int):
        self.jobs = {j.name: j for j in jobs}
        self.out = out
        self.parallel = parallel
        self.failed: dict[str, str] = {}
        self.durations: dict[str, list[float]] = {}
        self.running: dict[str, tuple[subprocess.Popen, float, int, Any]] = {}

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if "OMP_NUM_THREADS" not in os.environ and self.parallel > 1:
            env["OMP_NUM_THREADS"] = str(_threads_per_job(self.parallel))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _start(self, job: Job, step: int) -> None:
        args = job.commands[step]
        if args[0] in ("finetune", "pretrain") and (Path(args[args.index("--out") + 1]) / "checkpoints").is_dir() \
                and not (Path(args[args.index("--out") + 1]) / "model.pt").exists():
            args = [*args, "--resume"]  # an interrupted training continues from its last checkpoint
        if args[0] == "finetune" and (Path(args[args.index("--out") + 1]) / "model.pt").exists():
            step += 1  # trained already: evaluate only
            args = job.commands[step]
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        fh = open(logs / f"{job.name}.log", "a", encoding="utf-8")
        fh.write(f"$ medpretrain {' '.join(args)}\n")
        fh.flush()
        proc = subprocess.Popen([sys.executable, "-m", "medpretrain", *args], stdout=fh, stderr=subprocess.STDOUT,
                                env=self._env(), start_new_session=True)
        start = self.running[job.name][1] if job.name in self.running else time.perf_counter()
        self.running[job.name] = (proc, start, step, fh)

    def _eta(self, remaining: list[Job]) -> str:
        known = {k: sum(v) / len(v) for k, v in self.durations.items()}
        if not all(j.kind in known for j in remaining):
            return "ETA after the first job of each kind"
        return "ETA " + _fmt_s(sum(known[j.kind] for j in remaining) / self.parallel)

    def run(self) -> None:
        todo = [j for j in self.jobs.values() if not j.done]
        total, finished = len(self.jobs), len(self.jobs) - len(todo)
        log.info("benchmark: %d job(s), %d done already, %d to run, %d at a time", total, finished, len(todo),
                 self.parallel)
        pending = list(todo)
        try:
            while pending or self.running:
                for name in list(self.running):
                    proc, start, step, fh = self.running[name]
                    if proc.poll() is None:
                        continue
                    fh.close()
                    job = self.jobs[name]
                    if proc.returncode != 0:
                        del self.running[name]
                        self.failed[name] = f"exit code {proc.returncode}; see {self.out / 'logs' / (name + '.log')}"
                        log.error("FAILED %s: %s", name, self.failed[name])
                        continue
                    if step + 1 < len(job.commands):
                        self._start(job, step + 1)
                        continue
                    del self.running[name]
                    seconds = time.perf_counter() - start
                    self.durations.setdefault(job.kind, []).append(seconds)
                    finished += 1
                    left = [j for j in pending] + [self.jobs[n] for n in self.running]
                    log.info("[%d/%d] %s done in %s; %s", finished, total, name, _fmt_s(seconds), self._eta(left))
                for job in list(pending):
                    if len(self.running) >= self.parallel:
                        break
                    if any(n in self.failed for n in job.needs):
                        pending.remove(job)
                        self.failed[job.name] = "skipped: a job it needs failed"
                        continue
                    if all(self.jobs[n].done for n in job.needs if n in self.jobs):
                        pending.remove(job)
                        if job.name == "prepare-pool":
                            _restrict_pool_to_prepared_train(self.out)
                        self._start(job, 0)
                time.sleep(0.5)
        except KeyboardInterrupt:
            for proc, _, _, fh in self.running.values():
                os.killpg(proc.pid, signal.SIGINT)
            for proc, _, _, fh in self.running.values():
                proc.wait()
                fh.close()
            log.warning("interrupted: re-run the same command to continue (finished jobs are kept, interrupted "
                        "trainings resume from their last checkpoint)")
            raise


def run_benchmark(config: str | Path | BenchmarkConfig, out: str | Path, parallel: int | None = None,
                  dry_run: bool = False) -> Path:
    """Run (or continue) a benchmark and write its report.

    Args:
        config: a ``BenchmarkConfig`` or the path of its YAML.
        out: the benchmark's folder (prepared data, pretrained checkpoints, runs, logs, report).
        parallel: override of ``config.parallel``.
        dry_run: print the jobs and their commands, run nothing.

    Returns:
        The path of ``report.md``.
    """
    from medpretrain.evaluation.benchmark_report import write_benchmark_report

    cfg = config if isinstance(config, BenchmarkConfig) else load_benchmark_config(config)
    if parallel is not None:
        cfg = cfg.model_copy(update={"parallel": parallel})
    out = Path(out)
    if not Path(cfg.dataset).exists():
        raise ConfigError(f"benchmark dataset {cfg.dataset} does not exist (paths are relative to the current folder)")
    jobs = plan(cfg, out)
    if dry_run:
        for j in jobs:
            print(f"{'done' if j.done else 'todo'}  {j.name}")
            for c in j.commands:
                print("      medpretrain " + " ".join(c))
        return out / "report.md"
    out.mkdir(parents=True, exist_ok=True)
    files = job_files(cfg, out, _methods(cfg))
    if any("prepare-pool" in j.needs for j in jobs) and (out / "pool.json") not in files:
        raise ConfigError("the benchmark's methods "
                          f"{sorted({j.info['method'] for j in jobs if 'prepare-pool' in j.needs})} need an unlabelled "
                          "pool: list sources under 'pool:' or set pool_add_downstream_train: true")
    _check_recorded_commands(jobs, out, files)  # before writing: a refused run changes nothing
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name != "pool.json" or not (out / "prepared" / "pool" / "manifest.json").exists():
            atomic_write_text(path, text)
    atomic_write_json(out / "benchmark.json", json.loads(cfg.model_dump_json()))
    runner = _Runner(jobs, out, cfg.parallel)
    runner.run()
    report = write_benchmark_report(cfg, out, [j for j in jobs if j.kind == "finetune"],
                                    [j for j in jobs if j.kind == "pretrain"], runner.failed)
    if runner.failed:
        raise MedpretrainError(f"{len(runner.failed)} job(s) failed or were skipped "
                               f"({', '.join(list(runner.failed)[:5])}); the report covers the finished ones: "
                               f"{report}. Fix the cause (logs in {out / 'logs'}) and re-run the same command")
    return report
