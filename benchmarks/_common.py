"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this folder is on the path)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np

METRICS = ("dice", "nsd", "assd", "hd95")


def cpu_model() -> str:
    """The processor's model name, for the machine block of a result file (what run.json records too)."""
    from medpretrain.engine.device import cpu_model_name

    return cpu_model_name()


def sh(args: list[str], log: Path) -> None:
    """Run a command (a `medpretrain` verb, as a user types it), appending the command and its output to ``log``."""
    print("$", " ".join(args), flush=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(args) + "\n")
        fh.flush()
        subprocess.run(args, check=True, stdout=fh, stderr=subprocess.STDOUT)


def load_records(path: Path) -> dict[tuple, dict]:
    """Finished runs of a benchmark script (``records.jsonl``), by (arm, n labelled, seed)."""
    records = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                records[(r["arm"], r["n_labeled"], r["seed"])] = r
    return records


def finetune_and_evaluate(exe, prepared: Path, run: Path, n: int, seed: int, init: Path | None, log: Path,
                          finetune_args: list[str], init_part: str = "all") -> dict:
    """Fine-tune (``finetune_args`` = the budget) and evaluate one run, or read it when done; resumes a run
    that has checkpoints. Returns the overall metrics, per-case Dice and training wall time."""
    if not (run / "model.pt").exists():
        extra = ["--init", str(init), "--init-part", init_part] if init else []
        resume = ["--resume"] if (run / "checkpoints").exists() else []
        sh(exe + ["finetune", "--data", str(prepared), "--out", str(run), "--n-labeled", str(n), "--seed", str(seed)]
           + finetune_args + extra + resume, log)
    if not (run / "eval" / "metrics.json").exists():
        sh(exe + ["evaluate", "--run", str(run), "--data", str(prepared), "--overlays", "0"], log)
    metrics = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    with open(run / "eval" / "per_case.csv", encoding="utf-8") as fh:
        per_case = {row["case_id"]: float(row["dice"]) for row in csv.DictReader(fh)}
    return {**{m: round(metrics["overall"][m]["mean"], 4) for m in METRICS}, "per_case_dice": per_case,
            "train_wall_s": info["training"]["wall_time_s"]}


def paired(rec: dict, scratch: dict) -> tuple[float, str]:
    """Mean per-case Dice gain over scratch and the number of improved cases (same seed, same cases)."""
    if rec.get("per_case_dice") and scratch.get("per_case_dice"):
        diffs = [rec["per_case_dice"][c] - scratch["per_case_dice"][c] for c in scratch["per_case_dice"]]
        return round(float(np.mean(diffs)), 4), f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
    if "paired_dice_gain_vs_scratch" in rec:  # recorded before per-case records existed
        return rec["paired_dice_gain_vs_scratch"], rec["cases_improved"]
    # scratch run without per-case values (previous session): only the difference of the means is known
    return round(rec["dice"] - scratch["dice"], 4), "n/a"


def mean_std(values: list[float]) -> str:
    """``mean ± sample std``; a single value alone (its spread over seeds is unknown, not zero)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def gain_vs_steps_axes(ax, ylabel: str, title: str, legend_size: int = 8) -> None:
    """Finish the axes of a gain-against-pretraining-steps figure: zero line, log steps, labels, legend."""
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("pretraining steps")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
