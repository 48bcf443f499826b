"""Paired gain of each pretrained arm over a control arm other than scratch (e.g. the null control), per labelled-set
size: mean ± std over seeds, seeds improved, test cases improved, Wilcoxon p over the cases (each case's gain
averaged over seeds) -- the statistics of the benchmark report, with another reference arm.

    python benchmarks/gain_vs_control.py --runs runs/transfer-la2018/runs --backbone unet --control null \
        --arms volume-fusion volume-fusion-k1 volume-fusion-shuffled --n 4 8 --seeds 0 1 2

The control may be on another backbone (``--control-backbone``): e.g. scratch with the planned patch against
scratch with the fixed default patch (issue 22). The last column is each side's mean training wall time
(``run.json``), for comparisons meant to be at equal wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
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


def wall_minutes(run: Path) -> float | None:
    training = json.loads((run / "run.json").read_text(encoding="utf-8")).get("training", {})
    return training["wall_time_s"] / 60 if "wall_time_s" in training else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--backbone", default="unet")
    ap.add_argument("--control", default="null")
    ap.add_argument("--control-backbone", default=None, help="the control's backbone (default: --backbone)")
    ap.add_argument("--arms", nargs="+", required=True)
    ap.add_argument("--n", nargs="+", default=["4", "8"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args(argv)
    control_backbone = args.control_backbone or args.backbone
    control = args.control if control_backbone == args.backbone else f"{args.control}-{control_backbone}"
    print(f"| n labelled | arm | Dice gain over {control} (mean ± std over seeds) | seeds improved | "
          "test cases improved | Wilcoxon p | training wall time, arm / control (min) |\n|---|---|---|---|---|---|---|")
    for n in args.n:
        for arm in args.arms:
            runs = [(args.runs / f"{arm}-{args.backbone}-n{n}-s{s}",
                     args.runs / f"{args.control}-{control_backbone}-n{n}-s{s}") for s in args.seeds]
            # seeds whose two runs are both evaluated (a benchmark in progress has unfinished ones)
            runs = [(a, b) for a, b in runs if (a / "eval" / "per_case.csv").is_file()
                    and (b / "eval" / "per_case.csv").is_file()]
            if not runs:
                print(f"| {n} | {arm} | no seed with both runs finished | | | | |")
                continue
            pairs = [(case_dice(a), case_dice(b)) for a, b in runs]
            walls = [[wall_minutes(r) for r in side] for side in zip(*runs)]
            wall = " / ".join("–" if None in w else f"{np.mean(w):.1f}" for w in walls)
            per_seed = [np.mean(list(a.values())) - np.mean(list(b.values())) for a, b in pairs]
            cases = per_case_gains(pairs)
            p = wilcoxon_p(cases)
            spread = f" ± {np.std(per_seed, ddof=1):.3f}" if len(per_seed) > 1 else ""
            print(f"| {n} | {arm} | {np.mean(per_seed):+.3f}{spread} | "
                  f"{sum(d > 0 for d in per_seed)}/{len(per_seed)} | {sum(d > 0 for d in cases)}/{len(cases)} | "
                  f"{'–' if p is None else f'{p:.3g}'} | {wall} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
