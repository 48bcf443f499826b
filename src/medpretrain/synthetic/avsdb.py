"""AVS-DB: auto-generated volumetric shapes for formula-driven segmentation pretraining.

After Tadokoro, Yamada and Kataoka, "Pre-training Auto-generated Volumetric Shapes for 3D Medical
Image Segmentation" (``../shared/papers/avs-db.md``). A shape is a cross-section in the xy plane
stacked along z while its similarity ratio (scale, about the cross-section's centre) follows a rule:

* xy classes (8): ``ellipse`` and the 3- to 9-gons ``3gon`` .. ``9gon``;
* z classes (4): ``constant`` (prism), ``hourglass`` (concave-inside: the scale falls, then rises),
  ``rhombus`` (concave-outside: rises, then falls), ``pyramid`` (linear down to a point).

Class id = 1 + index of the ``(xy, z)`` pair in product order (xy outer, z inner); 0 is background.
``AVSDBConfig.classes`` picks the set: ``xy8-z2`` (the paper's best, default: 8 xy x {constant,
hourglass} = 16 classes), ``xy4-z2`` (the paper does not name its 4 xy classes; we use ellipse,
3-, 4- and 5-gon) and ``xy8-z4`` (32 classes), the rows of the paper's Table 1a.

Instance augmentation (ranges of the public generator for a 96^3 volume; in-plane lengths scale with
``min(X, Y) / 96``, depths with ``Z / 96``):

* n-gon: a bounding box side ``B ~ U(30, 80)``; one vertex per equal angular sector (sector ``k`` is
  ``[2 pi k / n, 2 pi (k + 1) / n)``) at a uniform angle within it and a radius ``~ U(15, B / 2)``.
  Vertices in angular order make a simple polygon that is star-shaped about its centre (every gap
  between consecutive vertices is below pi for n >= 4); a triangle whose centre falls outside it is
  re-centred on its vertex centroid, so every cross-section contains the centre it is scaled about.
* ellipse: ``R ~ U(15, 40)``, semi-axes ``~ U(15, R)``, a uniform in-plane angle.
* depth ``D ~ U{10..50}`` slices; scale profile over the slices, piecewise linear:
  constant 1; hourglass ``U(0.8, 1) -> U(0.3, 0.5)`` at a random slice ``3..D-3`` ``-> U(0.8, 1)``;
  rhombus the mirror ``U(0.3, 0.5) -> U(0.8, 1) -> U(0.3, 0.5)``; pyramid ``U(0.8, 1)`` falling
  linearly to ``1 / D`` of it at the apex (apex up or down at random).
* every shape centre gets a uniform sub-voxel offset.

Arrangement (the paper's Sec. 2): ``n_shapes`` shapes (classes uniform) are sorted by volume, largest
first; each tries up to ``max_retries`` uniform random positions (the shape wholly inside the volume)
until the voxels it would share with the already filled region, divided by its *own* volume, are
below ``max_overlap_ratio`` (``overlap=False``: until it shares none); a shape that finds no place is
dropped. Later (smaller) shapes overwrite earlier (larger) ones in the label map. The public code
divides by the volume of another shape after sorting; here the ratio uses the placed shape's own.
Neither the paper nor the issue give the public retry limit; we use 50.

Images (``render``):

* ``outline`` (default, like the public generator): each slice of each placed shape gets a 2-voxel
  wide outline (the slice's region minus its 2-step 4-connected erosion, i.e. the outline lies on the
  inner side of the label boundary) at value 128; interiors are empty (0). Outlines of larger shapes
  stay visible where smaller shapes cover them (outlines are drawn, never erased). uint8.
* ``filled``: a random background level ``b ~ U(0, 0.3)`` with texture amplitude ``U(0, 0.15)``; each
  placed shape, largest first, is alpha-blended over what is there with its own intensity
  ``(b + U(0.2, 0.8)) mod 1`` (at least 0.2 from the background) and opacity ``U(0.6, 1)``, so
  overlaps mix both shapes' intensities; each shape has its own texture amplitude ``U(0.05, 0.3)``
  (the smaller shape's in overlaps) times unit-variance uniform white noise; then a 3-tap binomial
  blur along every axis (partial volume; turns the noise into fine texture, std about 0.23 x the
  amplitude). float32 in ``[0, 1]``.

``noise > 0`` adds uniform noise ``U[0, noise]`` (in units of the full range: ``noise * 255`` grey
levels for ``outline``) to every voxel, then clips.

Determinism: a volume is a pure function of ``(cfg, seed, index)``: its draws come from
``numpy.random.default_rng([tag, seed, index, stream])`` (PCG64, the same on every platform), the
geometry from one stream and the rendering from another, so ``outline`` and ``filled`` volumes of the
same ``(seed, index)`` have the same label map. No transcendental function decides a voxel: vertex
coordinates and rotations are rounded to a 2^-16 grid after ``cos``/``sin`` and everything after
that is IEEE-exact elementwise arithmetic, so the result does not depend on the machine's libm or
SIMD path. A data loader worker or DDP rank that reads item ``i`` gets volume ``i``; distinct indices
give independent streams, so different workers and ranks never repeat each other.
"""

