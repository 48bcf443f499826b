"""The ``medpretrain`` command: a thin layer over ``medpretrain.api``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from medpretrain.errors import MedpretrainError, describe_os_error

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Pretrain and fine-tune 3D medical image segmentation networks when labelled data are scarce.",
)
log = logging.getLogger("medpretrain")

TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


def tcmalloc_library() -> str | None:
    """The installed tcmalloc the training verbs preload, or None."""
    return next((p for p in TCMALLOC_PATHS if os.path.exists(p)), None)


def _maybe_reexec_with_tcmalloc() -> None:
    """Re-run this command with tcmalloc preloaded when it is installed (training steps up to 2.5x faster on
    CPU: glibc malloc returns and re-faults the large activation buffers every step). Opt out with
    MEDPRETRAIN_NO_TCMALLOC=1."""
    if os.environ.get("MEDPRETRAIN_NO_TCMALLOC") or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = tcmalloc_library()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [lib, env.get("LD_PRELOAD")]))
    env["MEDPRETRAIN_NO_TCMALLOC"] = "1"  # never loop
    # -m (not -c) so that Lightning's DDP launcher can re-run the command; safe path: a medpretrain/ folder in
    # the working directory must not shadow the installed package (Python >= 3.11).
    env["PYTHONSAFEPATH"] = "1"
    try:
        os.execve(sys.executable, [sys.executable, "-m", "medpretrain", *sys.argv[1:]], env)
    except OSError:
        return


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler()
        fmt = "%(asctime)s %(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    for noisy in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # nibabel reports the header "fixes" it applies on load (zero pixdim -> 1, ...); we check headers ourselves.
    logging.getLogger("nibabel").setLevel(logging.ERROR)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    _setup_logging(verbose)


def _tuple3(values, name, kind=float):
    if values is None:
        return None
    if len(values) != 3:
        raise typer.BadParameter(f"{name} takes three values X Y Z")
    return tuple(kind(v) for v in values)


@app.command()
def prepare(
    dataset: Optional[Path] = typer.Option(None, help="Labelled dataset folder (MSD, nnU-Net v2 raw, or images/ + labels/)."),
    pool: Optional[str] = typer.Option(None, help="Unlabelled scans: a folder, a glob, or a JSON list of paths."),
    out: Path = typer.Option(..., help="Output folder of the prepared cache."),
    config: Optional[Path] = typer.Option(None, help="YAML file of preprocessing keys (see PreprocessConfig); options here override it."),
    spacing: Optional[tuple[float, float, float]] = typer.Option(None, help="Target spacing X Y Z in mm (default: the dataset's median)."),
    modality: Optional[str] = typer.Option(None, help="CT or MR (default: from dataset.json, else MR)."),
    ct_window: Optional[tuple[float, float]] = typer.Option(None, help="CT intensity window in HU. (default: -175 250)"),
    mr_percentiles: Optional[tuple[float, float]] = typer.Option(None, help="MR clipping percentiles. (default: 0.5 99.5)"),
    label_interpolation: Optional[str] = typer.Option(None, help="Label resampling: linear (one-hot, then argmax) or nearest. (default: linear)"),
    no_crop: bool = typer.Option(False, "--no-crop", help="Do not crop to the body box."),
    nan_policy: Optional[str] = typer.Option(None, help="NaN/Inf voxels: error (skip the case) or zero (replace, recorded). (default: error)"),
    max_voxels: Optional[int] = typer.Option(None, help="Refuse images with more voxels than this after resampling. (default: what fits in memory)"),
    workers: int = typer.Option(1, help="Parallel processes."),
    strict: bool = typer.Option(False, help="Stop with an error at the first bad case instead of skipping it."),
    seed: int = typer.Option(0, help="Seed of the 80/20 split when the dataset has no splits.json."),
    cache_format: str = typer.Option("npy", help="Array storage: npy (memory-mapped, no decode) or blosc2 (compressed "
                                                 "~3x on CT, decodes only the blocks a crop touches; pip install blosc2)."),
) -> None:
    """Preprocess a labelled dataset or an unlabelled pool into a memory-mapped cache."""
    from medpretrain.config import load_config
    from medpretrain.data.cache import prepare as run_prepare  # not via api: no torch/Lightning start-up
    from medpretrain.data.preprocess import PreprocessConfig

    cfg = load_config(PreprocessConfig, config, {
        "spacing": spacing, "modality": modality.upper() if modality else None, "ct_window": ct_window,
        "mr_percentiles": mr_percentiles, "label_interpolation": label_interpolation,
        "crop_foreground": False if no_crop else None, "nan_policy": nan_policy, "max_voxels": max_voxels,
    })
    data = run_prepare(dataset=dataset, pool=pool, out=out, cfg=cfg, workers=workers, strict=strict, seed=seed,
                       cache_format=cache_format)
    skipped = data.manifest.get("skipped", [])
    typer.echo(f"prepared {len(data.case_ids)} case(s) in {data.root}" + (f", skipped {len(skipped)}" if skipped else ""))


@app.command()
def finetune(
    data: Path = typer.Option(..., help="Prepared labelled data (output of `prepare --dataset`)."),
    out: Path = typer.Option(..., help="Run folder."),
    model: Optional[str] = typer.Option(None, help="Registered model name (see `medpretrain models`). (default: unet)"),
    config: Optional[Path] = typer.Option(None, help="YAML file of FinetuneConfig keys; options given here override it."),
    init: Optional[Path] = typer.Option(None, help="Checkpoint to initialise from (ours, Lightning, or MONAI SSL)."),
    init_part: Optional[str] = typer.Option(None, help="encoder or all. (default: encoder)"),
    n_labeled: Optional[int] = typer.Option(None, help="Number of labelled training cases (seeded draw)."),
    fraction: Optional[float] = typer.Option(None, help="Or a fraction of the labelled training cases."),
    validation_cases: Optional[int] = typer.Option(None, help="Training cases set aside for validation, never "
                                                   "trained on (0: train on all). (default: 0)"),
    freeze_encoder: Optional[bool] = typer.Option(None, "--freeze-encoder", help="Train decoder and head only."),
    allow_padding: Optional[bool] = typer.Option(None, "--allow-padding", help="Train even if patches are mostly padding."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps. (default: 600)"),
    patch: Optional[tuple[int, int, int]] = typer.Option(None, help="Patch X Y Z. (default: 64 64 48)"),
    batch: Optional[int] = typer.Option(None, help="Patches per step and process. (default: 2)"),
    lr: Optional[float] = typer.Option(None, help="Peak AdamW learning rate. (default: 1e-3)"),
    seed: Optional[int] = typer.Option(None, help="Seed of subset, initialisation and patches. (default: 0)"),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints. (default: 100)"),
    precision: Optional[str] = typer.Option(None, help="auto, 32-true, bf16-mixed or 16-mixed. (default: auto)"),
    accelerator: Optional[str] = typer.Option(None, help="auto, cpu or gpu. (default: auto)"),
    devices: Optional[str] = typer.Option(None, help="Devices (processes) per node for Lightning. (default: 1)"),
    num_nodes: Optional[int] = typer.Option(None, help="Nodes for Lightning DDP. (default: 1)"),
    strategy: Optional[str] = typer.Option(None, help="Lightning strategy, e.g. ddp. (default: auto)"),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers. (default: 2)"),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic", help="Bitwise-reproducible mode."),
    resume: bool = typer.Option(False, help="Continue from the newest readable checkpoint in --out."),
) -> None:
    """Fine-tune (or train from scratch) a segmentation network on prepared labelled data."""
    from medpretrain.config import FinetuneConfig, load_config
    from medpretrain.planning import plan_overrides

    options = {
        "model": model, "init": init, "init_part": init_part, "n_labeled": n_labeled, "fraction": fraction,
        "validation_cases": validation_cases, "freeze_encoder": freeze_encoder, "steps": steps, "patch": patch,
        "batch": batch, "lr": lr, "seed": seed,
        "checkpoint_every": checkpoint_every, "precision": precision, "accelerator": accelerator,
        "devices": int(devices) if devices and devices.isdigit() else devices, "num_nodes": num_nodes,
        "strategy": strategy, "num_workers": num_workers, "deterministic": deterministic,
        "allow_padding": allow_padding,
    }
    # Patch and batch not given: the data's plan (`medpretrain plan`) decides, when it is for this network.
    options.update(plan_overrides(data, config, options, FinetuneConfig.model_fields["model"].default))
    cfg = load_config(FinetuneConfig, config, options)
    # Bad settings fail before the seconds-long Lightning import.
    from medpretrain.models import get_spec

    get_spec(cfg.model).check_patch(cfg.patch, cfg.model_options)
    from medpretrain.api import finetune as run_finetune

    run = run_finetune(data, out, cfg, resume=resume)
    typer.echo(f"run written to {run}")


@app.command()
def pretrain(
    method: str = typer.Option(..., help="Pretraining method (see `medpretrain methods`)."),
    out: Path = typer.Option(..., help="Run folder; RUN/model.pt feeds `finetune --init`."),
    data: Optional[Path] = typer.Option(None, help="Prepared unlabelled pool (`prepare --pool`); not needed by avsdb."),
    model: Optional[str] = typer.Option(None, help="Registered model name. (default: the method's)"),
    preset: Optional[str] = typer.Option(None, help="Named settings of the method, e.g. cpu or paper."),
    config: Optional[Path] = typer.Option(None, help="YAML file of the method's config keys; options here override it."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps. (default: the method's)"),
    patch: Optional[tuple[int, int, int]] = typer.Option(None, help="Patch X Y Z. (default: the method's)"),
    batch: Optional[int] = typer.Option(None, help="Samples per step and process."),
    lr: Optional[float] = typer.Option(None, help="Peak AdamW learning rate."),
    seed: Optional[int] = typer.Option(None, help="Seed of initialisation and samples. (default: 0)"),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints. (default: 100)"),
    precision: Optional[str] = typer.Option(None, help="auto, 32-true, bf16-mixed or 16-mixed. (default: auto)"),
    accelerator: Optional[str] = typer.Option(None, help="auto, cpu or gpu. (default: auto)"),
    devices: Optional[str] = typer.Option(None, help="Devices (processes) per node. (default: 1)"),
    num_nodes: Optional[int] = typer.Option(None, help="Nodes for Lightning DDP. (default: 1)"),
    strategy: Optional[str] = typer.Option(None, help="Lightning strategy, e.g. ddp. (default: auto)"),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers. (default: 2)"),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic", help="Bitwise-reproducible mode."),
    matcher: Optional[str] = typer.Option(None, help="alice: anatomical matcher, sam or registration. (default: registration)"),
    matcher_run: Optional[Path] = typer.Option(None, help="alice with --matcher sam: the `train-matcher` run folder."),
    untrained: bool = typer.Option(False, "--untrained", help="Write the network's initial weights without training "
                                   "(the null control: same network, seed and --init path, nothing learnt)."),
    plan: Optional[Path] = typer.Option(None, help="plan.json of the downstream data (`medpretrain plan`): its network "
                                        "and patch, unless --model / --patch are given, and its planned kernels and "
                                        "strides (DynUNet), unless model_options set them, so the pretrained "
                                        "network is the fine-tuning one."),
    resume: bool = typer.Option(False, help="Continue from the newest readable checkpoint in --out."),
) -> None:
    """Pretrain a network with a registered method (self-supervised or formula-driven)."""
    from medpretrain.engine.pretrain import pretrain as run_pretrain
    from medpretrain.engine.pretrain import pretrain_config

    planned = None
    if plan is not None:
        from medpretrain.planning import read_plan

        planned = read_plan(plan.parent) if plan.name == "plan.json" else None
        if planned is None:
            from medpretrain.errors import ConfigError

            raise ConfigError(f"--plan {plan}: no such plan.json; write it with `medpretrain plan --data DIR`")
        model = model or planned["model"]
        patch = patch or tuple(planned["patch"])
    overrides = {
        "model": model, "steps": steps, "patch": patch, "batch": batch, "lr": lr, "seed": seed,
        "checkpoint_every": checkpoint_every, "precision": precision, "accelerator": accelerator,
        "devices": int(devices) if devices and devices.isdigit() else devices, "num_nodes": num_nodes,
        "strategy": strategy, "num_workers": num_workers, "deterministic": deterministic,
        "matcher": matcher, "matcher_run": matcher_run,
    }
    cfg = pretrain_config(method, config, preset, overrides)
    if planned is not None:
        from medpretrain.planning import with_plan_model_options

        # The planned network (DynUNet's per-axis kernels and strides), added to the preset's and YAML's options.
        options = with_plan_model_options(planned, cfg.model, cfg.model_options)
        if options != cfg.model_options:
            cfg = pretrain_config(method, config, preset, {**overrides, "model_options": options})
    run = run_pretrain(method, data, out, cfg, resume=resume, untrained=untrained)
    typer.echo(f"pretrained model: {run / 'model.pt'}")


@app.command()
def snapshot(
    run: Path = typer.Option(..., help="A pretraining run folder (run.json)."),
    checkpoint: Path = typer.Option(..., help="One of its kept checkpoints, e.g. RUN/checkpoints/step0008000.ckpt."),
) -> None:
    """Write the snapshot a pretraining would have written at a kept checkpoint's step (RUN/snapshots/), for a
    budget-curve point chosen after the run passed it; it loads with `finetune --init` like model.pt."""
    from medpretrain.engine.pretrain import export_snapshot_from_checkpoint

    typer.echo(f"snapshot: {export_snapshot_from_checkpoint(run, checkpoint)}")


@app.command("train-matcher")
def train_matcher(
    data: Path = typer.Option(..., help="Prepared unlabelled pool (`prepare --pool`)."),
    out: Path = typer.Option(..., help="Run folder; RUN is what `pretrain --method alice --matcher sam --matcher-run` takes."),
    config: Optional[Path] = typer.Option(None, help="YAML file of MatcherConfig keys; options here override it."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps. (default: 400)"),
    patch: Optional[tuple[int, int, int]] = typer.Option(None, help="View size X Y Z, multiples of 16. (default: 64 64 48)"),
    batch: Optional[int] = typer.Option(None, help="View pairs per step. (default: 2)"),
    seed: Optional[int] = typer.Option(None, help="Seed. (default: 0)"),
    accelerator: Optional[str] = typer.Option(None, help="auto, cpu or gpu. (default: auto)"),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers. (default: 2)"),
    resume: bool = typer.Option(False, help="Continue from the newest readable checkpoint in --out."),
) -> None:
    """Train the self-supervised anatomical matcher (SAM-style embeddings) that Alice uses to find the same
    body part in two volumes."""
    from medpretrain.config import load_config
    from medpretrain.matching.sam import MatcherConfig
    from medpretrain.matching.sam import train_matcher as run_train

    cfg = load_config(MatcherConfig, config, {"steps": steps, "patch": patch, "batch": batch, "seed": seed,
                                              "accelerator": accelerator, "num_workers": num_workers})
    run = run_train(data, out, cfg, resume=resume)
    typer.echo(f"matcher: {run}")


generate_app = typer.Typer(no_args_is_help=True, help="Generate synthetic datasets.")
app.add_typer(generate_app, name="generate")


@generate_app.command("avsdb")
def generate_avsdb(
    n: int = typer.Option(..., help="Number of volumes."),
    out: Path = typer.Option(..., help="Output folder (nnU-Net v2 raw / MSD layout)."),
    seed: int = typer.Option(0, help="Seed; volume i is a pure function of (seed, i)."),
    size: int = typer.Option(96, help="Cube side in voxels."),
    classes: str = typer.Option("xy8-z2", help="Shape classes: xy8-z2, xy4-z2 or xy8-z4."),
    shapes: int = typer.Option(20, help="Shapes per volume (their sizes scale with --size)."),
    no_overlap: bool = typer.Option(False, "--no-overlap", help="Place shapes without overlap."),
    render: str = typer.Option("outline", help="outline (the authors' generator) or filled."),
    workers: int = typer.Option(1, help="Parallel processes."),
    preview: int = typer.Option(0, help="Write PNG sheets of the first N volumes to OUT/preview/."),
) -> None:
    """Write an AVS-DB dataset of formula-driven labelled volumes (usable by prepare and finetune)."""
    from medpretrain.atomic import check_writable_folder
    from medpretrain.config import make_config
    from medpretrain.synthetic.avsdb import AVSDBConfig, write_avsdb_dataset

    check_writable_folder(out, "--out")
    cfg = make_config(AVSDBConfig, {"size": (size, size, size), "classes": classes, "n_shapes": shapes,
                                    "overlap": not no_overlap, "render": render})
    root = write_avsdb_dataset(out, n, cfg, seed=seed, workers=workers, preview=preview)
    typer.echo(f"wrote {n} volumes to {root}")


@app.command()
def evaluate(
    run: Path = typer.Option(..., help="A finished run folder."),
    data: Path = typer.Option(..., help="Prepared labelled data."),
    split: str = typer.Option("test", help="Split of the prepared data."),
    nsd_tolerance: float = typer.Option(2.0, help="NSD tolerance in mm."),
    overlays: int = typer.Option(4, help="Overlay PNGs (half best, half worst cases); -1 for all."),
    overlap: Optional[float] = typer.Option(None, help="Sliding-window overlap. (default: the run's, 0.5)"),
    out: Optional[Path] = typer.Option(None, help="Output folder. (default: RUN/eval)"),
    model_file: Optional[Path] = typer.Option(None, help="Evaluate this export of the run instead of RUN/model.pt "
                                              "(a learning-curve point, RUN/curve/model_stepN.pt)."),
    original_space: bool = typer.Option(False, help="Also score each case in its source file's geometry against "
                                        "the label file as distributed, in OUT/original/ (as `predict` writes)."),
) -> None:
    """Evaluate a run: metrics.json, per_case.csv, report.md and overlays/ in RUN/eval."""
    from medpretrain.config import EvaluateConfig, InferenceConfig, make_config

    # Bad settings fail before the seconds-long torch import.
    inference = make_config(InferenceConfig, {"overlap": overlap}) if overlap is not None else None
    cfg = make_config(EvaluateConfig, {"split": split, "nsd_tolerance_mm": nsd_tolerance, "overlays": overlays,
                                       "inference": inference, "original_space": original_space})
    from medpretrain.api import evaluate as run_evaluate

    metrics = run_evaluate(run, data, cfg, out, model_file=model_file)
    overall = metrics["overall"]
    typer.echo("  ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in overall.items()))


@app.command()
def predict(
    run: Path = typer.Option(..., help="A finished run folder."),
    input: Path = typer.Option(..., help="An image file, a DICOM series folder, or a folder of images."),
    out: Path = typer.Option(..., help="Folder for the label maps (original geometry of each input)."),
    overlap: Optional[float] = typer.Option(None, help="Sliding-window overlap. (default: the run's, 0.5)"),
    nan_policy: Optional[str] = typer.Option(None, help="NaN/Inf voxels: error (skip that input) or zero (replace, "
                                             "with a warning). (default: the run's, error)"),
) -> None:
    """Segment images; label maps are written in each input's original geometry. An input that cannot be
    segmented is skipped with a warning; the others are segmented."""
    from medpretrain.config import InferenceConfig, make_config

    inference = make_config(InferenceConfig, {"overlap": overlap}) if overlap is not None else None
    from medpretrain.api import predict as run_predict

    written = run_predict(run, input, out, inference, nan_policy=nan_policy)
    skipped = getattr(written, "skipped", [])
    typer.echo(f"wrote {len(written)} label map(s) to {out}" + (f", skipped {len(skipped)}" if skipped else ""))


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder."),
    seed: int = typer.Option(0, help="Seed of the synthetic data and training."),
    steps: int = typer.Option(240, help="Fine-tuning steps of each run."),
    pretrain_steps: int = typer.Option(240, help="AVS-DB pretraining steps (0 skips pretraining)."),
    n_labeled: int = typer.Option(3, help="Labelled training cases of each fine-tuning run."),
    fresh: bool = typer.Option(False, help="Delete --out first."),
) -> None:
    """Run the whole pipeline on built-in synthetic data (no download) and write OUT/report.md."""
    from medpretrain.demo import demo as run_demo

    report = run_demo(out, seed=seed, steps=steps, pretrain_steps=pretrain_steps, n_labeled=n_labeled, fresh=fresh)
    typer.echo(f"report: {report}")


@app.command()
def benchmark(
    config: Path = typer.Option(..., help="Benchmark YAML (profiles: benchmarks/*.yaml; keys: medpretrain.benchmark.BenchmarkConfig)."),
    out: Path = typer.Option(..., help="Benchmark folder: prepared data, checkpoints, runs, logs and the report."),
    parallel: Optional[int] = typer.Option(None, help="Jobs side by side, each with cores/parallel threads. (default: the config's)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the jobs and their commands; run nothing."),
    report_only: bool = typer.Option(False, "--report-only", help="Write the report of the runs finished so far; run nothing."),
    jobs: Optional[list[str]] = typer.Option(None, "--jobs", help="Run only the jobs whose names match this glob (repeatable), and what they need, e.g. --jobs 'scratch-*' --jobs '*volume-fusion*'; names: --dry-run."),
    time_limit: Optional[str] = typer.Option(None, "--time-limit", help="Stop within this time (3600, 170m, 2h50m: a session or a cluster job's walltime): jobs that would not end in time are not started, running ones stop at their last checkpoint; re-run to continue."),
) -> None:
    """Pretrain every method, fine-tune at several labelled-set sizes and seeds, and report the label efficiency.

    Re-running the same command after a crash or Ctrl-C runs only what is missing."""
    from medpretrain.benchmark import parse_duration, run_benchmark

    if not (dry_run or report_only or tcmalloc_library() or os.environ.get("MEDPRETRAIN_NO_TCMALLOC")):
        # Hours of CPU jobs: say it once, where it is cheap to fix (measured here: a Swin UNETR pretraining step
        # 12 s without, 6 s with; docs/design.md, "tcmalloc").
        log.warning("tcmalloc is not installed: CPU training runs up to 2x slower. Install Debian's "
                    "libtcmalloc-minimal4 (the training commands then preload it), or set MEDPRETRAIN_NO_TCMALLOC=1")
    limit = None if time_limit is None else parse_duration(time_limit)
    report = run_benchmark(config, out, parallel=parallel, dry_run=dry_run, report_only=report_only, select=jobs,
                           time_limit=limit)
    if not dry_run:
        typer.echo(f"report: {report}")


@app.command("plan")
def plan_cmd(
    data: Path = typer.Option(..., help="Prepared data (output of `prepare`)."),
    model: str = typer.Option("unet", help="Registered network to plan for."),
    device: str = typer.Option("cpu", help="cpu or gpu: what the plan is sized for."),
    threads: int = typer.Option(2, help="cpu: threads per training process."),
    step_seconds: float = typer.Option(2.0, help="cpu: longest acceptable estimated step, in seconds."),
    gpu: str = typer.Option("h200", help="gpu: h200, h100 or a100 (FLOP rate)."),
    gpu_memory_gb: float = typer.Option(140.0, help="gpu: memory available to training, in GB."),
) -> None:
    """Plan patch and batch from the data (fingerprint.json) for a network and a budget; writes plan.json."""
    from medpretrain.data.cache import PreparedData
    from medpretrain.planning import Budget, write_plan

    if device not in ("cpu", "gpu"):
        from medpretrain.errors import ConfigError

        raise ConfigError(f"--device {device!r}: choose cpu or gpu")
    budget = Budget(device=device, threads=threads, step_seconds=step_seconds, gpu=gpu, gpu_memory_gb=gpu_memory_gb)
    plan = write_plan(PreparedData(data), model, budget)
    typer.echo(plan.table())
    typer.echo(f"plan written to {Path(data) / 'plan.json'}")


@app.command("select-hparams")
def select_hparams(
    base: Path = typer.Option(..., help="The fine-tuning config (YAML) the validation runs started from."),
    runs: list[Path] = typer.Option(..., help="Validation runs, each evaluated with `evaluate --split validation`."),
    out: Path = typer.Option(..., help="Config to write: BASE with the learning rate of the best run (OUT.json: every score)."),
    extend: int = typer.Option(0, min=0, max=4, help="While the best lr is the grid's largest (smallest), try up "
                               "to this many more, one grid step beyond (needs --finetune-args)."),
    finetune_args: Optional[str] = typer.Option(None, help="JSON list: the grid's `medpretrain finetune` arguments "
                                                "without --out and --lr, for the extra runs of --extend."),
) -> None:
    """Choose the learning rate of best validation Dice among runs (the benchmark's validation grid)."""
    import json
    import signal

    from medpretrain.benchmark import _raise_interrupt, select_hyperparameters
    from medpretrain.errors import ConfigError

    # SIGTERM like Ctrl-C: an extra validation run (--extend) in a child process is then stopped cleanly, not orphaned.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    args = None
    if finetune_args is not None:
        try:
            args = json.loads(finetune_args)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--finetune-args {finetune_args[:80]!r}: not JSON ({err}); give a JSON list of "
                              "strings, e.g. '[\"--data\", \"prepared\"]'") from err
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ConfigError(f"--finetune-args {finetune_args[:80]!r}: give a JSON list of strings")
    chosen = select_hyperparameters(base, runs, out, extend=extend, finetune_args=args)
    typer.echo(f"chosen lr {chosen['chosen']['lr']:g}: {out}")


