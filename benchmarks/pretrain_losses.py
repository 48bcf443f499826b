"""How a pretraining run's logged losses moved: the mean of each metric over the first and the last logged steps.

    python benchmarks/pretrain_losses.py RUN [RUN ...] [--window 5] [--out FILE.json]

Reads ``RUN/logs/csv/metrics.csv`` (written by every ``medpretrain pretrain`` run; Lightning logs every
10th step) and prints one Markdown table per run: metric, mean over the first ``--window`` logged values,
mean over the last ``--window``, and the step ranges they cover. Per-phase metrics (``train/p1_*``,
``train/p2_*``, ASA) count only on the rows of their phase (``train/phase``): runs made before the inactive
phase was logged as NaN repeat the other phase's last value there.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from pathlib import Path

_PHASE_METRIC = re.compile(r"^train/p(\d)_")


def metric_series(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` of the finite values of each column, phase-filtered."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        phase = row.get("train/phase")
        for key, text in row.items():
            if key in ("epoch", "step") or not text:
                continue
            m = _PHASE_METRIC.match(key)
            if m and phase and int(float(phase)) != int(m.group(1)):
                continue
            value = float(text)
            if math.isfinite(value):
                series.setdefault(key, []).append((int(row["step"]), value))
    return series


def summarize(run: Path, window: int) -> list[dict]:
    path = run / "logs" / "csv" / "metrics.csv"
    if not path.is_file():
        raise SystemExit(f"{path}: no metrics log; pass the folder of a `medpretrain pretrain` run")
    out = []
    for key, points in sorted(metric_series(path).items()):
        if key in ("train/lr", "train/phase", "train/ema_momentum"):
            continue
        first, last = points[:window], points[-window:]
        out.append({"metric": key, "first": sum(v for _, v in first) / len(first),
                    "first_steps": [first[0][0], first[-1][0]], "last": sum(v for _, v in last) / len(last),
                    "last_steps": [last[0][0], last[-1][0]], "points": len(points)})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--window", type=int, default=5, help="logged values averaged at each end")
    ap.add_argument("--out", type=Path, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    report = {}
    for run in args.runs:
        rows = summarize(run, args.window)
        report[str(run)] = rows
        print(f"\n{run}\n\n| metric | first (steps) | last (steps) |\n|---|---|---|")
        for r in rows:
            print(f"| {r['metric']} | {r['first']:.4f} ({r['first_steps'][0]}-{r['first_steps'][1]}) "
                  f"| {r['last']:.4f} ({r['last_steps'][0]}-{r['last_steps'][1]}) |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": "python benchmarks/pretrain_losses.py "
                                        + " ".join(str(r) for r in args.runs) + f" --window {args.window}",
                                        "runs": report}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
