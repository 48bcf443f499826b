"""Turning one source image (and label) into network-ready arrays, and mapping results back.

The pipeline of :func:`preprocess_case`:

1. validate (shapes, grids, label values, NaN/Inf, constant images, memory budget);
2. reorient to RAS by permuting/flipping axes (exact, no interpolation);
3. resample to the target spacing in world coordinates (image trilinear, label nearest or
   per-class linear + argmax);
4. find the body box (CT: HU > -500; MR: above min + 1e-3 * range), union the label box, add
   a margin and crop;
5. normalise intensities (CT: window and scale to [0, 1]; MR: clip to percentiles, z-score).

Everything needed to undo steps 2-4 is kept in a :class:`Geometry`, and
:func:`restore_to_original` maps a prediction on the prepared grid back onto the exact voxel
grid of the original file through world coordinates.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pydantic
from scipy import ndimage

from medpretrain.data.io import Image3D, affine_spacing
from medpretrain.errors import DataError

# Grid agreement tolerances between an image and its label.
_AFFINE_REL_TOL = 1e-3
_AFFINE_MM_TOL = 1e-2


class PreprocessConfig(pydantic.BaseModel, extra="forbid"):
    """How source images are turned into prepared arrays.

    Attributes:
        spacing: target voxel size (mm) along R, A, S; None = the dataset's median spacing.
        modality: "CT" or "MR"; None = from dataset.json, else "MR".
        ct_window: CT intensities are clipped to this HU window and scaled to [0, 1].
        mr_percentiles: MR intensities are clipped to these percentiles, then z-scored.
        label_interpolation: "nearest", or "linear" (per-class linear resampling of the
            one-hot map, then argmax: smoother boundaries when downsampling).
        crop_foreground: crop to the body box (plus the label box) with ``crop_margin`` voxels.
        crop_margin: margin around the box, in voxels of the prepared grid.
        nan_policy: "error" refuses images with NaN/Inf voxels, "zero" replaces them with 0.
        max_voxels: refuse images with more voxels than this after resampling (memory budget); None = what
            fits in this machine's memory (``default_max_voxels``).
    """

    spacing: tuple[float, float, float] | None = None
    modality: Literal["CT", "MR"] | None = None
    ct_window: tuple[float, float] = (-175.0, 250.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    label_interpolation: Literal["nearest", "linear"] = "linear"
    crop_foreground: bool = True
    crop_margin: int = 2
    nan_policy: Literal["error", "zero"] = "error"
    max_voxels: int | None = None

    @pydantic.field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, v):
        if v is not None and not all(np.isfinite(s) and s > 0 for s in v):
            raise ValueError(f"spacing {v} must be three positive numbers (mm)")
        return v

    @pydantic.field_validator("ct_window")
    @classmethod
    def _ordered_window(cls, v):
        if not v[0] < v[1]:
            raise ValueError(f"ct_window {v} must be (low, high) with low < high")
        return v

    @pydantic.field_validator("mr_percentiles")
    @classmethod
    def _ordered_percentiles(cls, v):
        if not 0.0 <= v[0] < v[1] <= 100.0:
            raise ValueError(f"mr_percentiles {v} must satisfy 0 <= low < high <= 100")
        return v

    @pydantic.field_validator("crop_margin")
    @classmethod
    def _non_negative_margin(cls, v):
        if v < 0:
            raise ValueError(f"crop_margin {v} must be >= 0")
        return v

    @pydantic.field_validator("max_voxels")
    @classmethod
    def _positive_budget(cls, v):
        if v is not None and v <= 0:
            raise ValueError(f"max_voxels {v} must be positive")
        return v


@dataclass
class Geometry:
    """Where the prepared grid lies relative to the original file (JSON-serialisable).

    Attributes:
        original_affine: 4x4 affine of the source file as read (RAS world).
        original_shape: spatial shape of the source file.
        prepared_affine: 4x4 affine of the cropped prepared grid (RAS-oriented axes).
        prepared_shape: spatial shape of the prepared arrays.
        spacing: voxel size of the prepared grid (mm).
        crop_start: first kept voxel of the resampled grid (inclusive).
        crop_end: last kept voxel of the resampled grid (exclusive).
        resampled_shape: spatial shape of the resampled grid before cropping.
    """

    original_affine: list[list[float]]
    original_shape: list[int]
    prepared_affine: list[list[float]]
    prepared_shape: list[int]
    spacing: list[float]
    crop_start: list[int]
    crop_end: list[int]
    resampled_shape: list[int]

    def to_dict(self) -> dict:
        """A plain dict of lists (JSON-ready)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        """Rebuild from :meth:`to_dict` output (extra keys are ignored).

        Args:
            d: the dict.
        """
        return cls(
            original_affine=[[float(v) for v in row] for row in d["original_affine"]],
            original_shape=[int(v) for v in d["original_shape"]],
            prepared_affine=[[float(v) for v in row] for row in d["prepared_affine"]],
            prepared_shape=[int(v) for v in d["prepared_shape"]],
            spacing=[float(v) for v in d["spacing"]],
            crop_start=[int(v) for v in d["crop_start"]],
            crop_end=[int(v) for v in d["crop_end"]],
            resampled_shape=[int(v) for v in d["resampled_shape"]],
        )

    @property
    def resampled_affine(self) -> np.ndarray:
        """Affine of the uncropped resampled grid."""
        shift = np.eye(4)
        shift[:3, 3] = -np.asarray(self.crop_start, dtype=np.float64)
        return np.asarray(self.prepared_affine, dtype=np.float64) @ shift


