"""The main job with no download: synthetic labelled data -> prepare -> AVS-DB pretraining -> fine-tuning
from scratch and from the pretrained network with a handful of labels -> evaluation -> one report."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from medpretrain.atomic import atomic_write_json, atomic_write_text, check_writable_folder
from medpretrain.config import AugmentConfig, EvaluateConfig, FinetuneConfig
from medpretrain.data.cache import prepare_dataset
from medpretrain.data.preprocess import PreprocessConfig
from medpretrain.errors import ConfigError
from medpretrain.synthetic.demo_data import TEST_FRACTION, make_demo_dataset

log = logging.getLogger("medpretrain")

#: Sized to finish within 5 minutes on the 2-core AMD EPYC development machine (measured: docs/results/demo/):
#: 32^3 patches (44% of the voxels of the earlier 48x48x32) and 240 steps per run keep it within that budget.
DEMO_STEPS = 240
DEMO_PRETRAIN_STEPS = 240
DEMO_PATCH = (32, 32, 32)
DEMO_GENERATOR = 48  # AVS-DB volumes (cube side) the pretraining patches are cut from
DEMO_LABELED = 3
METRICS = ("dice", "nsd", "assd", "hd95")


def _check_demo_options(steps: int, pretrain_steps: int, n_cases: int, n_labeled: int) -> None:
    """Refuse demo settings that cannot run, before anything is generated or trained."""
    n_train = n_cases - max(1, int(round(TEST_FRACTION * n_cases)))  # the synthetic set's test cases are held out
    problems = []
    if steps < 1:
        problems.append(f"--steps {steps} must be >= 1 (fine-tuning steps of each run)")
    if pretrain_steps < 0:
        problems.append(f"--pretrain-steps {pretrain_steps} must be >= 0 (0 skips pretraining)")
    if n_cases < 2:
        problems.append(f"n_cases {n_cases} must be >= 2 (training and test cases)")
    elif not 1 <= n_labeled <= n_train:
        problems.append(f"--n-labeled {n_labeled} must be within 1..{n_train} (the demo's training cases)")
    if problems:
        raise ConfigError("; ".join(problems))


def _resume_flag(run: Path) -> bool:
    from medpretrain.engine.checkpointing import find_resume_checkpoint  # imports Lightning: only when training

    return find_resume_checkpoint(run / "checkpoints") is not None


def demo(out: str | Path = "runs/demo", seed: int = 0, steps: int = DEMO_STEPS,
         pretrain_steps: int = DEMO_PRETRAIN_STEPS, n_cases: int = 12, n_labeled: int = DEMO_LABELED,
         fresh: bool = False) -> Path:
    """Run the whole pipeline on procedurally generated data and write ``OUT/report.md``.

    Stages (each reused when already finished, so an interrupted demo resumes): synthetic labelled set,
    prepare, AVS-DB pretraining (formula-driven, no real data), fine-tuning with ``n_labeled`` labelled cases
    from scratch and from the pretrained network (same steps, patch, seed and cases), evaluation of both.

    Args:
        out: output folder (data, prepared cache, runs, report).
        seed: seeds the synthetic data and training; another seed gives another data set.
        steps: fine-tuning steps of each run.
        pretrain_steps: AVS-DB pretraining steps (0 skips pretraining).
        n_cases: synthetic labelled volumes (a quarter is held out for testing).
        n_labeled: labelled training cases each fine-tuning run sees.
        fresh: delete ``out`` first.
    """
    _check_demo_options(steps, pretrain_steps, n_cases, n_labeled)  # before the seconds-long Lightning import
    out = check_writable_folder(out, "--out")
    from medpretrain.api import evaluate
    from medpretrain.engine.finetune import finetune
    from medpretrain.engine.pretrain import pretrain, pretrain_config

    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str, t: float) -> None:
        timings[name] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    raw = out / "data"
    if not (raw / "dataset.json").exists():
        make_demo_dataset(raw, n_cases=n_cases, seed=seed)
    stage("generate", t)

    t = time.perf_counter()
    prepared = prepare_dataset(raw, out / "prepared", PreprocessConfig(modality="MR"), workers=1, seed=seed)
    stage("prepare", t)

    runs: dict[str, Path] = {}
    init = None
    if pretrain_steps > 0:
        t = time.perf_counter()
        pcfg = pretrain_config("avsdb", overrides={
            "model": "unet", "steps": pretrain_steps, "patch": DEMO_PATCH, "batch": 2, "lr": 1e-3,
            "seed": seed, "checkpoint_every": max(1, pretrain_steps // 3), "num_workers": 1,
            "generator": {"size": (DEMO_GENERATOR,) * 3},
        })
        prun = out / "pretrain-avsdb"
        if not (prun / "model.pt").exists():
            pretrain("avsdb", None, prun, pcfg, resume=_resume_flag(prun))
        init = prun / "model.pt"
        stage("pretrain_avsdb", t)

    variants = {"scratch": None} | ({"avsdb": init} if init else {})
    for name, ckpt in variants.items():
        t = time.perf_counter()
        cfg = FinetuneConfig(
            model="unet", steps=steps, patch=DEMO_PATCH, batch=2, lr=1e-3, seed=seed, n_labeled=n_labeled,
            checkpoint_every=max(1, steps // 3), num_workers=1, augment=AugmentConfig(flip_prob=0.5),
            init=ckpt, init_part="all",
        )
        run = out / f"finetune-{name}"
        if not (run / "model.pt").exists():
            finetune(prepared.root, run, cfg, resume=_resume_flag(run))
        runs[name] = run
        stage(f"finetune_{name}", t)

    results = {}
    for name, run in runs.items():
        t = time.perf_counter()
        results[name] = evaluate(run, prepared.root, EvaluateConfig(overlays=2))
        stage(f"evaluate_{name}", t)
    timings["total"] = round(time.perf_counter() - t0, 1)

    report = out / "report.md"
    atomic_write_text(report, _render_report(prepared, results, runs, out, seed, steps, pretrain_steps,
                                             n_labeled, timings))
    atomic_write_json(out / "timings.json", timings)
    log.info("demo finished in %.0f s: %s", timings["total"], report)
    return report


def _render_report(prepared, results, runs, out, seed, steps, pretrain_steps, n_labeled, timings) -> str:
    lines = [
        "# medpretrain demo",
        "",
        f"Synthetic labelled set (seed {seed}): {len(prepared.case_ids)} volumes, "
        f"{len(prepared.split('train'))} train / {len(prepared.split('test'))} test; classes "
        + ", ".join(f"{k} = {v}" for k, v in prepared.labels.items()) + ".",
        f"Every run: `unet` (MONAI BasicUNet 16..128), {steps} fine-tuning steps, patch {DEMO_PATCH}, batch 2, "
        f"the same {n_labeled} labelled cases (seed {seed}).",
    ]
    if "avsdb" in runs:
        lines.append(f"`avsdb`: initialised from {pretrain_steps} steps of AVS-DB pretraining on formula-driven "
                     "shapes (no real or demo image seen), encoder and decoder loaded, head replaced.")
    lines += ["", "## Test metrics (mean ± std over test cases, all classes)", "",
              "| run | Dice | NSD (2 mm) | ASSD (mm) | HD95 (mm) |", "|---|---|---|---|---|"]
    for name, m in results.items():
        ov = m["overall"]
        lines.append(f"| {name} | " + " | ".join(f"{ov[k]['mean']:.3f} ± {ov[k]['std']:.3f}" for k in METRICS) + " |")
    lines += ["", "Per class:", "", "| run | class | Dice | NSD | ASSD (mm) | HD95 (mm) |", "|---|---|---|---|---|---|"]
    for name, m in results.items():
        for cname, cm in m["classes"].items():
            lines.append(f"| {name} | {cname} | " + " | ".join(
                f"{cm[k]['mean']:.3f} ± {cm[k]['std']:.3f}" for k in METRICS) + " |")
    lines.append("")
    lines.append("A demo-sized comparison (one seed, a few test cases): it shows the pipeline, not which method "
                 "is better; the benchmarks in docs/results/ answer that on real data.")
    for name, run in runs.items():
        rel = run.relative_to(out)
        lines += ["", f"## {name}", "", f"![training curve]({rel}/eval/training_curve.png)", ""]
        for png in sorted((run / "eval" / "overlays").glob("*.png")):
            lines.append(f"![{png.stem}]({rel}/eval/overlays/{png.name})")
        lines += ["", f"Full report: [{rel}/eval/report.md]({rel}/eval/report.md)"]
    lines += ["", "## Timings (s, 2 CPU cores)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"