from __future__ import annotations

import io
import logging
import math
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
CASE_PREFIX = "avsdb"
#: Reference volume side the public generator's ranges are given for.
REFERENCE_SIZE = 96
#: Value of outline voxels in ``render="outline"`` images.
OUTLINE_VALUE = 128

XY_KINDS: tuple[str, ...] = ("ellipse", "3gon", "4gon", "5gon", "6gon", "7gon", "8gon", "9gon")
Z_KINDS: tuple[str, ...] = ("constant", "hourglass", "rhombus", "pyramid")
#: The class sets of the paper's Table 1a: (xy kinds, z kinds).
CLASS_SETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "xy8-z2": (XY_KINDS, ("constant", "hourglass")),
    "xy4-z2": (("ellipse", "3gon", "4gon", "5gon"), ("constant", "hourglass")),
    "xy8-z4": (XY_KINDS, Z_KINDS),
}

_TAG = 0x41565344  # "AVSD": keeps these streams apart from other users of (seed, index)
_GEOMETRY, _RENDER, _CROP = 0, 1, 2
_QUANT = 65536.0  # shape parameters after cos/sin are rounded to multiples of 1 / _QUANT


class AVSDBConfig(BaseModel):
    """Settings of the AVS-DB generator.

    Args:
        size: volume shape ``(X, Y, Z)``; the shape-size ranges scale with it (see the module docs).
        classes: class set: ``xy8-z2`` (16 classes, the paper's best), ``xy4-z2`` (8), ``xy8-z4`` (32).
        n_shapes: shapes drawn per volume (some may be dropped if they find no place).
        overlap: allow overlap up to ``max_overlap_ratio``; False places shapes without any overlap.
        max_overlap_ratio: a shape is placed where (voxels shared with already placed shapes) /
            (its own voxels) is below this.
        max_retries: random positions tried per shape before it is dropped.
        render: ``outline`` (uint8 2-voxel slice outlines at 128, the public generator's images) or
            ``filled`` (float32 in [0, 1], textured shapes of random intensity).
        noise: amplitude of additive uniform noise ``U[0, noise]`` as a fraction of the full range
            (0 = none).
    """

    model_config = ConfigDict(extra="forbid")

    size: tuple[int, int, int] = (96, 96, 96)
    classes: Literal["xy8-z2", "xy4-z2", "xy8-z4"] = "xy8-z2"
    n_shapes: int = 20
    overlap: bool = True
    max_overlap_ratio: float = 0.7
    max_retries: int = 50
    render: Literal["outline", "filled"] = "outline"
    noise: float = 0.0

    @field_validator("size")
    @classmethod
    def _check_size(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(s < 8 or s > 1024 for s in v):
            raise ValueError(f"each side of size must be 8..1024 voxels, got {tuple(v)}")
        return v

    @field_validator("n_shapes")
    @classmethod
    def _check_n_shapes(cls, v: int) -> int:
        # 0 would write volumes with empty label maps, which prepare then skips one by one.
        if not 1 <= v <= 10_000:
            raise ValueError(f"n_shapes (--shapes) must be 1..10000, got {v}: a volume needs a shape to label")
        return v

    @field_validator("max_overlap_ratio")
    @classmethod
    def _check_ratio(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"max_overlap_ratio must be in (0, 1], got {v}")
        return v

    @field_validator("max_retries")
    @classmethod
    def _check_retries(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"max_retries must be at least 1, got {v}")
        return v

    @field_validator("noise")
    @classmethod
    def _check_noise(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {v}")
        return v

    @property
    def xy_kinds(self) -> tuple[str, ...]:
        """The xy classes in use, in class-id order."""
        return CLASS_SETS[self.classes][0]

    @property
    def z_kinds(self) -> tuple[str, ...]:
        """The z classes in use, in class-id order."""
        return CLASS_SETS[self.classes][1]

    @property
    def num_classes(self) -> int:
        """Number of label values including background: ``len(xy) * len(z) + 1``."""
        return len(self.xy_kinds) * len(self.z_kinds) + 1


def class_names(cfg: AVSDBConfig) -> dict[int, str]:
    """Label id -> name: ``{0: "background", 1: "ellipse-constant", 2: "ellipse-hourglass", ...}``.

    Args:
        cfg: the generator settings (only ``classes`` matters).
    """
    names = {0: "background"}
    for i, xy in enumerate(cfg.xy_kinds):
        for j, z in enumerate(cfg.z_kinds):
            names[1 + i * len(cfg.z_kinds) + j] = f"{xy}-{z}"
    return names


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng([_TAG, int(seed), int(index), stream])


def _quantise(x):
    return np.round(np.asarray(x, dtype=np.float64) * _QUANT) / _QUANT


# --------------------------------------------------------------------------------------------------
# Shapes


@dataclass
class Shape:
    """One generated shape, rasterised in its own box.

    Attributes:
        kind_xy: ``"ellipse"`` or ``"<n>gon"``.
        kind_z: one of :data:`Z_KINDS`.
        mask: ``(nx, ny, D)`` bool, the shape in its tight box.
        scale: ``(D,)`` similarity ratio of each slice.
        q: ``(nx, ny)`` float64: a column's "radius" relative to the cross-section at scale 1; voxel
            ``(i, j, k)`` is inside exactly when ``q[i, j] <= scale[k]``.
        origin: in-plane coordinates, relative to the shape's centre, of voxel ``mask[0, 0, :]``;
            voxel ``(i, j)`` lies at ``origin + (i, j)``.
        vertices: ``(n, 2)`` polygon vertices at scale 1 (counter-clockwise, relative to the centre),
            None for an ellipse.
        ellipse: ``(a, b, cos, sin)`` semi-axes and rotation of an ellipse, None for a polygon.
    """

    kind_xy: str
    kind_z: str
    mask: np.ndarray
    scale: np.ndarray
    q: np.ndarray
    origin: tuple[float, float]
    vertices: np.ndarray | None = None
    ellipse: tuple[float, float, float, float] | None = None
    _q_pad: np.ndarray | None = field(default=None, repr=False)
    _volume: int | None = field(default=None, repr=False)

    @property
    def volume(self) -> int:
        """Number of voxels of the shape."""
        if self._volume is None:
            self._volume = int(np.count_nonzero(self.mask))
        return self._volume

    def outline(self, width: int = 2) -> np.ndarray:
        """``mask`` restricted to each slice's ``width``-voxel inner rim (4-connected erosion per slice)."""
        qp = self._q_pad if self._q_pad is not None else np.pad(self.q, width, constant_values=np.inf)
        p = (qp.shape[0] - self.q.shape[0]) // 2
        grown = qp
        for _ in range(width):  # max over the 4-neighbourhood, `width` times: L1 ball of radius `width`
            g = grown.copy()
            g[1:, :] = np.maximum(g[1:, :], grown[:-1, :])
            g[:-1, :] = np.maximum(g[:-1, :], grown[1:, :])
            g[:, 1:] = np.maximum(g[:, 1:], grown[:, :-1])
            g[:, :-1] = np.maximum(g[:, :-1], grown[:, 1:])
            grown = g
        qmax = grown[p : p + self.q.shape[0], p : p + self.q.shape[1]] if p else grown
        return self.mask & (qmax[:, :, None] > self.scale[None, None, :])


def _parse_xy(kind_xy: str | int) -> int:
    """0 for an ellipse, else the vertex count."""
    if kind_xy in ("ellipse", 0):
        return 0
    m = re.fullmatch(r"(\d+)gon", str(kind_xy)) if isinstance(kind_xy, str) else None
    n = int(m.group(1)) if m else (int(kind_xy) if isinstance(kind_xy, (int, np.integer)) else -1)
    if n < 3:
        raise ValueError(f"unknown xy kind {kind_xy!r}; use 'ellipse' or '<n>gon' with n >= 3")
    return n


def _scale_profile(kind_z: str, depth: int, rng: np.random.Generator) -> np.ndarray:
    z = np.arange(depth, dtype=np.float64)
    if kind_z == "constant":
        return np.ones(depth)
    if kind_z in ("hourglass", "rhombus"):
        lo_hi = ((0.8, 1.0), (0.3, 0.5)) if kind_z == "hourglass" else ((0.3, 0.5), (0.8, 1.0))
        a = rng.uniform(*lo_hi[0])
        m = rng.uniform(*lo_hi[1])
        b = rng.uniform(*lo_hi[0])
        lo = min(3, (depth - 1) // 2)
        hi = max(lo, depth - 1 - lo)
        k = int(rng.integers(lo, hi + 1))
        return np.interp(z, [0.0, float(k), float(depth - 1)], [a, m, b])
    if kind_z == "pyramid":
        s0 = rng.uniform(0.8, 1.0)
        s = s0 * (depth - z) / depth
        return s[::-1].copy() if rng.random() < 0.5 else s
    raise ValueError(f"unknown z kind {kind_z!r}; use one of {Z_KINDS}")


def _polygon_vertices(n: int, rng: np.random.Generator, f: float) -> np.ndarray:
    box = rng.uniform(30.0 * f, 80.0 * f)
    angles = (np.arange(n) + rng.random(n)) * (2.0 * np.pi / n)
    radii = rng.uniform(15.0 * f, max(15.0 * f, box / 2.0), size=n)
    v = _quantise(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1))
    # Centre strictly inside every sector triangle (v_k, v_k+1): cross(v_k, v_k+1) > 0. Only a
    # triangle can break this (an angular gap above pi); re-centre it on its vertex centroid.
    cross = v[:, 0] * np.roll(v[:, 1], -1) - v[:, 1] * np.roll(v[:, 0], -1)
    if np.any(cross <= 1e-6 * np.max(radii) ** 2):
        v = _quantise(v - v.mean(axis=0))
        area2 = np.sum(v[:, 0] * np.roll(v[:, 1], -1) - v[:, 1] * np.roll(v[:, 0], -1))
        if area2 < 0:
            v = v[::-1].copy()
    return v


def _polygon_q(v: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """q for a polygon star-shaped about the origin (vertices counter-clockwise).

    A point in the sector between rays v_k and v_k+1 is inside iff it is on the inner side of the edge
    v_k v_k+1: with the edge's outward normal n_k and d_k = n_k . v_k > 0, q = (n_k . p) / d_k <= 1.
    The sector is found with cross products (no atan2): cross(v_k, p) >= 0 > cross(v_k+1, p).
    """
    w = np.roll(v, -1, axis=0)
    nx, ny = w[:, 1] - v[:, 1], v[:, 0] - w[:, 0]  # outward normal of a CCW edge
    d = nx * v[:, 0] + ny * v[:, 1]
    vx, vy = v[:, 0][:, None, None], v[:, 1][:, None, None]
    c = vx * y - vy * x  # (n, H, W): cross(v_k, p)
    in_sector = (c >= 0) & (np.roll(c, -1, axis=0) < 0)
    k = np.argmax(in_sector, axis=0)  # the origin itself is in no sector: k = 0, q = 0 there anyway
    q = (nx[k] * x + ny[k] * y) / d[k]
    return q


def generate_shape(kind_xy: str | int, kind_z: str, rng: np.random.Generator,
                   size: tuple[int, int, int] = (96, 96, 96)) -> Shape:
    """Draw one shape of the given class, with the instance augmentation for a volume of ``size``.

    Args:
        kind_xy: ``"ellipse"`` or ``"<n>gon"`` (n >= 3; also the int n, 0 for an ellipse).
        kind_z: ``"constant"``, ``"hourglass"``, ``"rhombus"`` or ``"pyramid"``.
        rng: the random generator to draw from.
        size: the volume the shape is for; ranges scale with ``min(X, Y) / 96`` and ``Z / 96``. The
            shape's box is cropped (centrally) to fit in the volume.

    Returns:
        The shape, rasterised in its own tight box.
    """
    n = _parse_xy(kind_xy)
    if kind_z not in Z_KINDS:
        raise ValueError(f"unknown z kind {kind_z!r}; use one of {Z_KINDS}")
    X, Y, Z = (int(s) for s in size)
    f = min(X, Y) / REFERENCE_SIZE
    fz = Z / REFERENCE_SIZE
    vertices = ellipse = None
    if n == 0:
        big = rng.uniform(15.0 * f, 40.0 * f)
        a, b = rng.uniform(15.0 * f, big, size=2)
        phi = rng.uniform(0.0, np.pi)
        a, b, cs, sn = (float(t) for t in _quantise([a, b, np.cos(phi), np.sin(phi)]))
        ellipse = (a, b, cs, sn)
        rmax = max(a, b)
    else:
        vertices = _polygon_vertices(n, rng, f)
        rmax = float(np.max(np.hypot(vertices[:, 0], vertices[:, 1])))
    depth = int(rng.integers(max(3, round(10 * fz)), max(3, round(50 * fz)) + 1))
    depth = min(depth, Z)
    scale = _scale_profile(kind_z, depth, rng)
    offset = _quantise(rng.random(2))  # sub-voxel centre position

    pad = 3
    half = math.ceil(rmax * float(scale.max())) + 1 + pad
    jx = np.arange(-half, half + 1, dtype=np.float64)
    x = (jx - offset[0])[:, None]
    y = (jx - offset[1])[None, :]
    if ellipse is not None:
        a, b, cs, sn = ellipse
        u = (x * cs + y * sn) / a
        w = (y * cs - x * sn) / b
        q_pad = np.sqrt(u * u + w * w)
    else:
        q_pad = _polygon_q(vertices, x, y)
    # Tight box of the footprint at the largest scale, cropped centrally to fit the volume.
    foot = q_pad <= scale.max()
    if not foot.any():  # only in tiny volumes: keep the voxel nearest the centre
        q_pad[np.unravel_index(np.argmin(q_pad), q_pad.shape)] = 0.0
        foot = q_pad <= scale.max()
    rows, cols = np.flatnonzero(foot.any(axis=1)), np.flatnonzero(foot.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if r1 - r0 > X:
        r0 += (r1 - r0 - X) // 2
        r1 = r0 + X
    if c1 - c0 > Y:
        c0 += (c1 - c0 - Y) // 2
        c1 = c0 + Y
    q = q_pad[r0:r1, c0:c1]
    # A pyramid's apex slices can hold no voxel: the box starts and ends at non-empty slices.
    full = np.flatnonzero(scale >= q.min())
    scale = scale[full[0] : full[-1] + 1]
    mask = q[:, :, None] <= scale[None, None, :]
    origin = (float(x[r0, 0]), float(y[0, c0]))
    # Keep a 2-voxel frame of q around the box for the outline (pad >= 2 on every side).
    qp = np.pad(q_pad, 2, constant_values=np.inf)[r0 : r1 + 4, c0 : c1 + 4]
    name = "ellipse" if n == 0 else f"{n}gon"
    return Shape(name, kind_z, mask, scale, q, origin, vertices, ellipse, _q_pad=qp)


# --------------------------------------------------------------------------------------------------
# Arrangement and rendering


@dataclass
class Placement:
    """A placed shape: its class id, its shape, and where its box starts in the volume."""

    class_id: int
    shape: Shape
    start: tuple[int, int, int]
    overlap: int  # voxels it shared with the already filled region when placed
    attempts: int

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.shape.mask.shape))  # type: ignore[return-value]


def place_shapes(cfg: AVSDBConfig, seed: int, index: int) -> tuple[np.ndarray, list[Placement], int]:
    """Draw and arrange the shapes of volume ``(seed, index)``.

    Returns:
        ``(label, placements, dropped)``: the uint8 label map, the placed shapes in placement order
        (largest first), and how many drawn shapes found no place.
    """
    rng = _rng(seed, index, _GEOMETRY)
    xy_kinds, z_kinds = cfg.xy_kinds, cfg.z_kinds
    nz = len(z_kinds)
    size = tuple(int(s) for s in cfg.size)
    cids = rng.integers(0, len(xy_kinds) * nz, size=cfg.n_shapes)
    shapes = [generate_shape(xy_kinds[c // nz], z_kinds[c % nz], rng, size) for c in cids]
    order = sorted(range(len(shapes)), key=lambda i: (-shapes[i].volume, i))

    label = np.zeros(size, dtype=np.uint8)
    filled = np.zeros(size, dtype=bool)
    placements: list[Placement] = []
    dropped = 0
    for i in order:
        shape = shapes[i]
        dims = np.asarray(shape.mask.shape)
        span = np.asarray(size) - dims + 1  # the box always fits (generate_shape crops it)
        limit = cfg.max_overlap_ratio * shape.volume
        for attempt in range(1, cfg.max_retries + 1):
            start = tuple(int(s) for s in rng.integers(0, span))
            view = tuple(slice(s, s + n) for s, n in zip(start, dims))
            shared = int(np.count_nonzero(filled[view] & shape.mask))
            if (shared < limit) if cfg.overlap else (shared == 0):
                np.copyto(label[view], np.uint8(int(cids[i]) + 1), where=shape.mask)
                filled[view] |= shape.mask
                placements.append(Placement(int(cids[i]) + 1, shape, start, shared, attempt))
                break
        else:
            dropped += 1
    return label, placements, dropped


def _render_outline(cfg: AVSDBConfig, placements: list[Placement], rng: np.random.Generator) -> np.ndarray:
    edge = np.zeros(cfg.size, dtype=bool)
    for p in placements:
        edge[p.slices] |= p.shape.outline()
    image = edge.view(np.uint8) * np.uint8(OUTLINE_VALUE)
    amp = round(cfg.noise * 255)
    if amp > 0:
        noisy = image.astype(np.uint16) + rng.integers(0, amp + 1, size=image.shape, dtype=np.uint16)
        image = np.minimum(noisy, 255).astype(np.uint8)
    return image


def _blur3(a: np.ndarray) -> np.ndarray:
    """3-tap binomial (1, 2, 1) / 4 along every axis, edges repeated; ``a`` is used as scratch space.

    Written as separate numpy additions (no compiled convolution loop a compiler may contract into
    fused multiply-adds on some CPUs), so the result is bit-identical on every machine.
    """
    out = np.empty_like(a)
    for axis in range(a.ndim):
        lo = [slice(None)] * a.ndim
        mid, hi = list(lo), list(lo)
        lo[axis], mid[axis], hi[axis] = slice(None, -2), slice(1, -1), slice(2, None)
        lo, mid, hi = tuple(lo), tuple(mid), tuple(hi)
        np.add(a[lo], a[hi], out=out[mid])
        out[mid] += a[mid] + a[mid]
        first, second = [slice(None)] * a.ndim, [slice(None)] * a.ndim
        first[axis], second[axis] = slice(0, 1), slice(1, 2)
        out[tuple(first)] = a[tuple(first)] * 3 + a[tuple(second)]
        first[axis], second[axis] = slice(-1, None), slice(-2, -1)
        out[tuple(first)] = a[tuple(first)] * 3 + a[tuple(second)]
        out *= np.float32(0.25)
        a, out = out, a
    return a


def _render_filled(cfg: AVSDBConfig, placements: list[Placement], rng: np.random.Generator) -> np.ndarray:
    bg = np.float32(rng.uniform(0.0, 0.3))
    image = np.full(cfg.size, bg, dtype=np.float32)
    texture = np.full(cfg.size, np.float32(rng.uniform(0.0, 0.15)), dtype=np.float32)
    for p in placements:
        value = np.float32((bg + rng.uniform(0.2, 0.8)) % 1.0)
        alpha = np.float32(rng.uniform(0.6, 1.0))
        amp = np.float32(rng.uniform(0.05, 0.3))
        view = image[p.slices]
        np.copyto(view, view + alpha * (value - view), where=p.shape.mask)
        np.copyto(texture[p.slices], amp, where=p.shape.mask)
    white = rng.random(cfg.size, dtype=np.float32)
    white -= np.float32(0.5)
    image += texture * white * np.float32(2.0 * math.sqrt(3.0))  # unit-variance noise times amplitude
    image = _blur3(image)
    if cfg.noise > 0:
        image += rng.random(cfg.size, dtype=np.float32) * np.float32(cfg.noise)
    np.clip(image, 0.0, 1.0, out=image)
    return image


def generate_volume(cfg: AVSDBConfig, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Volume ``index`` of the AVS-DB stream ``seed``: a pure function of ``(cfg, seed, index)``.

    Args:
        cfg: generator settings.
        seed: stream seed (>= 0).
        index: volume index (>= 0).

    Returns:
        ``(image, label)``, both ``cfg.size``: image uint8 (0 / 128 outlines, plus noise) for
        ``render="outline"``, float32 in [0, 1] for ``render="filled"``; label uint8 class ids
        ``0 .. cfg.num_classes - 1``.
    """
    label, placements, _ = place_shapes(cfg, seed, index)
    rng = _rng(seed, index, _RENDER)
    if cfg.render == "outline":
        image = _render_outline(cfg, placements, rng)
    else:
        image = _render_filled(cfg, placements, rng)
    return image, label


# --------------------------------------------------------------------------------------------------
# On-the-fly dataset


try:  # torch is a dependency, but keep the generator importable without it
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object  # type: ignore[assignment,misc]


class AVSDBDataset(_TorchDataset):  # type: ignore[misc,valid-type]
    """AVS-DB volumes generated on the fly: sample ``i`` is ``generate_volume(cfg, seed, i % length)``.

    Samples depend only on ``(cfg, seed, i)``, so any DataLoader worker or DDP rank that reads sample ``i``
    gets the same volume, and a sampler that gives workers and ranks disjoint indices never repeats a
    volume among them within one pass over ``length`` samples.

    Args:
        cfg: generator settings.
        seed: stream seed.
        length: size of the database (the paper pretrains on 5,000 volumes): sample ``i`` reads volume
            ``i mod length``, so a sampler may keep counting past it (a second pass sees the same
            volumes). None: no bound, every sample index is a new volume (``len()`` is ``sys.maxsize``).
        patch: if given and smaller than ``cfg.size`` along some axis, a random crop of that size; its
            position is drawn from ``(seed, i)`` with the sample index ``i``, so later passes over the
            same volume see other crops.
    """

    def __init__(self, cfg: AVSDBConfig, seed: int = 0, length: int | None = 5000,
                 patch: tuple[int, int, int] | None = None):
        if length is not None and length < 1:
            raise ValueError(f"length must be at least 1 (or None for no bound), got {length}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if patch is not None:
            patch = tuple(int(p) for p in patch)  # type: ignore[assignment]
            if len(patch) != 3 or any(p < 1 or p > s for p, s in zip(patch, cfg.size)):
                raise ValueError(f"patch {patch} must be 3 sides of 1..size {tuple(cfg.size)}")
            if tuple(patch) == tuple(cfg.size):
                patch = None
        self.cfg, self.seed, self.patch = cfg, int(seed), patch
        self.length = None if length is None else int(length)

    def __len__(self) -> int:
        return sys.maxsize if self.length is None else self.length

    def __getitem__(self, i: int) -> dict:
        import torch

        i = int(i)
        if i < 0:
            if self.length is None or i < -self.length:
                raise IndexError(f"sample index {i} out of range")
            i += self.length
        volume = i if self.length is None else i % self.length
        image, label = generate_volume(self.cfg, self.seed, volume)
        if self.patch is not None:
            span = np.asarray(self.cfg.size) - np.asarray(self.patch) + 1
            start = _rng(self.seed, i, _CROP).integers(0, span)
            view = tuple(slice(int(s), int(s) + p) for s, p in zip(start, self.patch))
            image, label = image[view], label[view]
        if image.dtype == np.uint8:
            img = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32).div_(255.0)
        else:
            img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        lab = torch.from_numpy(np.ascontiguousarray(label)).to(torch.int64)
        return {"image": img.unsqueeze(0), "label": lab.unsqueeze(0)}


# --------------------------------------------------------------------------------------------------
# Writing a dataset


def case_id(index: int) -> str:
    """``avsdb_00042`` for index 42."""
    return f"{CASE_PREFIX}_{index:05d}"


def _label_colours(num_classes: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    colours = np.zeros((num_classes, 4))
    for c in range(1, num_classes):
        colours[c] = cmap((c - 1) % 20)
        if (c - 1) // 20 % 2:  # a second lap through the palette: darker
            colours[c, :3] *= 0.6
    colours[:, 3] = 1.0
    return colours


def save_preview(image: np.ndarray, label: np.ndarray, path, title: str, names: dict[int, str]) -> Path:
    """Write a PNG with the central axial, coronal and sagittal slices of the image and the label map.

    Args:
        image: ``(X, Y, Z)`` image.
        label: ``(X, Y, Z)`` class ids.
        path: destination PNG.
        title: figure title.
        names: class id -> name (colours follow the ids; the present classes get a legend).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from medpretrain.atomic import atomic_write_bytes

    image = np.asarray(image, dtype=np.float32)
    cx, cy, cz = (s // 2 for s in image.shape)
    views = [(f"axial z={cz}", np.s_[:, :, cz]), (f"coronal y={cy}", np.s_[:, cy, :]),
             (f"sagittal x={cx}", np.s_[cx, :, :])]
    colours = _label_colours(max(names) + 1)
    cmap = ListedColormap(colours)
    vmax = float(image.max()) if image.max() > 0 else 1.0
    fig = Figure(figsize=(11, 7.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    for col, (name, sl) in enumerate(views):
        for row, (arr, kw) in enumerate(((image, {"cmap": "gray", "vmin": 0.0, "vmax": vmax}),
                                         (label, {"cmap": cmap, "vmin": -0.5, "vmax": len(colours) - 0.5}))):
            ax = axes[row, col]
            ax.imshow(np.asarray(arr[sl]).T, origin="lower", interpolation="nearest", **kw)
            ax.set_title(f"{'image' if row == 0 else 'label'} {name}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    present = [int(c) for c in np.unique(label) if c > 0]
    handles = [Patch(color=colours[c], label=f"{c} {names.get(c, c)}") for c in present]
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return atomic_write_bytes(path, buf.getvalue())


def _write_case(task: dict) -> int:
    from medpretrain.data.io import write_nifti

    cfg = AVSDBConfig.model_validate(task["cfg"])
    out, index, seed = Path(task["out"]), task["index"], task["seed"]
    image, label = generate_volume(cfg, seed, index)
    cid = case_id(index)
    affine = np.eye(4)
    write_nifti(image, affine, out / "imagesTr" / f"{cid}_0000.nii.gz", dtype=image.dtype)
    write_nifti(label, affine, out / "labelsTr" / f"{cid}.nii.gz", dtype=np.uint8)
    if task["preview"]:
        title = f"{cid}  ({cfg.classes}, render={cfg.render}, seed={seed})"
        save_preview(image, label, out / "preview" / f"{cid}.png", title, class_names(cfg))
    return index


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not (enabled and sys.stderr.isatty()))


def write_avsdb_dataset(out_dir, n: int, cfg: AVSDBConfig, seed: int = 0, workers: int = 1, preview: int = 0,
                        progress: bool = True) -> Path:
    """Generate ``n`` AVS-DB volumes into an nnU-Net v2 raw dataset folder (with an MSD-style list).

    Writes ``imagesTr/avsdb_NNNNN_0000.nii.gz`` (uint8 for ``outline``, float32 for ``filled``),
    ``labelsTr/avsdb_NNNNN.nii.gz`` (uint8), ``dataset.json`` (``channel_names`` ``{"0": "synthetic"}``,
    ``labels`` ``{name: id}``, ``numTraining``, ``file_ending``, ``training`` list, the generator
    settings under ``"avsdb"``) and, for the first ``preview`` volumes, ``preview/avsdb_NNNNN.png``.
    Volume ``i`` is ``generate_volume(cfg, seed, i)``, 1 mm isotropic, identity affine.

    Re-running into the same folder with the same settings keeps the cases already written (files
    are written atomically, so an existing file is complete) and writes the rest; ``dataset.json``
    is written last. A folder generated with other settings is refused.

    Args:
        out_dir: dataset folder (created).
        n: number of volumes.
        cfg: generator settings.
        seed: stream seed.
        workers: processes generating in parallel.
        preview: number of preview PNGs.
        progress: show a progress bar (on a terminal).

    Returns:
        ``out_dir`` as a Path.
    """
    from medpretrain.atomic import atomic_write_json
    from medpretrain.errors import ConfigError

    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"generator_version": GENERATOR_VERSION, "seed": int(seed), "config": cfg.model_dump(mode="json")}
    marker = out / "avsdb.json"
    if marker.is_file():
        import json

        old = json.loads(marker.read_text(encoding="utf-8"))
        if old != settings:
            raise ConfigError(
                f"{out}: holds AVS-DB volumes generated with other settings ({old}); use a new folder or delete it"
            )
    elif any(out.iterdir()):
        raise ConfigError(f"{out}: is not empty and holds no AVS-DB volumes; use a new or empty folder")
    atomic_write_json(marker, settings, indent=2)

    # Cases from an earlier, longer run with the same settings would otherwise join the dataset.
    pattern = re.compile(rf"{CASE_PREFIX}_(\d+)(_0000)?\.(nii\.gz|png)$")
    for sub in ("imagesTr", "labelsTr", "preview"):
        for f in (out / sub).glob(f"{CASE_PREFIX}_*") if (out / sub).is_dir() else ():
            m = pattern.match(f.name)
            if m and (int(m.group(1)) >= n or (sub == "preview" and int(m.group(1)) >= preview)):
                f.unlink()

    def done(i: int) -> bool:
        cid = case_id(i)
        return ((out / "imagesTr" / f"{cid}_0000.nii.gz").is_file() and (out / "labelsTr" / f"{cid}.nii.gz").is_file()
                and (i >= preview or (out / "preview" / f"{cid}.png").is_file()))

    cfg_json = cfg.model_dump(mode="json")
    todo = [{"cfg": cfg_json, "out": str(out), "index": i, "seed": int(seed), "preview": i < preview}
            for i in range(n) if not done(i)]
    if len(todo) < n:
        log.info("%d AVS-DB volume(s) already in %s, %d to generate", n - len(todo), out, len(todo))
    label = f"AVS-DB {cfg.classes} {cfg.render}"
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futures = [pool.submit(_write_case, t) for t in todo]
            try:
                with _progress(progress) as bar:
                    job = bar.add_task(label, total=len(todo))
                    for fut in as_completed(futures):
                        fut.result()
                        bar.advance(job)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    else:
        with _progress(progress) as bar:
            job = bar.add_task(label, total=len(todo))
            for t in todo:
                _write_case(t)
                bar.advance(job)

    names = class_names(cfg)
    dataset = {
        "name": "AVS-DB",
        "description": "Auto-generated volumetric shapes (Tadokoro et al.), generated by medpretrain",
        "channel_names": {"0": "synthetic"},
        "labels": {name: cid for cid, name in names.items()},
        "numTraining": n,
        "file_ending": ".nii.gz",
        "training": [{"image": f"./imagesTr/{case_id(i)}_0000.nii.gz", "label": f"./labelsTr/{case_id(i)}.nii.gz"}
                     for i in range(n)],
        "avsdb": settings,
    }
    atomic_write_json(out / "dataset.json", dataset, indent=2)
    return out


__all__ = [
    "CLASS_SETS",
    "XY_KINDS",
    "Z_KINDS",
    "AVSDBConfig",
    "AVSDBDataset",
    "Placement",
    "Shape",
    "case_id",
    "class_names",
    "generate_shape",
    "generate_volume",
    "place_shapes",
    "save_preview",
    "write_avsdb_dataset",
]
