"""Figures for evaluation reports: overlays, training curves, label-efficiency curves.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas rather than through
``pyplot``: nothing needs a display, no global figure state leaks between calls, and it works the
same on a headless cluster node. Every file is written to a temporary name and then moved into
place, so a reader never sees half a PNG.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from medpretrain.atomic import atomic_write_bytes

#: PNG resolution of every figure written here.
DPI = 110
#: Overlays above this size are re-encoded with a 256-colour palette.
MAX_PNG_BYTES = 300_000

GT_COLOR = (0.0, 0.85, 0.0)
PRED_COLOR = (1.0, 0.0, 0.0)
# One line style per class keeps "green = truth, red = prediction" while still telling classes apart.
_CLASS_STYLES = ("solid", "dashed", "dotted", "dashdot")


def _png_bytes(fig: Figure, max_bytes: int | None = None) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    data = buf.getvalue()
    if max_bytes is not None and len(data) > max_bytes:
        # Noisy full-resolution images compress badly as RGBA; a 256-colour palette keeps the
        # grey levels and the contour colours and is typically 3-5x smaller.
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB")
        out = io.BytesIO()
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
        data = out.getvalue()
    return data


def _slice_centre(label: np.ndarray | None, prediction: np.ndarray, shape: Sequence[int]) -> tuple[int, int, int]:
    for volume in (label, prediction):
        if volume is not None and np.any(volume > 0):
            coords = np.nonzero(volume > 0)
            return tuple(int(round(float(np.mean(c)))) for c in coords)  # type: ignore[return-value]
    return tuple(int(n) // 2 for n in shape)  # type: ignore[return-value]


def save_overlay(
    image: np.ndarray,
    label: np.ndarray | None,
    prediction: np.ndarray,
    path,
    title: str = "",
    spacing: Sequence[float] = (1, 1, 1),
) -> Path:
    """Save three orthogonal slices of a case with ground-truth and predicted contours.

    The slices (axial: fixed Z, coronal: fixed Y, sagittal: fixed X) pass through the centre of
    mass of the label's foreground, or of the prediction's if the label is empty or absent, or
    else through the centre of the volume. The image is drawn in grey (0.5-99.5 percentile
    window) with the physical aspect ratio from ``spacing``, X to the right and Z upwards;
    ground truth contours are green, predicted ones red, one line style per class.

    Args:
        image: intensity volume (X, Y, Z).
        label: ground-truth integer label map (X, Y, Z), or None when there is none.
        prediction: predicted integer label map (X, Y, Z).
        path: where to write the PNG; parent folders are created.
        title: figure title, e.g. the case id and its Dice.
        spacing: voxel size in mm along (X, Y, Z).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    # A case id from a file name that is not valid UTF-8 holds surrogates, which the font renderer refuses.
    title = title.encode("utf-8", "backslashreplace").decode("utf-8")
    image = np.asarray(image, dtype=np.float32)
    prediction = np.asarray(prediction)
    label_arr = None if label is None else np.asarray(label)
    if image.ndim != 3 or prediction.shape != image.shape or (label_arr is not None and label_arr.shape != image.shape):
        raise ValueError(
            f"image, label and prediction must be 3D with the same shape; got image {image.shape}, "
            f"label {None if label_arr is None else label_arr.shape}, prediction {prediction.shape}."
        )
    sx, sy, sz = (float(s) for s in spacing)
    cx, cy, cz = _slice_centre(label_arr, prediction, image.shape)

    finite = image[np.isfinite(image)]
    if finite.size:
        vmin, vmax = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    else:
        vmin, vmax = 0.0, 1.0
    if vmax <= vmin:
        vmax = vmin + 1.0

    classes = sorted(
        int(c)
        for c in set(np.unique(prediction).tolist()) | (set(np.unique(label_arr).tolist()) if label_arr is not None else set())
        if c > 0
    )

    # (name, slicer, aspect of one displayed pixel = row spacing / column spacing, axis labels)
    views = [
        (f"axial z={cz}", (slice(None), slice(None), cz), sy / sx, ("X", "Y")),
        (f"coronal y={cy}", (slice(None), cy, slice(None)), sz / sx, ("X", "Z")),
        (f"sagittal x={cx}", (cx, slice(None), slice(None)), sz / sy, ("Y", "Z")),
    ]
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (name, sl, aspect, (xlabel, ylabel)) in zip(axes, views):
        # Transpose so the first remaining axis runs horizontally, origin lower so Z points up.
        ax.imshow(image[sl].T, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", aspect=aspect, interpolation="nearest")
        for i, c in enumerate(classes):
            style = _CLASS_STYLES[i % len(_CLASS_STYLES)]
            for volume, color in ((label_arr, GT_COLOR), (prediction, PRED_COLOR)):
                if volume is None:
                    continue
                mask = (volume[sl] == c).T
                if mask.any() and not mask.all():
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.4, linestyles=style)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)

    handles = []
    if label_arr is not None:
        handles.append(Line2D([], [], color=GT_COLOR, lw=2, label="ground truth"))
    handles.append(Line2D([], [], color=PRED_COLOR, lw=2, label="prediction"))
    for i, c in enumerate(classes[: len(_CLASS_STYLES)]):
        handles.append(Line2D([], [], color="0.3", lw=1.4, linestyle=_CLASS_STYLES[i], label=f"class {c}"))
    # "outside" + constrained layout reserves room for the legend instead of covering axis labels.
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    atomic_write_bytes(path, _png_bytes(fig, MAX_PNG_BYTES))
    return path


