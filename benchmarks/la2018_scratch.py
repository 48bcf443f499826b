"""From-scratch `unet` on la2018 with 4, 8 and 80 labelled cases under one CPU budget.

Reproduce (2 CPU cores, ~40 min; tcmalloc preloaded by the CLI when installed):

    python benchmarks/la2018_scratch.py --shared ../shared --work runs/bench --out docs/results/la2018-scratch

Budget (the spine's calibration recipe): BasicUNet 16..128, 1.25 mm, patch 64x64x48, batch 2, DiceCE, flips,
AdamW 1e-3 one-cycle, 600 steps, seed 0. Each run is a separate `medpretrain finetune` / `evaluate` process,
so the committed numbers come from the same commands a user types. Finished runs are reused.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

from _common import sh

BUDGET = {"model": "unet", "steps": 600, "patch": [64, 64, 48], "batch": 2, "lr": 1e-3, "seed": 0}




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--work", type=Path, default=Path("runs/bench"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/la2018-scratch"))
    ap.add_argument("--n-labeled", type=int, nargs="+", default=[4, 8, 80])
    ap.add_argument("--steps", type=int, default=BUDGET["steps"])
    ap.add_argument("--seed", type=int, default=BUDGET["seed"])
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    exe = [sys.executable, "-m", "medpretrain"]
    dataset = args.shared / "data" / "la2018"
    if not dataset.is_dir():
        sys.exit(f"{dataset} not found: pass --shared pointing at the folder that holds data/la2018")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "commands.log"
    prepared = args.work / "la2018-prepared"
    t = time.perf_counter()
    sh(exe + ["prepare", "--dataset", str(dataset), "--out", str(prepared), "--spacing", "1.25", "1.25", "1.25",
              "--modality", "MR", "--workers", "2"], log)
    prepare_s = time.perf_counter() - t

    rows = []
    for n in args.n_labeled:
        run = args.work / f"scratch-unet-n{n}-s{args.seed}-{args.steps}steps-{args.precision}"
        if not (run / "model.pt").exists():
            resume = ["--resume"] if (run / "checkpoints").exists() else []
            sh(exe + ["finetune", "--data", str(prepared), "--out", str(run), "--model", BUDGET["model"],
                      "--n-labeled", str(n), "--steps", str(args.steps), "--patch", *map(str, BUDGET["patch"]),
                      "--batch", str(BUDGET["batch"]), "--lr", str(BUDGET["lr"]), "--seed", str(args.seed),
                      "--precision", args.precision] + resume, log)
        if not (run / "eval" / "metrics.json").exists():
            sh(exe + ["evaluate", "--run", str(run), "--data", str(prepared), "--overlays", "2"], log)
        metrics = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
        info = json.loads((run / "run.json").read_text(encoding="utf-8"))
        ov = metrics["overall"]
        row = {
            "method": "scratch", "model": BUDGET["model"], "n_labeled": n, "seed": args.seed, "steps": args.steps,
            "patch": "x".join(map(str, BUDGET["patch"])), "batch": BUDGET["batch"], "precision": info["precision"],
            **{f"{m}_mean": round(ov[m]["mean"], 4) for m in ("dice", "nsd", "assd", "hd95")},
            **{f"{m}_std": round(ov[m]["std"], 4) for m in ("dice", "nsd", "assd", "hd95")},
            "train_wall_s": info["training"]["wall_time_s"], "s_per_step": info["training"]["s_per_step"],
            "eval_s_per_case": metrics["context"]["inference_seconds_per_case"],
        }
        rows.append(row)
        dest = args.out / f"n{n}"
        dest.mkdir(exist_ok=True)
        for name in ("metrics.json", "per_case.csv", "report.md", "training_curve.png"):
            if (run / "eval" / name).exists():
                shutil.copy(run / "eval" / name, dest / name)
        if (run / "eval" / "overlays").exists():
            shutil.copytree(run / "eval" / "overlays", dest / "overlays", dirs_exist_ok=True)
        shutil.copy(run / "run.json", dest / "run.json")

    with open(args.out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# la2018: `unet` from scratch",
        "",
        f"Command: `python benchmarks/la2018_scratch.py --shared ../shared --work runs/bench --out {args.out}`",
        "",
        f"Budget: BasicUNet 16..128, 1.25 mm, patch {BUDGET['patch']}, batch {BUDGET['batch']}, DiceCE, flips, "
        f"AdamW {BUDGET['lr']} one-cycle, {args.steps} steps, seed {args.seed}; test = the 20 cases of splits.json; "
        "sliding window (Gaussian, overlap 0.5). Metrics on the 1.25 mm prepared grid; NSD tolerance 2 mm.",
        f"Machine: {os.cpu_count()} CPU cores; prepare took {prepare_s:.0f} s (cached runs re-used).",
        "",
        "| labelled cases | Dice | NSD | ASSD (mm) | HD95 (mm) | precision | train wall (s) | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n_labeled']} | {r['dice_mean']:.3f} ± {r['dice_std']:.3f} | {r['nsd_mean']:.3f} ± {r['nsd_std']:.3f} "
            f"| {r['assd_mean']:.2f} ± {r['assd_std']:.2f} | {r['hd95_mean']:.2f} ± {r['hd95_std']:.2f} "
            f"| {r['precision']} | {r['train_wall_s']:.0f} | {r['s_per_step']:.2f} |")
    lines += ["", "Mean ± std over the 20 test cases. Per-case tables, curves and overlays: `nN/`.", ""]
    (args.out / "README.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
