"""Crops of prepared volumes for the self-supervised methods: region reads from memory-mapped arrays with padding,
a vectorised trilinear resize, and the intensity that stands for "nothing" in a prepared volume."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def read_crop(volume: np.ndarray, start: Sequence[int], size: Sequence[int], fill: Sequence[float]) -> np.ndarray:
    """``volume[:, start:start+size]`` (channel first) as a new float32 array; outside the volume ``fill``
    (one value per channel). Touches only the pages of the region on a memory-mapped array."""
    channels = volume.shape[0]
    out = np.empty((channels, *[int(s) for s in size]), np.float32)
    src, dst = [], []
    empty = False
    for s, n, dim in zip(start, size, volume.shape[1:]):
        a, b = max(int(s), 0), min(int(s) + int(n), dim)
        empty |= b <= a
        src.append(slice(a, b))
        dst.append(slice(a - int(s), b - int(s)))
    full = not empty and all(d.start == 0 and d.stop == n for d, n in zip(dst, size))
    if not full:
        out[...] = np.asarray(fill, np.float32).reshape(-1, 1, 1, 1)
    if not empty:
        out[(slice(None), *dst)] = volume[(slice(None), *src)]
    return out


def _resize_axis(a: np.ndarray, axis: int, length: int) -> np.ndarray:
    # Linear interpolation along one axis at voxel centres (PyTorch's align_corners=False convention).
    n = a.shape[axis]
    if n == length:
        return a
    pos = np.clip((np.arange(length) + 0.5) * (n / length) - 0.5, 0.0, n - 1)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1] * a.ndim
    shape[axis] = length
    w = (pos - i0).astype(np.float32).reshape(shape)
    lo = np.take(a, i0, axis)
    out = np.take(a, i1, axis)
    # lo + (hi - lo) * w, in place: two gathers and three passes, no further temporaries.
    out -= lo
    out *= w
    out += lo
    return out


def resize_linear(volume: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Trilinear resize of the last three axes of ``(C, X, Y, Z)`` to ``size`` (separable, vectorised)."""
    spatial = volume.shape[1:]
    # Shrink first: the later passes then touch fewer voxels.
    order = sorted(range(3), key=lambda a: size[a] / spatial[a])
    out = volume
    for a in order:
        out = _resize_axis(out, a + 1, int(size[a]))
    return np.ascontiguousarray(out, dtype=np.float32)


def background_fill(entry: dict, channels: int) -> list[float]:
    """The normalised intensity of 'nothing' per channel: the lower end of the CT window (0) or the MR lower
    clip percentile after z-scoring; 0 when the manifest does not tell."""
    norm = (entry.get("stats") or {}).get("normalisation") or {}
    if norm.get("modality") == "MR" and len(norm.get("clip", [])) == channels:
        return [float((c[0] - m) / s) for c, m, s in zip(norm["clip"], norm["mean"], norm["std"])]
    return [0.0] * channels


class PoolCases:
    """The scans a self-supervised dataset reads from a prepared cache, with what every crop needs.

    A labelled cache contributes its train split only (its test cases must stay unseen); a pool, every case.

    Attributes:
        case_ids: the scans.
        fill: per scan, the normalised "nothing" intensity per channel (:func:`background_fill`).
        shape: per scan, its spatial shape (X, Y, Z).

    Raises:
        CacheError: no case to read.
        ConfigError: the cache's channel count is not ``in_channels``.
    """

    def __init__(self, data, in_channels: int, purpose: str = "pretrain on"):
        from medpretrain.errors import CacheError, ConfigError

        split = data.manifest.get("split") or {}
        self.case_ids: list[str] = list(data.split("train")) if "train" in split else list(data.case_ids)
        if not self.case_ids:
            raise CacheError(f"{data.root}: no prepared case to {purpose}; run `medpretrain prepare --pool ...`")
        if data.in_channels != in_channels:
            raise ConfigError(f"{data.root}: images have {data.in_channels} channel(s) but in_channels is "
                              f"{in_channels}; set in_channels: {data.in_channels} in the config (YAML) file")
        self.fill = {c: background_fill(data.case(c), data.in_channels) for c in self.case_ids}
        self.shape = {c: tuple(int(s) for s in data.case(c)["shape"][-3:]) for c in self.case_ids}



class PoolDataset:
    """Base of the self-supervised methods' datasets: samples read from a prepared pool, sample ``i`` a pure
    function of ``(seed, i)`` and the data (the sampler decides which indices are read).

    Sets ``data``, ``cfg``, ``length``, ``patch`` (``cfg.patch`` as ints) and, from :class:`PoolCases`,
    ``case_ids`` with the per-scan ``_fill`` and ``_shape``.

    Args:
        data: a prepared cache (``prepare --pool``; a labelled cache contributes its train split only).
        cfg: the method's configuration (``in_channels``, ``patch``).
        length: nominal length.

    Raises:
        CacheError: no case to read.
        ConfigError: the pool's channel count is not ``cfg.in_channels``.
    """

    def __init__(self, data, cfg, length: int = 2**62):
        self.data, self.cfg, self.length = data, cfg, length
        self.patch = tuple(int(p) for p in cfg.patch)
        cases = PoolCases(data, cfg.in_channels)
        self.case_ids, self._fill, self._shape = cases.case_ids, cases.fill, cases.shape

    @property
    def cases_per_pass(self) -> int:
        """Samples in one pass over the pool (every case once)."""
        return len(self.case_ids)

    def __len__(self) -> int:
        return self.length

def body_points(image: np.ndarray, threshold: float, n: int, rng: np.random.Generator, margin, step: int = 1
                ) -> np.ndarray:
    """``n`` random voxel coordinates ``(n, 3)`` of a 3D ``image`` where it exceeds ``threshold``, at least
    ``margin`` (an int or one per axis) from the border, drawn from a lattice of ``step`` voxels. Falls back to
    body voxels near the border, then to the centre, when nothing qualifies."""
    cand = np.argwhere(image[::step, ::step, ::step] > threshold) * step
    lo = np.broadcast_to(np.asarray(margin), (3,))
    hi = np.array(image.shape) - lo
    inner = cand[np.all((cand >= lo) & (cand < hi), axis=1)]
    cand = inner if len(inner) else cand
    if not len(cand):
        cand = np.array([[s // 2 for s in image.shape]])
    return cand[rng.choice(len(cand), n, replace=len(cand) < n)].astype(float)