# Column names Lightning users commonly log, best first.
_LOSS_COLUMNS = ("train/loss", "train/loss_step", "train_loss", "train_loss_step", "loss", "train/loss_epoch")
_LR_COLUMNS = ("train/lr", "lr", "lr-AdamW", "lr-Adam", "lr-SGD")


def _pick_column(fieldnames: Sequence[str], preferred: Sequence[str], predicate) -> str | None:
    for name in preferred:
        if name in fieldnames:
            return name
    for name in fieldnames:
        if predicate(name):
            return name
    return None


def _as_float(cell: str | None) -> float | None:
    if cell is None or cell.strip() == "":
        return None
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _smooth(values: np.ndarray) -> np.ndarray:
    """Trailing moving average over ~1/20 of the run, so the trend survives noisy steps."""
    window = max(1, len(values) // 20)
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


def save_training_curve(metrics_csv, path, title: str = "") -> Path | None:
    """Plot training loss (raw and smoothed) and learning rate from a Lightning ``metrics.csv``.

    The loss column is ``train/loss`` if present, else another common name (``train/loss_step``,
    ``train_loss``, ``loss``, ...) or the first column with "loss" in its name that is not a
    validation one; the learning rate is ``train/lr``, ``lr``, ``lr-<optimizer>`` or the first
    column whose name ends in "lr". Empty cells (Lightning writes one row per logging call) are
    skipped. A ``val/loss`` column, if present, is drawn as points.

    Args:
        metrics_csv: path of the CSVLogger ``metrics.csv``.
        path: where to write the PNG; parent folders are created.
        title: figure title.

    Returns:
        ``path`` as a Path, or None if the CSV does not exist or holds no loss value.
    """
    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        return None
    with metrics_csv.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fieldnames = list(reader.fieldnames or [])
        rows = list(reader)
    loss_col = _pick_column(
        fieldnames, _LOSS_COLUMNS, lambda n: "loss" in n.lower() and not n.lower().startswith("val")
    )
    if loss_col is None:
        return None
    lr_col = _pick_column(fieldnames, _LR_COLUMNS, lambda n: n.lower().endswith("lr") or n.lower().startswith("lr-"))
    val_col = "val/loss" if "val/loss" in fieldnames else ("val_loss" if "val_loss" in fieldnames else None)

    def series(column: str | None) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        if column is None:
            return np.array([]), np.array([])
        for i, row in enumerate(rows):
            y = _as_float(row.get(column))
            if y is None:
                continue
            x = _as_float(row.get("step"))
            xs.append(float(i) if x is None else x)
            ys.append(y)
        order = np.argsort(np.asarray(xs), kind="stable")
        return np.asarray(xs)[order], np.asarray(ys)[order]

    steps, loss = series(loss_col)
    if loss.size == 0:
        return None
    lr_steps, lr = series(lr_col)
    val_steps, val = series(val_col)

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label=f"{loss_col} (raw)")
    ax.plot(steps, _smooth(loss), color="tab:blue", lw=1.8, label=f"{loss_col} (smoothed)")
    if val.size:
        ax.plot(val_steps, val, "o", color="tab:orange", ms=4, label=val_col)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if np.all(loss > 0) and loss.max() / loss.min() > 30:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lr.size:
        ax2 = ax.twinx()
        ax2.plot(lr_steps, lr, color="tab:green", lw=1.2, ls="--", label=lr_col)
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    atomic_write_bytes(path, _png_bytes(fig))
    return path


