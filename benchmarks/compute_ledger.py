"""The compute every kept benchmark folder cost: training core-hours by study, kind, CPU and precision.

    python benchmarks/compute_ledger.py --raw docs/results/raw --out docs/results/scaling/compute.md

Reads each folder's runs as ``benchmarks/keep_runs.py`` keeps them (``pretrain/*/run.json``,
``validation/*/run.json``, ``runs/*/run.json``). A run's training core-hours are its seconds per step x steps
done x threads (``scaling_report.core_seconds_per_step``: the seconds per step of its last session, threads as
recorded, else 1: runs from before 2026-12-02 that trained with two threads, the ``--parallel 1`` pretrainings,
are undercounted 2x). Not counted: untrained exports (the null control costs nothing), runs adopted from another
folder (``adopted_from.json``: counted once, where they ran), evaluation and data preparation (not timed in
run.json). Where a folder has ``timings.json`` (from 2026-12-01), the wall-clock seconds the benchmark driver
recorded for its jobs are added up in a column of their own (evaluation included; a job resumed across sessions
counts its last session only; one lane = one thread on the 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from medpretrain.engine.run_folder import run_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a sibling script, also when imported by the tests
from scaling_report import RUN_KINDS, core_seconds_per_step, trained_runs  # noqa: E402


def ledger(raw: Path) -> dict:
    """Core-hours by (folder, kind) and by (cpu, precision), runs counted, and each folder's job wall-clock hours."""
    by_study: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])
    by_machine: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])
    job_hours: dict[str, float] = {}
    for folder in sorted(p for p in raw.iterdir() if p.is_dir()):
        trained_here = False
        for kind, info in trained_runs(folder, skip_adopted=True):
            trained_here = True
            hours = core_seconds_per_step(info) * int(info["training"].get("steps_done") or 0) / 3600
            for table, key in ((by_study, (folder.name, kind)),
                               (by_machine, (info["training"].get("cpu", "not recorded (before 2026-12-02)"),
                                             run_precision(info) or "not recorded"))):
                table[key][0] += 1
                table[key][1] += hours
        timings = folder / "timings.json"
        if timings.is_file():
            recorded = json.loads(timings.read_text(encoding="utf-8"))
            # a folder whose training ran before timings.json existed may have re-recorded only its (cached, seconds
            # long) preparation jobs since: beside its training, a sum of those would read as "this cost nothing"
            if not trained_here or any(not job.startswith("prepare-") for job in recorded):
                job_hours[folder.name] = sum(recorded.values()) / 3600
    return {"by_study": dict(by_study), "by_machine": dict(by_machine), "job_hours": job_hours}


def markdown(led: dict, command: str) -> str:
    md = ["# Compute of the kept benchmark folders", "", f"    {command}", "",
          "Training core-hours: seconds per step x steps done x threads of every run a folder trained itself "
          "(adopted runs are counted where they ran; the null control's untrained exports cost nothing; runs from "
          "before 2026-12-02 did not record their threads and count one, so a two-thread pretraining of then is "
          "undercounted 2x). Evaluation and data preparation are not in run.json; the last column adds up the "
          "wall-clock seconds the benchmark driver recorded for a folder's jobs (`timings.json`, from 2026-12-01; "
          "evaluation included, a job resumed across sessions counts its last session only; one lane = one "
          "thread; blank where only preparation jobs were recorded).", "",
          "| folder | kind | runs | training core-hours | jobs' wall-clock hours (all kinds) |", "|---|---|---|---|---|"]
    folders = sorted({f for f, _ in led["by_study"]} | set(led["job_hours"]))
    total_runs, total_hours = 0, 0.0
    for folder in folders:
        first = True
        for kind, _ in RUN_KINDS:
            if (folder, kind) not in led["by_study"]:
                continue
            runs, hours = led["by_study"][(folder, kind)]
            total_runs, total_hours = total_runs + runs, total_hours + hours
            wall = f"{led['job_hours'][folder]:.2f}" if first and folder in led["job_hours"] else ""
            md.append(f"| {folder if first else ''} | {kind} | {runs} | {hours:.2f} | {wall} |")
            first = False
        if first:  # nothing trained here (everything adopted, or only preparation): its driver's time still counts
            md.append(f"| {folder} | (no run trained here) | 0 | 0.00 | {led['job_hours'][folder]:.2f} |")
    md.append(f"| **all** | | {total_runs} | **{total_hours:.2f}** | {sum(led['job_hours'].values()):.2f} |")
    md += ["", "By CPU and precision (training core-hours):", "", "| CPU | precision | runs | core-hours |",
           "|---|---|---|---|",
           *[f"| {cpu} | {prec} | {runs} | {hours:.2f} |"
             for (cpu, prec), (runs, hours) in sorted(led["by_machine"].items())]]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", type=Path, default=Path("docs/results/raw"), help="folder of kept benchmark folders")
    ap.add_argument("--out", type=Path, required=True, help="markdown file to write")
    args = ap.parse_args(argv)
    if not args.raw.is_dir():
        print(f"no folder {args.raw}: pass --raw, the folder benchmarks/keep_runs.py saves into", file=sys.stderr)
        return 2
    led = ledger(args.raw)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(led, f"python benchmarks/compute_ledger.py --raw {args.raw} --out {args.out}"),
                        encoding="utf-8")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
