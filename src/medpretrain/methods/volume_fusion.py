"""Volume Fusion (VF) self-supervised pretraining (MIS-FM, ``../shared/papers/mis-fm.md``, Sec. 3.1, Alg. 1).

Pretext task: a background sub-volume ``I_b`` and a foreground sub-volume ``I_f`` are fused voxel by voxel,
``X = alpha * I_f + (1 - alpha) * I_b``, with a fusion coefficient map ``alpha`` whose values come from
``{0, 1/K, ..., 1}``; the network segments ``X`` into the K + 1 classes ``Y = K * alpha``. The loss is
``(Dice + CE) / 2`` over all classes, background included. Encoder and decoder both learn the task, so
fine-tuning reuses both and replaces only the output layer(s) (``finetune --init RUN/model.pt --init-part
all``).

Variants (``variant``):

* ``paper`` (default): ``I_b`` and ``I_f`` are uniform random crops of two *different* scans of the pool.
  ``alpha`` starts at 0; ``M ~ U{m0..m1}`` boxes (default 10..40) are placed one after another, each at a
  uniform random centre voxel with uniform random side lengths, clipped to the sub-volume, and filled with a
  value drawn from ``{1/K, ..., 1}``; later boxes overwrite earlier ones.
* ``grid`` (the authors' later public code): both crops come from the *same* scan, each an independent
  random resized crop (a region ``scale ~ U(0.7, 1.5)`` times the sub-volume per axis, resampled linearly
  to it), randomly flipped along each axis, with a random percentile window (low ``U(0.1, 2)``, high
  ``U(98, 99.9)``) rescaled to [0, 1] and a random gamma ``U(0.7, 1.5)``; a quarter of the pairs are both
  inverted (``1 - x``). ``alpha`` is a grid of equal blocks (side ``U{8..32}`` per axis, one draw per
  sample) at a random offset; 70% of the blocks (rounded) get a value from ``{1/K, ..., 1}``, the others
  and the voxels outside the grid 0.

Axes: prepared volumes and patches are ``(X, Y, Z)`` (RAS array order); the paper's ``D x H x W`` sub-volume
is ``(W, H, D)`` here, so its 64 x 128 x 128 is ``patch = (128, 128, 64)`` with the depth (slice) axis last.
Box and block side ranges are given for that reference sub-volume (paper: depth 8..40, height and width
8..80) and scale per axis with ``patch / reference`` for other patch sizes.

Determinism: sample ``i`` is a pure function of ``(seed, i)`` and the prepared data (its draws come from
``numpy.random.default_rng([tag, seed, i])``), like ``PatchDataset``: DataLoader workers and DDP ranks that
read the same index get the same sample, and a resumed run sees the same data. Crops are read from the
memory-mapped ``.npy`` files without loading whole volumes; a volume smaller than the crop is padded with
its background intensity (the normalised lower clip value: 0 for CT, the 0.5 percentile for MR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch
from monai.losses import DiceCELoss
from pydantic import field_validator, model_validator
from torch.utils.data import Dataset

from medpretrain.config import TrainingConfig
from medpretrain.data.crops import PoolDataset, read_crop, resize_linear
from medpretrain.data.sampling import choose_patch_start
from medpretrain.blocks.optim import check_one_schedule, make_optimizer, scheduled_optimization
from medpretrain.engine.module import SegmentationModule
from medpretrain.errors import CacheError
from medpretrain.methods import PretrainMethod, register_method

# First word of every sample's seed sequence: keeps VF draws independent of other datasets' (seed, i) streams.
_TAG = 0x5646  # "VF"

Int3 = tuple[int, int, int]


class VolumeFusionConfig(TrainingConfig):
    """Volume Fusion pretraining. Shared training settings as in ``TrainingConfig``; the defaults are the CPU
    preset (BasicUNet, 64 x 64 x 48 patches, batch 2, 600 steps, AdamW one-cycle); ``--preset paper`` gives
    the paper's (PCT-Net with deep supervision, 128 x 128 x 64 = D x H x W 64 x 128 x 128, batch 4, Adam 1e-3,
    weight decay 1e-5, lr halved every 20k of 100k steps).

    Args:
        variant: ``paper`` (boxes, two different scans) or ``grid`` (blocks, two augmented crops of one scan).
        k: K, the number of non-zero fusion coefficients; the network predicts K + 1 classes.
        in_channels: image channels of the pool (``prepare --pool`` keeps the most common channel count).
        boxes: ``(m0, m1)``, the box count M is uniform in ``m0..m1`` (paper variant).
        box_min, box_max: box side ranges (X, Y, Z) for a ``reference`` patch (paper variant).
        reference: the patch the box and block ranges are given for; ranges scale with ``patch / reference``.
        grid_block_min, grid_block_max: block side ranges (X, Y, Z) for a ``reference`` patch (grid variant).
        grid_foreground: share of grid blocks that get a non-zero coefficient.
        grid_scale: range of the random resized crop's scale per axis (grid variant).
        grid_intensity: random percentile window, gamma and inversion of the two crops (grid variant).
        optimizer: ``adamw`` (the project's recipe) or ``adam`` (the paper's; ``weight_decay`` is then an L2
            term added to the gradient, as in ``torch.optim.Adam``).
        schedule: ``one-cycle`` (the ``lr_schedule`` of ``TrainingConfig``: warm-up then cosine decay, or warm-up
            then constant with ``lr_schedule: warmup-constant``) or ``step`` (the paper's: the learning rate is
            multiplied by ``lr_step_factor`` every ``lr_step_every`` steps; not combined with ``warmup-constant``).
        lr_step_every, lr_step_factor: the step schedule.
        target: ``real`` (the task) or ``shuffled``, a control: the network is trained to output the fusion
            map of another, independent draw, so the target carries no information about the image. If
            fine-tuning from shuffled VF hurts as much as from real VF, the harm comes from any short
            uninformative pretraining, not from what VF teaches.
    """

    model: str = "unet"
    steps: int = 600
    patch: Int3 = (64, 64, 48)
    batch: int = 2
    lr: float = 1e-3
    variant: Literal["paper", "grid"] = "paper"
    k: int = 4
    in_channels: int = 1
    boxes: tuple[int, int] = (10, 40)
    box_min: Int3 = (8, 8, 8)
    box_max: Int3 = (80, 80, 40)
    reference: Int3 = (128, 128, 64)
    grid_block_min: Int3 = (8, 8, 8)
    grid_block_max: Int3 = (32, 32, 32)
    grid_foreground: float = 0.7
    grid_scale: tuple[float, float] = (0.7, 1.5)
    grid_intensity: bool = True
    optimizer: Literal["adamw", "adam"] = "adamw"
    schedule: Literal["one-cycle", "step"] = "one-cycle"
    lr_step_every: int = 20000
    lr_step_factor: float = 0.5
    target: Literal["real", "shuffled"] = "real"

    @field_validator("k")
    @classmethod
    def _k_range(cls, v: int) -> int:
        if not 1 <= v <= 255:
            raise ValueError("must be within 1..255 (labels are stored as uint8)")
        return v

    @field_validator("in_channels", "lr_step_every")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("box_min", "box_max", "reference", "grid_block_min", "grid_block_max", "patch")
    @classmethod
    def _positive_sides(cls, v: Int3) -> Int3:
        if any(s < 1 for s in v):
            raise ValueError("every side must be >= 1")
        return v

    @field_validator("grid_foreground")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be within [0, 1]")
        return v

    @field_validator("lr_step_factor")
    @classmethod
    def _factor(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("must be within (0, 1]")
        return v

    @model_validator(mode="after")
    def _ranges(self):
        check_one_schedule(self.schedule, self.lr_schedule)
        m0, m1 = self.boxes
        if not 0 <= m0 <= m1:
            raise ValueError(f"boxes {tuple(self.boxes)} must be (m0, m1) with 0 <= m0 <= m1, e.g. (10, 40)")
        for lo_name, hi_name in (("box_min", "box_max"), ("grid_block_min", "grid_block_max")):
            lo, hi = getattr(self, lo_name), getattr(self, hi_name)
            if any(a > b for a, b in zip(lo, hi)):
                raise ValueError(f"{lo_name} {tuple(lo)} exceeds {hi_name} {tuple(hi)} along some axis")
        lo, hi = self.grid_scale
        if not 0.0 < lo <= hi:
            raise ValueError(f"grid_scale {tuple(self.grid_scale)} must be (low, high) with 0 < low <= high")
        return self

    def box_range(self) -> tuple[Int3, Int3]:
        """Box side ranges (X, Y, Z) for this config's patch (the reference ranges scaled per axis)."""
        return scale_range(self.box_min, self.box_max, self.patch, self.reference)

    def grid_block_range(self) -> tuple[Int3, Int3]:
        """Grid block side ranges (X, Y, Z) for this config's patch."""
        return scale_range(self.grid_block_min, self.grid_block_max, self.patch, self.reference)


