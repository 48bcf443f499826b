"""Pretraining-budget scaling (issue 20): the gain over scratch of fine-tuning from each snapshot of one long
pretraining per method, per labelled-set size, with the seed spread, per organ group on BTCV, the pretext task's
fraction learnt at each snapshot and the CPU hours it took.

    python benchmarks/scaling_report.py --bench runs/scaling-la2018-proxy --out docs/results/scaling/la2018-proxy

Reads a finished (or partly finished) benchmark folder whose profile lists ``snapshots`` (arms
``<method>@<step>``, the method's own arm being its final step; a pretrained method without snapshots is one
point at its steps, e.g. scaling-la2018's 200-step Volume Fusion arm beside its 2,000-step run); writes
``results.csv`` (one row per method, budget, n, reference and organ group; for a task of several classes also
each one, ``organ:<name>``),
``report.md`` (with a per-organ table for such a task) and ``gain_vs_budget.png`` (gain over scratch, y,
against pretraining steps, x log; one line per method and n, bars = std over seeds; one panel per organ group
when the task has several classes).

Statistics as in the benchmark report: per seed, the mean Dice over test cases of the arm minus scratch's
(same labelled subset and seed); mean ± std over seeds, seeds improved; Wilcoxon signed-rank over test cases of
each case's gain averaged over seeds. The same against the ``null`` control when the profile has one.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from medpretrain.blocks.pretext import fraction_learnt
from medpretrain.engine.run_folder import run_precision
from medpretrain.evaluation.benchmark_report import per_case_gains, wilcoxon_p

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a sibling module, also when imported by the tests
from _common import gain_vs_steps_axes, save_figure  # noqa: E402

# BTCV organ groups of the issue (label ids of ../shared/data/btcv).
BTCV_GROUPS = {"large": (1, 2, 3, 6, 7), "small": (4, 5, 9, 10, 11, 12, 13)}
BTCV_AORTA = 8  # neither group in the issue; counted in "all"


def case_dice(run: Path, classes: set[int] | None = None, space: str = "prepared") -> dict[str, float] | None:
    """Each test case's Dice averaged over its classes (or over ``classes``); None if the run is unfinished.
    ``space``: ``original`` reads the scores in the source files' geometry (``eval/original/``, the profile's
    ``original_space``)."""
    path = run / "eval" / ("original" if space == "original" else "") / "per_case.csv"
    if not path.is_file():
        return None
    rows: dict[str, list[float]] = defaultdict(list)
    with open(path, encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if classes is None or int(r["class_id"]) in classes:
                d = float(r["dice"])
                if math.isfinite(d):
                    rows[r["case_id"]].append(d)
    return {c: float(np.mean(v)) for c, v in rows.items() if v}


def organ_names(runs: Path) -> dict[int, str]:
    """Foreground class id -> name, from the first finished run's run.json (the prepared dataset's labels)."""
    for path in sorted(runs.glob("*/run.json")):
        labels = json.loads(path.read_text(encoding="utf-8")).get("labels") or {}
        return {int(k): v for k, v in sorted(labels.items(), key=lambda kv: int(kv[0])) if int(k) != 0}
    return {}


def loss_near(csv_path: Path, term: str, step: int, rows: int = 20) -> float | None:
    """Mean of the last ``rows`` logged ``train/<term>`` values before optimizer step ``step``, at most the later half
    of them: in a short run (scaling-la2018's 200-step arm, 20 logged rows) a fixed window would average the whole
    run, its first untrained steps included (budgets of 500 steps and more, 50 rows and more, are unaffected)."""
    if not csv_path.is_file():
        return None
    values = []
    with open(csv_path, encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            v, s = r.get(f"train/{term}", ""), r.get("step", "")
            if v not in ("", None) and s not in ("", None) and int(float(s)) < step and math.isfinite(float(v)):
                values.append(float(v))
    return float(np.mean(values[-min(rows, max(1, len(values) // 2)):])) if values else None


def core_seconds_per_step(info: dict) -> float:
    """Core-seconds per optimizer step of a run (its run.json): seconds per step of its last session (a resumed
    run's earlier sessions are not summed in run.json) x its threads x the processes of a DDP run; 0 when not
    recorded. Threads as recorded (from 2026-12-02); before, 1 (a benchmark lane on the 2-core machine: a run at
    ``--parallel 1`` had 2, so its core-hours are undercounted 2x). A GPU run counts device-seconds (no threads)."""
    training = info.get("training", {})
    threads = 1 if info.get("cuda") else int(training.get("threads") or info.get("threads") or 1)
    threads *= int(training.get("world_size") or 1)
    return float(training.get("s_per_step") or 0.0) * threads


def pretraining_facts(job_run: Path, steps: list[int]) -> dict[int, dict]:
    """Per budget: fraction learnt of each pretext term (from the run's baselines and its logged loss near that
    step) and CPU core-hours to that step (seconds per step x steps x threads)."""
    info = json.loads((job_run / "run.json").read_text(encoding="utf-8"))
    pretext = info.get("pretext", {})
    core_s = core_seconds_per_step(info)
    out = {}
    for s in steps:
        fracs = {term: fraction_learnt(r["trivial"], r["perfect"],
                                       loss_near(job_run / "logs" / "csv" / "metrics.csv", term, s))
                 for term, r in pretext.items()}
        out[s] = {"fraction_learnt": fracs, "cpu_hours": core_s * s / 3600 if core_s else None}
    return out


RUN_KINDS = (("pretraining", "pretrain"), ("validation fine-tuning", "validation"), ("test fine-tuning", "runs"))


def trained_runs(bench: Path, skip_adopted: bool = False):
    """``(kind, run.json contents)`` of every run in a benchmark folder that trained (an untrained export, the null
    control's, has nothing to count); ``skip_adopted``: not the runs copied from another folder by
    ``benchmarks/adopt_runs.py`` (``adopted_from.json``), which are counted where they ran."""
    for kind, folder in RUN_KINDS:
        for path in sorted((bench / folder).glob("*/run.json")):
            if skip_adopted and (path.parent / "adopted_from.json").is_file():
                continue
            info = json.loads(path.read_text(encoding="utf-8"))
            if not info.get("untrained") and "training" in info:
                yield kind, info


def compute_hours(bench: Path) -> list[dict]:
    """Training core-hours of everything the folder ran, by kind: seconds per step x steps done x threads, from each
    run's run.json (the seconds per step of its last session; evaluation is not timed there and not counted)."""
    totals = {kind: [0, 0.0] for kind, _ in RUN_KINDS}
    for kind, info in trained_runs(bench):
        core_s = core_seconds_per_step(info)
        if core_s:
            totals[kind][0] += 1
            totals[kind][1] += core_s * int(info["training"].get("steps_done") or 0) / 3600
    return [{"kind": kind, "runs": count, "core_hours": hours} for kind, (count, hours) in totals.items()]


def arithmetic(bench: Path) -> tuple[list[str], bool]:
    """Markdown rows counting the folder's trained runs by kind, precision and CPU (each run.json), and whether
    the fine-tunings mixed precisions: arms compared with different arithmetic are a confound the reader must see
    (a profile left at ``precision: auto`` resolves to bf16 on CPUs with AMX and to fp32 on the others)."""
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    finetune_precisions = set()
    for kind, folder in (("pretraining", "pretrain"), ("fine-tuning", "validation"), ("fine-tuning", "runs")):
        for path in sorted((bench / folder).glob("*/run.json")):
            info = json.loads(path.read_text(encoding="utf-8"))
            if info.get("untrained") or "training" not in info:
                continue
            precision = run_precision(info) or "not recorded"
            cpu = info["training"].get("cpu", "not recorded")
            if "cpu_bf16" in info["training"]:
                cpu += " (native bf16)" if info["training"]["cpu_bf16"] else " (no native bf16)"
            counts[(kind, precision, cpu)] += 1
            if kind == "fine-tuning" and precision not in ("not recorded", "auto"):
                finetune_precisions.add(precision)
    rows = ["| kind | precision | CPU | runs |", "|---|---|---|---|",
            *[f"| {k} | {p} | {c} | {n} |" for (k, p, c), n in sorted(counts.items())]]
    return rows, len(finetune_precisions) > 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, required=True, help="benchmark output folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--control", default="null", help="second reference arm (skipped when absent)")
    ap.add_argument("--space", choices=("prepared", "original"), default="prepared",
                    help="score on the prepared grid or in the source files' geometry (profiles with original_space)")
    ap.add_argument("--same-curve", action="append", default=[], metavar="VARIANT=METHOD",
                    help="tabulate and draw the benchmark method VARIANT's points as METHOD's: a longer run whose "
                         "first steps repeat METHOD's run (same seed, data and warm-up), e.g. "
                         "volume-fusion-64k=volume-fusion; results.csv keeps the run in pretraining_run")
    args = ap.parse_args(argv)
    cfg = json.loads((args.bench / "benchmark.json").read_text(encoding="utf-8"))
    same_curve = {}
    for item in args.same_curve:
        variant, _, method = item.partition("=")
        if not method or variant not in cfg["methods"]:
            ap.error(f"--same-curve {item!r}: give VARIANT=METHOD with VARIANT one of the profile's methods "
                     f"({', '.join(cfg['methods'])})")
        same_curve[variant] = method
    runs = args.bench / "runs"
    n_sizes = [str(n) for n in cfg["n_labeled"]]
    seeds = cfg["seeds"]
    multi_class = "btcv" in str(cfg["dataset"]).lower()
    groups = {"all": None, **({g: set(c) for g, c in BTCV_GROUPS.items()} if multi_class else {})}
    organs = organ_names(runs)
    organs = organs if len(organs) > 1 else {}  # a single structure: its table is the "all" row
    scored = {**groups, **{f"organ:{name}": {cid} for cid, name in organs.items()}}
    rows = []
    for b_name in cfg["backbones"]:
        for m_name, m in cfg["methods"].items():
            if m.get("untrained"):
                continue  # the null control is a reference, not a point on a curve
            final = m.get("steps")
            pre_run = args.bench / "pretrain" / f"{m_name}-{b_name}"
            if final is None and (pre_run / "run.json").is_file():
                final = json.loads((pre_run / "run.json").read_text())["config"]["steps"]
            if final is None and not m.get("snapshots"):
                continue  # a single point whose length neither the profile nor a finished pretraining says
            budgets = [*m.get("snapshots", []), final]  # a method without snapshots is a single point
            facts = pretraining_facts(pre_run, budgets) if (pre_run / "run.json").is_file() else {}
            for step in budgets:
                arm = m_name if step == final else f"{m_name}@{step}"
                for n in n_sizes:
                    label = "all" if n == "all" else f"n{n}"
                    for ref in ("scratch", args.control):
                        for g, classes in scored.items():
                            pairs = [(case_dice(runs / f"{arm}-{b_name}-{label}-s{s}", classes, args.space),
                                      case_dice(runs / f"{ref}-{b_name}-{label}-s{s}", classes, args.space))
                                     for s in seeds]
                            pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
                            if not pairs:
                                continue
                            per_seed = [np.mean(list(a.values())) - np.mean(list(b.values())) for a, b in pairs]
                            p = wilcoxon_p(per_case_gains(pairs))
                            f = facts.get(step, {})
                            rows.append({"backbone": b_name, "method": same_curve.get(m_name, m_name),
                                         "pretraining_run": m_name, "pretrain_steps": step, "n_labeled": n,
                                         "reference": ref, "group": g, "seeds": len(pairs),
                                         "gain_mean": float(np.mean(per_seed)),
                                         "gain_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None,
                                         "seeds_improved": int(sum(d > 0 for d in per_seed)),
                                         "wilcoxon_p": p,
                                         "fraction_learnt": json.dumps(f.get("fraction_learnt", {})),
                                         "cpu_hours": f.get("cpu_hours")})
    # a continued run's points in their place on the curve (a stable sort: sizes, references and groups keep their order)
    rows.sort(key=lambda r: (r["backbone"], r["method"], r["pretrain_steps"]))
    args.out.mkdir(parents=True, exist_ok=True)
    if not rows:
        print(f"{args.bench}: no finished snapshot arm yet")
        return 1
    with open(args.out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = [f"# Pretraining-budget scaling: {cfg['name']}", "",
          f"`python benchmarks/scaling_report.py --bench {args.bench} --out {args.out}"
          + (" --space original`" if args.space == "original" else "`"), "",
          *(["Scored in the source files' geometry (each test case's label file as distributed).", ""]
            if args.space == "original" else []),
          "| backbone | method | pretraining steps | CPU h | fraction learnt | n | group | gain vs scratch "
          "(mean ± std) | seeds improved | Wilcoxon p | gain vs null |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["backbone"], r["method"], r["pretrain_steps"], r["n_labeled"], r["group"], r["reference"]): r
              for r in rows}
    for r in rows:
        if r["reference"] != "scratch" or r["group"].startswith("organ:"):
            continue
        null = by_key.get((r["backbone"], r["method"], r["pretrain_steps"], r["n_labeled"], r["group"],
                           args.control))
        fr = ", ".join(f"{k} {v:.0%}" for k, v in json.loads(r["fraction_learnt"]).items() if v is not None) or "–"
        std = "" if r["gain_std"] is None else f" ± {r['gain_std']:.3f}"
        hours = "–" if r["cpu_hours"] is None else f"{r['cpu_hours']:.2f}"
        p = "–" if r["wilcoxon_p"] is None else f"{r['wilcoxon_p']:.3g}"
        vs_null = "–" if null is None else f"{null['gain_mean']:+.3f}"
        md.append(f"| {r['backbone']} | {r['method']} | {r['pretrain_steps']} | {hours} | {fr} | {r['n_labeled']} | "
                  f"{r['group']} | {r['gain_mean']:+.3f}{std} | {r['seeds_improved']}/{r['seeds']} | {p} | "
                  f"{vs_null} |")
    if organs:
        md += ["", "## Gain over scratch per organ", "",
               "Dice gain of each organ (mean over seeds) with the seeds improved; the organ groups above average "
               "these per case.", "",
               "| backbone | method | steps | n | " + " | ".join(organs.values()) + " |",
               "|---|---|---|---|" + "---|" * len(organs)]
        for key in dict.fromkeys((r["backbone"], r["method"], r["pretrain_steps"], r["n_labeled"]) for r in rows):
            cells = []
            for name in organs.values():
                r = by_key.get((*key, f"organ:{name}", "scratch"))
                cells.append("–" if r is None else f"{r['gain_mean']:+.3f} ({r['seeds_improved']}/{r['seeds']})")
            md.append("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")
    compute = compute_hours(args.bench)
    md += ["", "## Compute (training core-hours, from each run's seconds per step; evaluation not counted)", "",
           "| kind | runs | core-hours |", "|---|---|---|",
           *[f"| {c['kind']} | {c['runs']} | {c['core_hours']:.2f} |" for c in compute],
           f"| all | {sum(c['runs'] for c in compute)} | {sum(c['core_hours'] for c in compute):.2f} |"]
    machines, mixed = arithmetic(args.bench)
    md += ["", "## Arithmetic and machines (each run's run.json; seconds per step differ several-fold between CPUs)",
           "", *(["**Warning: the fine-tunings did not all run with the same precision: gains between arms of "
                  "different precision include that difference.**", ""] if mixed else []), *machines]
    (args.out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    _plot(rows, groups, args.out / "gain_vs_budget.png")
    print("\n".join(md))
    return 0


def _plot(rows, groups, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, g in zip(axes[0], groups):
        lines = defaultdict(list)
        for r in rows:
            if r["reference"] == "scratch" and r["group"] == g:
                lines[(r["method"], r["n_labeled"])].append(r)
        for (method, n), pts in sorted(lines.items()):
            pts.sort(key=lambda r: r["pretrain_steps"])
            ax.errorbar([r["pretrain_steps"] for r in pts], [r["gain_mean"] for r in pts],
                        yerr=[r["gain_std"] or 0.0 for r in pts], marker="o", capsize=3, label=f"{method}, n={n}")
        gain_vs_steps_axes(ax, "Dice gain over scratch", f"organs: {g}", legend_size=7)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