@app.command()
def export(
    run: Path = typer.Option(..., help="A finished pretrain or finetune run folder (or its model.pt)."),
    out: Path = typer.Option(..., help="Checkpoint file to write, e.g. pretrained.pth; OUT.json (the extension "
                             "replaced) gets the adaptation description."),
    format: str = typer.Option("nnunet", "--format", help="nnunet: nnU-Net v2 `nnUNetv2_train -pretrained_weights` "
                               "checkpoint (networks resenc-l*, plainconv-unet*)."),
    axes: str = typer.Option("zyx", help="zyx: kernels reordered to nnU-Net's (Z, Y, X) arrays; xyz: as trained."),
) -> None:
    """Export a run's network for another tool (nnU-Net v2: docs/nnunet.md)."""
    from medpretrain.errors import ConfigError

    if format not in ("nnunet",):
        raise ConfigError(f"--format {format!r}: the formats are nnunet")
    from medpretrain.api import export_nnunet

    written = export_nnunet(run, out, axes=axes)
    from medpretrain.interop.nnunet import description_path

    typer.echo(f"nnU-Net pretrained weights: {written}; adaptation description: {description_path(written)}")


@app.command("nnunet-scratch")
def nnunet_scratch(
    data: Path = typer.Option(..., help="Prepared labelled data (`prepare --dataset`); nnU-Net reads its source files."),
    out: Path = typer.Option(..., help="Run folder (run.json, predictions/, nnunet/ with nnU-Net's trees, nnunet.log)."),
    n_labeled: Optional[int] = typer.Option(None, help="Labelled training cases: the subset `finetune --n-labeled N "
                                            "--seed S` trains on."),
    fraction: Optional[float] = typer.Option(None, help="Or a fraction of the training cases (1.0: all)."),
    seed: int = typer.Option(0, help="Seed of the subset (as finetune), nnU-Net's initialisation and sampling."),
    iterations: Optional[int] = typer.Option(None, help="Budget: nnU-Net optimizer steps."),
    max_seconds: Optional[float] = typer.Option(None, help="Budget: seconds of training (from the first step)."),
    max_seconds_from: Optional[Path] = typer.Option(None, help="Budget: the training wall time a finished run of ours "
                                                    "recorded (RUN/run.json), e.g. scratch at the same n and seed."),
    gpu_memory_target: float = typer.Option(0.25, help="nnU-Net planner's GPU-memory target (GB): sizes its patch "
                                            "and batch; small for a CPU (la2018: 0.25 -> 28x48x56, 1 -> 48x64x96)."),
    workers: int = typer.Option(1, help="nnU-Net data-augmentation processes (0: in the training process)."),
    mirroring: bool = typer.Option(True, "--mirroring/--no-mirroring", help="nnU-Net's test-time mirroring (its "
                                   "default; 8 passes per window in 3D)."),
    validation_cases: int = typer.Option(0, help="Training cases set aside as finetune's validation_cases (never "
                                         "labelled), for the same subset as a run made with them."),
    validation_seed: int = typer.Option(0, help="finetune's validation_seed."),
) -> None:
    """nnU-Net v2 itself (planning, preprocessing, trainer, predictor) from scratch on our labelled subset with a short
    budget on the CPU; `evaluate --run OUT --data DATA` scores its test predictions with our metrics."""
    from medpretrain.errors import ConfigError
    from medpretrain.interop.nnunet_scratch import budget_from_run, require_nnunet

    if sum(x is not None for x in (iterations, max_seconds, max_seconds_from)) != 1:
        raise ConfigError("nnunet-scratch needs one budget: --iterations K, --max-seconds T or --max-seconds-from RUN")
    if n_labeled is None and fraction is None:
        raise ConfigError("nnunet-scratch needs the labelled-set size: --n-labeled N (or --fraction F)")
    require_nnunet()  # one line naming the install command, before anything is written
    source = None
    if max_seconds_from is not None:
        max_seconds, source = budget_from_run(max_seconds_from), str(max_seconds_from)
    from medpretrain.api import nnunet_scratch as run_nnunet_scratch

    run = run_nnunet_scratch(data, out, n_labeled=n_labeled, fraction=fraction, seed=seed, iterations=iterations,
                             max_seconds=max_seconds, gpu_memory_target_gb=gpu_memory_target, workers=workers,
                             mirroring=mirroring, validation_cases=validation_cases, validation_seed=validation_seed,
                             budget_source=source)
    typer.echo(f"nnU-Net scratch run: {run}; score it: medpretrain evaluate --run {run} --data {data}")


