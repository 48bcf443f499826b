"""The main job with no download: synthetic labelled data -> prepare -> fine-tune -> evaluate -> report."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from medpretrain.config import AugmentConfig, EvaluateConfig, FinetuneConfig
from medpretrain.data.cache import prepare_dataset
from medpretrain.data.preprocess import PreprocessConfig
from medpretrain.engine.checkpointing import find_resume_checkpoint
from medpretrain.engine.finetune import finetune
from medpretrain.synthetic.demo_data import make_demo_dataset

log = logging.getLogger("medpretrain")

#: Sized to finish in a few minutes on 2 CPU cores (measured: docs/results/demo/).
DEMO_STEPS = 300
DEMO_PATCH = (48, 48, 32)


def demo(out: str | Path = "runs/demo", seed: int = 0, steps: int = DEMO_STEPS, n_cases: int = 12,
         fresh: bool = False) -> Path:
    """Run the whole pipeline on procedurally generated data and write ``OUT/report.md``.

    Args:
        out: output folder (data, prepared cache, run, report).
        seed: seeds the synthetic data and training; another seed gives another data set.
        steps: fine-tuning steps.
        n_cases: synthetic labelled volumes (a quarter is held out for testing).
        fresh: delete ``out`` first (otherwise finished stages are reused).
    """
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings = {}

    raw = out / "data"
    if not (raw / "dataset.json").exists():
        make_demo_dataset(raw, n_cases=n_cases, seed=seed)
    timings["generate_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    prepared = prepare_dataset(raw, out / "prepared", PreprocessConfig(modality="MR"), workers=1, seed=seed)
    timings["prepare_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg = FinetuneConfig(
        model="unet", steps=steps, patch=DEMO_PATCH, batch=2, lr=1e-3, seed=seed,
        checkpoint_every=max(1, steps // 3), num_workers=1,
        augment=AugmentConfig(flip_prob=0.5),
    )
    run = out / "scratch"
    if not (run / "model.pt").exists():
        finetune(prepared.root, run, cfg, resume=find_resume_checkpoint(run / "checkpoints") is not None)
    timings["finetune_s"] = time.perf_counter() - t

    t = time.perf_counter()
    from medpretrain.api import evaluate

    metrics = evaluate(run, prepared.root, EvaluateConfig(overlays=4))
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    report = out / "report.md"
    eval_dir = Path("scratch") / "eval"
    lines = [
        "# medpretrain demo",
        "",
        f"Synthetic labelled set (seed {seed}): {n_cases} volumes, "
        f"{len(prepared.split('train'))} train / {len(prepared.split('test'))} test, classes "
        + ", ".join(f"{k}={v}" for k, v in prepared.labels.items()) + ".",
        f"Model `unet` (MONAI BasicUNet 16..128) trained from scratch: {steps} steps, patch {DEMO_PATCH}, batch 2.",
        "",
        "## Test metrics (mean ± std over test cases)",
        "",
        "| class | Dice | NSD (2 mm) | ASSD (mm) | HD95 (mm) |",
        "|---|---|---|---|---|",
    ]
    for name, m in metrics["classes"].items():
        lines.append("| " + name + " | " + " | ".join(
            f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k in ("dice", "nsd", "assd", "hd95")) + " |")
    lines += ["", "## Training curve", "", f"![training curve]({eval_dir}/training_curve.png)", "",
              "## Overlays (best and worst test cases)", ""]
    for png in sorted((out / eval_dir / "overlays").glob("*.png")):
        lines.append(f"![{png.stem}]({eval_dir}/overlays/{png.name})")
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k[:-2]} | {v:.1f} |" for k, v in timings.items()]
    lines += ["", f"Full evaluation report: [{eval_dir}/report.md]({eval_dir}/report.md)", ""]
    report.write_text("\n".join(lines), encoding="utf-8")
    (out / "timings.json").write_text(json.dumps(timings, indent=1), encoding="utf-8")
    log.info("demo finished in %.0f s: %s", timings["total_s"], report)
    return report
