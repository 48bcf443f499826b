"""la2018 fine-tuning of `unetr-small` from Alice pretraining vs from scratch at the same budget, and Alice
without l_dv (paper Table 4) and without CASA (Table 5).

Reproduce (2 CPU cores; needs the combined pool and a trained sam matcher, see docs/results/alice/README.md):

    python benchmarks/alice_la2018.py --shared ../shared --pool runs/alice/pool-prepared \\
        --matcher-run runs/alice-matcher/matcher --work runs/alice --out docs/results/alice/la2018 \\
        --seeds 0 --n-labeled 4 8 --arms alice --pretrain-steps 300

Budget of every fine-tuning run (every arm): unetr-small (MONAI UNETR, ViT hidden 192, 3 heads), 1.25 mm,
patch 64x64x48 (the pretraining crop: UNETR's positional embeddings are per patch), batch 2, DiceCE, flips,
AdamW `--lr` one-cycle, 600 steps; for a seed the labelled cases are identical in every arm. Pretrained arms
load the encoder only (`--init-part encoder`: Alice pretrains the online encoder). Pretraining: `medpretrain
pretrain --method alice --preset cpu --matcher sam` on the pool (20 shared scans + the 80 la2018 train images,
labels unused), `--pretrain-steps` steps; an ablation changes one setting:

- `no-dv`: `inter_volume: false`: K is a crop around another of the query scan's table points (Q's centres
  are the match table's, as in `alice`) and l_dv is dropped (Table 4 "x");
- `no-casa`: `casa: false`: pooled siamese contrast of masked and intact views instead of CASA (Table 5 "w/o").

Finished runs are recorded in `OUT/records.jsonl`; a re-run skips them. On 2 cores the full plan runs as two
lanes side by side (`OMP_NUM_THREADS=1`, disjoint `--seeds`/`--arms`, e.g. `--seeds 1 --arms alice` and
`--seeds 2 --arms alice`; an ablation arm's pretraining in one lane only), then the full plan with
`--report-only` writes the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medpretrain.evaluation.benchmark_report import per_case_gains, wilcoxon_p

from _common import METRICS, finetune_and_evaluate, load_records, mean_std, paired, sh

ARMS = {"alice": {}, "no-dv": {"inter_volume": False}, "no-casa": {"casa": False}}


def pretrain(exe, args, arm: str, log: Path) -> tuple[Path, float]:
    pre = args.work / f"pretrain-alice-{arm}-unetr-small-{args.pretrain_steps}steps"
    if not (pre / "model.pt").exists():
        pre.mkdir(parents=True, exist_ok=True)
        cfg = pre / "arm.yaml"
        cfg.write_text(json.dumps(ARMS[arm]) + "\n", encoding="utf-8")  # JSON is YAML
        resume = ["--resume"] if (pre / "checkpoints").exists() else []
        sh(exe + ["pretrain", "--method", "alice", "--preset", "cpu", "--model", "unetr-small", "--matcher", "sam",
                  "--matcher-run", str(args.matcher_run), "--data", str(args.pool), "--steps",
                  str(args.pretrain_steps), "--out", str(pre), "--config", str(cfg)] + resume, log)
    info = json.loads((pre / "run.json").read_text(encoding="utf-8"))
    return pre / "model.pt", float(info.get("training", {}).get("wall_time_s", float("nan")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--pool", type=Path, required=True)
    ap.add_argument("--matcher-run", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("runs/alice"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/alice/la2018"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-labeled", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--report-only", action="store_true",
                    help="write the report of the recorded runs of this plan and run nothing (e.g. after lanes: "
                         "invocations with disjoint --seeds/--arms and OMP_NUM_THREADS=1 side by side)")
    args = ap.parse_args()
    exe = [sys.executable, "-m", "medpretrain"]
    finetune_args = ["--model", "unetr-small", "--steps", "600", "--patch", "64", "64", "48", "--batch", "2",
                     "--lr", str(args.lr), "--precision", "auto"]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "commands.log"
    rec_path = args.out / "records.jsonl"
    records = load_records(rec_path)
    prepared = args.work / "la2018-prepared"
    jobs = [(arm, n, s) for s in args.seeds for n in args.n_labeled for arm in ("scratch", *args.arms)]
    if args.report_only:
        jobs_to_run = []
    else:
        jobs_to_run = [job for job in jobs if job not in records]
    if jobs_to_run and not (prepared / "manifest.json").exists():
        sh(exe + ["prepare", "--dataset", str(args.shared / "data" / "la2018"), "--out", str(prepared),
                  "--spacing", "1.25", "1.25", "1.25", "--modality", "MR", "--workers", "2"], log)
    for arm, n, seed in jobs_to_run:
        init, pre_wall = (None, None) if arm == "scratch" else pretrain(exe, args, arm, log)
        run = args.work / f"{arm}-unetr-small-n{n}-s{seed}-600steps-lr{args.lr:g}"
        res = finetune_and_evaluate(exe, prepared, run, n, seed, init, log, finetune_args, init_part="encoder")
        rec = {"arm": arm, "model": "unetr-small", "n_labeled": n, "seed": seed, "steps": 600, "lr": args.lr,
               "pretrain_steps": None if arm == "scratch" else args.pretrain_steps, "pretrain_wall_s": pre_wall,
               **res}
        with open(rec_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        records[(arm, n, seed)] = rec

    records = load_records(rec_path)  # another invocation (lane) may have added runs meanwhile
    cmd = (f"python benchmarks/alice_la2018.py --shared ../shared --pool {args.pool} --matcher-run "
           f"{args.matcher_run} --work {args.work} --out {args.out} --seeds {' '.join(map(str, args.seeds))} "
           f"--n-labeled {' '.join(map(str, args.n_labeled))} --arms {' '.join(args.arms)} "
           f"--pretrain-steps {args.pretrain_steps} --lr {args.lr:g}")
    lines = ["# la2018: Alice-pretrained `unetr-small` vs scratch", "", f"Command: `{cmd}`", "",
             f"Pretraining: {args.pretrain_steps} steps of the alice CPU preset (sam matcher). Fine-tuning budget "
             f"per run: 600 steps, unetr-small, patch 64x64x48, batch 2, lr {args.lr:g}; 20 test cases. A metric "
             "is the mean over the test cases; mean ± sample std over seeds; paired gain = mean per-case Dice "
             "difference to scratch with the same seed (same labelled and test cases), per seed; p = two-sided "
             "Wilcoxon signed-rank test over the 20 test cases of the per-case gain averaged over seeds.", "",
             "| n labelled | arm | seeds | Dice | NSD | ASSD (mm) | HD95 (mm) | paired Dice gain | cases improved "
             "(per seed) | p |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in args.n_labeled:
        for arm in ("scratch", *args.arms):
            sel = [records[(arm, n, s)] for s in args.seeds if (arm, n, s) in records]
            if not sel:
                continue
            pairs = [(r, records[("scratch", n, r["seed"])]) for r in sel
                     if arm != "scratch" and ("scratch", n, r["seed"]) in records]
            gains = [paired(r, s) for r, s in pairs]
            gain = mean_std([g for g, _ in gains]) if gains else ""
            improved = ", ".join(i for _, i in gains)
            case_dice = [(r.get("per_case_dice", {}), s.get("per_case_dice", {})) for r, s in pairs]
            p = wilcoxon_p(per_case_gains(case_dice)) if pairs else None
            lines.append(f"| {n} | {arm} | {len(sel)} | " + " | ".join(mean_std([r[m] for r in sel]) for m in METRICS)
                         + f" | {gain} | {improved} | {'' if p is None else f'{p:.2g}'} |")
    done = sum(job in records for job in jobs)
    lines += ["", f"{done} of {len(jobs)} planned runs recorded."]
    (args.out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
