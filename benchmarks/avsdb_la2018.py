"""la2018 fine-tuning from an AVS-DB-pretrained `unet` vs from scratch, at the same budget, plus small-scale
versions of the paper's ablations.

Reproduce (2 CPU cores; ~10 min per pretraining, ~6.5 min per fine-tuning run + evaluation):

    python benchmarks/avsdb_la2018.py --shared ../shared --work runs/bench --out docs/results/avsdb/la2018 \
        --seeds 0 1 2 --n-labeled 4 8 --ablations xy4-z2 no-overlap filled --ablation-n 4 --ablation-seeds 0

Budget of every fine-tuning run (every arm): the spine's calibrated scratch recipe (BasicUNet 16..128,
1.25 mm, patch 64x64x48, batch 2, DiceCE, flips, AdamW 1e-3 one-cycle, 600 steps); for a seed the labelled
cases are identical in every arm. Pretrained arms load encoder and decoder (`--init-part all`; the
synthetic-class head is replaced). Pretraining: `medpretrain pretrain --method avsdb --preset cpu` (64^3
volumes, 20 shapes, 5,000-volume database, Dice loss, batch 2, AdamW 1e-3), `--pretrain-steps` steps; an
ablation changes one generator setting of that preset (Table 1 of the paper):

- `xy4-z2`: 4 cross-sections x {prism, hourglass} = 8 classes instead of 16 (Table 1a);
- `no-overlap`: shapes placed without overlap (Table 1b);
- `filled`: textured filled shapes instead of the public generator's outlines (our addition).

Every finished run is recorded in `OUT/records.jsonl` (overall metrics, per-case Dice, wall time); a
re-run skips recorded runs, so the script can be re-run with more seeds or ablations, or after a crash.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from _common import METRICS, finetune_and_evaluate, load_records, mean_std, paired, sh

FINETUNE = ["--model", "unet", "--steps", "600", "--patch", "64", "64", "48", "--batch", "2", "--lr", "0.001",
            "--precision", "auto"]
# Generator settings of each pretraining arm, over the cpu preset (64^3, xy8-z2, overlap, outline).
ARMS = {
    "avsdb": {},
    "xy4-z2": {"classes": "xy4-z2"},
    "no-overlap": {"overlap": False},
    "filled": {"render": "filled"},
}




def pretrain(exe, work: Path, arm: str, steps: int, log: Path) -> tuple[Path, float]:
    pre = work / (f"pretrain-avsdb-unet-{steps}steps" if arm == "avsdb" else f"pretrain-avsdb-{arm}-unet-{steps}steps")
    if not (pre / "model.pt").exists():
        pre.mkdir(parents=True, exist_ok=True)
        extra = []
        if ARMS[arm]:
            cfg = pre / "ablation.yaml"
            cfg.write_text(json.dumps({"generator": ARMS[arm]}) + "\n", encoding="utf-8")  # JSON is YAML
            extra = ["--config", str(cfg)]
        resume = ["--resume"] if (pre / "checkpoints").exists() else []
        sh(exe + ["pretrain", "--method", "avsdb", "--preset", "cpu", "--model", "unet", "--steps", str(steps),
                  "--out", str(pre)] + extra + resume, log)
    info = json.loads((pre / "run.json").read_text(encoding="utf-8"))
    return pre / "model.pt", float(info.get("training", {}).get("wall_time_s", float("nan")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--work", type=Path, default=Path("runs/bench"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/avsdb/la2018"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-labeled", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--ablations", nargs="*", default=["xy4-z2", "no-overlap", "filled"], choices=list(ARMS)[1:])
    ap.add_argument("--ablation-n", type=int, nargs="+", default=[4])
    ap.add_argument("--ablation-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--run-only", nargs="+", choices=["scratch", *ARMS], default=None,
                    help="run only these arms' missing jobs (e.g. two invocations with OMP_NUM_THREADS=1 side by "
                         "side on a 2-core machine); the report is written once every job is recorded")
    args = ap.parse_args()
    exe = [sys.executable, "-m", "medpretrain"]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "commands.log"
    rec_path = args.out / "records.jsonl"
    records = load_records(rec_path)

    jobs = [(arm, n, s) for s in args.seeds for n in args.n_labeled for arm in ("scratch", "avsdb")]
    for arm in args.ablations:
        for s in args.ablation_seeds:
            for n in args.ablation_n:
                for job in (("scratch", n, s), ("avsdb", n, s), (arm, n, s)):
                    if job not in jobs:
                        jobs.append(job)

    prepared = args.work / "la2018-prepared"
    pretrain_wall = {}
    if any(job not in records for job in jobs):
        sh(exe + ["prepare", "--dataset", str(args.shared / "data" / "la2018"), "--out", str(prepared),
                  "--spacing", "1.25", "1.25", "1.25", "--modality", "MR", "--workers", "2"], log)
    for arm, n, seed in jobs:
        if (arm, n, seed) in records or (args.run_only and arm not in args.run_only):
            continue
        init = None
        if arm != "scratch":
            init, pretrain_wall[arm] = pretrain(exe, args.work, arm, args.pretrain_steps, log)
        name = (f"scratch-unet-n{n}-s{seed}-600steps-auto" if arm == "scratch" else
                f"avsdb{args.pretrain_steps}-unet-n{n}-s{seed}-600steps" if arm == "avsdb" else
                f"avsdb{args.pretrain_steps}-{arm}-unet-n{n}-s{seed}-600steps")
        res = finetune_and_evaluate(exe, prepared, args.work / name, n, seed, init, log, FINETUNE)
        rec = {"arm": arm, "model": "unet", "n_labeled": n, "seed": seed, "steps": 600,
               "pretrain_steps": None if arm == "scratch" else args.pretrain_steps,
               "pretrain_wall_s": pretrain_wall.get(arm), **res}
        records[(arm, n, seed)] = rec
        with open(rec_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")

    records = load_records(rec_path)  # another invocation may have added runs meanwhile
    missing = [job for job in jobs if job not in records]
    if missing:
        print(f"{len(missing)} job(s) not recorded yet ({missing}); report not written")
        return
    rows = []
    for arm, n, seed in jobs:
        r = records[(arm, n, seed)]
        row = {k: r.get(k) for k in ("arm", "model", "n_labeled", "seed", "steps", *METRICS, "train_wall_s")}
        if arm != "scratch":
            row["paired_dice_gain_vs_scratch"], row["cases_improved"] = paired(r, records[("scratch", n, seed)])
        rows.append(row)
    fields = ["arm", "model", "n_labeled", "seed", "steps", *METRICS, "train_wall_s",
              "paired_dice_gain_vs_scratch", "cases_improved"]
    with open(args.out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    cmd = (f"python benchmarks/avsdb_la2018.py --shared ../shared --work runs/bench --out {args.out} "
           f"--seeds {' '.join(map(str, args.seeds))} --n-labeled {' '.join(map(str, args.n_labeled))} "
           f"--pretrain-steps {args.pretrain_steps}"
           + (f" --ablations {' '.join(args.ablations)} --ablation-n {' '.join(map(str, args.ablation_n))} "
              f"--ablation-seeds {' '.join(map(str, args.ablation_seeds))}" if args.ablations else " --ablations"))
    lines = ["# la2018: AVS-DB-pretrained `unet` vs scratch", "", f"Command: `{cmd}`", "",
             f"Pretraining: {args.pretrain_steps} steps of the avsdb CPU preset (batch 2, so "
             f"{2 * args.pretrain_steps} synthetic volumes seen; the paper sees 5,000 volumes x many epochs). "
             "Fine-tuning budget per run: 600 steps, patch 64x64x48, batch 2 (the calibrated scratch recipe); "
             "20 test cases. Per run, a metric is the mean over the 20 test cases; below, mean ± sample std of "
             "that over seeds.", "",
             "| n labelled | arm | seeds | Dice | NSD | ASSD (mm) | HD95 (mm) |", "|---|---|---|---|---|---|---|"]
    for n in args.n_labeled:
        for arm in ("scratch", "avsdb"):
            sel = [records[(arm, n, s)] for s in args.seeds]
            lines.append(f"| {n} | {arm} | {len(sel)} | " + " | ".join(mean_std([r[m] for r in sel])
                                                                          for m in METRICS) + " |")
    lines += ["", "Paired per seed (same labelled cases, same test cases):", "",
              "| n labelled | seed | Dice scratch | Dice avsdb | mean per-case gain | cases improved |",
              "|---|---|---|---|---|---|"]
    gains = {}
    for seed in args.seeds:
        for n in args.n_labeled:
            s, a = records[("scratch", n, seed)], records[("avsdb", n, seed)]
            g, imp = paired(a, s)
            gains.setdefault(n, []).append(g)
            lines.append(f"| {n} | {seed} | {s['dice']:.3f} | {a['dice']:.3f} | {g:+.3f} | {imp} |")
    lines += ["", "Mean paired Dice gain over seeds: " + "; ".join(
        f"n={n}: {np.mean(v):+.3f} (seeds with a gain: {sum(x > 0 for x in v)}/{len(v)})" for n, v in gains.items())]
    if args.ablations:
        lines += ["", "## Ablations (paper Table 1, small scale)", "",
                  f"Each arm: {args.pretrain_steps} pretraining steps, then the same fine-tuning; n labelled "
                  f"{', '.join(map(str, args.ablation_n))}, seeds {', '.join(map(str, args.ablation_seeds))}.", "",
                  "| n labelled | arm | generator change | Dice | NSD | HD95 (mm) | paired gain vs scratch |",
                  "|---|---|---|---|---|---|---|"]
        for n in args.ablation_n:
            for arm in ("scratch", "avsdb", *args.ablations):
                sel = [records[(arm, n, s)] for s in args.ablation_seeds]
                gain = "" if arm == "scratch" else mean_std(
                    [paired(records[(arm, n, s)], records[("scratch", n, s)])[0] for s in args.ablation_seeds])
                change = "none (xy8-z2, overlap, outline)" if arm == "avsdb" else json.dumps(ARMS.get(arm, {})) \
                    if arm != "scratch" else "no pretraining"
                lines.append(f"| {n} | {arm} | {change} | " + " | ".join(
                    mean_std([r[m] for r in sel]) for m in ("dice", "nsd", "hd95")) + f" | {gain} |")
    (args.out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
