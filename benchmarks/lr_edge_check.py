"""Did the validation grid stop at its edge? Step beyond it for a finished benchmark's arms, on validation only.

A benchmark run before ``validation.extend`` existed (or without it) may have arms whose best lr is the grid's
largest: scratch at 1e-2 in ``scaling-la2018-proxy``, for one. This runs, for each such arm, the selection again
with ``extend`` (``medpretrain.benchmark.select_hyperparameters``): one more validation run one grid step beyond,
with the grid's own recorded fine-tuning command, scored on the same validation cases. The extra runs sit beside
the grid's in ``BENCH/validation/`` (keep_runs.py does not keep them: no selection of the benchmark lists them);
their scores and the choices go to ``OUT`` (never over the benchmark's own selections, which its test runs used),
with a table:

    python benchmarks/lr_edge_check.py --bench runs/scaling-la2018-proxy --out docs/results/scaling/la2018-proxy/lr-edge

If an arm's extra lr scores better on validation, that arm was under-tuned and its test runs should be re-run with
``validation.extend`` on; if it scores worse, the grid covered the arm's best lr. Test cases are never used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    from medpretrain.benchmark import grid_finetune_args, select_hyperparameters
    from medpretrain.evaluation.benchmark_report import format_grid_scores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, required=True, help="a benchmark folder with a validation grid")
    ap.add_argument("--out", type=Path, required=True, help="where the checks' choices and table go")
    ap.add_argument("--extend", type=int, default=1, choices=range(1, 5), help="extra learning rates allowed per "
                    "arm (1-4, default 1)")
    ap.add_argument("--arms", nargs="*", default=None, help="select-job names (default: every arm at an edge)")
    args = ap.parse_args(argv)
    jobs = json.loads((args.bench / "jobs.json").read_text(encoding="utf-8"))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, signature in sorted(jobs.items()):
        if not name.startswith("select-") or (args.arms is not None and name not in args.arms):
            continue
        cmd = signature[0][0]  # [command, files read]
        base = Path(cmd[cmd.index("--base") + 1])
        runs = [Path(cmd[i + 1]) for i, a in enumerate(cmd) if a == "--runs"]
        chosen = Path(cmd[cmd.index("--out") + 1]).with_suffix(".json")
        if not chosen.is_file():
            print(f"{name}: started but not finished in {args.bench}; skipped", flush=True)
            continue
        record = json.loads(chosen.read_text(encoding="utf-8"))
        lrs = [r["lr"] for r in record["runs"]]
        if args.arms is None and record["chosen"]["lr"] not in (min(lrs), max(lrs)):
            continue
        val = jobs[f"val-{name.removeprefix('select-')}-lr{lrs[0]:g}"][0][0]
        ft_args = grid_finetune_args(val)
        print(f"{name}: chosen {record['chosen']['lr']:g} at the grid's edge; stepping beyond it", flush=True)
        check = select_hyperparameters(base, runs, args.out / f"{name}.yaml", extend=args.extend, finetune_args=ft_args)
        rows.append((name, record, check))
    lines = [f"# Validation grid edge check: {args.bench.name}", "",
             f"`python benchmarks/lr_edge_check.py --bench {args.bench} --out {args.out}`", "",
             "| arm | chosen in the benchmark | validation Dice per lr (+: beyond the grid) | best with the extension |",
             "|---|---|---|---|"]
    for name, record, check in rows:
        scores = format_grid_scores(check["runs"])
        lines.append(f"| {name.removeprefix('select-')} | {record['chosen']['lr']:g} | {scores} | "
                     f"{check['chosen']['lr']:g}{' (still the edge)' if check['extend']['edge'] else ''} |")
    (args.out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
