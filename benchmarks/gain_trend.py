"""Extrapolate a pretraining-budget curve (issue 20): fit the gain over a reference against pretraining steps with
two models that agree inside the measured range and disagree beyond it, test each by predicting the largest
measured budget from the smaller ones, and say what each predicts at the budgets asked for (the papers').

    python benchmarks/gain_trend.py --csv docs/results/scaling/btcv/results.csv --method volume-fusion --n 4 \
        --at 100000 400000 --out docs/results/scaling/btcv/trend

Reads ``results.csv`` of ``benchmarks/scaling_report.py`` (one row per method, budget, n, reference and organ
group: mean and std over seeds of the per-seed Dice gain). The two models:

- ``log-linear``: gain = a + b * log2(steps), a constant gain per doubling of the pretraining, for ever: what a
  curve that has not bent yet says if nothing changes, the optimistic reading.
- ``saturating``: gain = g_max * (1 - exp(-steps / tau)), a gain that approaches a ceiling g_max: what a pretext
  loss that flattens (la2018's proxy did) gives.

Both are weighted least squares with each point's standard error over seeds (std / sqrt(seeds); a floor of 0.005
Dice, so that a point whose seeds happened to agree does not pin the fit; a point of one seed has no spread and is
left out). With a handful of points neither is more than a description; the hold-out check (fit without the
largest budget, predict it) says how each extrapolated one step, and only where its error, or the two models'
difference, exceeds twice that point's standard error does it tell them apart (the points share scratch's runs,
so their errors are correlated too). Writes ``trend.md`` and ``trend.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import curve_fit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a sibling module, also when imported by the tests
from _common import gain_vs_steps_axes, save_figure  # noqa: E402

SE_FLOOR = 0.005
TAU_BOUND = 1e9  # the saturating model's largest time constant: a fit there has found no bend in the data


def log_linear(steps, a, b):
    return a + b * np.log2(steps)


def saturating(steps, g_max, tau):
    return g_max * (1.0 - np.exp(-np.asarray(steps, dtype=float) / tau))


MODELS = {"log-linear": log_linear, "saturating": saturating}


def load_points(path: Path, method: str, n: str, reference: str, group: str,
                backbone: str = "unet") -> list[tuple[int, float, float, int]]:
    """(steps, mean gain, standard error, seeds) of one curve's points of two or more seeds, by steps; a missing
    curve is an error naming what the file holds."""
    with open(path, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    def curve(r):
        return r["backbone"], r["method"], r["n_labeled"], r["reference"], r["group"]

    pts = [(int(r["pretrain_steps"]), float(r["gain_mean"]),
            max(float(r["gain_std"]) / math.sqrt(int(r["seeds"])), SE_FLOOR), int(r["seeds"]))
           for r in rows if curve(r) == (backbone, method, n, reference, group) and int(r["seeds"]) > 1]
    if len(pts) < 3:
        held = sorted({curve(r) for r in rows})
        raise SystemExit(f"{path}: {len(pts)} point(s) of 2+ seeds for backbone={backbone} method={method} n={n} "
                         f"reference={reference} group={group}; three are needed. Curves there: {held[:12]}")
    return sorted(pts)


def fit(model: str, steps, gains, se):
    """Parameters of ``model`` fitted to the points, or None where the fit does not converge."""
    steps, gains = np.asarray(steps, dtype=float), np.asarray(gains, dtype=float)
    if model == "log-linear":
        b, a = np.polyfit(np.log2(steps), gains, 1, w=1.0 / np.asarray(se))
        return (a, b)
    start = (min(max(gains.max(), 1e-3) * 1.2, 0.99), float(np.median(steps)))  # inside the bounds
    try:
        params, _ = curve_fit(saturating, steps, gains, p0=start, sigma=se, bounds=([-1.0, 1.0], [1.0, TAU_BOUND]),
                              maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    return tuple(params)


def describe(model: str, params) -> str:
    if params is None:
        return "did not converge"
    if model == "log-linear":
        return f"gain = {params[0]:+.3f} {params[1]:+.4f} x log2(steps) ({params[1]:+.3f} per doubling)"
    bound = " (tau at its bound: no bend in the data, a straight line in steps)" if params[1] > 0.99 * TAU_BOUND else ""
    return f"gain = {params[0]:.3f} x (1 - exp(-steps / {params[1]:,.0f})){bound}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, required=True, help="results.csv of benchmarks/scaling_report.py")
    ap.add_argument("--method", required=True)
    ap.add_argument("--n", default="4", help="labelled-set size of the curve")
    ap.add_argument("--reference", default="scratch")
    ap.add_argument("--group", default="all")
    ap.add_argument("--backbone", default="unet")
    ap.add_argument("--min-steps", type=int, default=0, help="leave out budgets below this (a curve's flat start)")
    ap.add_argument("--at", type=int, nargs="+", default=[100_000, 400_000], help="budgets to predict")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    pts = [p for p in load_points(args.csv, args.method, args.n, args.reference, args.group, args.backbone)
           if p[0] >= args.min_steps]
    if len(pts) < 3:
        raise SystemExit(f"{args.csv}: fewer than 3 points at >= {args.min_steps} steps; lower --min-steps")
    steps, gains, se, _ = (list(c) for c in zip(*pts))
    fits = {m: fit(m, steps, gains, se) for m in MODELS}
    holdout = {m: fit(m, steps[:-1], gains[:-1], se[:-1]) for m in MODELS} if len(pts) >= 4 else {}
    curve = f"{args.backbone}, {args.method}, n = {args.n}, gain over {args.reference}, organs: {args.group}"
    md = [f"# Extrapolating the pretraining-budget curve: {curve}", "",
          f"`python benchmarks/gain_trend.py --csv {args.csv} --backbone {args.backbone} --method {args.method} --n "
          f"{args.n} --reference {args.reference} --group {args.group} --min-steps {args.min_steps} --at "
          f"{' '.join(map(str, args.at))} --out {args.out}`", "",
          "Measured (mean ± standard error over seeds):", "", "| pretraining steps | gain | s.e. | seeds |",
          "|---|---|---|---|", *[f"| {s:,} | {g:+.3f} | {e:.3f} | {k} |" for s, g, e, k in pts], "",
          "| model | fit on every point | hold-out: fit without the largest budget, "
          f"predict {steps[-1]:,} (measured {gains[-1]:+.3f} ± {se[-1]:.3f}) | "
          + " | ".join(f"predicted at {s:,}" for s in args.at) + " |",
          "|---|---|---|" + "---|" * len(args.at)]
    predicted = {m: float(MODELS[m](steps[-1], *held)) for m, held in holdout.items() if held is not None}
    for m, fn in MODELS.items():
        params = fits[m]
        check = ("–" if not holdout else "did not converge" if m not in predicted else
                 f"{predicted[m]:+.3f} (error {predicted[m] - gains[-1]:+.3f}, "
                 f"{abs(predicted[m] - gains[-1]) / se[-1]:.1f} s.e.)")
        preds = ["–" if params is None else f"{float(fn(s, *params)):+.3f}" for s in args.at]
        md.append(f"| {m} | {describe(m, params)} | {check} | " + " | ".join(preds) + " |")
    if len(predicted) == 2:
        gap = abs(predicted["log-linear"] - predicted["saturating"]) / se[-1]
        md += ["", f"Hold-out: the two models' predictions differ by {gap:.1f} standard errors of the held-out point: "
                   + ("enough to tell them apart there." if gap > 2 else
                      "too little to tell them apart; the measured points do not choose between the models.")]
    md += ["", "Assumed by every prediction: the same pool, network, patch, batch, lr schedule and fine-tuning budget "
               "as the measured points; only the pretraining steps grow. Neither model is evidence beyond the "
               "measured range; the hold-out column is how well each extrapolated one step."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trend.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    _plot(steps, gains, se, fits, args.at, curve, args.out / "trend.png")
    print("\n".join(md))
    return 0


def _plot(steps, gains, se, fits, at, title, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.errorbar(steps, gains, yerr=se, fmt="o", color="black", capsize=3, label="measured (± s.e. over seeds)")
    grid = np.logspace(math.log10(min(steps)), math.log10(max([*steps, *at])), 200)
    for m, params in fits.items():
        if params is not None:
            ax.plot(grid, MODELS[m](grid, *params), label=m)
    ax.axvline(max(steps), color="grey", lw=0.8, ls=":")
    gain_vs_steps_axes(ax, "Dice gain", title)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
