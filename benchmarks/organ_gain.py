"""Per-organ and per-organ-group gain of pretrained arms over a control (scratch by default) in a multi-organ
benchmark's test runs: where in the anatomy a gain sits (issue 20's BTCV groups: large = spleen, kidneys, liver,
stomach; small = gallbladder, oesophagus, IVC, portal/splenic vein, pancreas, adrenals; the aorta is in neither and
counts in "all").

    python benchmarks/organ_gain.py --runs runs/btcv-cpu-ft2x/runs --arms volume-fusion avsdb null --n 4 \
        --seeds 0 1 2 --out docs/results/scaling/btcv-ft2x/organ_gain.md

Per group: gain mean ± std over seeds, seeds improved, and the Wilcoxon p over the test cases of the seed-averaged
gain (each case's Dice averaged over the group's organs it has a finite score for), as `gain_vs_control.py`. Per
organ: the control's mean Dice over its seeds and scored cases, each arm's over the cases both runs scored, the
paired gain and seeds improved (no p: with 12 cases and organs a few voxels wide at 4 mm a per-organ test would be
read as more than it is).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling_report import BTCV_GROUPS, case_dice, organ_names  # noqa: E402

from medpretrain.evaluation.benchmark_report import per_case_gains, wilcoxon_p  # noqa: E402


def seed_pairs(runs: Path, arm: str, control: str, backbone: str, n: str, seeds: list[int],
               classes: set[int] | None) -> list[tuple[dict[str, float], dict[str, float]]]:
    """(arm, control) per-case Dice of each seed whose two runs are both evaluated, over ``classes``."""
    pairs = []
    for s in seeds:
        a = case_dice(runs / f"{arm}-{backbone}-n{n}-s{s}", classes)
        c = case_dice(runs / f"{control}-{backbone}-n{n}-s{s}", classes)
        shared = sorted(set(a or {}) & set(c or {}))  # a case with no finite score in either run drops out
        if shared:
            pairs.append(({k: a[k] for k in shared}, {k: c[k] for k in shared}))
    return pairs


def gain_cells(pairs) -> tuple[float, float | None, int]:
    """Mean gain over seeds, its sample std (None for one seed), seeds improved."""
    per_seed = [np.mean(list(a.values())) - np.mean(list(c.values())) for a, c in pairs]
    spread = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None
    return float(np.mean(per_seed)), spread, sum(d > 0 for d in per_seed)


def report(runs: Path, arms: list[str], control: str, backbone: str, n: str, seeds: list[int]) -> str:
    names = organ_names(runs)
    if not names:
        raise SystemExit(f"{runs}: no finished run with a run.json naming its labels; run the benchmark first")
    lines = [f"# Gain over {control} per organ group and per organ (n = {n}, seeds {', '.join(map(str, seeds))})",
             "", f"`python benchmarks/organ_gain.py --runs {runs} --arms {' '.join(arms)} --control {control} "
             f"--n {n} --seeds {' '.join(map(str, seeds))}`", "",
             "| group | arm | Dice gain (mean ± std over seeds) | seeds improved | test cases improved | Wilcoxon p |",
             "|---|---|---|---|---|---|"]
    groups = {"all": None}
    if names.get(1) == "spleen" and len(names) == 13:  # BTCV's label map: its organ groups apply
        groups.update({g: set(ids) for g, ids in BTCV_GROUPS.items()})
    for group, classes in groups.items():
        for arm in arms:
            pairs = seed_pairs(runs, arm, control, backbone, n, seeds, classes)
            if not pairs:
                lines.append(f"| {group} | {arm} | no seed with both runs finished | | | |")
                continue
            mean, spread, improved = gain_cells(pairs)
            cases = per_case_gains(pairs)
            p = wilcoxon_p(cases)
            lines.append(f"| {group} | {arm} | {mean:+.3f}{'' if spread is None else f' ± {spread:.3f}'} | "
                         f"{improved}/{len(pairs)} | {sum(d > 0 for d in cases)}/{len(cases)} | "
                         f"{'–' if p is None else f'{p:.3g}'} |")
    lines += ["", f"| organ | {control} Dice | " + " | ".join(f"{a} Dice (gain, seeds improved)" for a in arms) + " |",
              "|---|---|" + "---|" * len(arms)]
    for cid, name in names.items():
        # the control's own Dice over its seeds and scored cases, not over one arm's intersection with it
        control_runs = [case_dice(runs / f"{control}-{backbone}-n{n}-s{s}", {cid}) for s in seeds]
        control_runs = [r for r in control_runs if r]
        control_dice = np.mean([np.mean(list(r.values())) for r in control_runs]) if control_runs else None
        cells = []
        for arm in arms:
            pairs = seed_pairs(runs, arm, control, backbone, n, seeds, {cid})
            if not pairs:
                cells.append("–")
                continue
            mean, _, improved = gain_cells(pairs)
            arm_dice = np.mean([np.mean(list(a.values())) for a, _ in pairs])
            cells.append(f"{arm_dice:.2f} ({mean:+.2f}, {improved}/{len(pairs)})")
        lines.append(f"| {cid} {name} | {'–' if control_dice is None else f'{control_dice:.2f}'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True, help="a benchmark's runs/ folder")
    ap.add_argument("--arms", nargs="+", required=True)
    ap.add_argument("--control", default="scratch")
    ap.add_argument("--backbone", default="unet")
    ap.add_argument("--n", default="4")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=None, help="write the markdown here (default: print it)")
    args = ap.parse_args(argv)
    text = report(args.runs, args.arms, args.control, args.backbone, args.n, args.seeds)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