@app.command()
def models() -> None:
    """List the registered networks and their presets."""
    from medpretrain.models import list_models

    for spec in list_models():
        opts = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        divisor = spec.divisor if spec.layout is None else f"{spec.divisors()[0]} (per axis: the product of strides)"
        least = f", >= {spec.min_size}" if spec.min_size > 1 else ""
        typer.echo(f"{spec.name:18s} {spec.description}\n{'':18s} patch sides: multiple of {divisor}{least}; "
                   f"options: {opts}")


@app.command()
def methods() -> None:
    """List the registered pretraining methods and their presets."""
    from medpretrain.methods import list_methods

    for m in list_methods():
        presets = ", ".join(m.presets) or "-"
        data = "prepared pool (--data)" if m.needs_data else "no data"
        typer.echo(f"{m.name:16s} {m.description}\n{'':16s} needs: {data}; presets: {presets}; "
                   f"config: {m.config_cls.__name__}")


def main() -> None:
    """Console-script entry point: known errors print one line and exit 1, without a traceback."""
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command in ("finetune", "pretrain", "demo", "evaluate", "predict", "nnunet-scratch"):
        _maybe_reexec_with_tcmalloc()
    try:
        app(prog_name="medpretrain")  # typer handles usage errors and --help itself (exit code 2)
    except MedpretrainError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    except OSError as exc:
        # Read-only folder, full disk, name too long, a file where a folder is needed: one line, path and fix.
        typer.echo(f"error: {describe_os_error(exc)}", err=True)
        raise SystemExit(1) from None
    except MemoryError:
        typer.echo(f"error: {command or 'medpretrain'} ran out of memory; choose a coarser --spacing, a smaller "
                   "--patch or --batch, or fewer --workers", err=True)
        raise SystemExit(1) from None
