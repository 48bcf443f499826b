"""How far a matcher's answers are from the truth, in mm: against a known synthetic affine transform of a
volume, and across subjects as the distance between the matched and the true centroid of a labelled structure."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from medpretrain.data.crops import body_points as crop_body_points
from medpretrain.matching import Matcher, MatchVolume


def random_affine(rng: np.random.Generator, max_rotation_deg: float = 10.0, scale: Sequence[float] = (0.9, 1.1),
                  max_shift: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """``(M, t)``: rotation about each axis within ``max_rotation_deg``, per-axis scale within ``scale``, shift
    (voxels) within ``max_shift``; a voxel ``o`` of the warped volume shows voxel ``M @ (o - c) + c + t`` of the
    original, ``c`` the volume's centre (see :func:`warp`)."""
    rot = np.eye(3)
    for axis in range(3):
        a = math.radians(rng.uniform(-max_rotation_deg, max_rotation_deg))
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = math.cos(a)
        r[i, j], r[j, i] = -math.sin(a), math.sin(a)
        rot = rot @ r
    m = rot @ np.diag(rng.uniform(scale[0], scale[1], 3))
    return m, rng.uniform(-max_shift, max_shift, 3)


def warp(volume: MatchVolume, m: np.ndarray, t: np.ndarray, name: str) -> MatchVolume:
    """The volume resampled through ``(M, t)`` about its centre (same grid and spacing), outside filled with
    its minimum; see :func:`random_affine` for the convention."""
    from scipy.ndimage import affine_transform

    centre = (np.array(volume.image.shape[1:]) - 1) / 2
    offset = centre + t - m @ centre  # o -> M (o - c) + c + t
    img = np.stack([affine_transform(c, m, offset=offset, order=1, cval=float(c.min())) for c in volume.image])
    return MatchVolume(name, img.astype(np.float32), volume.spacing)


def warped_point(p: Sequence[float], m: np.ndarray, t: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Where original voxel ``p`` lies in the volume :func:`warp` made."""
    centre = (np.array(shape) - 1) / 2
    return np.linalg.solve(m, np.asarray(p, float) - centre - t) + centre


def body_points(volume: MatchVolume, n: int, rng: np.random.Generator, margin: int = 8) -> np.ndarray:
    """``n`` random voxels of the body (above the volume's median intensity), ``margin`` from the border."""
    img = volume.image[0]
    return crop_body_points(img, float(np.median(img)), n, rng, margin)


def affine_errors(matcher: Matcher, volume: MatchVolume, n_transforms: int = 3, n_points: int = 20,
                  seed: int = 0) -> list[dict]:
    """Per point: error (mm) between the matched and the true location in a synthetic affine copy of the
    volume, with the match score and acceptance."""
    rng = np.random.default_rng(seed)
    spacing = np.array(volume.spacing, float)
    rows = []
    for k in range(n_transforms):
        m, t = random_affine(rng)
        key = warp(volume, m, t, f"{volume.name}@affine{k}")
        for p in body_points(volume, n_points, rng):
            truth = warped_point(p, m, t, volume.image.shape[1:])
            match = matcher.match(volume, p, key)
            err = float(np.linalg.norm((np.array(match.point) - truth) * spacing))
            rows.append({"volume": volume.name, "transform": k, "error_mm": err, "score": match.score,
                         "accepted": match.accepted})
        if hasattr(matcher, "forget"):
            matcher.forget(key.name)
    return rows


def centroid(label: np.ndarray, value: int | None = None) -> np.ndarray:
    """Voxel centroid of ``label == value`` (any non-zero label when ``value`` is None)."""
    mask = label > 0 if value is None else label == value
    return np.argwhere(mask).mean(0)


def centroid_errors(matcher: Matcher, cases: Sequence[tuple[MatchVolume, np.ndarray]], pairs: int = 20,
                    seed: int = 0) -> list[dict]:
    """For random ordered pairs of different subjects: the query's structure centroid matched into the key, and
    the distance (mm) to the key's own structure centroid."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(pairs):
        qi, ki = rng.choice(len(cases), 2, replace=False)
        (q, q_label), (k, k_label) = cases[qi], cases[ki]
        match = matcher.match(q, centroid(q_label), k)
        err = float(np.linalg.norm((np.array(match.point) - centroid(k_label)) * np.array(k.spacing)))
        rows.append({"query": q.name, "key": k.name, "error_mm": err, "score": match.score,
                     "accepted": match.accepted})
    return rows


def summarise(rows: Sequence[dict]) -> dict:
    """Median, mean and 90th percentile of the errors (mm), share within 10 mm, acceptance rate, and the
    median error of the accepted matches."""
    e = np.array([r["error_mm"] for r in rows], float)
    acc = np.array([r["accepted"] for r in rows], bool)
    if e.size == 0:
        return {"n": 0}
    return {"n": int(e.size), "median_mm": round(float(np.median(e)), 2), "mean_mm": round(float(e.mean()), 2),
            "p90_mm": round(float(np.percentile(e, 90)), 2), "within_10mm": round(float((e <= 10).mean()), 3),
            "accepted": round(float(acc.mean()), 3),
            "median_accepted_mm": round(float(np.median(e[acc])), 2) if acc.any() else None}
