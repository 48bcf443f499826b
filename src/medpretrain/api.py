"""The Python API: everything the command line does, one import away.

    from medpretrain.api import prepare, finetune, evaluate, predict, demo, export_nnunet, nnunet_scratch
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from medpretrain.atomic import check_writable_folder
from medpretrain.config import EvaluateConfig, FinetuneConfig, InferenceConfig
from medpretrain.data.cache import PreparedData, prepare, prepare_dataset, prepare_pool
from medpretrain.data.crops import background_fill
from medpretrain.data.datasets import discover_pool
from medpretrain.data.io import IMAGE_SUFFIXES, image_suffix, read_image, strip_image_suffix, write_nifti
from medpretrain.data.preprocess import (
    PreprocessConfig, preprocess_image, restore_label_values, restore_to_original,
)
from medpretrain.engine.run_folder import read_run
from medpretrain.errors import CacheError, CheckpointError, ConfigError, DataError, short_path
from medpretrain.evaluation.inference import load_trained_model, predict_probabilities
from medpretrain.evaluation.metrics import case_metrics
from medpretrain.evaluation.plots import save_overlay, save_training_curve
from medpretrain.evaluation.report import write_evaluation
from medpretrain.interop.nnunet import export_nnunet
from medpretrain.interop.nnunet_scratch import nnunet_scratch

log = logging.getLogger("medpretrain")


def __getattr__(name: str):
    """``finetune`` is imported on first use: it brings Lightning, which costs seconds per process and which
    ``evaluate``, ``predict`` and ``prepare`` (each a child process of a benchmark, many times) do not use."""
    if name == "finetune":
        from medpretrain.engine.finetune import finetune

        return finetune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["prepare", "prepare_dataset", "prepare_pool", "finetune", "evaluate", "predict", "export_nnunet",
           "nnunet_scratch", "FinetuneConfig", "EvaluateConfig", "PreprocessConfig", "PreparedData"]


def _check_model_fits_data(meta: dict, data: PreparedData, run_dir: Path) -> None:
    if data.kind != "labelled":
        raise CacheError(f"{data.root} is an unlabelled pool; evaluation needs prepared labelled data")
    trained, here = meta.get("preprocess"), data.manifest.get("preprocess")
    if trained is not None and trained != here:
        diff = sorted(k for k in set(trained) | set(here) if trained.get(k) != here.get(k))
        raise CacheError(
            f"{data.root} was prepared with other settings than the data run {run_dir} was trained on "
            f"(differ: {', '.join(f'{k}={here.get(k)!r} vs {trained.get(k)!r}' for k in diff)}); "
            "prepare the evaluation data with the run's settings"
        )
    if meta["in_channels"] != data.in_channels or meta["out_channels"] != data.num_classes:
        raise CacheError(
            f"run {run_dir} was trained for {meta['in_channels']} channel(s) and {meta['out_channels']} classes, "
            f"but {data.root} has {data.in_channels} channel(s) and {data.num_classes} classes; "
            "evaluate on data prepared from the same dataset"
        )


def evaluate(run: str | Path, data: str | Path, cfg: EvaluateConfig | None = None,
             out: str | Path | None = None, model_file: str | Path | None = None) -> dict:
    """Evaluate a finished run on a split of prepared data (``validation``: the training cases the run set aside).

    Writes ``RUN/eval/`` (or ``out``): metrics.json, per_case.csv, report.md, overlays/*.png.
    Metrics are computed on the prepared grid (the spacing of the prepared data), per case and class.
    An ``nnunet-scratch`` run (nnU-Net v2's own training, ``interop.nnunet_scratch``) is scored from the label maps
    nnU-Net predicted in each test image's original geometry, mapped into the prepared grid with the steps
    ``prepare`` applied to the ground truth (``label_to_prepared``), with the same metric code.
    """
    cfg = cfg or EvaluateConfig()
    run_dir = Path(run)
    out_dir = Path(out) if out else run_dir / "eval"
    check_writable_folder(out_dir, "--out")
    prepared = PreparedData(data)
    nnunet_info = _nnunet_run(run_dir)
    if nnunet_info is not None:
        return _evaluate_nnunet_run(run_dir, nnunet_info, prepared, cfg, out_dir, model_file)
    model = load_trained_model(run_dir, model_file=model_file)
    _check_model_fits_data(model.meta, prepared, run_dir)
    inference = _inference_settings(model, cfg.inference, run_dir)
    labels = model.labels
    case_ids = _evaluation_cases(run_dir, prepared, cfg, out_dir)

    original: dict[str, dict] = {}

    def segment(cid: str) -> np.ndarray:
        image = np.asarray(prepared.image(cid))
        fill = background_fill(prepared.case(cid), prepared.in_channels)
        probs = predict_probabilities(model, image, inference, fill)
        if cfg.original_space:
            original[cid] = _original_space_metrics(cid, probs, prepared, model.meta.get("label_values"), labels,
                                                    cfg.nsd_tolerance_mm)
        return probs.argmax(0).astype(np.uint8)

    per_case, overlays, seconds_per_case = _score_cases(case_ids, segment, prepared, labels, cfg, out_dir)
    curve = save_training_curve(run_dir / "logs" / "csv" / "metrics.csv", out_dir / "training_curve.png")
    run_info = read_run(run_dir)
    context = {
        "run": str(run_dir),
        "model": model.meta["model"],
        "steps": model.meta.get("global_step"),
        "model_file": str(model_file) if model_file else None,
        "n_labeled": run_info.get("n_labeled"),
        "data": str(prepared.root),
        "split": cfg.split,
        "n_cases": len(case_ids),
        "spacing_mm": list(prepared.spacing),
        "patch": list(model.patch),
        "inference": inference.model_dump(),
        "precision": model.precision,
        "nsd_tolerance_mm": cfg.nsd_tolerance_mm,
        "training": run_info.get("training", {}),
        "inference_seconds_per_case": round(seconds_per_case, 2),
    }
    if original:
        write_evaluation(out_dir / "original", original, labels, {
            **context, "space": "each case's source file geometry: probabilities mapped back as `predict` writes "
                                "them, scored against the source label file at its own spacing",
            "spacing_mm": "the source file's, per case"})
    elif (out_dir / "original").is_dir():
        # An earlier evaluation's source-geometry scores would sit beside new prepared-grid ones (and a benchmark
        # report would read them): they no longer describe this evaluation.
        shutil.rmtree(out_dir / "original")
    return write_evaluation(out_dir, per_case, labels, context, overlays=overlays, training_curve=curve)


def _original_space_metrics(cid: str, probs: np.ndarray, prepared: PreparedData, label_values: list[int] | None,
                            labels: dict[int, str], tolerance_mm: float) -> dict:
    """Metrics of one case in its source file's geometry (``EvaluateConfig.original_space``): the prepared-grid
    probabilities mapped back with ``restore_to_original`` (what ``predict`` writes), against the source label file
    read as ``prepare`` read it, with the source spacing."""
    from medpretrain.data.preprocess import renumber_labels

    record = prepared.case(cid)
    source = record.get("source_label")
    if not source or not Path(source).is_file():
        raise DataError(f"case {cid} of {prepared.root}: its source label file {source!r} is not there, so it cannot "
                        "be scored in its original geometry; evaluate without original_space, or prepare the data "
                        "again from where the files are now")
    truth = read_image(source)
    geometry = prepared.geometry(cid)
    if list(truth.spatial_shape) != list(geometry.original_shape) or not np.allclose(
            truth.affine, geometry.original_affine, rtol=1e-4, atol=1e-2):
        raise DataError(f"{source}: the label's grid {tuple(truth.spatial_shape)} is not the grid {cid} was prepared "
                        f"from ({tuple(geometry.original_shape)}); was {prepared.root} prepared from these files?")
    pred = restore_to_original(probs, geometry, is_probability=True)
    gt = np.rint(np.asarray(truth.array[0])).astype(np.int64)
    if label_values is not None:
        gt = renumber_labels(gt, label_values)
    spacing = tuple(float(v) for v in np.linalg.norm(np.asarray(truth.affine)[:3, :3], axis=0))
    metrics = case_metrics(pred, gt, [c for c in sorted(labels) if c != 0], spacing, tolerance_mm)
    log.info("%s in its original geometry (%s voxels): Dice %s", cid, "x".join(map(str, pred.shape)),
             ", ".join(f"{m['dice']:.3f}" for m in metrics.values()))
    return metrics


def _evaluation_cases(run_dir: Path, prepared: PreparedData, cfg: EvaluateConfig, out_dir: Path) -> list[str]:
    if cfg.split == "validation":
        case_ids = read_run(run_dir).get("validation_cases") or []
        if not case_ids:
            raise ConfigError(f"run {run_dir} set no validation cases aside (validation_cases: 0); evaluate another "
                              "split, or fine-tune with validation_cases > 0")
    else:
        case_ids = prepared.split(cfg.split)
    if not case_ids:
        # An empty evaluation is no result: never let it replace the previous one.
        raise ConfigError(
            f"split {cfg.split!r} of {prepared.root} holds no case, nothing to evaluate (the evaluation in {out_dir} "
            f"is left as it was); evaluate another split (--split, here: "
            f"{', '.join(k for k, v in prepared.manifest.get('split', {}).items() if v) or 'none'}) or prepare the "
            "data with cases in that split"
        )
    return case_ids


def _score_cases(case_ids: list[str], segment, prepared: PreparedData, labels: dict[int, str], cfg: EvaluateConfig,
                 out_dir: Path) -> tuple[dict, list[Path], float]:
    """Metrics of ``segment(case_id)`` (a label map on the prepared grid) against each case's prepared label, the
    overlays of the best and worst cases, and the seconds per case."""
    class_ids = [c for c in sorted(labels) if c != 0]
    spacing = tuple(prepared.spacing)
    per_case, cache = {}, {}
    t0 = time.perf_counter()
    for i, cid in enumerate(case_ids):
        pred = segment(cid)
        label = np.asarray(prepared.label(cid))
        per_case[cid] = case_metrics(pred, label, class_ids, spacing, cfg.nsd_tolerance_mm)
        cache[cid] = pred
        log.info("evaluated %s (%d/%d): Dice %s", cid, i + 1, len(case_ids),
                 ", ".join(f"{per_case[cid][c]['dice']:.3f}" for c in class_ids))
    seconds_per_case = (time.perf_counter() - t0) / max(len(case_ids), 1)

    overlays = []
    if cfg.overlays:
        mean_dice = {cid: float(np.mean([per_case[cid][c]["dice"] for c in class_ids])) for cid in case_ids}
        ranked = sorted(case_ids, key=lambda c: mean_dice[c], reverse=True)
        chosen = ranked if cfg.overlays < 0 or cfg.overlays >= len(ranked) else (
            ranked[: (cfg.overlays + 1) // 2] + ranked[len(ranked) - cfg.overlays // 2:])
        for cid in dict.fromkeys(chosen):
            path = out_dir / "overlays" / f"{cid}.png"
            save_overlay(np.asarray(prepared.image(cid))[0], np.asarray(prepared.label(cid)), cache[cid], path,
                         title=f"{cid}  Dice {mean_dice[cid]:.3f}  (green: truth, red: prediction)", spacing=spacing)
            overlays.append(path)
    return per_case, overlays, seconds_per_case


def _nnunet_run(run_dir: Path) -> dict | None:
    """The ``run.json`` of an nnunet-scratch run, else None."""
    from medpretrain.interop.nnunet_scratch import RUN_KIND

    path = run_dir / "run.json"
    if (run_dir / "model.pt").exists() or not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if info.get("kind") == RUN_KIND else None


def _evaluate_nnunet_run(run_dir: Path, info: dict, prepared: PreparedData, cfg: EvaluateConfig, out_dir: Path,
                         model_file) -> dict:
    """Score the label maps nnU-Net predicted (original geometry) on our prepared grid with our metrics."""
    from medpretrain.data.preprocess import label_to_prepared

    if model_file is not None:
        raise ConfigError(f"--model-file: {run_dir} is an nnunet-scratch run (nnU-Net's predictions, no model "
                          "exports); evaluate it without --model-file")
    if cfg.original_space:
        raise ConfigError(f"--original-space: {run_dir} is an nnunet-scratch run, scored on the prepared grid only; "
                          f"its predictions in the original geometry are in {run_dir / info.get('predictions', 'predictions')}")
    if not info.get("finished"):
        raise CheckpointError(f"the nnunet-scratch run in {run_dir} has not finished (no predictions yet); re-run its "
                              "`medpretrain nnunet-scratch` command")
    meta = {"preprocess": info.get("preprocess"), "in_channels": info["in_channels"],
            "out_channels": info["out_channels"]}
    _check_model_fits_data(meta, prepared, run_dir)
    labels = {int(k): v for k, v in info["labels"].items()}
    case_ids = _evaluation_cases(run_dir, prepared, cfg, out_dir)
    folder = run_dir / info.get("predictions", "predictions")
    interpolation = prepared.manifest["preprocess"].get("label_interpolation", "linear")

    def segment(cid: str) -> np.ndarray:
        path = folder / f"{cid}.nii.gz"
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist: nnU-Net predicted the test split of the run's data only "
                                  f"({len(info.get('test_cases', []))} cases); evaluate --split test")
        image = read_image(path)
        geometry = prepared.geometry(cid)
        if list(image.spatial_shape) != list(geometry.original_shape) or not np.allclose(
                image.affine, geometry.original_affine, rtol=1e-4, atol=1e-2):
            raise DataError(f"{path}: nnU-Net's prediction ({image.spatial_shape}) does not lie on the grid of the "
                            f"case's source image ({tuple(geometry.original_shape)}); was {prepared.root} prepared "
                            "from the files this run read?")
        return label_to_prepared(image.array[0], geometry, interpolation).astype(np.uint8, copy=False)

    per_case, overlays, seconds_per_case = _score_cases(case_ids, segment, prepared, labels, cfg, out_dir)
    curve = save_training_curve(run_dir / "logs" / "csv" / "metrics.csv", out_dir / "training_curve.png")
    nn = info.get("nnunet", {})
    context = {
        "run": str(run_dir),
        "model": f"{info['config'].get('model')} ({nn.get('network', {}).get('class', '?').rsplit('.', 1)[-1]}, "
                 f"nnU-Net {nn.get('version', '?')})",
        "arm": info.get("arm"),
        "steps": info.get("training", {}).get("steps_done"),
        "n_labeled": info.get("n_labeled"),
        "data": str(prepared.root),
        "split": cfg.split,
        "n_cases": len(case_ids),
        "spacing_mm": list(prepared.spacing),
        "patch": nn.get("patch_size"),
        "nnunet_spacing": nn.get("spacing"),
        "inference": nn.get("inference", {}),
        "prediction_space": "nnU-Net's predictions in each image's original geometry, mapped into the prepared grid "
                            f"as prepare mapped the ground truth (label interpolation: {interpolation})",
        "precision": info.get("training", {}).get("precision"),
        "nsd_tolerance_mm": cfg.nsd_tolerance_mm,
        "training": info.get("training", {}),
        "scoring_seconds_per_case": round(seconds_per_case, 2),
    }
    return write_evaluation(out_dir, per_case, labels, context, overlays=overlays, training_curve=curve)


def _group_channels(sources, in_channels: int) -> dict[str, list[Path]]:
    """One entry per case. A single-channel model: every file is its own case, named by its unique case id
    less nnU-Net's channel suffix ``_0000`` (``CASE_0000.nii.gz`` -> ``CASE``, as nnU-Net names predictions)
    unless that name is taken. A multi-channel model: nnU-Net channel files ``CASE_0000 .. CASE_{C-1}`` in the
    same folder form a case, or a file that already holds all channels (4D) is a case by itself."""
    if in_channels == 1:
        ids = {s.case_id for s in sources}
        cases = {}
        for s in sources:
            base = s.case_id[:-5] if s.case_id.endswith("_0000") else s.case_id
            cases[base if base == s.case_id or (base not in ids and base not in cases) else s.case_id] = list(s.images)
        return cases
    groups: dict[tuple[Path, str], dict[int, Path]] = {}
    singles: dict[str, list[Path]] = {}
    for src in sources:
        for path in src.images:
            stem = strip_image_suffix(path.name)
            if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
                groups.setdefault((path.parent, stem[:-5]), {})[int(stem[-4:])] = path
            else:
                singles[src.case_id] = [path]
    cases = dict(singles)
    for (folder, base), channels in sorted(groups.items()):
        if sorted(channels) != list(range(in_channels)):
            raise DataError(
                f"{folder}: case {base} has channel files {sorted(channels)}; the model expects "
                f"{base}_0000 .. {base}_{in_channels - 1:04d} ({in_channels} channels)"
            )
        name = base if base not in cases else f"{folder.name}_{base}"
        cases[name] = [channels[c] for c in range(in_channels)]
    return cases


def _inference_settings(model, override: InferenceConfig | None, run: str | Path = "the run") -> InferenceConfig:
    """The run's stored sliding-window settings, with only the fields the user set replaced. A bad value stored
    with the run (from a run written before it was checked) is named with the option that overrides it, so that
    it does not break every later evaluate/predict of that run."""
    stored = model.meta.get("inference", {})
    changed = override.model_dump(exclude_unset=True) if override is not None else {}
    try:
        return InferenceConfig(**{**stored, **changed})
    except ValidationError as exc:
        bad = "; ".join(f"{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg'].removeprefix('Value error, ')}"
                        for e in exc.errors())
        raise ConfigError(f"run {run} stores invalid sliding-window settings ({bad}); override them, e.g. "
                          "--overlap 0.5") from None


class Predictions(list):
    """The label maps ``predict`` wrote (a list of paths), and ``skipped``: one ``{"file", "reason"}`` per input
    that could not be segmented."""

    def __init__(self, written=(), skipped=()):
        super().__init__(written)
        self.skipped: list[dict] = list(skipped)


def _check_predict_out(input: Path, out: Path, targets: list[Path], inputs: list[Path]) -> None:
    """Refuse an --out that would write over an input or be read as input later, before anything is written."""
    if not out.is_dir() and image_suffix(out):
        raise ConfigError(f"--out {out} looks like a file name; predict writes one CASE.nii.gz label map per input "
                          "into the folder --out: pass a folder, e.g. predictions/")
    check_writable_folder(out, "--out")
    source, target_dir = input.resolve(), out.resolve()
    if source.is_dir() and (target_dir == source or source in target_dir.parents):
        raise ConfigError(
            f"--out {out} is the input folder {input} or inside it: label maps written there would overwrite input "
            f"scans or be read as scans by the next run; choose another --out, e.g. {short_path(input.parent / (input.name + '_pred'))}"
        )
    originals = {p.resolve() for p in inputs}
    clash = [t for t in targets if t.resolve() in originals]
    if clash:
        raise ConfigError(f"--out {out}: the label map {clash[0]} would overwrite the input of the same name; "
                          "choose another --out")


def predict(run: str | Path, input: str | Path, out: str | Path,
            inference: InferenceConfig | None = None, nan_policy: str | None = None) -> Predictions:
    """Segment image file(s) and write label maps in each input's ORIGINAL geometry (shape and affine).

    An input that cannot be segmented (unreadable, NaN voxels, wrong channel count...) is skipped with a warning
    and the others are segmented; only when none can be is it an error.

    Args:
        run: a finished fine-tuning run.
        input: an image file, a DICOM series folder, or a folder of images (nnU-Net channel files
            ``CASE_0000`` are grouped per case).
        out: folder for ``CASE.nii.gz`` label maps; never the input folder, never over an input file.
        inference: overrides of the run's sliding-window settings.
        nan_policy: ``zero`` replaces NaN/Inf voxels with 0 (and says how many); None: the run's setting
            (``error``: such an input is skipped).

    Returns:
        The label maps written, in input order (``.skipped``: the inputs that were not).
    """
    model = load_trained_model(run)
    if "preprocess" not in model.meta:
        raise DataError(
            f"{run} holds a pretrained network ({model.meta.get('kind', 'pretraining')}), not a segmentation model "
            "of real classes; fine-tune it first (`medpretrain finetune --init RUN/model.pt`) and predict with that run"
        )
    inference = _inference_settings(model, inference, run)
    # The manifest's preprocess block holds the resolved spacing and modality the model was trained at.
    cfg = PreprocessConfig(**model.meta["preprocess"])
    if nan_policy is not None:
        if nan_policy not in ("error", "zero"):
            raise ConfigError(f"--nan-policy {nan_policy!r} must be error (skip such an input) or zero (replace by 0)")
        cfg = cfg.model_copy(update={"nan_policy": nan_policy})
    spacing, modality = tuple(cfg.spacing), cfg.modality
    sources = discover_pool(input)
    if not sources:
        raise DataError(f"no images found in {input} (looked for {', '.join(IMAGE_SUFFIXES)} and DICOM folders)")
    groups = _group_channels(sources, model.meta["in_channels"])
    out_dir = Path(out)
    targets = {case_id: out_dir / f"{case_id}.nii.gz" for case_id in groups}
    _check_predict_out(Path(input), out_dir, list(targets.values()), [p for paths in groups.values() for p in paths])
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for case_id, paths in groups.items():
        try:
            label, affine, stats = _segment_case(model, paths, cfg, spacing, modality, inference)
        except DataError as exc:
            log.warning("SKIP %s: %s", case_id, exc)
            skipped.append({"case_id": case_id, "file": str(paths[0]), "reason": str(exc)})
            continue
        if stats.get("nan_replaced"):
            log.warning("%s: %d NaN/Inf voxels were replaced by 0 (--nan-policy zero)", paths[0], stats["nan_replaced"])
        target = targets[case_id]
        write_nifti(label, affine, target)
        written.append(target)
        log.info("wrote %s", target)
    if skipped and not written:
        raise DataError(f"none of the {len(skipped)} input(s) in {input} could be segmented (reasons above; the first, "
                        f"{skipped[0]['file']}: {skipped[0]['reason']})")
    if skipped:
        log.warning("%d input(s) skipped: %s", len(skipped), ", ".join(s["case_id"] for s in skipped))
    return Predictions(written, skipped)


def _segment_case(model, paths: list[Path], cfg: PreprocessConfig, spacing, modality: str,
                  inference: InferenceConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """One input case: its label map in the original geometry (the dataset's label ids), affine and stats."""
    images = [read_image(p) for p in paths]
    image = images[0]
    if len(images) > 1:
        for other, path in zip(images[1:], paths[1:]):
            if other.array.shape[1:] != image.array.shape[1:] or not np.allclose(
                    other.affine, image.affine, atol=1e-3):
                raise DataError(f"{path}: channel file does not lie on the grid of {paths[0]} "
                                f"(shape {other.array.shape[1:]} vs {image.array.shape[1:]}); resample it first")
        image.array = np.concatenate([im.array for im in images], axis=0)
    if image.array.shape[0] != model.meta["in_channels"]:
        raise DataError(
            f"{paths[0]}: {image.array.shape[0]} channel(s) but the model expects {model.meta['in_channels']}; "
            "give one file per channel named CASE_0000, CASE_0001, ... or a 4D file"
        )
    prepared = preprocess_image(image, cfg, spacing, modality)
    probs = predict_probabilities(model, prepared.image, inference,
                                  background_fill({"stats": prepared.stats}, prepared.image.shape[0]))
    label = restore_to_original(probs, prepared.geometry, is_probability=True)
    # Classes 0..K-1 back to the dataset's label ids when they had gaps (0, 1, 5).
    label = restore_label_values(label, model.meta.get("label_values"))
    return label, np.asarray(prepared.geometry.original_affine), prepared.stats
