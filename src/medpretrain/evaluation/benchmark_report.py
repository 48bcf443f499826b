"""The label-efficiency benchmark's outputs: results.csv, summary.json, report.md, label_efficiency.png.

Statistics. Each run is scored by its mean over the test cases. A table cell is the mean ± sample std
(ddof 1) of that over seeds. The gain of a method over scratch is paired twice over: per seed (same labelled
cases, same initialisation seed of the new layers, same patches), and per test case. The report gives the
mean per-seed gain, how many seeds gained, and a two-sided Wilcoxon signed-rank test (scipy) over the test
cases of each case's Dice gain averaged over the seeds: the cases are the independent units (the runs of
one seed share a model, so pooling seed x case pairs would overstate the evidence).
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medpretrain.atomic import atomic_write_text
from medpretrain.engine.run_folder import run_precision
from medpretrain.evaluation.plots import save_label_efficiency_plot, save_learning_curves
from medpretrain.evaluation.report import _json_safe

if TYPE_CHECKING:
    from medpretrain.benchmark import BenchmarkConfig, Job

METRICS = ("dice", "nsd", "assd", "hd95")
SCRATCH = "scratch"


def _curve_exports(run: Path) -> dict[int, float]:
    """Mean Dice of each intermediate export a run scored (``RUN/curve/eval-stepN/metrics.json``), by step: test
    cases for a benchmark run, validation cases for a grid run."""
    return {int(path.parent.name.removeprefix("eval-step")):
            _num(json.loads(path.read_text(encoding="utf-8")).get("overall", {}).get("dice", {}).get("mean"))
            for path in sorted(run.glob("curve/eval-step*/metrics.json"))}


def _read_run(job: "Job") -> dict[str, Any] | None:
    run = Path(job.info["run"])
    metrics_path = run / "eval" / "metrics.json"
    if not metrics_path.exists() or not (run / "eval" / "per_case.csv").exists():
        return None
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    per_case: dict[str, dict[str, float]] = {}
    with open(run / "eval" / "per_case.csv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            # mean over classes per case, as the overall numbers are
            per_case.setdefault(row["case_id"], {}).setdefault("_rows", []).append(float(row["dice"]))
    case_dice = {cid: float(np.mean(v["_rows"])) for cid, v in per_case.items()}
    training = info.get("training", {})
    # Learning curve: the test Dice of every intermediate export, and of the final model at its step.
    curve = _curve_exports(run)
    if training.get("steps_done") and info.get("kind") != "nnunet-scratch":  # nnU-Net's iterations are not our steps
        curve[int(training["steps_done"])] = _num(metrics.get("overall", {}).get("dice", {}).get("mean"))
    original_path = run / "eval" / "original" / "metrics.json"  # scored in the source geometry too (original_space)
    original = None
    if original_path.is_file():
        om = json.loads(original_path.read_text(encoding="utf-8"))
        original = {"overall": {m: _num(om.get("overall", {}).get(m, {}).get("mean")) for m in METRICS},
                    "classes": {c: {m: _num(v.get(m, {}).get("mean")) for m in METRICS}
                                for c, v in om.get("classes", {}).items()}}
    return {
        "method": job.info["method"], "backbone": job.info["backbone"], "model": info.get("config", {}).get("model"),
        "n_labeled": job.info["n_labeled"], "n_cases": len(info.get("labeled_cases", [])), "seed": job.info["seed"],
        **{m: _num(metrics.get("overall", {}).get(m, {}).get("mean")) for m in METRICS},
        "classes": {c: {m: _num(v.get(m, {}).get("mean")) for m in METRICS}
                    for c, v in metrics.get("classes", {}).items()},
        "wall_s": training.get("wall_time_s"), "steps": training.get("steps_done"),
        "precision": run_precision(info),
        "case_dice": case_dice, "run": str(run), "curve": curve,
        "lr": info.get("config", {}).get("lr"), "original": original,
    }


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def per_case_gains(pairs: list[tuple[dict[str, float], dict[str, float]]]) -> list[float]:
    """Per test case, the Dice gain over scratch averaged over the paired seeds (the unit of the signed-rank
    test: cases are independent, seeds of one case are not).

    Args:
        pairs: one ``(method's per-case Dice, scratch's per-case Dice)`` per seed.
    """
    per_case: dict[str, list[float]] = {}
    for method, scratch in pairs:
        for case, dice in scratch.items():
            if case in method:
                per_case.setdefault(case, []).append(method[case] - dice)
    return [float(np.mean(v)) for v in per_case.values()]


def wilcoxon_p(diffs: list[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (zeros dropped); None below 6 pairs."""
    diffs = [d for d in diffs if d != 0.0]
    if len(diffs) < 6:  # too few pairs for a meaningful signed-rank test
        return None
    from scipy.stats import wilcoxon

    return float(wilcoxon(diffs).pvalue)


