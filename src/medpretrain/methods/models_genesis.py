"""Models Genesis self-supervised pretraining (Zhou et al., "Models Genesis: Generic Autodidactic Models for 3D
Medical Image Analysis", MICCAI 2019; extended in Medical Image Analysis 67:101840, 2021; official code
MrGiovanni/ModelsGenesis, ``pytorch/utils.py``, ``pytorch/config.py``, ``pytorch/Genesis_Chest_CT.py``).

Pretext task: image restoration. A sub-volume ("cube") is corrupted by a chain of random transformations and
the whole network, encoder and decoder (a CNN: the registered ``cnn`` family), restores the uncorrupted cube
from it with an L2 (mean squared error) loss over every voxel. The network's output has as many channels as its
input; a sigmoid maps it to [0, 1], the range of the target (the official 3D U-Net ends in a sigmoid; the
sigmoid has no parameters, so the exported network is the registered one unchanged, ``output: linear`` drops
it). Fine-tuning reuses encoder and decoder (``finetune --init RUN/model.pt --init-part all``); the 1-channel
restoration head is replaced by the segmentation head.

Per cube, in the official code's order and with its probabilities (``pytorch/config.py``):

1. flips (``flip_rate`` 0.4): up to 3 times, while a draw is below ``flip_rate``, one axis is picked uniformly
   and flipped in BOTH the input and the target (an augmentation, not a corruption). The official code picks
   the axis among the first three axes of a channel-first cube, i.e. channel, X or Y: with one channel a third
   of the flips do nothing and the slice axis Z is never flipped. ``flip_axes: official`` (default) keeps that
   (the channel pick is a no-op for any channel count: we never reorder channels); ``xyz`` picks X, Y or Z.
2. local pixel shuffling (``local_rate`` 0.5): ``shuffle_blocks`` (10,000) small blocks, side uniform in
   ``1..max(1, side // 10)`` per axis (1..6, 1..6, 1..3 for the 64 x 64 x 32 cube), at uniform positions; each
   block's voxels are a random permutation of the voxels the block covers BEFORE this step (blocks read the
   step's input, not each other's output); a later block overwrites an earlier one where they overlap. The
   same permutation is used for every channel.
3. non-linear intensity transformation (``nonlinear_rate`` 0.9): a cubic Bezier curve from (0, 0) to (1, 1)
   with two control points drawn uniformly in [0, 1]^2, sampled at 100,000 values of its parameter, is
   applied to every voxel by linear interpolation (ours: through a 65,537-entry table of the sampled curve,
   within 1e-3 of interpolating the samples directly); with probability 1/2 the curve's ordinates are reversed,
   which makes it a decreasing map from 1 to 0. Both are monotone maps of [0, 1] onto [0, 1] (the control
   points' abscissae in [0, 1] make the abscissa monotone in the curve parameter). Pointwise and applied after
   a permutation, it commutes with step 2, so the order of 2 and 3 does not change the distribution.
4. painting (``paint_rate`` 0.9), then in-painting with probability ``inpaint_rate`` 0.2 (official
   ``inpaint_rate = 1 - outpaint_rate``, ``outpaint_rate`` 0.8), else out-painting:

   * in-painting: up to 5 boxes, each drawn while a draw is below 0.95 (so possibly none), side uniform in
     ``side // 6 .. side // 3`` per axis, position uniform with a 3-voxel margin to the cube's border, filled
     with uniform noise in [0, 1) (one noise volume shared by the channels, as the official code);
   * out-painting: the whole cube becomes uniform noise in [0, 1) (per channel), except inside 1 to 5 boxes
     (the first always, up to 4 more while a draw is below 0.95) that keep the step's input; box side
     ``side - U{3 * side // 7 .. 4 * side // 7}`` per axis, position with the same 3-voxel margin.

   (The margin shrinks where a side is too small for it; the official cube never is.)

The target is the cube after the flips (step 1) and before any corruption (steps 2-4).

Data (ours where the official code is chest-CT specific). The official code pre-extracts 32 cubes of
64 x 64 x 32 voxels per LUNA16 scan (its 10 subsets; 0-4 train), clipped to HU [-1000, 1000] and scaled to
[0, 1], keeping cubes at least 100 voxels (30 in Z) from the scan's border and at most 15% above -150 HU (lung
parenchyma). Here, sample ``i`` is a pure function of ``(seed, i)`` and the prepared pool: a scan uniformly
from the pool (a labelled cache: its train split), a cube of ``patch`` voxels at a uniform position
(``choose_patch_start``; a scan smaller than the patch is padded with its background intensity, as the other
methods), read from the memory-mapped ``.npy`` without loading the scan. The cubes are drawn afresh for every
sample, not from a fixed set.

Intensities. The transformations assume [0, 1] (the Bezier curve is defined on it, the noise is in it). The
pool is normalised by ``prepare``: CT windowed and scaled to [0, 1] already; MR clipped to per-scan percentiles
and z-scored. ``intensity: volume`` (default) maps each scan back to [0, 1] with its own window, recorded in
the manifest: CT unchanged, MR ``(x - lo) / (hi - lo)`` with ``lo``, ``hi`` the z-scored clip percentiles (the
official code's fixed window per modality, here the scan's clip window; a cube keeps its intensities relative
to the whole scan). Without a recorded window (an older cache) the cube's own minimum and maximum are used.
``intensity: crop`` always min-max scales each cube to [0, 1] (a constant cube becomes 0). Input and target
are both in that [0, 1] space. Fine-tuning later feeds the z-scored MR intensities: an affine, per-scan
change of intensity that the registered CNNs' first convolution and instance normalisation absorb (positive
gain, up to zero padding at the borders).

Training (``paper`` preset, official ``pytorch/config.py`` and ``Genesis_Chest_CT.py``): batch 6, SGD lr 1,
momentum 0.9, no weight decay, the learning rate halved every 40 epochs (``StepLR(step_size=0.8 * patience)``,
patience 50), early stopping on the validation loss. Our step schedule halves every ``lr_step_every`` steps;
the official epoch is (cubes // 6) iterations, at most 445 LUNA16 scans x 32 cubes / 6 = 2,373, so 40 epochs
are ~95,000 steps. The official run length depends on its early stopping (at least 50 epochs, ~119k steps):
200,000 steps (~84 of its epochs) is our choice. The official network is its own 3D U-Net (UNet3D, 3
poolings, 32-512 channels, batch normalisation, ~19M parameters); ``unet-large`` (MONAI BasicUNet 32-256,
instance normalisation, 4 poolings) stands in for it. The CPU recipe (defaults) is ours: ``unet``, the
official 64 x 64 x 32 cube, batch 2, AdamW 1e-3 with the one-cycle schedule, 600 steps.

Pretext baselines: trivial = the better (lower MSE) of the identity (the corrupted input returned unchanged)
and the mean intensity of the samples at every voxel, i.e. ``min(identity, mean)``; perfect = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import field_validator, model_validator
from torch.utils.data import Dataset

from medpretrain.blocks.optim import check_one_schedule, make_optimizer, scheduled_optimization
from medpretrain.config import TrainingConfig
from medpretrain.data.crops import PoolDataset, read_crop
from medpretrain.data.sampling import choose_patch_start
from medpretrain.engine.module import float32_loss, log_loss_parts
from medpretrain.methods import PretrainMethod, register_method
from medpretrain.models import build_model

Int3 = tuple[int, int, int]

# Constants of the official code (pytorch/utils.py), not configuration.
BEZIER_SAMPLES = 100_000  # points of the sampled Bezier curve
LUT_SIZE = 65_537  # ours: the curve's lookup table (see apply_curve)
MAX_FLIPS = 3  # flip attempts per cube
INPAINT_BOXES = 5  # at most, each while a draw < BOX_CONTINUE
OUTPAINT_BOXES = 5  # 1 always + at most 4 more while a draw < BOX_CONTINUE
BOX_CONTINUE = 0.95
BOX_MARGIN = 3  # voxels between a painting box and the cube's border
SHUFFLE_BLOCK_DIVISOR = 10  # shuffled block side at most side // 10

# Sample streams (the third word of ``sample_rng``): the cube, then its corruption, so that changing a
# transformation's settings leaves the cubes as they are.
_CROP, _CORRUPT = 0, 1


class ModelsGenesisConfig(TrainingConfig):
    """Models Genesis pretraining. Shared training settings as in ``TrainingConfig``; the defaults are the CPU
    preset (``unet``, 64 x 64 x 32 cubes as the original, batch 2, AdamW one-cycle, 600 steps); ``--preset
    paper`` gives the official recipe (see the module's documentation).

    Args:
        in_channels: image channels of the pool; the pretraining network outputs as many (restoration).
        intensity: how a cube is mapped to [0, 1] before the transformations: ``volume`` (the scan's
            normalisation window from the manifest) or ``crop`` (the cube's own minimum and maximum).
        flip_rate: probability of each of up to 3 flips of input and target (official 0.4).
        flip_axes: ``official`` (the axis among channel, X, Y; the channel pick flips nothing) or ``xyz``.
        local_rate: probability of local pixel shuffling (official 0.5).
        shuffle_blocks: shuffled blocks per cube (official 10,000).
        nonlinear_rate: probability of the Bezier intensity transformation (official 0.9).
        paint_rate: probability of in- or out-painting (official 0.9).
        inpaint_rate: share of the painted cubes that are in-painted, the others out-painted (official 0.2).
        output: ``sigmoid`` (the official network's output activation) or ``linear`` (the raw output).
        optimizer: ``adamw`` (CPU recipe), ``adam`` or ``sgd`` (official, with ``sgd_momentum``).
        sgd_momentum: SGD momentum (official 0.9).
        schedule: ``one-cycle`` (the ``lr_schedule`` of ``TrainingConfig``: warm-up then cosine decay, or warm-up
            then constant with ``lr_schedule: warmup-constant``) or ``step`` (official: the learning rate times
            ``lr_step_factor`` every ``lr_step_every`` steps; not combined with ``warmup-constant``).
        lr_step_every, lr_step_factor: the step schedule (official: halved every 40 epochs, ~95k steps).
    """

    model: str = "unet"
    steps: int = 600
    patch: Int3 = (64, 64, 32)
    batch: int = 2
    lr: float = 1e-3
    in_channels: int = 1
    intensity: Literal["volume", "crop"] = "volume"
    flip_rate: float = 0.4
    flip_axes: Literal["official", "xyz"] = "official"
    local_rate: float = 0.5
    shuffle_blocks: int = 10_000
    nonlinear_rate: float = 0.9
    paint_rate: float = 0.9
    inpaint_rate: float = 0.2
    output: Literal["sigmoid", "linear"] = "sigmoid"
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    sgd_momentum: float = 0.9
    schedule: Literal["one-cycle", "step"] = "one-cycle"
    lr_step_every: int = 95_000
    lr_step_factor: float = 0.5

    @field_validator("flip_rate", "local_rate", "nonlinear_rate", "paint_rate", "inpaint_rate")
    @classmethod
    def _probability(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be a probability within [0, 1] (official: flip_rate 0.4, local_rate 0.5, "
                             "nonlinear_rate 0.9, paint_rate 0.9, inpaint_rate 0.2)")
        return v

    @field_validator("in_channels", "lr_step_every")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("shuffle_blocks")
    @classmethod
    def _blocks(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0 (official 10000; set local_rate: 0 to switch shuffling off)")
        return v

    @field_validator("lr_step_factor")
    @classmethod
    def _factor(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("must be within (0, 1], e.g. 0.5 (official)")
        return v

    @field_validator("sgd_momentum")
    @classmethod
    def _momentum(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be within [0, 1), e.g. 0.9 (official)")
        return v

    @field_validator("patch")
    @classmethod
    def _positive_sides(cls, v: Int3) -> Int3:
        if any(s < 1 for s in v):
            raise ValueError("every side must be >= 1, e.g. (64, 64, 32) (official)")
        return v

    @model_validator(mode="after")
    def _one_schedule(self):
        check_one_schedule(self.schedule, self.lr_schedule)
        return self

    @model_validator(mode="after")
    def _cnn(self):
        from medpretrain.errors import ConfigError
        from medpretrain.models import get_spec, list_models

        try:
            family = get_spec(self.model).family
        except ConfigError:
            return self  # an unknown name: the job names the registered ones
        if family != "cnn":
            cnns = ", ".join(s.name for s in list_models() if s.family == "cnn")
            raise ValueError(f"model '{self.model}' is a {family} network; Models Genesis pretrains a CNN (its "
                             f"models: the cnn family): set model to one of {cnns}")
        return self


# --------------------------------------------------------------------------------------------------
# Transformations: (C, X, Y, Z) float32 cubes in [0, 1]; every random draw comes from the generator passed in.


def cubic_bezier(p1: Sequence[float], p2: Sequence[float], samples: int = BEZIER_SAMPLES
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The cubic Bezier curve from (0, 0) to (1, 1) with control points ``p1``, ``p2`` (each ``(x, y)``),
    sampled at ``samples`` parameter values evenly spaced in [0, 1]: its abscissae and ordinates."""
    t = np.linspace(0.0, 1.0, samples)
    s = 1.0 - t
    w1, w2, w3 = 3.0 * s * s * t, 3.0 * s * t * t, t**3  # the weight of (0, 0) is s**3
    xs = w1 * p1[0] + w2 * p2[0] + w3
    ys = w1 * p1[1] + w2 * p2[1] + w3
    return xs, ys


def apply_curve(x: np.ndarray, p1: Sequence[float], p2: Sequence[float], decreasing: bool,
                samples: int = BEZIER_SAMPLES) -> np.ndarray:
    """Map every voxel of ``x`` through the Bezier curve of ``p1``, ``p2`` (linear interpolation between its
    samples); ``decreasing`` pairs each abscissa with the ordinate of the mirrored parameter, which makes the
    curve run from (0, 1) to (1, 0). Values outside [0, 1] take the curve's end values.

    Ours, for speed: the sampled curve is first read at ``LUT_SIZE`` evenly spaced abscissae, and voxels are
    interpolated in that table by index arithmetic (float32): ~6x faster than ``np.interp`` into the 100,000
    samples for every voxel of a 64 x 64 x 32 cube, and within 1e-3 of it (the largest differences sit where
    the curve is nearly vertical; measured over 200 random curves)."""
    xs, ys = cubic_bezier(p1, p2, samples)
    if decreasing:
        ys = ys[::-1]
    table = np.interp(np.linspace(0.0, 1.0, LUT_SIZE), xs, ys).astype(np.float32)
    pos = np.clip(x, 0.0, 1.0, dtype=np.float32) * np.float32(LUT_SIZE - 1)
    lo = np.minimum(pos.astype(np.int32), LUT_SIZE - 2)
    pos -= lo  # the fraction within the table cell
    out = table[lo]
    out += (table[lo + 1] - out) * pos
    return out


def nonlinear_transform(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """The non-linear intensity transformation with random control points (increasing or decreasing, 1/2 each).

    Returns:
        The transformed cube and ``{"p1", "p2", "decreasing"}``.
    """
    p1, p2 = rng.random(2), rng.random(2)
    decreasing = bool(rng.random() < 0.5)
    info = {"p1": tuple(float(v) for v in p1), "p2": tuple(float(v) for v in p2), "decreasing": decreasing}
    return apply_curve(x, p1, p2, decreasing), info


def local_pixel_shuffle(x: np.ndarray, rng: np.random.Generator, n_blocks: int = 10_000
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local pixel shuffling: ``n_blocks`` blocks, each the permuted voxels of ``x`` it covers, written in
    drawing order (a later block overwrites an earlier one). Vectorised: the blocks' voxels are listed once, a
    random key per voxel sorted within its block gives each block's permutation, and where blocks overlap the
    last writer is kept.

    Returns:
        The shuffled cube, block starts ``(n, 3)`` and block sizes ``(n, 3)`` in drawing order.
    """
    channels, *dims = x.shape
    dims_a = np.asarray(dims)
    hi = np.maximum(1, dims_a // SHUFFLE_BLOCK_DIVISOR)
    sizes = rng.integers(1, hi + 1, size=(n_blocks, 3))
    starts = rng.integers(0, dims_a - sizes + 1)
    out = x.copy()
    if n_blocks == 0:
        return out, starts, sizes
    vols = np.prod(sizes, axis=1)
    total = int(vols.sum())
    block = np.repeat(np.arange(n_blocks), vols)
    local = np.arange(total) - np.repeat(np.cumsum(vols) - vols, vols)
    sy, sz = sizes[block, 1], sizes[block, 2]
    gx = starts[block, 0] + local // (sy * sz)
    gy = starts[block, 1] + (local // sz) % sy
    gz = starts[block, 2] + local % sz
    flat = (gx * dims[1] + gy) * dims[2] + gz
    # Position j of block b receives the voxel at flat[order[j]]: sorting by (block, random key) permutes each
    # block's positions among themselves (one integer key: block in the high bits).
    order = np.argsort((block << 32) | rng.integers(0, 2**32, size=total), kind="stable")
    source = flat[order]
    # Where blocks overlap the last one drawn wins: keep position j only if it is the last write to its voxel.
    writer = np.full(int(np.prod(dims)), -1, np.int64)
    np.maximum.at(writer, flat, np.arange(total))
    last = np.flatnonzero(writer[flat] == np.arange(total))
    src, dst = x.reshape(channels, -1), out.reshape(channels, -1)
    dst[:, flat[last]] = src[:, source[last]]
    return out, starts, sizes


def _box(dims: Sequence[int], lo_side: Sequence[int], hi_side: Sequence[int], rng: np.random.Generator
         ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A box with side uniform in ``lo_side..hi_side`` per axis (at least 1, at most the side) at a uniform
    position ``BOX_MARGIN`` voxels or more from the border (less where the side leaves no room)."""
    start, size = [], []
    for d, lo, hi in zip(dims, lo_side, hi_side):
        lo = min(max(1, int(lo)), d)
        hi = min(max(lo, int(hi)), d)
        n = int(rng.integers(lo, hi + 1))
        margin = min(BOX_MARGIN, (d - n) // 2)
        start.append(int(rng.integers(margin, d - n - margin + 1)))
        size.append(n)
    return tuple(start), tuple(size)


def _region(start: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    return (slice(None), *(slice(a, a + n) for a, n in zip(start, size)))


def in_paint(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[tuple, tuple]]]:
    """In-painting: up to ``INPAINT_BOXES`` boxes (each while a draw < 0.95) of side ``side // 6 .. side // 3``
    filled with uniform noise in [0, 1) (shared by the channels).

    Returns:
        The painted cube and the boxes ``(start, size)`` in drawing order.
    """
    dims = x.shape[1:]
    out = x.copy()
    boxes = []
    for _ in range(INPAINT_BOXES):
        if rng.random() >= BOX_CONTINUE:
            break
        start, size = _box(dims, [d // 6 for d in dims], [d // 3 for d in dims], rng)
        out[_region(start, size)] = rng.random(size, dtype=np.float32)
        boxes.append((start, size))
    return out, boxes


def out_paint(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[tuple, tuple]]]:
    """Out-painting: uniform noise in [0, 1) everywhere except 1 to ``OUTPAINT_BOXES`` boxes (the first always,
    the others while a draw < 0.95) of side ``side - (3 * side // 7 .. 4 * side // 7)`` that keep ``x``.

    Returns:
        The painted cube and the boxes ``(start, size)`` in drawing order.
    """
    dims = x.shape[1:]
    out = rng.random(x.shape, dtype=np.float32)
    boxes = []
    for k in range(OUTPAINT_BOXES):
        if k and rng.random() >= BOX_CONTINUE:
            break
        start, size = _box(dims, [d - 4 * d // 7 for d in dims], [d - 3 * d // 7 for d in dims], rng)
        region = _region(start, size)
        out[region] = x[region]
        boxes.append((start, size))
    return out, boxes


def random_flips(rng: np.random.Generator, flip_rate: float, axes: str = "official") -> list[int | None]:
    """The flips of one cube: up to ``MAX_FLIPS``, each while a draw < ``flip_rate``; each a spatial axis
    (0 = X, 1 = Y, 2 = Z) or None (the official code's channel-axis pick, which flips nothing here)."""
    flips: list[int | None] = []
    for _ in range(MAX_FLIPS):
        if rng.random() >= flip_rate:
            break
        pick = int(rng.integers(3))
        flips.append(pick if axes == "xyz" else (None if pick == 0 else pick - 1))
    return flips


def apply_flips(x: np.ndarray, flips: Sequence[int | None]) -> np.ndarray:
    """``x`` (C, X, Y, Z) flipped along each spatial axis of ``flips`` in turn (None: no flip)."""
    for axis in flips:
        if axis is not None:
            x = np.flip(x, axis + 1)
    return np.ascontiguousarray(x)


# --------------------------------------------------------------------------------------------------
# Dataset


def intensity_window(entry: dict, channels: int) -> list[tuple[float, float]] | None:
    """Per channel, the prepared intensities that map to 0 and 1 (``intensity: volume``): CT ``(0, 1)`` (the
    window is already scaled to it), MR the z-scored clip percentiles; None when the manifest does not tell."""
    norm = (entry.get("stats") or {}).get("normalisation") or {}
    if norm.get("modality") == "CT":
        return [(0.0, 1.0)] * channels
    if norm.get("modality") == "MR" and len(norm.get("clip", [])) == channels:
        window = [((lo - m) / s, (hi - m) / s) for (lo, hi), m, s in zip(norm["clip"], norm["mean"], norm["std"])]
        if all(b > a for a, b in window):
            return [(float(a), float(b)) for a, b in window]
    return None


def to_unit_range(x: np.ndarray, window: Sequence[tuple[float, float]] | None) -> np.ndarray:
    """``x`` (C, X, Y, Z) scaled to [0, 1] per channel: by ``window`` (then clipped) or, with None, by the
    channel's own minimum and maximum (a constant channel becomes 0). In place; returns ``x``."""
    for c in range(x.shape[0]):
        ch = x[c]
        lo, hi = window[c] if window is not None else (float(ch.min()), float(ch.max()))
        if hi > lo:
            ch -= np.float32(lo)
            ch /= np.float32(hi - lo)
            np.clip(ch, 0.0, 1.0, out=ch)
        else:
            ch[...] = 0.0
    return x


@dataclass
class GenesisSample:
    """One training pair with everything that made it (for tests and inspection).

    Attributes:
        image: the corrupted cube (network input), float32 ``(C, X, Y, Z)`` in [0, 1].
        target: the cube after flips, before corruption (what the network restores).
        case, start: the scan and the cube's start in its prepared volume (negative: padded).
        flips: the flips applied to both (see :func:`random_flips`).
        shuffle: None, or ``(starts, sizes)`` of the shuffled blocks.
        curve: None, or the Bezier transformation's ``{"p1", "p2", "decreasing"}``.
        paint: None, ``"in"`` or ``"out"``.
        boxes: the painting boxes ``(start, size)`` in drawing order.
        stages: the cube after each step that ran (``"shuffle"``, ``"curve"``, ``"paint"``), for tests.
    """

    image: np.ndarray
    target: np.ndarray
    case: str
    start: tuple[int, ...]
    flips: list[int | None]
    shuffle: tuple[np.ndarray, np.ndarray] | None = None
    curve: dict[str, Any] | None = None
    paint: str | None = None
    boxes: list[tuple[tuple, tuple]] = field(default_factory=list)
    stages: dict[str, np.ndarray] = field(default_factory=dict)


class ModelsGenesisDataset(PoolDataset, Dataset):
    """Corrupted/original cube pairs from a prepared pool: sample ``i`` is a pure function of ``(seed, i)`` and
    the data.

    Args:
        data: a prepared cache (``prepare --pool``; a labelled cache contributes its train split only).
        cfg: the method's configuration.
        length: nominal length (the sampler decides which indices are read).

    Raises:
        CacheError: no case to read.
        ConfigError: the pool's channel count is not ``cfg.in_channels``.
    """

    def __init__(self, data, cfg: ModelsGenesisConfig, length: int = 2**62):
        super().__init__(data, cfg, length)
        self._window = {c: intensity_window(data.case(c), cfg.in_channels) if cfg.intensity == "volume" else None
                        for c in self.case_ids}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.synthesize(index)
        return {"image": torch.from_numpy(s.image), "target": torch.from_numpy(s.target)}

    def cube(self, index: int) -> tuple[str, tuple[int, ...], np.ndarray]:
        """The scan, start and [0, 1] cube of sample ``index`` (before flips)."""
        rng = METHOD.sample_rng(self.cfg.seed, index, _CROP)
        cid = self.case_ids[int(rng.integers(len(self.case_ids)))]
        start = tuple(choose_patch_start(self._shape[cid], self.patch, rng, None))
        crop = read_crop(self.data.image(cid), start, self.patch, self._fill[cid])
        return cid, start, to_unit_range(crop, self._window[cid])

    def synthesize(self, index: int, keep_stages: bool = False) -> GenesisSample:
        """Sample ``index`` with its ingredients (see :class:`GenesisSample`); ``keep_stages`` also keeps the
        cube after each step."""
        cfg = self.cfg
        cid, start, cube = self.cube(index)
        rng = METHOD.sample_rng(cfg.seed, index, _CORRUPT)
        flips = random_flips(rng, cfg.flip_rate, cfg.flip_axes)
        target = apply_flips(cube, flips)
        sample = GenesisSample(image=target, target=target, case=cid, start=start, flips=flips)
        x = target
        if rng.random() < cfg.local_rate:
            x, starts, sizes = local_pixel_shuffle(x, rng, cfg.shuffle_blocks)
            sample.shuffle = (starts, sizes)
            if keep_stages:
                sample.stages["shuffle"] = x
        if rng.random() < cfg.nonlinear_rate:
            x, sample.curve = nonlinear_transform(x, rng)
            if keep_stages:
                sample.stages["curve"] = x
        if rng.random() < cfg.paint_rate:
            if rng.random() < cfg.inpaint_rate:
                x, sample.boxes = in_paint(x, rng)
                sample.paint = "in"
            else:
                x, sample.boxes = out_paint(x, rng)
                sample.paint = "out"
            if keep_stages:
                sample.stages["paint"] = x
        # A copy when nothing corrupted the cube: input and target never share memory.
        sample.image = x if x is not target else target.copy()
        return sample


# --------------------------------------------------------------------------------------------------
# Training


def step_factor(step: int, every: int, factor: float) -> float:
    """Learning-rate multiplier of the step schedule: ``factor ** (step // every)``."""
    return factor ** (step // every)


def restoration_loss(output: torch.Tensor, target: torch.Tensor, activation: str = "sigmoid") -> torch.Tensor:
    """Mean squared error over every voxel between ``activation(output)`` and ``target``, in float32."""
    with float32_loss(output.device):
        pred = output.float()
        if activation == "sigmoid":
            pred = torch.sigmoid(pred)
        return F.mse_loss(pred, target.float())


def _full_resolution(out, x: torch.Tensor) -> torch.Tensor:
    # Networks with deep supervision return outputs per scale (a tuple, or stacked on dim 1) in training: the
    # restoration is learnt on the full-resolution output only.
    if isinstance(out, (tuple, list)):
        return out[0]
    return out[:, 0] if out.dim() == x.dim() + 1 else out


class ModelsGenesisModule(pl.LightningModule):
    """The registered network restoring corrupted cubes (``model``: what goes downstream, all of it).

    Args:
        cfg: the method's configuration.
    """

    def __init__(self, cfg: ModelsGenesisConfig):
        super().__init__()
        self.cfg = cfg
        self.model = build_model(cfg.model, cfg.in_channels, cfg.in_channels, cfg.patch, **cfg.model_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The restored cube (after the output activation)."""
        out = _full_resolution(self.model(x), x)
        return torch.sigmoid(out) if self.cfg.output == "sigmoid" else out

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["image"]
        out = _full_resolution(self.model(x), x)
        return {"loss": restoration_loss(out, batch["target"], self.cfg.output)}

    def training_step(self, batch, batch_idx):
        loss = log_loss_parts(self, self.losses(batch), batch["image"].shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        return loss

    def exported_state_dict(self) -> dict[str, torch.Tensor]:
        """What ``model.pt`` holds: the whole registered network (encoder, decoder, restoration head)."""
        return self.model.state_dict()

    def configure_optimizers(self):
        cfg = self.cfg
        opt = make_optimizer(self.model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay,
                             sgd_momentum=cfg.sgd_momentum)
        if cfg.schedule == "step":
            every, factor = cfg.lr_step_every, cfg.lr_step_factor
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step_factor(step, every, factor))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return scheduled_optimization(opt, cfg)  # one-cycle, or warm-up then constant (lr_schedule)


def _model_meta(cfg: ModelsGenesisConfig) -> dict:
    return {"in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
            "output": f"restored intensities in [0, 1] ({cfg.output} output, intensity: {cfg.intensity}); "
                      "replace the head for segmentation (--init-part all loads encoder and decoder)"}


@torch.no_grad()
def _pretext_baselines(cfg: ModelsGenesisConfig, dataset, samples: int):
    """Trivial: ``min(identity, mean)``, the better of returning the corrupted input unchanged and predicting
    the samples' mean intensity at every voxel, both scored with the training loss (MSE against the target);
    perfect: 0."""
    from medpretrain.blocks.pretext import PretextBaseline, baseline_samples

    items = baseline_samples(dataset, samples)
    image = torch.stack([s["image"] for s in items]).float()
    target = torch.stack([s["target"] for s in items]).float()
    identity = float(F.mse_loss(image, target))
    mean = float(F.mse_loss(target.mean().expand_as(target), target))
    which = "identity (the corrupted input unchanged)" if identity <= mean else "the mean intensity at every voxel"
    return [PretextBaseline("loss", min(identity, mean), 0.0,
                            f"min(identity {identity:.5f}, mean {mean:.5f}): {which}", len(items))]


METHOD = register_method(PretrainMethod(
    name="models-genesis",
    description="Models Genesis: restore cubes after flips, local pixel shuffling, Bezier intensity maps and "
                "in/out-painting (MSE; whole CNN goes downstream, unlabelled pool)",
    config_cls=ModelsGenesisConfig,
    needs_data=True,
    build_dataset=lambda cfg, data: ModelsGenesisDataset(data, cfg),
    build_module=lambda cfg: ModelsGenesisModule(cfg),
    model_meta=_model_meta,
    pretext_baselines=_pretext_baselines,
    models=("cnn",),
    presets={
        # Ours: the official cube, a small U-Net and the project's AdamW one-cycle recipe.
        "cpu": {},
        # Seconds on a CPU: the method contract test and the GPU check's dry run.
        "smoke": {"model": "unet", "patch": (32, 32, 32), "model_options": {"features": (4, 4, 8, 8, 16, 4)},
                  "steps": 2, "batch": 1, "num_workers": 0, "checkpoint_every": 1, "precision": "32-true"},
        # Official (pytorch/config.py, Genesis_Chest_CT.py): 64 x 64 x 32 cubes, batch 6, SGD lr 1 momentum 0.9
        # weight decay 0, lr halved every 40 epochs (~95k steps at <= 2,373 iterations per epoch), the
        # transformation rates of ModelsGenesisConfig's defaults. Ours: unet-large stands in for the official
        # UNet3D; 200k steps (the official run stops early, after at least 50 epochs); 8 loader workers (a cube's
        # 10,000 shuffled blocks and Bezier map cost CPU time; the official code used 10); checkpoints every 1000.
        "paper": {"model": "unet-large", "patch": (64, 64, 32), "batch": 6, "optimizer": "sgd", "lr": 1.0,
                  "sgd_momentum": 0.9, "weight_decay": 0.0, "schedule": "step", "lr_step_every": 95_000,
                  "lr_step_factor": 0.5, "steps": 200_000, "checkpoint_every": 1000, "num_workers": 8},
    },
))