def save_label_efficiency_plot(rows: list[dict], path, metric: str = "dice") -> Path:
    """Plot a metric against the number of labelled cases, one line per method.

    Each point is the mean over seeds with error bars of the sample standard deviation
    (``ddof=1``; no bar for a single seed). The x axis is log2. Rows without a finite value for
    ``metric`` are skipped; with no usable rows the figure says so instead of failing.

    Args:
        rows: dicts with keys ``"method"``, ``"n_labeled"``, ``"seed"`` and ``metric``.
        path: where to write the PNG; parent folders are created.
        metric: key of the value to plot, e.g. ``"dice"`` or ``"nsd"``.

    Returns:
        ``path`` as a Path.
    """
    grouped: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        value = row.get(metric)
        try:
            value = float(value)  # type: ignore[arg-type]
            n = float(row["n_labeled"])
        except (TypeError, ValueError, KeyError):
            continue
        if not math.isfinite(value) or n <= 0:
            continue
        grouped[str(row.get("method", "?"))][n].append(value)

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    all_x: set[float] = set()
    for method in sorted(grouped):
        xs = sorted(grouped[method])
        means = [float(np.mean(grouped[method][x])) for x in xs]
        stds = [float(np.std(grouped[method][x], ddof=1)) if len(grouped[method][x]) > 1 else 0.0 for x in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, lw=1.5, label=method)
        all_x.update(xs)
    if all_x:
        ax.set_xscale("log", base=2)
        ticks = sorted(all_x)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.legend(fontsize=9)
    else:
        ax.text(0.5, 0.5, f"no finite '{metric}' values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = Path(path)
    atomic_write_bytes(path, _png_bytes(fig))
    return path


def save_learning_curves(curves: dict[str, dict[str, list[tuple[int, float, float]]]], path,
                         metric: str = "Dice") -> Path:
    """Test metric against fine-tuning step, one panel per labelled-set size, one line per method.

    Args:
        curves: panel title -> method -> ``[(step, mean over seeds, std over seeds), ...]``.
        path: where to write the PNG.
        metric: the y-axis label.
    """
    panels = list(curves) or ["no finished run"]
    fig = Figure(figsize=(4.5 * len(panels), 4))
    FigureCanvasAgg(fig)
    for i, title in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for method, points in sorted(curves.get(title, {}).items()):
            points = sorted(points)
            x = [p[0] for p in points]
            y = np.array([p[1] for p in points])
            e = np.array([p[2] for p in points])
            ax.plot(x, y, marker="o", label=method)
            ax.fill_between(x, y - e, y + e, alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3)
        if curves.get(title):
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, _png_bytes(fig))
    return path