def _size_key(n) -> float:
    return math.inf if n == "all" else float(n)


def summarize_runs(rows: list[dict]) -> dict[str, Any]:
    """Mean ± std per (backbone, method, n) and the paired gain of each method over scratch."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backbone"], r["method"], r["n_labeled"]), []).append(r)
    table = []
    for (backbone, method, n), sel in sorted(groups.items(), key=lambda kv: (kv[0][0], _size_key(kv[0][2]),
                                                                            kv[0][1] != SCRATCH, kv[0][1])):
        entry = {"backbone": backbone, "method": method, "n_labeled": n, "seeds": sorted(r["seed"] for r in sel),
                 "n_cases": sel[0]["n_cases"]}
        for m in METRICS:
            entry[m] = dict(zip(("mean", "std"), _mean_std([r[m] for r in sel])))
        classes = sorted({c for r in sel for c in r["classes"]})
        entry["classes"] = {c: {m: dict(zip(("mean", "std"), _mean_std([r["classes"][c][m] for r in sel
                                                                          if c in r["classes"]])))
                                for m in METRICS} for c in classes}
        entry["wall_s"] = _mean_std([r["wall_s"] for r in sel if r["wall_s"] is not None])[0]
        orig = [r["original"] for r in sel if r.get("original")]
        if orig:  # the runs scored in their source geometry too (original_space)
            entry["original"] = {
                "seeds": len(orig),
                **{m: dict(zip(("mean", "std"), _mean_std([o["overall"][m] for o in orig]))) for m in METRICS},
                "classes": {c: {m: dict(zip(("mean", "std"), _mean_std([o["classes"][c][m] for o in orig
                                                                         if c in o["classes"]]))) for m in METRICS}
                            for c in dict.fromkeys(c for o in orig for c in o["classes"])}}
        if method != SCRATCH:
            scratch = {r["seed"]: r for r in groups.get((backbone, SCRATCH, n), [])}
            paired = [(r, scratch[r["seed"]]) for r in sel if r["seed"] in scratch]
            if paired:
                per_seed = [r["dice"] - s["dice"] for r, s in paired]
                case_gain = per_case_gains([(r["case_dice"], s["case_dice"]) for r, s in paired])
                mean, std = _mean_std(per_seed)
                entry["gain_vs_scratch"] = {
                    "dice_mean": mean, "dice_std": std, "seeds_paired": len(paired),
                    "seeds_improved": sum(d > 0 for d in per_seed),
                    "cases_improved": sum(d > 0 for d in case_gain), "cases": len(case_gain),
                    "wilcoxon_p": wilcoxon_p(case_gain),
                }
        table.append(entry)
    return {"groups": table}


def steps_to_reach(curve: dict[int, float], target: float) -> float | None:
    """The first fine-tuning step at which a learning curve reaches ``target`` (linear between its points,
    from the first point on), or None if it never does."""
    points = sorted((s, d) for s, d in curve.items() if math.isfinite(d))
    for i, (step, dice) in enumerate(points):
        if dice >= target:
            if i == 0:
                return float(step)
            s0, d0 = points[i - 1]
            return float(s0 + (step - s0) * (target - d0) / (dice - d0))
    return None


def summarize_curves(rows: list[dict]) -> dict[str, Any]:
    """Per (backbone, n, method): mean ± std test Dice over seeds at every curve step, and for pretrained arms
    the steps needed to reach scratch's final Dice of the same seed (compute saved when below scratch's steps)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backbone"], r["n_labeled"], r["method"]), []).append(r)
    out = []
    for (backbone, n, method), sel in sorted(groups.items(), key=lambda kv: (kv[0][0], _size_key(kv[0][1]),
                                                                            kv[0][2] != SCRATCH, kv[0][2])):
        steps = sorted({s for r in sel for s in r["curve"]})
        points = [(s, *_mean_std([r["curve"][s] for r in sel if s in r["curve"]])) for s in steps]
        entry = {"backbone": backbone, "n_labeled": n, "method": method, "points": points}
        if method != SCRATCH:
            scratch = {r["seed"]: r for r in groups.get((backbone, n, SCRATCH), [])}
            reach = []
            for r in sel:
                s = scratch.get(r["seed"])
                if s and s["curve"]:
                    target = s["curve"][max(s["curve"])]
                    reach.append(steps_to_reach(r["curve"], target))
            reached = [x for x in reach if x is not None]
            entry["reach_scratch_final"] = {"seeds": len(reach), "reached": len(reached),
                                            "mean_steps": float(np.mean(reached)) if reached else None,
                                            "scratch_steps": max(steps) if steps else None}
        out.append(entry)
    return {"curves": out}


