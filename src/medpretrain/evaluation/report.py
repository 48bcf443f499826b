"""Write the results of an evaluation: metrics.json, per_case.csv and a Markdown report."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medpretrain.atomic import atomic_write_text
from medpretrain.evaluation.metrics import HIGHER_IS_BETTER, METRIC_NAMES, summarize

PER_CASE_COLUMNS = (
    "case_id",
    "class_id",
    "class_name",
    "dice",
    "nsd",
    "assd",
    "hd95",
    "pred_voxels",
    "label_voxels",
)
_METRIC_LABELS = {"dice": "Dice", "nsd": "NSD", "assd": "ASSD (mm)", "hd95": "HD95 (mm)"}
_N_BEST_WORST = 3

EMPTY_CASE_NOTE = (
    "Empty cases are scored explicitly: when a class is absent from both the prediction and the "
    "ground truth, Dice = NSD = 1 and ASSD = HD95 = 0 mm; when it is absent from exactly one of "
    "them, Dice = NSD = 0 and ASSD = HD95 = the diagonal of the volume in mm (the worst distance "
    "possible, so that means stay finite)."
)


def _json_safe(value):
    """Make context values JSON-serialisable (paths, numpy scalars, tuples, NaN -> None)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _fmt(value: float, metric: str) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}" if metric in HIGHER_IS_BETTER else f"{value:.2f}"


def _md_cell(value) -> str:
    if isinstance(value, (Mapping, list, tuple)):
        text = json.dumps(_json_safe(value))
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _rel_link(target: Path, out_dir: Path) -> str:
    target = Path(target)
    try:
        rel = os.path.relpath(target.resolve(), out_dir.resolve())
    except ValueError:  # another drive on Windows
        rel = str(target)
    return rel.replace(os.sep, "/")


def _class_name(class_names: Mapping[int, str], c: int) -> str:
    return str(class_names.get(c, f"class_{c}"))


def _case_mean(case: Mapping[int, Mapping[str, float]], metric: str) -> float:
    vals = [m[metric] for c, m in case.items() if int(c) != 0 and metric in m]
    return float(np.mean(vals)) if vals else float("nan")