@dataclass
class PreparedCase:
    """The output of :func:`preprocess_case`.

    Attributes:
        image: ``(C, X, Y, Z)`` float32, RAS, target spacing, cropped, normalised.
        label: ``(X, Y, Z)`` uint8 (uint16 above 255 classes), or None.
        geometry: how to map the prepared grid back to the source file.
        stats: per-channel intensity statistics before normalisation and what was applied.
    """

    image: np.ndarray
    label: np.ndarray | None
    geometry: Geometry
    stats: dict


# --------------------------------------------------------------------------- grid helpers


def reorient_to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip the spatial axes so that they point (closest to) R, A, S.

    Exact (no interpolation); an oblique or sheared affine keeps its obliquity.

    Args:
        array: ``(C, X, Y, Z)`` or ``(X, Y, Z)`` array.
        affine: its 4x4 RAS affine.

    Returns:
        ``(array, affine)`` after reorientation (the array may be a view).
    """
    import nibabel.orientations as nio

    ornt = nio.io_orientation(affine)
    spatial = array.shape[-3:]
    if np.array_equal(ornt, nio.axcodes2ornt(("R", "A", "S"))):
        return array, np.asarray(affine, dtype=np.float64)
    channel_first = array.ndim == 4
    arr = np.moveaxis(array, 0, -1) if channel_first else array
    arr = nio.apply_orientation(arr, ornt)
    if channel_first:
        arr = np.moveaxis(arr, -1, 0)
    new_affine = np.asarray(affine, dtype=np.float64) @ nio.inv_ornt_aff(ornt, spatial)
    return arr, new_affine


def _resample_plan(shape, affine: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int], np.ndarray]:
    """Grid of the same field of view (same centre) at ``spacing``.

    Returns ``(zoom, offset, new_shape, new_affine)`` with old_index = zoom * new_index + offset.
    """
    n = np.asarray(shape, dtype=np.float64)
    cur = np.asarray(affine_spacing(affine))
    target = np.asarray(spacing, dtype=np.float64)
    new_shape = np.maximum(1, np.round(n * cur / target - 1e-6)).astype(int)
    zoom = target / cur
    if np.allclose(zoom, 1.0, rtol=0, atol=1e-6) and np.array_equal(new_shape, n.astype(int)):
        zoom = np.ones(3)
        offset = np.zeros(3)
    else:
        offset = (n - 1) / 2 - zoom * (new_shape - 1) / 2
    t = np.eye(4)
    t[:3, :3] = np.diag(zoom)
    t[:3, 3] = offset
    return zoom, offset, tuple(int(s) for s in new_shape), np.asarray(affine, dtype=np.float64) @ t  # type: ignore[return-value]


def _is_identity(zoom, offset) -> bool:
    return bool(np.all(zoom == 1.0) and np.all(offset == 0.0))


def _resample_volume(vol: np.ndarray, zoom, offset, shape, order: int) -> np.ndarray:
    if _is_identity(zoom, offset):
        return np.array(vol, copy=True)
    # A 1D matrix takes scipy's separable zoom/shift path: much faster than a full affine.
    return ndimage.affine_transform(
        vol, np.asarray(zoom), offset=np.asarray(offset), output_shape=shape, order=order,
        mode="nearest", prefilter=False,
    )


def _resample_label(label: np.ndarray, zoom, offset, shape, mode: str) -> np.ndarray:
    if _is_identity(zoom, offset):
        return np.array(label, copy=True)
    if mode == "nearest":
        return _resample_volume(label, zoom, offset, shape, order=0)
    # Per-class linear interpolation of the one-hot map, then argmax. Each class is resampled
    # only inside its own bounding box (organ maps have 100+ small classes), and background is
    # 1 - sum(foreground) because linear weights sum to one.
    zoom, offset = np.asarray(zoom, float), np.asarray(offset, float)
    n = np.asarray(label.shape)
    m = np.asarray(shape)
    best = np.zeros(shape, dtype=np.float32)
    total = np.zeros(shape, dtype=np.float32)
    out = np.zeros(shape, dtype=label.dtype)
    for c in np.unique(label):
        if c == 0:
            continue
        mask = label == c
        box = _bbox(mask)
        a, b = box  # type: ignore[misc]
        lo, hi = np.maximum(a - 2, 0), np.minimum(b + 2, n)
        # Target voxels whose interpolation stencil can touch the class: old index in (a-1, b).
        j_lo = np.clip(np.floor((a - 1 - offset) / zoom).astype(int), 0, m)
        j_hi = np.clip(np.ceil((b - offset) / zoom).astype(int) + 1, 0, m)
        if np.any(j_hi <= j_lo):
            continue
        sub = tuple(slice(int(p), int(q)) for p, q in zip(j_lo, j_hi))
        prob = ndimage.affine_transform(
            mask[tuple(slice(int(p), int(q)) for p, q in zip(lo, hi))].astype(np.float32), zoom,
            offset=offset + zoom * j_lo - lo, output_shape=tuple(int(v) for v in j_hi - j_lo),
            order=1, mode="nearest", prefilter=False,
        )
        total[sub] += prob
        region_best = best[sub]
        better = prob > region_best
        out[sub][better] = c
        region_best[better] = prob[better]
    out[(1.0 - total) >= best] = 0
    return out


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    if not mask.any():
        return None
    start, end = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        start.append(idx[0])
        end.append(idx[-1] + 1)
    return np.asarray(start), np.asarray(end)


def _body_mask(image: np.ndarray, modality: str) -> np.ndarray:
    if modality == "CT":
        return (image > -500).any(axis=0)
    mask = np.zeros(image.shape[1:], dtype=bool)
    for ch in image:
        lo, hi = float(ch.min()), float(ch.max())
        mask |= ch > lo + 1e-3 * (hi - lo)
    return mask


def _label_dtype(max_value: int):
    return np.uint8 if max_value <= 255 else np.uint16


def _check_label(image: Image3D, label: Image3D, declared_labels, src: str, lab_src: str) -> np.ndarray:
    if label.num_channels != 1:
        raise DataError(
            f"{lab_src}: label has {label.num_channels} channels (4D); a label map must be a single 3D volume "
            "of integer class ids"
        )
    if label.spatial_shape != image.spatial_shape:
        raise DataError(
            f"{lab_src}: label shape {label.spatial_shape} does not match image {src} shape {image.spatial_shape}; "
            "the label must be on the image's voxel grid (resample it with nearest neighbour)"
        )
    a, b = np.asarray(image.affine, dtype=np.float64), np.asarray(label.affine, dtype=np.float64)
    lin_diff = float(np.abs(a[:3, :3] - b[:3, :3]).max())
    trans_diff = float(np.abs(a[:3, 3] - b[:3, 3]).max())
    scale = float(np.abs(a[:3, :3]).max())
    if lin_diff > _AFFINE_REL_TOL * scale or trans_diff > _AFFINE_MM_TOL:
        raise DataError(
            f"label {lab_src} does not lie on the image grid: max affine difference {max(lin_diff, trans_diff):.4g} "
            f"(image {src}); resample the label onto the image or fix its header"
        )
    arr = label.array[0]
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{lab_src}: label contains NaN/Inf values; a label map holds integer class ids")
        rounded = np.round(arr)
        if np.abs(arr - rounded).max(initial=0.0) > 1e-3:
            raise DataError(
                f"{lab_src}: label has non-integer values (e.g. {float(arr[np.abs(arr - rounded) > 1e-3].flat[0]):g}); "
                "a label map holds integer class ids (was it resampled with linear interpolation?)"
            )
        arr = rounded
    values = np.unique(arr)
    if values.size and values.min() < 0:
        raise DataError(f"{lab_src}: label has negative values {sorted(int(v) for v in values if v < 0)}; class ids must be >= 0")
    if declared_labels is not None:
        unknown = sorted(int(v) for v in values if int(v) not in declared_labels)
        if unknown:
            raise DataError(
                f"{lab_src}: label values {unknown} are not among the dataset's declared labels "
                f"{sorted(int(v) for v in declared_labels)}; add them to dataset.json 'labels' or fix the label map"
            )
    if values.size == 0 or values.max() == 0:
        raise DataError(f"{lab_src}: label is empty (all background); fix the label or remove the case")
    return arr.astype(_label_dtype(int(values.max())), copy=False)


BYTES_PER_VOXEL = 48  # peak memory of preparing one voxel: resampled, cropped and normalised copies, label work


def memory_bytes() -> int:
    """Memory this process may use: the machine's physical memory, or a smaller cgroup (container) limit."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        total = 16 * 2**30
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(limit_file, encoding="ascii").read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return int(total)


