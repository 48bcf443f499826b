"""Paired gain of each pretrained arm over a control arm other than scratch (e.g. the null control), per labelled-set
size: mean ± std over seeds, seeds improved, test cases improved, Wilcoxon p over the cases (each case's gain
averaged over seeds) -- the statistics of the benchmark report, with another reference arm.

    python benchmarks/gain_vs_control.py --runs runs/transfer-la2018/runs --backbone unet --control null \
        --arms volume-fusion volume-fusion-k1 volume-fusion-shuffled --n 4 8 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from medpretrain.evaluation.benchmark_report import per_case_gains, wilcoxon_p


def case_dice(run: Path) -> dict[str, float]:
    rows: dict[str, list[float]] = defaultdict(list)
    with open(run / "eval" / "per_case.csv", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            rows[r["case_id"]].append(float(r["dice"]))
    return {c: float(np.mean(v)) for c, v in rows.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--backbone", default="unet")
    ap.add_argument("--control", default="null")
    ap.add_argument("--arms", nargs="+", required=True)
    ap.add_argument("--n", nargs="+", default=["4", "8"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args(argv)
    print(f"| n labelled | arm | Dice gain over {args.control} (mean ± std over seeds) | seeds improved | "
          "test cases improved | Wilcoxon p |\n|---|---|---|---|---|---|")
    for n in args.n:
        for arm in args.arms:
            pairs = [(case_dice(args.runs / f"{arm}-{args.backbone}-n{n}-s{s}"),
                      case_dice(args.runs / f"{args.control}-{args.backbone}-n{n}-s{s}")) for s in args.seeds]
            per_seed = [np.mean(list(a.values())) - np.mean(list(b.values())) for a, b in pairs]
            cases = per_case_gains(pairs)
            p = wilcoxon_p(cases)
            print(f"| {n} | {arm} | {np.mean(per_seed):+.3f} ± {np.std(per_seed, ddof=1):.3f} | "
                  f"{sum(d > 0 for d in per_seed)}/{len(per_seed)} | {sum(d > 0 for d in cases)}/{len(cases)} | "
                  f"{'–' if p is None else f'{p:.3g}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