def scale_range(lo: Sequence[int], hi: Sequence[int], size: Sequence[int], reference: Sequence[int]
                ) -> tuple[Int3, Int3]:
    """Side ranges given for ``reference`` scaled per axis to ``size`` (rounded, at least 1, at most ``size``).

    Args:
        lo, hi: inclusive side ranges at the reference size.
        size: the sub-volume the ranges are for.
        reference: the sub-volume ``lo`` and ``hi`` were given for.
    """
    out_lo, out_hi = [], []
    for a, b, s, r in zip(lo, hi, size, reference):
        f = s / r
        a2 = min(max(1, int(math.floor(a * f + 0.5))), s)
        b2 = min(max(a2, int(math.floor(b * f + 0.5))), s)
        out_lo.append(a2)
        out_hi.append(b2)
    return tuple(out_lo), tuple(out_hi)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Fusion maps


@dataclass(frozen=True)
class FusionBox:
    """One box of the paper variant's fusion map.

    Attributes:
        size: drawn side lengths (X, Y, Z), before clipping.
        centre: drawn centre voxel.
        start, stop: the box's extent after clipping to the sub-volume (``stop`` exclusive).
        value: its class c (coefficient c / K).
    """

    size: Int3
    centre: Int3
    start: Int3
    stop: Int3
    value: int