def default_max_voxels() -> int:
    """The voxel budget of one prepared image when ``max_voxels`` is not set: what fits in memory while it is
    prepared (``BYTES_PER_VOXEL`` each), so that a tiny spacing is refused instead of allocating hundreds of GB."""
    return max(memory_bytes() // BYTES_PER_VOXEL, 128**3)


def renumber_labels(label: np.ndarray, label_values: list[int]) -> np.ndarray:
    """Label ids ``label_values[i]`` -> class ``i`` (ids with gaps to consecutive classes; ids not listed -> 0)."""
    lut = np.zeros(max(int(label.max(initial=0)), max(label_values)) + 1, dtype=_label_dtype(len(label_values) - 1))
    lut[np.asarray(label_values, dtype=np.int64)] = np.arange(len(label_values))
    return lut[label]


def restore_label_values(label: np.ndarray, label_values: list[int] | None) -> np.ndarray:
    """Classes ``0..K-1`` -> the dataset's label ids (inverse of ``renumber_labels``); None: unchanged."""
    if label_values is None:
        return label
    values = np.asarray(label_values, dtype=np.int64)
    return values[label].astype(_label_dtype(int(values.max())), copy=False)


# --------------------------------------------------------------------------- main entry points


def preprocess_case(
    image: Image3D,
    label: Image3D | None,
    cfg: PreprocessConfig,
    spacing: tuple[float, float, float],
    modality: str,
    declared_labels: set[int] | None = None,
    source: str = "",
    label_values: list[int] | None = None,
) -> PreparedCase:
    """Validate, reorient, resample, crop and normalise one case.

    Args:
        image: the source image (``(C, X, Y, Z)``, RAS affine).
        label: its label map on the same grid, or None.
        cfg: preprocessing options (``cfg.spacing``/``cfg.modality`` are ignored here: the
            resolved ``spacing`` and ``modality`` arguments are used).
        spacing: target voxel size (mm) along R, A, S.
        modality: "CT" or "MR".
        declared_labels: allowed label values (dataset.json), or None to accept any.
        source: name used in error messages (default: the image path).
        label_values: the dataset's label ids in order when they have gaps (``[0, 1, 5]``): label id
            ``label_values[i]`` becomes class ``i``; None keeps the ids.

    Returns:
        The prepared case.

    Raises:
        DataError: shape/grid mismatch, undeclared or non-integer label values, empty label,
            NaN/Inf voxels with ``nan_policy="error"``, a constant image, or more voxels than
            ``cfg.max_voxels``.
    """
    src = source or (str(image.path) if image.path is not None else "image")
    lab_src = str(label.path) if label is not None and label.path is not None else f"{src} (label)"
    if modality not in ("CT", "MR"):
        raise DataError(f"{src}: modality {modality!r} is not supported; use 'CT' or 'MR'")
    spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DataError(f"{src}: target spacing {spacing} must be three positive numbers (mm)")
    if image.array.ndim != 4:
        raise DataError(f"{src}: expected a (C, X, Y, Z) image array, got shape {image.array.shape}")

    lab = _check_label(image, label, declared_labels, src, lab_src) if label is not None else None
    if lab is not None and label_values is not None:
        lab = renumber_labels(lab, label_values)

    img = image.array
    stats: dict = {"nan_replaced": 0}
    if np.issubdtype(img.dtype, np.floating):
        bad = ~np.isfinite(img)
        n_bad = int(bad.sum())
        if n_bad:
            if cfg.nan_policy == "error":
                raise DataError(
                    f"{src}: contains {n_bad} NaN/Inf voxels; pass --nan-policy zero to replace them with 0"
                )
            img = np.where(bad, 0, img)
            stats["nan_replaced"] = n_bad
    for c in range(img.shape[0]):
        lo, hi = img[c].min(), img[c].max()
        if lo == hi:
            which = f"channel {c}" if img.shape[0] > 1 else "image"
            raise DataError(f"{src}: {which} is constant (all voxels = {float(lo):g}); is it empty or corrupted? "
                            "(re-export it or remove the case)")

    original_affine = np.asarray(image.affine, dtype=np.float64)
    original_shape = list(image.spatial_shape)
    img, ras_affine = reorient_to_ras(img, original_affine)
    if lab is not None:
        lab, _ = reorient_to_ras(lab, original_affine)

    zoom, offset, res_shape, res_affine = _resample_plan(img.shape[1:], ras_affine, spacing)
    n_vox = int(np.prod(res_shape))
    if cfg.max_voxels is not None and n_vox > cfg.max_voxels:
        raise DataError(
            f"{src}: would have {n_vox} voxels ({'x'.join(map(str, res_shape))}) at spacing {spacing} mm, more than "
            f"max_voxels={cfg.max_voxels}; raise max_voxels or choose a coarser spacing"
        )
    if cfg.max_voxels is None and n_vox > default_max_voxels():
        raise DataError(
            f"{src}: would have {n_vox} voxels ({'x'.join(map(str, res_shape))}) at spacing {spacing} mm, more than "
            f"fit in this machine's memory ({memory_bytes() / 2**30:.0f} GiB: at most {default_max_voxels()} voxels); "
            "choose a coarser spacing or pass --max-voxels"
        )

    res = np.empty((img.shape[0], *res_shape), dtype=np.float32)
    for c in range(img.shape[0]):
        res[c] = _resample_volume(np.asarray(img[c], dtype=np.float32), zoom, offset, res_shape, order=1)
    res_lab = None
    if lab is not None:
        res_lab = _resample_label(np.ascontiguousarray(lab), zoom, offset, res_shape, cfg.label_interpolation)
        if not res_lab.any():
            raise DataError(
                f"{lab_src}: label becomes empty after resampling to {spacing} mm (the structure is too small); "
                "use a finer spacing or label_interpolation='nearest'"
            )

    if cfg.crop_foreground:
        box = _bbox(_body_mask(res, modality))
        if res_lab is not None:
            lbox = _bbox(res_lab > 0)
            if lbox is not None:
                box = lbox if box is None else (np.minimum(box[0], lbox[0]), np.maximum(box[1], lbox[1]))
        if box is None:
            start, end = np.zeros(3, int), np.asarray(res_shape)
        else:
            start = np.maximum(box[0] - cfg.crop_margin, 0)
            end = np.minimum(box[1] + cfg.crop_margin, np.asarray(res_shape))
    else:
        start, end = np.zeros(3, int), np.asarray(res_shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(start, end))
    cropped = np.ascontiguousarray(res[(slice(None), *sl)])
    del res
    out_lab = None
    if res_lab is not None:
        out_lab = np.ascontiguousarray(res_lab[sl]).astype(_label_dtype(int(res_lab.max())), copy=False)

    shift = np.eye(4)
    shift[:3, 3] = start
    prepared_affine = res_affine @ shift

    out = np.empty_like(cropped, dtype=np.float32)
    channel_stats = []
    norm: dict = {"modality": modality}
    if modality == "CT":
        lo, hi = cfg.ct_window
        norm["window"] = [float(lo), float(hi)]
    else:
        norm["percentiles"] = [float(p) for p in cfg.mr_percentiles]
        norm["clip"], norm["mean"], norm["std"] = [], [], []
    for c in range(cropped.shape[0]):
        ch = cropped[c]
        p_lo, p_hi = np.percentile(ch, [0.5, 99.5])
        channel_stats.append({
            "mean": float(ch.mean(dtype=np.float64)), "std": float(ch.std(dtype=np.float64)),
            "p0.5": float(p_lo), "p99.5": float(p_hi), "min": float(ch.min()), "max": float(ch.max()),
        })
        if modality == "CT":
            out[c] = (np.clip(ch, lo, hi) - lo) / (hi - lo)
        else:
            c_lo, c_hi = np.percentile(ch, list(cfg.mr_percentiles))
            clipped = np.clip(ch, c_lo, c_hi)
            mean = float(clipped.mean(dtype=np.float64))
            # A near-constant crop must not blow up into huge values.
            std = max(float(clipped.std(dtype=np.float64)), 1e-6)
            out[c] = (clipped - mean) / std
            norm["clip"].append([float(c_lo), float(c_hi)])
            norm["mean"].append(mean)
            norm["std"].append(std)
    stats["channels"] = channel_stats
    stats["normalisation"] = norm

    geometry = Geometry(
        original_affine=original_affine.tolist(),
        original_shape=[int(s) for s in original_shape],
        prepared_affine=prepared_affine.tolist(),
        prepared_shape=[int(s) for s in out.shape[1:]],
        spacing=[float(s) for s in spacing],
        crop_start=[int(s) for s in start],
        crop_end=[int(s) for s in end],
        resampled_shape=[int(s) for s in res_shape],
    )
    return PreparedCase(image=out, label=out_lab, geometry=geometry, stats=stats)


def preprocess_image(image: Image3D, cfg: PreprocessConfig, spacing, modality: str) -> PreparedCase:
    """:func:`preprocess_case` without a label (prediction): the crop box is the body box only.

    Args:
        image: the source image.
        cfg: preprocessing options (use the ones the training cache was prepared with).
        spacing: target voxel size (mm) along R, A, S.
        modality: "CT" or "MR".
    """
    return preprocess_case(image, None, cfg, spacing, modality)


def label_to_prepared(label: np.ndarray, geometry: Geometry | dict, interpolation: str = "linear") -> np.ndarray:
    """Map a label map on the original file's voxel grid onto the prepared grid of that case, with exactly the steps
    :func:`preprocess_case` applied to the case's ground truth: reorientation to RAS, resampling to the prepared
    spacing (``interpolation``: ``nearest``, or ``linear`` = per-class linear then argmax, as the cache's
    ``label_interpolation``), and the case's crop. A label map equal to the source label therefore lands exactly on
    the prepared label (the inverse direction of :func:`restore_to_original`).

    Args:
        label: ``(X, Y, Z)`` integer label map in the source file's voxel order (as ``read_image`` reads it), with
            the training classes ``0..K-1``.
        geometry: the case's :class:`Geometry` (or its dict form).
        interpolation: ``linear`` or ``nearest``: use the cache's ``label_interpolation``.

    Returns:
        The label map on the prepared grid (``prepared_shape``).

    Raises:
        DataError: ``label`` does not have the source file's shape.
    """
    if isinstance(geometry, dict):
        geometry = Geometry.from_dict(geometry)
    arr = np.asarray(label)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or list(arr.shape) != list(geometry.original_shape):
        raise DataError(f"label map of shape {arr.shape} does not lie on the source grid {tuple(geometry.original_shape)} "
                        "of the case")
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.round(arr)
    arr = arr.astype(_label_dtype(int(arr.max(initial=0))), copy=False)
    lab, ras_affine = reorient_to_ras(arr, np.asarray(geometry.original_affine, dtype=np.float64))
    zoom, offset, res_shape, _ = _resample_plan(lab.shape, ras_affine, geometry.spacing)
    if list(res_shape) != list(geometry.resampled_shape):
        raise DataError(f"resampling the label map gives a {res_shape} grid, not the case's {tuple(geometry.resampled_shape)}")
    res = _resample_label(np.ascontiguousarray(lab), zoom, offset, res_shape, interpolation)
    sl = tuple(slice(a, b) for a, b in zip(geometry.crop_start, geometry.crop_end))
    return np.ascontiguousarray(res[sl])


def restore_to_original(array: np.ndarray, geometry: Geometry, is_probability: bool) -> np.ndarray:
    """Map a result on the prepared grid back onto the original file's voxel grid.

    Cropping, resampling and reorientation are undone together through world coordinates:
    each original voxel is looked up at ``inv(resampled_affine) @ original_affine``.

    Args:
        array: ``(C, X, Y, Z)`` class probabilities (channel 0 = background) when
            ``is_probability``, else an ``(X, Y, Z)`` integer label map; on the prepared grid.
        geometry: the case's :class:`Geometry` (or its dict form).
        is_probability: probabilities are resampled linearly per class (outside the crop:
            background probability 1), then argmax; label maps use nearest neighbour.

    Returns:
        An integer label map (uint8, uint16 above 255 classes) of exactly ``original_shape``
        lying on ``original_affine``.
    """
    if isinstance(geometry, dict):
        geometry = Geometry.from_dict(geometry)
    arr = np.asarray(array)
    prepared = tuple(geometry.prepared_shape)
    if is_probability:
        if arr.ndim != 4 or tuple(arr.shape[1:]) != prepared:
            raise DataError(f"restore_to_original: probabilities of shape {arr.shape} do not fit the prepared grid (C, {prepared})")
    else:
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 3 or tuple(arr.shape) != prepared:
            raise DataError(f"restore_to_original: label map of shape {arr.shape} does not fit the prepared grid {prepared}")
    mapping = np.linalg.inv(geometry.resampled_affine) @ np.asarray(geometry.original_affine, dtype=np.float64)
    matrix, offset = mapping[:3, :3], mapping[:3, 3]
    # Clean float noise so pure permutations/flips stay exact for nearest neighbour.
    matrix = np.where(np.abs(matrix - np.round(matrix)) < 1e-9, np.round(matrix), matrix)
    out_shape = tuple(geometry.original_shape)
    res_shape = tuple(geometry.resampled_shape)
    sl = tuple(slice(a, b) for a, b in zip(geometry.crop_start, geometry.crop_end))

    def to_original(vol: np.ndarray, fill, order: int) -> np.ndarray:
        # Padding back to the full resampled grid makes "outside the crop" explicit and lets
        # mode="nearest" extend the grid's edge for the half voxel beyond it.
        full = np.full(res_shape, fill, dtype=vol.dtype)
        full[sl] = vol
        return ndimage.affine_transform(full, matrix, offset=offset, output_shape=out_shape, order=order,
                                        mode="nearest", prefilter=False)

    if not is_probability:
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.round(arr)
        max_v = int(arr.max()) if arr.size else 0
        lab = arr.astype(_label_dtype(max_v) if arr.min(initial=0) >= 0 else np.int32, copy=False)
        return to_original(lab, 0, order=0)

    n_classes = arr.shape[0]
    best = None
    out = np.zeros(out_shape, dtype=_label_dtype(n_classes - 1))
    for c in range(n_classes):
        prob = to_original(np.asarray(arr[c], dtype=np.float32), 1.0 if c == 0 else 0.0, order=1)
        if best is None:
            best = prob
            continue
        better = prob > best
        out[better] = c
        best[better] = prob[better]
    return out