def _fmt(stat: dict, metric: str) -> str:
    mean, std = stat["mean"], stat["std"]
    if mean is None or not math.isfinite(mean):
        return "–"
    digits = 3 if metric in ("dice", "nsd") else 2
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _best_worst_overlays(rows: list[dict], out: Path) -> list[str]:
    """Copy the best and worst test-case overlays of each method's seed-0 run at the smallest size."""
    lines = []
    if not rows:
        return lines
    smallest = min((r["n_labeled"] for r in rows), key=_size_key)
    seed0 = min(r["seed"] for r in rows)
    dest = out / "overlays"
    for r in sorted((r for r in rows if r["n_labeled"] == smallest and r["seed"] == seed0),
                    key=lambda r: (r["backbone"], r["method"] != SCRATCH, r["method"])):
        if not r["case_dice"]:
            continue
        # rank among the cases evaluate drew an overlay for (it draws the best and the worst ones)
        drawn = {p.stem for p in (Path(r["run"]) / "eval" / "overlays").glob("*.png")}
        ranked = sorted((c for c in r["case_dice"] if c in drawn), key=r["case_dice"].get)
        if not ranked:
            continue
        pngs = []
        picks = [("best", ranked[-1])] + ([("worst", ranked[0])] if len(ranked) > 1 else [])
        for tag, cid in picks:
            src = Path(r["run"]) / "eval" / "overlays" / f"{cid}.png"
            if src.exists():
                dest.mkdir(parents=True, exist_ok=True)
                target = dest / f"{r['method']}-{r['backbone']}-{tag}-{cid}.png"
                shutil.copyfile(src, target)
                pngs.append(f"{tag} {cid} (Dice {r['case_dice'][cid]:.3f}): ![]({target.relative_to(out).as_posix()})")
        if pngs:
            lines.append(f"- {r['method']} / {r['backbone']}, n = {smallest}, seed {seed0}: " + "; ".join(pngs))
    return lines


def format_grid_scores(runs: list[dict]) -> str:
    """``lr: validation Dice`` of a selection's runs (``select-hparams`` JSON); ``+`` marks an lr beyond the grid
    (``validation.extend``), ``failed`` a run that did not train."""
    return ", ".join(f"{r['lr']:g}{'+' if r.get('extended') else ''}: "
                     + ("failed" if r["validation_dice"] is None else f"{r['validation_dice']:.3f}") for r in runs)


