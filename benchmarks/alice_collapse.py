"""Whether Alice's embedding losses collapse: windowed means of a pretraining's logged losses and monitors.

Reads Lightning's ``logs/csv/metrics.csv`` of one or more Alice pretrainings and writes a Markdown table per run:
per window of steps, the mean of ``l_dv``, ``l_st`` and the reconstruction loss, of the two spreads (``dv_spread``,
``st_spread``: 1 - norm of the mean unit embedding, 0 = every embedding alike) with the share of logged steps whose
``st_spread`` is below 0.05, and of ``st_own`` / ``st_other`` (the cosine loss of CASA's prediction against its own
crop's teacher embeddings / another crop's, the same queries: equal means the alignment ignores the crop's content;
with the cosine loss ``st_own`` is ``l_st``), the median over the window's steps of ``st_other / st_own`` (1 = the
alignment ignores the content; a window mean can be a few steps' spikes), and of ``h_content`` / ``y_content`` (the
share of phi's / psi's token-embedding variance that lies between samples at the same position: 0 = the embedding
is a function of the position alone). Columns a run did not log are left empty.

Reproduce probes.md from every committed metrics file (docs/results/scaling/alice-collapse/README.md):
    bash benchmarks/alice-collapse/probes.sh
or one run:
    python benchmarks/alice_collapse.py --out /tmp/probe.md --run "LABEL=runs/alice-collapse/NAME/logs/csv/metrics.csv"
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

WINDOWS = [(0, 200), (200, 400), (400, 600), (600, 1000), (1000, 2000), (2000, 4000), (4000, 8000), (8000, 16001)]
COLUMNS = ["dv", "st", "st_own", "st_other", "recon", "dv_spread", "st_spread", "h_content", "y_content"]


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The training rows of a metrics.csv: ``step`` and every logged ``train/`` value (empty cells dropped)."""
    with open(path, newline="") as f:
        rows = []
        for r in csv.DictReader(f):
            if not r.get("train/loss"):
                continue
            row = {k.removeprefix("train/"): float(v) for k, v in r.items() if k.startswith("train/") and v != ""}
            row["step"] = int(r["step"])
            rows.append(row)
    return rows


def window_table(rows: list[dict[str, float]]) -> list[str]:
    head = ["steps", "logged"] + COLUMNS + ["st_spread < 0.05", "other/own (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lo, hi in WINDOWS:
        sel = [r for r in rows if lo <= r["step"] < hi]
        if not sel:
            break
        cells = [f"{lo}-{min(hi, sel[-1]['step'] + 1)}", str(len(sel))]
        for c in COLUMNS:
            vals = [r[c] for r in sel if c in r]
            cells.append(f"{np.mean(vals):.3g}" if vals else "")
        spreads = [r["st_spread"] for r in sel if "st_spread" in r]
        cells.append(f"{np.mean(np.array(spreads) < 0.05):.0%}" if spreads else "")
        # per-step ratio, median: robust to the single-step spikes that dominate some windows' means
        ratios = [r["st_other"] / r["st_own"] for r in sel if "st_other" in r and "st_own" in r and r["st_own"] > 0]
        cells.append(f"{np.median(ratios):.2f}" if ratios else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def watch_verdicts(rows: list[dict[str, float]], cosine: bool) -> list[str]:
    """What ``methods.alice.AlignmentWatch`` (the warning a run logs) would have said over these logged rows: each
    logged row stands for the 10 steps up to the next one. Runs that did not log ``st_own`` use their ``st`` where it
    is the same number (the cosine loss)."""
    import torch

    from medpretrain.methods.alice import AlignmentWatch

    watch, said = AlignmentWatch(), []
    for r in rows:
        parts = {}
        own = r.get("st_own", r.get("st") if cosine else None)
        if own is not None and "st_other" in r:
            parts["st_own"], parts["st_other"] = torch.tensor(own), torch.tensor(r["st_other"])
        if "st_spread" in r:
            parts["st_spread"] = torch.tensor(r["st_spread"])
        for step in range(r["step"], r["step"] + 10):
            message = watch.update(step, parts)
            if message:
                said.append(f"{watch.where}: **{watch.state}**")
    return said or ["no warning"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="LABEL=path/to/metrics.csv (repeatable)")
    ap.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    ap.add_argument("--watch", action="store_true",
                    help="add what the run-time warning (methods.alice.AlignmentWatch) would have said per run; a "
                         "run whose LABEL contains 'infonce' or 'dino' is read as not using the cosine l_st")
    args = ap.parse_args()
    out = ["# Alice's embedding losses per window of pretraining steps", "",
           "Means over the logged steps of each window (every 10th step is logged; batch 2, so single steps are "
           "noisy). Written by `python benchmarks/alice_collapse.py` (see its docstring).", ""]
    for spec in args.run:
        label, _, path = spec.partition("=")
        rows = read_metrics(Path(path))
        out += [f"## {label}", "", f"`{path}`, {len(rows)} logged steps, last step {rows[-1]['step']}.", ""]
        out += window_table(rows) + [""]
        if args.watch:
            cosine = not any(k in label.lower() for k in ("infonce", "dino"))
            out += ["AlignmentWatch (200-step windows): " + "; ".join(watch_verdicts(rows, cosine)) + ".", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(out))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