def _render_markdown(
    out_dir: Path,
    per_case: Mapping[str, Mapping[int, Mapping[str, float]]],
    class_names: Mapping[int, str],
    metrics: dict,
    context: Mapping,
    overlays: Sequence[Path],
    training_curve: Path | None,
) -> str:
    title = context.get("run") or context.get("name") or out_dir.name
    lines: list[str] = [f"# Evaluation report: {_md_cell(title)}", ""]

    lines += ["## Context", "", "| Item | Value |", "| --- | --- |"]
    lines.append(f"| cases evaluated | {metrics['n_cases']} |")
    for key, value in context.items():
        lines.append(f"| {_md_cell(key)} | {_md_cell(value)} |")
    lines.append("")

    header = "| Class | " + " | ".join(_METRIC_LABELS[m] for m in METRIC_NAMES) + " |"
    sep = "| --- |" + " --- |" * len(METRIC_NAMES)
    lines += ["## Summary (mean ± std over cases)", "", header, sep]
    for name, block in metrics["classes"].items():
        cells = []
        for m in METRIC_NAMES:
            s = block.get(m)
            cells.append("n/a" if s is None else f"{_fmt(s['mean'], m)} ± {_fmt(s['std'], m)}")
        lines.append(f"| {_md_cell(name)} | " + " | ".join(cells) + " |")
    overall = metrics["overall"]
    if overall:
        cells = []
        for m in METRIC_NAMES:
            s = overall.get(m)
            cells.append("n/a" if s is None else f"{_fmt(s['mean'], m)} ± {_fmt(s['std'], m)}")
        lines.append("| **overall** | " + " | ".join(cells) + " |")
    lines.append("")
    if "nsd_tolerance_mm" in context:
        lines += [f"NSD: normalised surface Dice at a tolerance of {_md_cell(context['nsd_tolerance_mm'])} mm.", ""]
    lines += [
        "Overall: each case is first averaged over its foreground classes, then mean and std are "
        "taken over cases. std is the sample standard deviation (ddof=1), 0 for a single case.",
        "",
    ]

    class_ids = sorted({int(c) for case in per_case.values() for c in case})
    lines += ["## Per-case results", ""]
    head = ["Case"] + [f"{_class_name(class_names, c)} {_METRIC_LABELS[m]}" for c in class_ids for m in METRIC_NAMES]
    lines.append("| " + " | ".join(_md_cell(h) for h in head) + " |")
    lines.append("| --- |" + " --- |" * (len(head) - 1))
    for case_id in sorted(per_case):
        case = per_case[case_id]
        cells = [_md_cell(case_id)]
        for c in class_ids:
            for m in METRIC_NAMES:
                cells.append(_fmt(case[c][m], m) if c in case and m in case[c] else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    ranked = sorted(
        ((cid, _case_mean(case, "dice")) for cid, case in per_case.items()),
        key=lambda t: (-math.inf if math.isnan(t[1]) else t[1], t[0]),
    )
    if ranked:
        # Never more than half the cases each, so the two lists do not repeat each other.
        k = max(1, min(_N_BEST_WORST, len(ranked) // 2))
        lines += ["## Best and worst cases (mean Dice over classes)", ""]
        lines.append("Best: " + ", ".join(f"{_md_cell(c)} ({_fmt(v, 'dice')})" for c, v in reversed(ranked[-k:])))
        lines.append("")
        lines.append("Worst: " + ", ".join(f"{_md_cell(c)} ({_fmt(v, 'dice')})" for c, v in ranked[:k]))
        lines.append("")

    if overlays:
        lines += [
            "## Overlays",
            "",
            "Green: ground truth, red: prediction (line style by class).",
            "",
        ]
        for overlay in overlays:
            rel = _rel_link(Path(overlay), out_dir)
            lines += [f"![{Path(overlay).stem}]({rel})", ""]

    if training_curve is not None:
        rel = _rel_link(Path(training_curve), out_dir)
        lines += ["## Training curve", "", f"![training curve]({rel})", ""]

    lines += ["## Notes", "", EMPTY_CASE_NOTE, ""]
    lines += [
        "Distances are in mm between the centres of surface voxels (voxels with a 6-neighbour "
        "outside the mask), computed with MONAI.",
        "",
    ]
    return "\n".join(lines)


def write_evaluation(
    out_dir,
    per_case: Mapping[str, Mapping[int, Mapping[str, float]]],
    class_names: Mapping[int, str],
    context: Mapping,
    overlays: Sequence[Path] = (),
    training_curve: Path | None = None,
) -> dict:
    """Write ``metrics.json``, ``per_case.csv`` and ``report.md`` for one evaluation.

    - ``metrics.json``: :func:`~medpretrain.evaluation.metrics.summarize` of ``per_case`` plus
      ``"context"``.
    - ``per_case.csv``: one row per case and class, columns ``case_id, class_id, class_name,
      dice, nsd, assd, hd95, pred_voxels, label_voxels``, sorted by case then class.
    - ``report.md``: context table, mean ± std per class and metric, overall, per-case table,
      best and worst cases by Dice, overlay images and the training curve (relative links),
      and how empty cases are scored.

    Each file is written to a temporary name in ``out_dir`` and moved into place.

    Args:
        out_dir: folder to write into; created if needed.
        per_case: ``{case_id: {class_id: metrics}}`` from
            :func:`~medpretrain.evaluation.metrics.case_metrics`.
        class_names: ``{class_id: name}`` for the classes in ``per_case``.
        context: free-form facts shown in the report and stored in metrics.json (run, model,
            checkpoint, data, split, inference settings, ``nsd_tolerance_mm``...). Values that
            JSON cannot hold (paths, numpy scalars) are stored as strings or plain numbers.
        overlays: overlay PNGs to embed, e.g. from :func:`~medpretrain.evaluation.plots.save_overlay`.
        training_curve: training-curve PNG to embed, or None.

    Returns:
        The dict written to metrics.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = summarize(per_case, class_names)
    metrics["context"] = dict(context)
    # Strict JSON: NaN (only possible from hand-made inputs) becomes null rather than an invalid token.
    metrics = _json_safe(metrics)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PER_CASE_COLUMNS)
    for case_id in sorted(per_case):
        for c in sorted(per_case[case_id], key=int):
            m = per_case[case_id][c]
            row = [case_id, int(c), _class_name(class_names, int(c))]
            for key in PER_CASE_COLUMNS[3:]:
                v = m.get(key)
                if v is None:
                    row.append("")
                elif key.endswith("_voxels"):
                    row.append(int(v))
                else:
                    row.append(repr(float(v)))
            writer.writerow(row)
    atomic_write_text(out_dir / "per_case.csv", buf.getvalue())

    report = _render_markdown(out_dir, per_case, class_names, metrics, context, list(overlays), training_curve)
    atomic_write_text(out_dir / "report.md", report)
    # Last: metrics.json marks a finished evaluation (the benchmark relies on it), so it appears only once
    # per_case.csv and report.md exist.
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    return metrics