def validation_curve(run: Path) -> dict[int, float]:
    """Validation Dice of a grid run at each learning-curve step it scored (``validation.curves``) and at its
    final step; empty when it scored no curve."""
    run = Path(run)
    curve = _curve_exports(run)
    final, info = run / "eval" / "metrics.json", run / "run.json"
    if curve and final.is_file() and info.is_file():
        steps = json.loads(info.read_text(encoding="utf-8")).get("training", {}).get("steps_done")
        if steps:
            curve[int(steps)] = _num(json.loads(final.read_text(encoding="utf-8"))["overall"]["dice"]["mean"])
    return curve


def validation_curve_lines(selection: dict[str, dict]) -> list[str]:
    """Markdown: validation Dice vs fine-tuning step of every grid run that scored its curve, then the chosen
    run's validation Dice per class (which structures the recipe learns at all)."""
    rows = [(arm, r, validation_curve(Path(r["run"]))) for arm, sel in selection.items() for r in sel["runs"]
            if r.get("lr") is not None]
    rows = [(arm, r, c) for arm, r, c in rows if c]
    if not rows:
        return []
    steps = sorted({s for _, _, c in rows for s in c})
    md = ["", "### Validation learning curves (mean validation Dice at each fine-tuning step)", "",
          "| arm | lr | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for arm, r, c in rows:
        md.append(f"| {arm} | {r['lr']:g} | " + " | ".join(f"{c[s]:.3f}" if s in c else "" for s in steps) + " |")
    classes: dict[str, dict[str, float]] = {}
    for arm, sel in selection.items():
        if sel.get("chosen") is None:  # grid still running: no choice yet
            continue
        path = Path(next((r["run"] for r in sel["runs"] if r["lr"] == sel["chosen"]["lr"]), "")) / "eval" / "metrics.json"
        if path.is_file():
            per = json.loads(path.read_text(encoding="utf-8")).get("classes", {})
            classes[arm] = {c: _num(v.get("dice", {}).get("mean")) for c, v in per.items()}
    names = list(dict.fromkeys(c for v in classes.values() for c in v))  # the dataset's label order
    if names:
        md += ["", "Validation Dice per class of each arm's chosen run:", "",
               "| arm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        md += [f"| {arm} | " + " | ".join(f"{v[c]:.3f}" if c in v else "" for c in names) + " |"
               for arm, v in classes.items()]
    return md


def original_space_lines(groups: list[dict]) -> list[str]:
    """Markdown: the groups' test metrics in the source files' geometry (``original_space``), overall and per class
    (Dice, NSD, HD95); empty when no run was scored there."""
    groups = [g for g in groups if g.get("original")]
    if not groups:
        return []
    md = ["", "## In the source files' geometry (test predictions mapped back as `predict` writes them, scored "
          "against the label files as distributed, at their spacing)", "",
          "| backbone | n labelled | method | seeds | Dice | NSD | ASSD (mm) | HD95 (mm) |", "|---|---|---|---|---|---|---|---|"]
    for g in groups:
        o = g["original"]
        md.append(f"| {g['backbone']} | {g['n_labeled']} ({g['n_cases']}) | {g['method']} | {o['seeds']} | "
                  + " | ".join(_fmt(o[m], m) for m in METRICS) + " |")
    classes = list(dict.fromkeys(c for g in groups for c in g["original"]["classes"]))
    for metric, title in (("dice", "Dice"), ("nsd", "NSD"), ("hd95", "HD95, mm")) if classes else ():
        md += ["", f"### Per class in the source geometry ({title})", "",
               "| backbone | n labelled | method | " + " | ".join(classes) + " |", "|---|---|---|" + "---|" * len(classes)]
        for g in groups:
            per = g["original"]["classes"]
            md.append(f"| {g['backbone']} | {g['n_labeled']} | {g['method']} | " + " | ".join(
                _fmt(per[c][metric], metric) if c in per else "–" for c in classes) + " |")
    return md


def write_benchmark_report(cfg: "BenchmarkConfig", out: Path, finetune_jobs: list["Job"],
                           pretrain_jobs: list["Job"], failed: dict[str, str], notes: list[str] = (),
                           validation_jobs: list["Job"] = ()) -> Path:
    """Collect every finished run of the benchmark and write its four outputs; returns ``report.md``.
    ``validation_jobs``: the grid's runs, shown (learning curves) while their arm's selection has not run yet."""
    out = Path(out)
    rows = [r for r in (_read_run(j) for j in finetune_jobs) if r is not None]
    summary = summarize_runs(rows)
    summary.update(summarize_curves(rows))
    pretraining = {}
    for j in pretrain_jobs:
        run_file = Path(j.info["run"]) / "run.json"
        info = json.loads(run_file.read_text(encoding="utf-8")) if run_file.exists() else {}
        # Finished: its model.pt is there or, in a folder restored from kept results (no checkpoints), its
        # run.json says every step was done (or that it is the untrained null control, which trains none).
        finished = (Path(j.info["run"]) / "model.pt").exists() or bool(info.get("untrained")) or (
            info.get("training", {}).get("steps_done", -1) >= info.get("config", {}).get("steps", 0) > 0)
        if finished:
            t = info.get("training", {})
            cfg_used = info.get("config", {})
            pretraining[j.name] = {"method": j.info["method"], "backbone": j.info["backbone"],
                                   "steps": 0 if info.get("untrained") else t.get("steps_done"),
                                   "wall_s": t.get("wall_time_s"), "seed": cfg_used.get("seed"),
                                   "patch": cfg_used.get("patch"), "batch": cfg_used.get("batch"),
                                   "untrained": bool(info.get("untrained")), "pretext": info.get("pretext", {}),
                                   "teacher_init_share": info.get("teacher_init_share")}
    selection = {}
    for path in sorted((out / "configs").glob("finetune-*.json")):
        selection[path.stem.removeprefix("finetune-")] = json.loads(path.read_text(encoding="utf-8"))
    summary["validation_selection"] = selection
    summary.update({"name": cfg.name, "pretrain_seed": getattr(cfg, "pretrain_seed", None), "budgets": {k: json.loads(v.model_dump_json()) for k, v in cfg.backbones.items()},
                    "seeds": cfg.seeds, "n_labeled": cfg.n_labeled, "pretraining": pretraining,
                    "runs_finished": len(rows), "runs_planned": len(finetune_jobs), "failed": failed})
    summary["notes"] = list(notes)
    atomic_write_text(out / "summary.json", json.dumps(_json_safe(summary), indent=1, allow_nan=False) + "\n")

    fields = ["method", "backbone", "model", "n_labeled", "n_cases", "seed", *METRICS, "wall_s", "steps", "precision"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(fields)
    for r in sorted(rows, key=lambda r: (r["backbone"], r["method"], _size_key(r["n_labeled"]), r["seed"])):
        writer.writerow(["" if r[f] is None or (isinstance(r[f], float) and not math.isfinite(r[f]))
                         else (f"{r[f]:.4f}" if isinstance(r[f], float) else r[f]) for f in fields])
    atomic_write_text(out / "results.csv", buf.getvalue())

    plot_rows = [{"method": f"{r['method']} ({r['backbone']})" if len(cfg.backbones) > 1 else r["method"],
                  "n_labeled": r["n_cases"], "seed": r["seed"], "dice": r["dice"]} for r in rows]
    save_label_efficiency_plot(plot_rows, out / "label_efficiency.png", "dice")

    md = [f"# Label-efficiency benchmark: {cfg.name}", "",
          f"Finished runs: {len(rows)} of {len(finetune_jobs)} planned"
          + (f"; failed or skipped: {', '.join(failed)}" if failed else "") + ".", "",
          *[f"- {n}" for n in notes], *([""] if notes else []),
          *[f"- {name}: {why}" for name, why in failed.items() if name.startswith("pretrain-")],
          *([""] if any(name.startswith("pretrain-") for name in failed) else []),
          "## Budgets (identical for every method of a backbone, scratch included)", "",
          "| backbone | network | fine-tuning steps | patch | batch | lr | precision |", "|---|---|---|---|---|---|---|"]
    for name, b in cfg.backbones.items():
        md.append(f"| {name} | {b.model} | {b.steps} | {'x'.join(map(str, b.patch))} | {b.batch} | {b.lr:g} | "
                  f"{b.precision} |")
    if pretraining:
        md += ["", "Pretext fraction learnt = (trivial - final) / (trivial - perfect) of each logged pretext loss, "
               "the final loss the mean of its last 10% of logged steps (`blocks/pretext.py`); 0 = no better than "
               "the trivial prediction. Teacher init share: the share of its random initialisation an exported EMA "
               "teacher still holds.", "",
               "| pretraining | backbone | seed | steps | patch | batch | wall time (s) | pretext: trivial -> final "
               "(perfect), fraction learnt | teacher init share |", "|---|---|---|---|---|---|---|---|---|"]
        for p in pretraining.values():
            patch = "x".join(map(str, p["patch"])) if p["patch"] else "?"
            pretext = "untrained (null control)" if p["untrained"] else "; ".join(
                f"{term}: {r['trivial']:.4f} -> " + ("?" if r.get("final") is None else f"{r['final']:.4f}")
                + f" ({r['perfect']:.4f}), " + ("?" if r.get("fraction_learnt") is None
                                                else f"{100 * r['fraction_learnt']:.1f}%")
                for term, r in p["pretext"].items()) or "–"
            share = "–" if p["teacher_init_share"] is None else f"{p['teacher_init_share']:.3g}"
            md.append(f"| {p['method']} | {p['backbone']} | {p['seed']} | {p['steps']} | {patch} | {p['batch']} | "
                      f"{p['wall_s'] if p['wall_s'] is not None else '?'} | {pretext} | {share} |")
    if selection:
        md += ["", "## Learning rate chosen on validation cases (never test)", "",
               "| arm | chosen lr | validation Dice per lr | validation cases |", "|---|---|---|---|"]
        for arm, sel in selection.items():
            scores = format_grid_scores(sel["runs"])
            cases = sel["runs"][0].get("validation_cases", []) if sel["runs"] else []
            edge = " (edge of the search)" if sel.get("extend", {}).get("edge") else ""
            md.append(f"| {arm} | {sel['chosen']['lr']:g}{edge} | {scores} | {', '.join(cases)} |")
    pending: dict[str, dict] = {}  # grid runs finished so far of the arms not chosen yet
    for j in validation_jobs:
        arm = f"{j.info['backbone']}-{j.info['method']}"
        if arm not in selection and (Path(j.info["run"]) / "eval" / "metrics.json").is_file():
            dice = json.loads((Path(j.info["run"]) / "eval" / "metrics.json").read_text(encoding="utf-8"))
            pending.setdefault(arm, {"runs": [], "chosen": None})["runs"].append(
                {"run": j.info["run"], "lr": j.info["lr"], "validation_dice": dice["overall"]["dice"]["mean"]})
    if pending:
        md += ["", "## Validation grid runs finished so far (no choice made yet)", "",
               *[f"- {arm}: validation Dice per lr {format_grid_scores(sel['runs'])}" for arm, sel in pending.items()]]
    md += validation_curve_lines({**selection, **pending}) if selection or pending else []
    if selection:
        if any(sel.get("extend") for sel in selection.values()):
            md += ["", "+: an lr beyond the grid, tried because the best was at the grid's end (`validation.extend`); "
                   "\"edge of the search\": still the best after every extension allowed; \"failed\": the run did "
                   "not train (e.g. diverged) and counts as the worst."]
    if not rows:  # e.g. a calibration (validation.only): no test run, no empty test tables
        md += ["", "No test run finished (or none planned: a validation-only profile)."]
    md += [] if not rows else [
           "", f"Seeds: {', '.join(map(str, cfg.seeds))}. Each cell: mean ± sample std over seeds of the mean over "
           "the test cases.", "", "## Results", "",
           "| backbone | n labelled | method | seeds | Dice | NSD | ASSD (mm) | HD95 (mm) | fine-tune wall (s) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for g in summary["groups"]:
        md.append(f"| {g['backbone']} | {g['n_labeled']} ({g['n_cases']}) | {g['method']} | {len(g['seeds'])} | "
                  + " | ".join(_fmt(g[m], m) for m in METRICS)
                  + (f" | {g['wall_s']:.0f} |" if math.isfinite(g["wall_s"]) else " | – |"))
    md += [] if not rows else ["", "## Gain over scratch (paired: same seed, labelled cases and test cases)", "",
           "| backbone | n labelled | method | Dice gain (mean ± std over seeds) | seeds improved | test cases "
           "improved (gain averaged over seeds) | Wilcoxon p (over test cases) |", "|---|---|---|---|---|---|---|"]
    for g in summary["groups"]:
        gain = g.get("gain_vs_scratch")
        if gain:
            p = "–" if gain["wilcoxon_p"] is None else f"{gain['wilcoxon_p']:.3g}"
            md.append(f"| {g['backbone']} | {g['n_labeled']} | {g['method']} | {gain['dice_mean']:+.3f} ± "
                      f"{gain['dice_std']:.3f} | {gain['seeds_improved']}/{gain['seeds_paired']} | "
                      f"{gain['cases_improved']}/{gain['cases']} | {p} |")
    classes = sorted({c for g in summary["groups"] for c in g["classes"]})
    # Per-organ Dice, NSD and HD95: a multi-organ task (BTCV) is read organ by organ, and boundary quality (NSD,
    # HD95) can move where Dice does not.
    for metric, title in (("dice", "Dice"), ("nsd", "NSD"), ("hd95", "HD95, mm")) if classes else ():
        md += ["", f"## Per class ({title})", "", "| backbone | n labelled | method | " + " | ".join(classes) + " |",
               "|---|---|---|" + "---|" * len(classes)]
        for g in summary["groups"]:
            md.append(f"| {g['backbone']} | {g['n_labeled']} | {g['method']} | " + " | ".join(
                _fmt(g["classes"][c][metric], metric) if c in g["classes"] else "–" for c in classes) + " |")
    md += original_space_lines(summary["groups"])
    curve_groups = [c for c in summary["curves"] if len(c["points"]) > 1]
    if curve_groups:
        panels: dict[str, dict[str, list]] = {}
        for c in curve_groups:
            title = f"{c['backbone']}, n = {c['n_labeled']}" if len(cfg.backbones) > 1 else f"n = {c['n_labeled']}"
            panels.setdefault(title, {})[c["method"]] = c["points"]
        save_learning_curves(panels, out / "learning_curves.png")
        md += ["", "## Learning curves (test Dice at fractions of the fine-tuning steps, mean ± std over seeds)", "",
               "| backbone | n labelled | method | Dice by step | steps to reach scratch's final Dice (seeds "
               "reached) |", "|---|---|---|---|---|"]
        for c in curve_groups:
            by_step = ", ".join(f"{s}: {m:.3f} ± {sd:.3f}" for s, m, sd in c["points"])
            r = c.get("reach_scratch_final")
            reach = "–" if r is None else (f"{r['mean_steps']:.0f} of {r['scratch_steps']} ({r['reached']}/"
                                           f"{r['seeds']})" if r["mean_steps"] is not None
                                           else f"not reached (0/{r['seeds']})")
            md.append(f"| {c['backbone']} | {c['n_labeled']} | {c['method']} | {by_step} | {reach} |")
        md += ["", "![Learning curves](learning_curves.png)"]
    md += ["", "## Label efficiency", "", "![Dice vs labelled cases](label_efficiency.png)", ""] if rows else [""]
    overlays = _best_worst_overlays(rows, out)
    if overlays:
        md += ["## Best and worst test cases (red: prediction, green: ground truth)", "", *overlays, ""]
    md += ["Files: `results.csv` (one row per run), `summary.json` (everything above), `runs/*/eval/` (per-case "
           "metrics and overlays), `logs/` (every command and its output), `jobs.json` (the commands)."]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return out / "report.md"
