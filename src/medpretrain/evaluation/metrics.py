"""Per-case segmentation metrics (via MONAI) and their summary over a test set.

All distances are in millimetres, using the voxel spacing of the case. Surfaces follow MONAI's
definition: the surface of a mask is the set of its voxels that have at least one 6-connected
neighbour outside the mask (the mask XOR its binary erosion), and distances are Euclidean between
the centres of those voxels.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_surface_dice,
)

from medpretrain.errors import DataError

#: Metrics reported for every class, in report order.
METRIC_NAMES: tuple[str, ...] = ("dice", "nsd", "assd", "hd95")
#: Metrics where higher is better (the others are distances, lower is better).
HIGHER_IS_BETTER: frozenset[str] = frozenset({"dice", "nsd"})


def volume_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of a volume of ``shape`` voxels with voxel size ``spacing``.

    Args:
        shape: number of voxels along each axis.
        spacing: voxel size in mm along each axis.
    """
    return float(math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing, strict=True))))


def _crop_to_union(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop two binary masks to the bounding box of their union plus a 1-voxel margin.

    MONAI converts the whole volume to float before it crops, so on a 512x512x300 CT that is
    gigabytes per class; cropping here first gives identical surfaces (the erosion only looks at
    6-neighbours, and outside the union everything is background) at a fraction of the cost.
    """
    union = pred | gt
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        slices.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, union.shape[axis])))
    window = tuple(slices)
    return pred[window], gt[window]


def case_metrics(
    prediction: np.ndarray,
    label: np.ndarray,
    class_ids: Sequence[int],
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 2.0,
) -> dict[int, dict[str, float]]:
    """Dice, NSD, ASSD and HD95 of one case, per foreground class, computed with MONAI.

    Empty cases are scored explicitly rather than left to MONAI (which gives NaN or inf, and
    would make means over a test set undefined):

    - class absent from both prediction and label: dice 1, nsd 1, assd 0, hd95 0 (a correct
      "nothing here");
    - class absent from exactly one of them: dice 0, nsd 0, and assd = hd95 = the diagonal of
      the volume in mm (``sqrt(sum((shape * spacing) ** 2))``), the worst distance possible in
      this volume, so the case is penalised but the mean stays finite.

    Args:
        prediction: integer label map (X, Y, Z) predicted by the model.
        label: integer ground-truth label map (X, Y, Z), same shape as ``prediction``.
        class_ids: foreground class ids to score, e.g. ``[1, 2]``.
        spacing: voxel size in mm along (X, Y, Z); all distances are reported in mm.
        nsd_tolerance_mm: tolerance in mm of the normalised surface Dice: the fraction of both
            surfaces that lies within this distance of the other surface.

    Returns:
        ``{class_id: {"dice", "nsd", "assd", "hd95", "pred_voxels", "label_voxels"}}`` with
        plain Python floats (voxel counts are integral floats). MONAI computes in float32, so
        values carry float32 rounding (a Dice of 0.9 reads 0.8999999761).

    Raises:
        DataError: if the shapes differ, are not 3D, or ``spacing`` does not have 3 positive values.
    """
    prediction = np.asarray(prediction)
    label = np.asarray(label)
    if prediction.shape != label.shape:
        raise DataError(
            f"prediction shape {prediction.shape} differs from label shape {label.shape}; "
            "resample the prediction to the label grid before scoring."
        )
    if prediction.ndim != 3:
        raise DataError(f"expected 3D label maps (X, Y, Z), got shape {prediction.shape}.")
    spacing_t = tuple(float(s) for s in spacing)
    if len(spacing_t) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing_t):
        raise DataError(f"spacing must be 3 positive numbers in mm, got {tuple(spacing)}.")
    if not (nsd_tolerance_mm >= 0 and math.isfinite(nsd_tolerance_mm)):
        raise DataError(f"nsd_tolerance_mm must be a finite number >= 0, got {nsd_tolerance_mm}.")

    diagonal = volume_diagonal_mm(label.shape, spacing_t)
    results: dict[int, dict[str, float]] = {}
    for class_id in class_ids:
        c = int(class_id)
        pred_mask = prediction == c
        gt_mask = label == c
        n_pred = int(pred_mask.sum())
        n_gt = int(gt_mask.sum())
        counts = {"pred_voxels": float(n_pred), "label_voxels": float(n_gt)}
        if n_pred == 0 and n_gt == 0:
            results[c] = {"dice": 1.0, "nsd": 1.0, "assd": 0.0, "hd95": 0.0, **counts}
            continue
        if n_pred == 0 or n_gt == 0:
            results[c] = {"dice": 0.0, "nsd": 0.0, "assd": diagonal, "hd95": diagonal, **counts}
            continue

        pred_c, gt_c = _crop_to_union(pred_mask, gt_mask)
        # MONAI wants one-hot [B, C, X, Y, Z]; one channel per call keeps memory at one class.
        y_pred = torch.from_numpy(np.ascontiguousarray(pred_c))[None, None].float()
        y = torch.from_numpy(np.ascontiguousarray(gt_c))[None, None].float()
        with warnings.catch_warnings():
            # Both masks are non-empty here, so MONAI's empty-mask warnings cannot apply, and
            # its deprecation notices come from MONAI calling itself: neither helps a user.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            dice = compute_dice(y_pred, y, include_background=True, ignore_empty=False)
            nsd = compute_surface_dice(
                y_pred, y, class_thresholds=[float(nsd_tolerance_mm)], include_background=True, spacing=spacing_t
            )
            assd = compute_average_surface_distance(
                y_pred, y, include_background=True, symmetric=True, spacing=spacing_t
            )
            hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing_t)
        results[c] = {
            "dice": float(dice.reshape(-1)[0]),
            "nsd": float(nsd.reshape(-1)[0]),
            "assd": float(assd.reshape(-1)[0]),
            "hd95": float(hd95.reshape(-1)[0]),
            **counts,
        }
    return results


def _stats(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(np.std(arr, ddof=1)) if arr.size > 1 else 0.0
    return {
        "mean": float(np.mean(arr)),
        "std": std,
        "median": float(np.median(arr)),
        "min": float(np.min(arr)),
        "max": float(np.max(arr)),
    }


def summarize(
    per_case: Mapping[str, Mapping[int, Mapping[str, float]]],
    class_names: Mapping[int, str],
) -> dict:
    """Summarise per-case metrics over a test set.

    ``std`` is the sample standard deviation (``ddof=1``) when there are at least two values,
    and 0 for a single value. The ``overall`` block first averages each case over its
    foreground classes (class id != 0), then takes mean and std of those per-case means.

    Args:
        per_case: ``{case_id: {class_id: {metric: value}}}`` as returned by :func:`case_metrics`
            for each case.
        class_names: ``{class_id: name}``; a class id without a name is called ``class_<id>``.

    Returns:
        ``{"n_cases": N, "classes": {name: {metric: {"mean", "std", "median", "min", "max"}}},
        "overall": {metric: {"mean", "std"}}}`` for the metrics dice, nsd, assd, hd95. Classes
        appear in class-id order; a class missing from some cases is summarised over the cases
        that have it.
    """
    class_ids = sorted({int(c) for case in per_case.values() for c in case})
    classes: dict[str, dict[str, dict[str, float]]] = {}
    for c in class_ids:
        name = str(class_names.get(c, f"class_{c}"))
        block: dict[str, dict[str, float]] = {}
        for metric in METRIC_NAMES:
            values = [case[c][metric] for case in per_case.values() if c in case and metric in case[c]]
            if values:
                block[metric] = _stats(values)
        classes[name] = block

    overall: dict[str, dict[str, float]] = {}
    for metric in METRIC_NAMES:
        case_means = []
        for case in per_case.values():
            vals = [m[metric] for c, m in case.items() if int(c) != 0 and metric in m]
            if vals:
                case_means.append(float(np.mean(vals)))
        if case_means:
            s = _stats(case_means)
            overall[metric] = {"mean": s["mean"], "std": s["std"]}
    return {"n_cases": len(per_case), "classes": classes, "overall": overall}