@dataclass(frozen=True)
class FusionGrid:
    """The grid variant's fusion map.

    Attributes:
        block: block side lengths (X, Y, Z).
        offset: position of the first block's corner.
        counts: blocks per axis.
        block_labels: ``counts``-shaped class of each block (0 = background).
    """

    block: Int3
    offset: Int3
    counts: Int3
    block_labels: np.ndarray

    @property
    def foreground_blocks(self) -> int:
        return int(np.count_nonzero(self.block_labels))


def box_fusion_map(shape: Sequence[int], rng: np.random.Generator, k: int, count: tuple[int, int],
                   size_min: Sequence[int], size_max: Sequence[int]) -> tuple[np.ndarray, list[FusionBox]]:
    """The paper's fusion class map: boxes placed one after another, later ones overwriting earlier ones.

    Args:
        shape: sub-volume shape (X, Y, Z).
        rng: the sample's generator.
        k: K; box classes are uniform in ``1..K``.
        count: ``(m0, m1)``; the number of boxes is uniform in ``m0..m1``.
        size_min, size_max: inclusive side ranges per axis.

    Returns:
        The ``uint8`` class map (``alpha = label / K``) and the boxes in drawing order.
    """
    shape = tuple(int(s) for s in shape)
    n = int(rng.integers(count[0], count[1] + 1))
    # All draws at once (vectorised); only the slice assignments below loop, over at most m1 boxes.
    sizes = rng.integers(np.asarray(size_min), np.asarray(size_max) + 1, size=(n, 3))
    centres = rng.integers(0, np.asarray(shape), size=(n, 3))
    values = rng.integers(1, k + 1, size=n)
    starts = np.maximum(centres - sizes // 2, 0)
    stops = np.minimum(centres - sizes // 2 + sizes, np.asarray(shape))
    label = np.zeros(shape, np.uint8)
    boxes = []
    for i in range(n):
        a, b = starts[i], stops[i]
        label[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = values[i]
        boxes.append(FusionBox(tuple(int(v) for v in sizes[i]), tuple(int(v) for v in centres[i]),
                               tuple(int(v) for v in a), tuple(int(v) for v in b), int(values[i])))
    return label, boxes


def grid_fusion_map(shape: Sequence[int], rng: np.random.Generator, k: int, block_min: Sequence[int],
                    block_max: Sequence[int], foreground: float) -> tuple[np.ndarray, FusionGrid]:
    """The grid variant's fusion class map: equal blocks at a random offset, a share of them foreground.

    Args:
        shape: sub-volume shape (X, Y, Z).
        rng: the sample's generator.
        k: K; foreground block classes are uniform in ``1..K``.
        block_min, block_max: inclusive block side ranges per axis (capped at the sub-volume).
        foreground: share of blocks that are foreground (rounded to the nearest count).

    Returns:
        The ``uint8`` class map and the grid.
    """
    shape = np.asarray([int(s) for s in shape])
    lo = np.minimum(np.asarray(block_min), shape)
    hi = np.minimum(np.asarray(block_max), shape)
    block = rng.integers(lo, hi + 1)
    counts = shape // block
    offset = rng.integers(0, shape - counts * block + 1)
    n_blocks = int(np.prod(counts))
    n_fg = int(math.floor(n_blocks * foreground + 0.5))
    chosen = rng.permutation(n_blocks)[:n_fg]
    values = rng.integers(1, k + 1, size=n_fg)
    flat = np.zeros(n_blocks, np.uint8)
    flat[chosen] = values
    block_labels = flat.reshape(tuple(counts))
    # One extra zero slab per axis stands for the voxels outside the grid; gathering block indices one axis at a
    # time keeps the intermediate arrays small until the last axis.
    label = np.zeros(tuple(counts + 1), np.uint8)
    label[:counts[0], :counts[1], :counts[2]] = block_labels
    for axis in range(3):
        idx = (np.arange(shape[axis]) - offset[axis]) // block[axis]
        idx[(idx < 0) | (idx >= counts[axis])] = counts[axis]
        label = np.take(label, idx, axis)
    grid = FusionGrid(tuple(int(v) for v in block), tuple(int(v) for v in offset), tuple(int(v) for v in counts),
                      block_labels)
    return label, grid


def fusion_alpha(label: np.ndarray, k: int) -> np.ndarray:
    """``alpha = label / K`` in float32 (exactly ``label.astype(float32) / K``)."""
    return (np.arange(k + 1, dtype=np.float32) / np.float32(k))[label]


def fuse(background: np.ndarray, foreground: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``X = alpha * I_f + (1 - alpha) * I_b`` (float32; ``alpha`` broadcasts over leading channel axes)."""
    out = alpha * foreground
    out += (np.float32(1.0) - alpha) * background
    return out


# --------------------------------------------------------------------------------------------------
# Dataset


@dataclass
class FusionSample:
    """One synthesised sample with everything that made it (for tests and inspection).

    Attributes:
        image: fused ``X``, float32 ``(C, X, Y, Z)``.
        label: ``Y``, uint8 ``(X, Y, Z)`` in ``0..K``.
        alpha: the coefficient map ``Y / K``, float32 ``(X, Y, Z)``.
        background, foreground: ``I_b`` and ``I_f`` as fused (after any augmentation).
        background_case, foreground_case: the scans they come from.
        crops: how each was read: ``start`` and ``size`` (the region of the prepared volume, before any
            resize), and for the grid variant the ``flips`` and intensity settings.
        boxes: the paper variant's boxes in drawing order (empty for the grid variant).
        grid: the grid variant's grid (None for the paper variant).
    """

    image: np.ndarray
    label: np.ndarray
    alpha: np.ndarray
    background: np.ndarray
    foreground: np.ndarray
    background_case: str
    foreground_case: str
    crops: dict[str, dict[str, Any]] = field(default_factory=dict)
    boxes: list[FusionBox] = field(default_factory=list)
    grid: FusionGrid | None = None


class VolumeFusionDataset(PoolDataset, Dataset):
    """Volume Fusion samples synthesised on the fly from a prepared pool: sample ``i`` is a pure function of
    ``(seed, i)`` and the data.

    Args:
        data: a prepared cache (``prepare --pool``; a labelled cache contributes its train split only).
        cfg: the method's configuration (variant, K, patch, ranges, seed).
        length: nominal length (the sampler decides which indices are read).

    Raises:
        CacheError: no case to read, or the paper variant with a single scan.
        ConfigError: the pool's channel count is not ``cfg.in_channels``.
    """

    def __init__(self, data, cfg: VolumeFusionConfig, length: int = 2**62):
        super().__init__(data, cfg, length)
        if cfg.variant == "paper" and len(self.case_ids) < 2:
            raise CacheError(
                f"{data.root}: holds {len(self.case_ids)} scan; Volume Fusion (variant 'paper') fuses crops of two "
                "different scans: prepare a pool of at least 2 scans, or set variant: grid (one scan is enough)"
            )
        self.k = cfg.k
        self.box_min, self.box_max = cfg.box_range()
        self.block_min, self.block_max = cfg.grid_block_range()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.synthesize(index)
        return {"image": torch.from_numpy(s.image), "label": torch.from_numpy(s.label.astype(np.int64))[None]}

    def synthesize(self, index: int) -> FusionSample:
        """Sample ``index`` with its ingredients (see :class:`FusionSample`)."""
        rng = np.random.default_rng([_TAG, int(self.cfg.seed), int(index)])
        n = len(self.case_ids)
        if self.cfg.variant == "paper":
            b = int(rng.integers(n))
            f = int(rng.integers(n - 1))
            f += f >= b  # uniform over the other scans
            bg_case, fg_case = self.case_ids[b], self.case_ids[f]
            crops = {}
            arrays = []
            for role, cid in (("background", bg_case), ("foreground", fg_case)):
                start = choose_patch_start(self._shape[cid], self.patch, rng, None)
                arrays.append(read_crop(self.data.image(cid), start, self.patch, self._fill[cid]))
                crops[role] = {"case": cid, "start": tuple(start), "size": self.patch}
            background, foreground = arrays
            label, boxes = box_fusion_map(self.patch, rng, self.k, tuple(self.cfg.boxes), self.box_min, self.box_max)
            grid = None
        else:
            cid = self.case_ids[int(rng.integers(n))]
            bg_case = fg_case = cid
            crops = {}
            arrays = []
            for role in ("foreground", "background"):
                arr, info = self._augmented_crop(cid, rng)
                arrays.append(arr)
                crops[role] = {"case": cid, **info}
            foreground, background = arrays
            invert = bool(rng.random() < 0.25) and self.cfg.grid_intensity
            if invert:
                # Both crops, so that fused intensities stay comparable with either source.
                foreground = np.float32(1.0) - foreground
                background = np.float32(1.0) - background
            crops["inverted"] = {"value": invert}
            label, grid = grid_fusion_map(self.patch, rng, self.k, self.block_min, self.block_max,
                                          self.cfg.grid_foreground)
            boxes = []
        alpha = fusion_alpha(label, self.k)
        image = fuse(background, foreground, alpha)
        if self.cfg.target == "shuffled":
            # The image keeps its own fusion map; the target is the map of an independent draw (its own stream,
            # so the image's draws are exactly those of the real task).
            other = np.random.default_rng([_TAG, int(self.cfg.seed), int(index), 1])
            if self.cfg.variant == "paper":
                label, _ = box_fusion_map(self.patch, other, self.k, tuple(self.cfg.boxes), self.box_min, self.box_max)
            else:
                label, _ = grid_fusion_map(self.patch, other, self.k, self.block_min, self.block_max,
                                           self.cfg.grid_foreground)
        return FusionSample(image=image, label=label, alpha=alpha, background=background, foreground=foreground,
                            background_case=bg_case, foreground_case=fg_case, crops=crops, boxes=boxes, grid=grid)

    def _augmented_crop(self, cid: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        """A random resized crop, flips and (optionally) an intensity change of one scan (grid variant)."""
        lo, hi = self.cfg.grid_scale
        # All of this crop's draws first, whatever the data, so that the stream stays aligned.
        scale = rng.uniform(lo, hi, size=3)
        region = tuple(max(1, int(math.floor(p * s + 0.5))) for p, s in zip(self.patch, scale))
        start = choose_patch_start(self._shape[cid], region, rng, None)
        flips = rng.random(3) < 0.5
        channels = self.cfg.in_channels
        p_lo = rng.uniform(0.1, 2.0, size=channels)
        p_hi = rng.uniform(98.0, 99.9, size=channels)
        gamma = rng.uniform(0.7, 1.5, size=channels)

        crop = read_crop(self.data.image(cid), start, region, self._fill[cid])
        crop = resize_linear(crop, self.patch)
        flip_axes = tuple(int(a) + 1 for a in np.flatnonzero(flips))
        if flip_axes:
            crop = np.ascontiguousarray(np.flip(crop, flip_axes))
        info: dict[str, Any] = {"start": tuple(start), "size": region, "flips": tuple(bool(v) for v in flips)}
        if self.cfg.grid_intensity:
            for c in range(channels):
                ch = crop[c]
                # Percentiles of every 4th voxel per axis: 1/64 of the work, the same window to within noise.
                w_lo, w_hi = np.percentile(ch[::4, ::4, ::4], [p_lo[c], p_hi[c]]).astype(np.float32)
                if w_hi > w_lo:
                    # All in float32, dividing by the same difference: the window's top maps to exactly 1.
                    np.clip(ch, w_lo, w_hi, out=ch)
                    ch -= w_lo
                    ch /= w_hi - w_lo
                    # x ** gamma as exp(gamma * log x): twice as fast as np.power in float32; log 0 = -inf -> 0.
                    with np.errstate(divide="ignore"):
                        np.log(ch, out=ch)
                    ch *= np.float32(gamma[c])
                    np.exp(ch, out=ch)
                else:
                    ch[...] = 0.0  # a constant crop carries no contrast to window
            info.update(percentiles=[[float(a), float(b)] for a, b in zip(p_lo, p_hi)],
                        gamma=[float(g) for g in gamma])
        return crop, info


# --------------------------------------------------------------------------------------------------
# Training


def _loss(cfg: VolumeFusionConfig):
    # Eq. 2: (Dice + CE) / 2, the Dice term over all K + 1 classes including alpha = 0.
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=True, lambda_dice=0.5, lambda_ce=0.5)


class VolumeFusionModule(SegmentationModule):
    """SegmentationModule with the paper's optimiser and schedule available (``optimizer: adam``,
    ``schedule: step``); deep supervision comes from SegmentationModule when the network returns a tuple of
    outputs per scale in training.

    Args:
        cfg: the method's configuration.
    """

    def __init__(self, cfg: VolumeFusionConfig):
        super().__init__(cfg, cfg.in_channels, cfg.k + 1, _loss(cfg))

    def configure_optimizers(self):
        cfg = self.cfg
        opt = make_optimizer(self.model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
        if cfg.schedule == "step":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step_factor(step, cfg))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return scheduled_optimization(opt, cfg)  # one-cycle, or warm-up then constant (lr_schedule)


def step_factor(step: int, cfg: VolumeFusionConfig) -> float:
    """Learning-rate multiplier of the step schedule: ``lr_step_factor ** (step // lr_step_every)``."""
    return cfg.lr_step_factor ** (step // cfg.lr_step_every)


def _build_module(cfg: VolumeFusionConfig):
    return VolumeFusionModule(cfg)


def _build_dataset(cfg: VolumeFusionConfig, data):
    return VolumeFusionDataset(data, cfg)


def class_names(k: int) -> dict[int, str]:
    """Class id -> name of the pretext task: ``background`` (alpha 0) and ``alpha=c/K``."""
    return {0: "background", **{c: f"alpha={c}/{k}" for c in range(1, k + 1)}}


def _model_meta(cfg: VolumeFusionConfig) -> dict:
    return {"in_channels": cfg.in_channels, "out_channels": cfg.k + 1, "labels": class_names(cfg.k),
            "variant": cfg.variant, "target": cfg.target}


def _pretext_baselines(cfg: VolumeFusionConfig, dataset, samples: int):
    from medpretrain.blocks.pretext import baseline_samples, segmentation_baseline

    # Deep supervision (the paper preset) logs a scale-weighted loss; the full-resolution baseline still bounds it.
    return [segmentation_baseline(baseline_samples(dataset, samples), _loss(cfg), cfg.k + 1, batch=cfg.batch)]


register_method(PretrainMethod(
    name="volume-fusion",
    description="Volume Fusion (MIS-FM): segment the fusion coefficients of two fused sub-volumes (unlabelled pool)",
    config_cls=VolumeFusionConfig,
    needs_data=True,
    build_dataset=_build_dataset,
    build_module=_build_module,
    model_meta=_model_meta,
    pretext_baselines=_pretext_baselines,
    sample_tag=_TAG,
    presets={
        "cpu": {},
        # Seconds on a CPU: the method contract test and the GPU check's dry run.
        "smoke": {"model": "unet", "patch": (32, 32, 32), "model_options": {"features": (4, 4, 8, 8, 16, 4)},
                  "steps": 2, "batch": 1, "num_workers": 0, "checkpoint_every": 1, "precision": "32-true"},
        # Sec. 4.2 for PData-1k: D x H x W 64 x 128 x 128 sub-volumes, K = 4, M ~ U(10, 40), batch 4, Adam 1e-3,
        # weight decay 1e-5, 100k iterations with the lr halved every 20k; PCT-Net with deep supervision.
        # Checkpoints every 1000 steps (a data epoch restarts the loader workers) and 4 loader workers for a GPU.
        "paper": {"model": "pctnet", "model_options": {"deep_supervision": True}, "patch": (128, 128, 64),
                  "batch": 4, "lr": 1e-3, "weight_decay": 1e-5, "optimizer": "adam", "schedule": "step",
                  "lr_step_every": 20000, "lr_step_factor": 0.5, "steps": 100000, "checkpoint_every": 1000,
                  "num_workers": 4, "variant": "paper", "k": 4, "boxes": (10, 40)},
    },
))
