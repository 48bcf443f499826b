"""la2018 fine-tuning from an AVS-DB-pretrained `unet` vs from scratch, at the same budget.

Reproduce (2 CPU cores; one pretraining of ~10 min, then ~8 min per fine-tuning run):

    python benchmarks/avsdb_la2018.py --shared ../shared --work runs/bench --out docs/results/avsdb/la2018 \
        --seeds 0 1 2 --n-labeled 4 8

Budget of every fine-tuning run (both arms): the spine's calibrated scratch recipe (BasicUNet 16..128,
1.25 mm, patch 64x64x48, batch 2, DiceCE, flips, AdamW 1e-3 one-cycle, 600 steps); for a seed the
labelled cases are identical in both arms. The pretrained arm loads encoder and decoder (`--init-part
all`; the 17-class head is replaced). Pretraining: `medpretrain pretrain --method avsdb` CPU preset
(64^3 outline volumes, 20 shapes, 16 classes, 5,000-volume database, Dice loss, batch 2, AdamW 1e-3),
`--pretrain-steps` steps. Finished runs are reused (scratch runs are shared with la2018_scratch.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FINETUNE = ["--model", "unet", "--steps", "600", "--patch", "64", "64", "48", "--batch", "2", "--lr", "0.001",
            "--precision", "auto"]
METRICS = ("dice", "nsd", "assd", "hd95")


def sh(args: list[str], log: Path) -> None:
    print("$", " ".join(args), flush=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(args) + "\n")
        fh.flush()
        subprocess.run(args, check=True, stdout=fh, stderr=subprocess.STDOUT)


def finetune_and_evaluate(exe, prepared: Path, run: Path, n: int, seed: int, init: Path | None, log: Path) -> dict:
    if not (run / "model.pt").exists():
        extra = ["--init", str(init), "--init-part", "all"] if init else []
        resume = ["--resume"] if (run / "checkpoints").exists() else []
        sh(exe + ["finetune", "--data", str(prepared), "--out", str(run), "--n-labeled", str(n), "--seed", str(seed)]
           + FINETUNE + extra + resume, log)
    if not (run / "eval" / "metrics.json").exists():
        sh(exe + ["evaluate", "--run", str(run), "--data", str(prepared), "--overlays", "0"], log)
    metrics = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    per_case = {}
    with open(run / "eval" / "per_case.csv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            per_case[row["case_id"]] = float(row["dice"])
    return {"overall": metrics["overall"], "per_case_dice": per_case, "wall_s": info["training"]["wall_time_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--work", type=Path, default=Path("runs/bench"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/avsdb/la2018"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-labeled", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--pretrain-steps", type=int, default=600)
    args = ap.parse_args()
    exe = [sys.executable, "-m", "medpretrain"]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "commands.log"
    prepared = args.work / "la2018-prepared"
    sh(exe + ["prepare", "--dataset", str(args.shared / "data" / "la2018"), "--out", str(prepared),
              "--spacing", "1.25", "1.25", "1.25", "--modality", "MR", "--workers", "2"], log)

    pre = args.work / f"pretrain-avsdb-unet-{args.pretrain_steps}steps"
    t = time.perf_counter()
    if not (pre / "model.pt").exists():
        resume = ["--resume"] if (pre / "checkpoints").exists() else []
        sh(exe + ["pretrain", "--method", "avsdb", "--preset", "cpu", "--model", "unet", "--steps",
                  str(args.pretrain_steps), "--out", str(pre)] + resume, log)
    pre_info = json.loads((pre / "run.json").read_text(encoding="utf-8"))
    print(f"pretraining: {time.perf_counter() - t:.0f} s (cached if ~0)")

    rows = []
    for seed in args.seeds:
        for n in args.n_labeled:
            arms = {
                "scratch": finetune_and_evaluate(
                    exe, prepared, args.work / f"scratch-unet-n{n}-s{seed}-600steps-auto", n, seed, None, log),
                "avsdb": finetune_and_evaluate(
                    exe, prepared, args.work / f"avsdb{args.pretrain_steps}-unet-n{n}-s{seed}-600steps", n, seed,
                    pre / "model.pt", log),
            }
            for method, res in arms.items():
                rows.append({"method": method, "model": "unet", "n_labeled": n, "seed": seed, "steps": 600,
                             **{m: round(res["overall"][m]["mean"], 4) for m in METRICS},
                             "train_wall_s": res["wall_s"]})
            diffs = [arms["avsdb"]["per_case_dice"][c] - arms["scratch"]["per_case_dice"][c]
                     for c in arms["scratch"]["per_case_dice"]]
            rows[-1]["paired_dice_gain_vs_scratch"] = round(float(np.mean(diffs)), 4)
            rows[-1]["cases_improved"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"

    fields = ["method", "model", "n_labeled", "seed", "steps", *METRICS, "train_wall_s",
              "paired_dice_gain_vs_scratch", "cases_improved"]
    with open(args.out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    lines = ["# la2018: AVS-DB-pretrained `unet` vs scratch", "",
             "Command: `python benchmarks/avsdb_la2018.py --shared ../shared --work runs/bench "
             f"--out {args.out} --seeds {' '.join(map(str, args.seeds))} "
             f"--n-labeled {' '.join(map(str, args.n_labeled))} --pretrain-steps {args.pretrain_steps}`", "",
             f"Pretraining: {args.pretrain_steps} steps of the avsdb CPU preset "
             f"({pre_info.get('training', {}).get('wall_time_s', '?')} s). Fine-tuning budget per run: 600 steps, "
             "patch 64x64x48, batch 2 (the calibrated scratch recipe); 20 test cases; Dice mean over cases.", "",
             "| n labelled | method | seeds | Dice mean ± std over seeds | NSD | ASSD (mm) | HD95 (mm) |",
             "|---|---|---|---|---|---|---|"]
    for n in args.n_labeled:
        for method in ("scratch", "avsdb"):
            sel = [r for r in rows if r["n_labeled"] == n and r["method"] == method]
            stat = {m: (np.mean([r[m] for r in sel]), np.std([r[m] for r in sel])) for m in METRICS}
            lines.append(f"| {n} | {method} | {len(sel)} | " + " | ".join(
                f"{stat[m][0]:.3f} ± {stat[m][1]:.3f}" for m in METRICS) + " |")
    lines += ["", "Paired per seed (same labelled cases, same test cases):", "",
              "| n labelled | seed | Dice scratch | Dice avsdb | mean per-case gain | cases improved |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "avsdb":
            s = next(x for x in rows if x["method"] == "scratch" and x["n_labeled"] == r["n_labeled"]
                     and x["seed"] == r["seed"])
            lines.append(f"| {r['n_labeled']} | {r['seed']} | {s['dice']:.3f} | {r['dice']:.3f} | "
                         f"{r['paired_dice_gain_vs_scratch']:+.3f} | {r['cases_improved']} |")
    (args.out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
