"""Self-supervised pretraining of the Swin UNETR encoder with rotation, contrastive and in-painting proxy tasks
(Tang et al., "Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image Analysis", CVPR 2022,
arXiv:2111.14791; reference implementation: MONAI research-contributions, ``SwinUNETR/Pretrain``: ``main.py``,
``models/ssl_head.py``, ``losses/loss.py``, ``utils/ops.py``, ``utils/data_utils.py``).

Views. Every sample is ``crops`` random crops of ``patch`` voxels from one scan of the pool (the reference code's
``RandSpatialCropSamplesd`` with ``num_samples = sw_batch_size``: 2; the CPU default is 1). Each crop gives two
views, each made as the reference code makes them:

* rotation: a rotation by ``k * 90`` degrees, ``k`` uniform in {0, 1, 2, 3}, in one plane, drawn per view
  (``rotation_plane``: spatial axes ``(1, 2)``, i.e. array axes 2 and 3 of ``(C, X, Y, Z)``, the plane the
  reference code rotates; prepared volumes are RAS like its inputs, so it is the same anatomical plane, about
  the left-right axis). The rotated crop is the reconstruction target of that view and ``k`` its rotation label;
* cutout (the reference ``aug_rand``): boxes are placed on the rotated view until their summed volume reaches
  a share drawn uniformly from ``[0, cutout_max_fraction]`` (0.3) of the view; each box starts at a uniform
  voxel and has per axis a side uniform between ``cutout_min_box`` (5%) and ``cutout_max_box`` (25%) of the
  patch side, clipped at the border. First round: the boxes are filled with Gaussian noise min-max scaled to
  the pool's intensity range (the reference scales it to [0, 1], its CT range; ours is [0, 1] for CT, the
  normalised clip range for MR, the crop's range when the pool does not say). Second round, with probability
  ``donor_probability``: new boxes are filled with the same voxels of a *donor* view.

  The reference takes the donor from another crop of the same batch (``x_aug[j]`` for a random batch index
  ``j``; nothing happens when ``j`` is the view's own index, so the second round runs with probability
  ``1 - 1/crops per step``). Here the donor is a crop of a random scan of the pool at a random position,
  rotated by its own random ``k``: the sample then stays a pure function of ``(seed, index)``; the default
  probability (``donor_probability: null``) is the reference's ``1 - 1 / (batch * crops)``.

Views are made in the dataset (numpy, in the loader workers); the training device only runs the network.

Network and heads. The registered Swin UNETR's encoder (``swinViT``) embeds each view; its deepest hidden state
(stride 32, ``dim = 16 * feature_size`` channels, layer-normalised as ``SwinUNETR.forward`` does) feeds:

* a rotation head: ``Linear(dim, 4)``;
* a contrastive head: ``Linear(dim, contrast_dim)`` (reference 512);
* a reconstruction head (``recon_head``): ``vae`` (the reference default: five stages of 3^3 convolution,
  instance normalisation, LeakyReLU and x2 trilinear up-sampling, widths ``dim/2, /4, /8, /16, /16``, then a
  1^3 convolution to the image channels) or ``deconv`` (five x2 transposed convolutions, no activations, as the
  reference's ``deconv`` option): back to the input resolution from the deepest stage only.

``head_input``: the rotation and contrastive heads read the deepest stage's average over its tokens
(``pooled``, our default) or, as the reference code does, its first token (rotation) and second token
(contrastive) (``tokens``; ``--preset paper`` sets it). The registered network's CNN decoder and output layer
are never run: they keep their initial weights, and only ``swinViT`` (and the heads) train.

Losses (``loss = lambda_rot * rot + lambda_contrast * contrast + lambda_recon * recon``, all weights 1 as the
reference ``Loss``):

* ``rot``: cross-entropy of the 4 rotation classes over both views;
* ``contrast``: NT-Xent (SimCLR) between the two views' embeddings: the ``2N`` embeddings of a step's ``N``
  crops are L2-normalised, each one's positive is the other view of its crop and the ``2N - 2`` views of the
  other crops are its negatives, temperature ``temperature`` (reference 0.5), mean over the ``2N`` anchors.
  There is no EMA teacher or memory bank (the reference contrasts the two views of the same batch, with
  gradient through both) and no gathering across DDP processes (neither does the reference): ``N`` is the
  per-process ``batch * crops``, which must be at least 2; with one crop the loss is identically 0 (the only
  other embedding is the positive). The ``smoke`` preset therefore has batch 1 with 2 crops: 4 embeddings,
  each with 1 positive and 2 negatives;
* ``recon``: L1 between each view's reconstruction and its rotated crop without cutout, over every voxel.

Export. ``model.pt`` holds the registered network's state dict (``swinViT.*`` trained, decoder and ``out`` as
initialised, the registered network's key names): fine-tune with ``--init-part encoder``. MONAI's published SSL
encoder (``model_swinvit.pt``) names the same tensors ``module.<swinViT key>`` with the MLP layers as
``mlp.fc1``/``mlp.fc2`` (what ``SwinUNETR.load_from`` reads); :func:`to_monai_ssl_checkpoint` writes our
encoder in that layout. The registered networks are Swin UNETR v2 (``use_v2: true``: a residual convolution
block before each stage, ``swinViT.layers<k>c``), which the reference v1 encoder does not have; set
``model_options: {use_v2: false}`` for the reference's exact encoder.

Recipe (``--preset paper``), from the reference code (``main.py`` defaults): 96^3 crops, feature size 48,
batch 2 scans x 2 crops (``batch_size`` x ``sw_batch_size``), AdamW with lr 4e-4 and weight decay 0.1, warm-up
of 500 of 100,000 steps then cosine decay. Ours where it differs: the one-cycle schedule of ``blocks.optim``
(cosine warm-up from lr/25 and decay to lr/1e4; the reference warms up linearly from 0 and decays to 0) and the
donor of the second cutout round (above). The README's 8-GPU command uses batch 1 per GPU, lr 6e-6 and 100,000
steps; the authors say they trained on 32 GPUs (research-contributions issue #73).

DDP: the registered network's decoder never gets a gradient, so the method is registered with
``unused_parameters=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import lightning.pytorch as pl
from pydantic import model_validator
from torch.utils.data import Dataset

from medpretrain.blocks.optim import make_optimizer, scheduled_optimization
from medpretrain.config import TrainingConfig
from medpretrain.data.crops import PoolDataset, read_crop
from medpretrain.data.sampling import choose_patch_start
from medpretrain.engine.module import log_loss_parts
from medpretrain.errors import ConfigError
from medpretrain.methods import PretrainMethod, register_method
from medpretrain.methods.asa import encode
from medpretrain.models import build_model

NAME = "swinunetr-ssl"
_SAMPLE, _PASS = 0, 1  # second word of the sample streams: one sample / the case order of one pass
ROTATIONS = 4

Int3 = tuple[int, int, int]


class SwinSSLConfig(TrainingConfig):
    """Swin UNETR SSL pretraining (shared training settings as in ``TrainingConfig``). The defaults are the CPU
    recipe: swinunetr-small, 64^3 crops, batch 2 scans x 1 crop (4 views per step: each anchor has 1 positive
    and 2 negatives; the reference's 2 crops per scan double the step time), AdamW lr 4e-4 and weight decay 0.1
    (the reference's), one-cycle over 600 steps; ``--preset paper`` gives the reference code's recipe (see the
    module's documentation).

    Args:
        patch: crop size (X, Y, Z); the two sides of ``rotation_plane`` must be equal.
        in_channels: image channels of the pool (the reconstruction head outputs as many).
        crops: crops per sample, all from one scan (the reference's ``sw_batch_size``: 2, the ``paper`` and
            ``smoke`` presets; 1 on CPU); a step contrasts ``batch * crops`` crops (at least 2).
        rotation_plane: the two spatial axes (0 = X, 1 = Y, 2 = Z) of the 90-degree rotations; ``(1, 2)`` is
            the reference's.
        cutout_max_fraction: the share of a view covered by boxes per cutout round is uniform in
            ``[0, cutout_max_fraction]`` (reference 0.3).
        cutout_min_box, cutout_max_box: box side range per axis, as shares of the patch side (reference 0.05
            and 0.25).
        donor_probability: probability of the second cutout round (boxes copied from a donor crop); None = the
            reference's ``1 - 1 / (batch * crops)``.
        head_input: rotation and contrastive heads read the deepest stage's token average (``pooled``) or its
            first and second tokens (``tokens``, the reference code).
        contrast_dim: output width of the contrastive head (reference 512).
        temperature: NT-Xent temperature (reference 0.5).
        recon_head: ``vae`` (reference default) or ``deconv`` up-sampling from the deepest stage.
        lambda_rot, lambda_contrast, lambda_recon: loss weights (reference 1, 1, 1); a term with weight 0 is
            neither computed nor logged.
    """

    model: str = "swinunetr-small"
    steps: int = 600
    patch: Int3 = (64, 64, 64)
    batch: int = 2
    lr: float = 4e-4
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    in_channels: int = 1
    crops: int = 1
    rotation_plane: tuple[int, int] = (1, 2)
    cutout_max_fraction: float = 0.3
    cutout_min_box: float = 0.05
    cutout_max_box: float = 0.25
    donor_probability: float | None = None
    head_input: Literal["pooled", "tokens"] = "pooled"
    contrast_dim: int = 512
    temperature: float = 0.5
    recon_head: Literal["vae", "deconv"] = "vae"
    lambda_rot: float = 1.0
    lambda_contrast: float = 1.0
    lambda_recon: float = 1.0

    @model_validator(mode="after")
    def _check(self):
        if min(self.in_channels, self.crops, self.contrast_dim) < 1:
            raise ValueError(f"in_channels {self.in_channels}, crops {self.crops} and contrast_dim "
                             f"{self.contrast_dim} must be >= 1")
        a, b = (int(v) for v in self.rotation_plane)
        if a == b or not {a, b} <= {0, 1, 2}:
            raise ValueError(f"rotation_plane {tuple(self.rotation_plane)} must be two different spatial axes "
                             "among 0 (X), 1 (Y), 2 (Z), e.g. (1, 2) (the reference's)")
        if self.patch[a] != self.patch[b]:
            s = max(self.patch[a], self.patch[b])
            raise ValueError(f"patch {tuple(self.patch)}: a 90-degree rotation in the plane of axes {a} and {b} "
                             f"needs equal sides there; set both to {s} (or change rotation_plane)")
        if not 0.0 < self.cutout_max_fraction <= 1.0:
            raise ValueError(f"cutout_max_fraction {self.cutout_max_fraction} must be within (0, 1], e.g. 0.3")
        if not 0.0 <= self.cutout_min_box < self.cutout_max_box <= 1.0:
            raise ValueError(f"cutout_min_box {self.cutout_min_box} and cutout_max_box {self.cutout_max_box} "
                             "must satisfy 0 <= min < max <= 1, e.g. 0.05 and 0.25")
        if self.donor_probability is not None and not 0.0 <= self.donor_probability <= 1.0:
            raise ValueError(f"donor_probability {self.donor_probability} must be within [0, 1] (or null for "
                             "the reference's 1 - 1/(batch * crops))")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature {self.temperature} must be > 0, e.g. 0.5")
        weights = (self.lambda_rot, self.lambda_contrast, self.lambda_recon)
        if any(w < 0 for w in weights) or not any(weights):
            raise ValueError(f"loss weights (lambda_rot, lambda_contrast, lambda_recon) {weights} must be >= 0 "
                             "and not all 0")
        if self.lambda_contrast and self.batch * self.crops < 2:
            raise ValueError(f"batch {self.batch} x crops {self.crops} = 1 crop per step: NT-Xent needs at least "
                             "two crops (with one, its only other embedding is the positive and the loss is 0); "
                             "set crops: 2 or batch: 2")
        if self.head_input == "tokens" and math.prod(p // 32 for p in self.patch) < 2:
            raise ValueError(f"head_input tokens reads the first two tokens of the deepest stage, which has one "
                             f"token at patch {tuple(self.patch)}; use a patch of 64 on some axis or head_input "
                             "pooled")
        return self

    @property
    def crops_per_step(self) -> int:
        """Crops one process contrasts per step (``N``: ``2N`` embeddings)."""
        return self.batch * self.crops

    @property
    def donor_chance(self) -> float:
        """The probability of the donor cutout round (``donor_probability`` resolved)."""
        if self.donor_probability is not None:
            return float(self.donor_probability)
        return 1.0 - 1.0 / self.crops_per_step

    def loss_names(self) -> list[str]:
        """The logged terms (those with a non-zero weight)."""
        weights = {"rot": self.lambda_rot, "contrast": self.lambda_contrast, "recon": self.lambda_recon}
        return [k for k, w in weights.items() if w]


# --------------------------------------------------------------------------------------------------
# Views: rotation and cutout (numpy, channel-first (C, X, Y, Z))


def rotate(volume: np.ndarray, k: int, plane: Sequence[int]) -> np.ndarray:
    """``volume`` (C, X, Y, Z) rotated by ``k`` quarter turns in the plane of spatial axes ``plane`` (from the
    first axis towards the second, as ``numpy.rot90`` and ``torch.rot90``), as a new contiguous array."""
    return np.ascontiguousarray(np.rot90(volume, int(k) % ROTATIONS, axes=(int(plane[0]) + 1, int(plane[1]) + 1)))


Box = tuple[tuple[int, int, int], tuple[int, int, int]]


def draw_boxes(shape: Sequence[int], rng: np.random.Generator, max_fraction: float, min_box: float,
               max_box: float) -> list[Box]:
    """Cutout boxes ``(lo, hi)`` (voxel corners, ``hi`` exclusive) for a volume of spatial ``shape``: placed until
    their summed volume reaches ``U(0, max_fraction)`` of the volume; each starts at a uniform voxel at least the
    minimal side from the far border and has per axis a side uniform in ``[min_box * side, max_box * side)``
    (at least 1 voxel), clipped at the border."""
    shape = [int(s) for s in shape]
    target = rng.uniform(0.0, max_fraction) * math.prod(shape)
    small = [max(1, int(min_box * s)) for s in shape]
    large = [max(lo + 1, int(max_box * s)) for lo, s in zip(small, shape)]
    boxes: list[Box] = []
    covered = 0
    while covered < target:
        lo = [int(rng.integers(0, max(1, s - m))) for s, m in zip(shape, small)]
        hi = [min(a + int(rng.integers(m, big)), s) for a, m, big, s in zip(lo, small, large, shape)]
        boxes.append((tuple(lo), tuple(hi)))  # type: ignore[arg-type]
        covered += math.prod(b - a for a, b in zip(lo, hi))
    return boxes


def box_slices(box: Box) -> tuple[slice, ...]:
    """Index of a box in a channel-first array."""
    lo, hi = box
    return (slice(None), *(slice(a, b) for a, b in zip(lo, hi)))


def fill_noise(view: np.ndarray, boxes: Sequence[Box], rng: np.random.Generator,
               value_range: Sequence[tuple[float, float]]) -> None:
    """In place: each box of ``view`` (C, X, Y, Z) gets Gaussian noise min-max scaled to ``value_range`` (per
    channel ``(low, high)``), as the reference's first ``aug_rand`` round (which scales it to [0, 1])."""
    lows = np.asarray([r[0] for r in value_range], np.float32).reshape(-1, 1, 1, 1)
    highs = np.asarray([r[1] for r in value_range], np.float32).reshape(-1, 1, 1, 1)
    for box in boxes:
        region = view[box_slices(box)]
        noise = rng.standard_normal(region.shape).astype(np.float32)
        spread = float(noise.max() - noise.min())
        unit = (noise - noise.min()) / spread if spread > 0 else np.zeros_like(noise)
        region[...] = lows + unit * (highs - lows)


def fill_donor(view: np.ndarray, boxes: Sequence[Box], donor: np.ndarray) -> None:
    """In place: each box of ``view`` gets the same voxels of ``donor`` (the second ``aug_rand`` round)."""
    for box in boxes:
        view[box_slices(box)] = donor[box_slices(box)]


def cutout_mask(shape: Sequence[int], boxes: Sequence[Box]) -> np.ndarray:
    """Boolean spatial mask of the union of ``boxes``."""
    mask = np.zeros([int(s) for s in shape], bool)
    for box in boxes:
        mask[box_slices(box)[1:]] = True
    return mask


def intensity_range(entry: dict, channels: int) -> list[tuple[float, float]] | None:
    """The normalised intensity range per channel of a prepared scan: [0, 1] for CT (its window), the z-scored
    clip percentiles for MR; None when the manifest does not say."""
    norm = (entry.get("stats") or {}).get("normalisation") or {}
    if norm.get("modality") == "CT" and "window" in norm:
        return [(0.0, 1.0)] * channels
    clip, mean, std = norm.get("clip", []), norm.get("mean", []), norm.get("std", [])
    if norm.get("modality") == "MR" and len(clip) == len(mean) == len(std) == channels:
        return [(float((c[0] - m) / s), float((c[1] - m) / s)) for c, m, s in zip(clip, mean, std)]
    return None


# --------------------------------------------------------------------------------------------------
# Dataset


@dataclass
class SSLView:
    """One view of a crop and how it was made (for tests and inspection).

    Attributes:
        rotation: quarter turns ``k`` (the rotation label).
        target: the rotated crop (the reconstruction target), float32 ``(C, X, Y, Z)``.
        view: ``target`` after cutout (the network input).
        noise_boxes: boxes of the first cutout round (noise).
        donor_boxes: boxes of the second round (copied from ``donor``), empty when it did not run.
        donor: the donor view (a rotated crop of a random scan), None when the round did not run.
    """

    rotation: int
    target: np.ndarray
    view: np.ndarray
    noise_boxes: list[Box] = field(default_factory=list)
    donor_boxes: list[Box] = field(default_factory=list)
    donor: np.ndarray | None = None


@dataclass
class SSLSample:
    """One sample: ``crops`` crops of one scan, two views each.

    Attributes:
        case: the scan.
        starts: origin of each crop in the prepared volume.
        crops: the crops as read (before rotation), ``(K, C, X, Y, Z)``.
        views: per crop, its two :class:`SSLView`.
    """

    case: str
    starts: list[tuple[int, ...]]
    crops: np.ndarray
    views: list[tuple[SSLView, SSLView]]


class SwinSSLDataset(PoolDataset, Dataset):
    """Samples from a prepared pool: sample ``i`` is a pure function of ``(seed, i)`` and the data.

    Items are ``{"view": (K, 2, C, X, Y, Z) float32, "target": (K, 2, C, X, Y, Z) float32, "rot": (K, 2) int64}``
    with ``K = crops``: the network inputs, their reconstruction targets and rotation labels.

    Args:
        data: a prepared cache (``prepare --pool``; a labelled cache contributes its train split only).
        cfg: the method's configuration.
        length: nominal length (the sampler decides which indices are read).

    Raises:
        CacheError: no case to read.
        ConfigError: the pool's channel count is not ``cfg.in_channels``.
    """

    def __init__(self, data, cfg: SwinSSLConfig, length: int = 2**62):
        super().__init__(data, cfg, length)
        self._range = {c: intensity_range(data.case(c), cfg.in_channels) for c in self.case_ids}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.sample(index)
        views = np.stack([np.stack([v.view for v in pair]) for pair in s.views])
        targets = np.stack([np.stack([v.target for v in pair]) for pair in s.views])
        rot = np.asarray([[v.rotation for v in pair] for pair in s.views], np.int64)
        return {"view": torch.from_numpy(views), "target": torch.from_numpy(targets), "rot": torch.from_numpy(rot)}

    def case_of(self, index: int) -> str:
        """The scan of sample ``index``: passes over the pool in a seeded order, every scan once per pass."""
        n = len(self.case_ids)
        p, k = divmod(int(index), n)
        order = METHOD.sample_rng(self.cfg.seed, _PASS, p).permutation(n)
        return self.case_ids[int(order[k])]

    def _crop(self, cid: str, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, ...]]:
        start = tuple(choose_patch_start(self._shape[cid], self.cfg.patch, rng, None))
        return read_crop(self.data.image(cid), start, self.cfg.patch, self._fill[cid]), start

    def _value_range(self, cid: str, crop: np.ndarray) -> list[tuple[float, float]]:
        known = self._range[cid]
        if known is not None:
            return known
        flat = crop.reshape(crop.shape[0], -1)
        return [(float(lo), float(hi)) for lo, hi in zip(flat.min(1), flat.max(1))]

    def _view(self, crop: np.ndarray, value_range, rng: np.random.Generator) -> SSLView:
        cfg = self.cfg
        k = int(rng.integers(ROTATIONS))
        target = rotate(crop, k, cfg.rotation_plane)
        view = target.copy()
        spatial = view.shape[1:]
        noise_boxes = draw_boxes(spatial, rng, cfg.cutout_max_fraction, cfg.cutout_min_box, cfg.cutout_max_box)
        fill_noise(view, noise_boxes, rng, value_range)
        out = SSLView(rotation=k, target=target, view=view, noise_boxes=noise_boxes)
        if rng.random() < cfg.donor_chance:
            other = self.case_ids[int(rng.integers(len(self.case_ids)))]
            donor, _ = self._crop(other, rng)
            donor = rotate(donor, int(rng.integers(ROTATIONS)), cfg.rotation_plane)
            out.donor_boxes = draw_boxes(spatial, rng, cfg.cutout_max_fraction, cfg.cutout_min_box,
                                         cfg.cutout_max_box)
            out.donor = donor
            fill_donor(view, out.donor_boxes, donor)
        return out

    def sample(self, index: int) -> SSLSample:
        """Sample ``index`` with its ingredients (see :class:`SSLSample`)."""
        cid = self.case_of(index)
        rng = METHOD.sample_rng(self.cfg.seed, _SAMPLE, index)
        crops, starts, views = [], [], []
        for _ in range(self.cfg.crops):
            crop, start = self._crop(cid, rng)
            value_range = self._value_range(cid, crop)
            crops.append(crop)
            starts.append(start)
            views.append((self._view(crop, value_range, rng), self._view(crop, value_range, rng)))
        return SSLSample(case=cid, starts=starts, crops=np.stack(crops), views=views)


# --------------------------------------------------------------------------------------------------
# Losses and heads


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR) between two views ``a``, ``b`` ``(N, D)``: over the ``2N`` L2-normalised embeddings, row
    ``i``'s positive is the other view of the same crop and every other embedding except itself is in its
    denominator; ``-log(exp(s_pos / t) / sum_{k != i} exp(s_ik / t))`` averaged over the ``2N`` rows."""
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]).float(), dim=-1)
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, positive)


def nt_xent_collapsed(n: int) -> float:
    """NT-Xent of ``2n`` identical embeddings (every similarity equal): ``ln(2n - 1)``, whatever the
    temperature: the collapsed (trivial) solution."""
    return math.log(2 * n - 1)


def nt_xent_floor(n: int, temperature: float) -> float:
    """The lowest NT-Xent of ``2n`` embeddings: both views of a crop identical and the ``n`` crops at the vertices
    of a regular simplex (pairwise cosine ``-1/(n-1)``; reachable when the embedding has at least ``n - 1``
    dimensions): ``ln(1 + 2(n-1) exp(-n / ((n-1) t)))``. (The loss is increasing and convex in the negative
    similarities, whose sum over pairs of crops is at least ``-n``: the minimum has them all equal to
    ``-1/(n-1)``.)"""
    if n < 2:
        return 0.0
    return math.log1p(2 * (n - 1) * math.exp(-n / ((n - 1) * temperature)))


class ReconstructionHead(nn.Module):
    """Up-sampling from the deepest Swin stage (stride 32) to the input resolution, as the reference SSLHead.

    Args:
        dim: channels of the deepest stage (``16 * feature_size``).
        out_channels: image channels.
        kind: ``vae``: five stages of 3^3 convolution, instance normalisation, LeakyReLU and x2 trilinear
            up-sampling (widths dim/2, /4, /8, /16, /16), then a 1^3 convolution; ``deconv``: five x2 transposed
            convolutions (widths dim/2, /4, /8, /16, then ``out_channels``), no activations.
    """

    def __init__(self, dim: int, out_channels: int, kind: Literal["vae", "deconv"] = "vae"):
        super().__init__()
        if dim < 16:
            raise ConfigError(f"the deepest Swin stage has {dim} channels; the reconstruction head needs >= 16")
        widths = [dim, dim // 2, dim // 4, dim // 8, dim // 16]
        layers: list[nn.Module] = []
        if kind == "vae":
            widths.append(dim // 16)
            for cin, cout in zip(widths[:-1], widths[1:]):
                layers += [nn.Conv3d(cin, cout, 3, padding=1), nn.InstanceNorm3d(cout), nn.LeakyReLU(),
                           nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)]
            layers.append(nn.Conv3d(widths[-1], out_channels, 1))
        elif kind == "deconv":
            widths.append(out_channels)
            layers = [nn.ConvTranspose3d(cin, cout, 2, stride=2) for cin, cout in zip(widths[:-1], widths[1:])]
        else:
            raise ConfigError(f"recon_head '{kind}' is unknown; use vae or deconv")
        self.layers = nn.Sequential(*layers)

    def forward(self, deepest: torch.Tensor) -> torch.Tensor:
        return self.layers(deepest)


# --------------------------------------------------------------------------------------------------
# Lightning module


def _swinunetr_class():
    from monai.networks.nets import SwinUNETR

    return SwinUNETR


class SwinSSLModule(pl.LightningModule):
    """The registered Swin UNETR (only its ``swinViT`` runs) with the rotation, contrastive and reconstruction
    heads; one optimiser (AdamW, on the configuration's ``lr_schedule``) over the encoder and the heads.

    Attributes:
        model: the registered network (what goes downstream).
        rotation_head, contrastive_head, recon_head: the proxy-task heads.
    """

    def __init__(self, cfg: SwinSSLConfig):
        super().__init__()
        self.cfg = cfg
        self.model = build_model(cfg.model, cfg.in_channels, cfg.in_channels, cfg.patch, **cfg.model_options)
        if not isinstance(self.model, _swinunetr_class()):
            raise ConfigError(f"{NAME} pretrains Swin UNETR's encoder (models swinunetr, swinunetr-small); model "
                              f"'{cfg.model}' is a {type(self.model).__name__}: set --model swinunetr-small")
        dim = int(self.model.swinViT.embed_dim) * 16
        self.rotation_head = nn.Linear(dim, ROTATIONS)
        self.contrastive_head = nn.Linear(dim, cfg.contrast_dim)
        self.recon_head = ReconstructionHead(dim, cfg.in_channels, cfg.recon_head)

    def exported_state_dict(self) -> dict[str, torch.Tensor]:
        """The registered network: ``swinViT.*`` pretrained, decoder and ``out`` as initialised."""
        return self.model.state_dict()

    def head_features(self, deepest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation and contrastive heads' inputs ``(B, dim)`` from the deepest stage ``(B, dim, x, y, z)``."""
        tokens = deepest.flatten(2)
        if self.cfg.head_input == "tokens":
            return tokens[:, :, 0], tokens[:, :, 1]
        pooled = tokens.mean(-1)
        return pooled, pooled

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotation logits ``(B, 4)``, contrastive embeddings ``(B, contrast_dim)`` and reconstructions of views
        ``x`` ``(B, C, X, Y, Z)``."""
        deepest = encode(self.model, x)[4]
        rot_in, con_in = self.head_features(deepest)
        return self.rotation_head(rot_in), self.contrastive_head(con_in), self.recon_head(deepest)

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted total (``loss``) and each term with a non-zero weight."""
        cfg = self.cfg
        view, target, rot = batch["view"], batch["target"], batch["rot"]
        # (B, K, 2, ...) -> first views of all crops, then second views: crop j's views are rows j and N + j.
        first, second = (view[:, :, v].flatten(0, 1) for v in (0, 1))
        n = first.shape[0]
        x = torch.cat([first, second])
        wanted = cfg.loss_names()
        deepest = encode(self.model, x)[4]
        rot_in, con_in = self.head_features(deepest)
        out: dict[str, torch.Tensor] = {}
        if "rot" in wanted:
            labels = torch.cat([rot[:, :, 0].flatten(), rot[:, :, 1].flatten()]).long()
            out["rot"] = F.cross_entropy(self.rotation_head(rot_in).float(), labels)
        if "contrast" in wanted:
            z = self.contrastive_head(con_in)
            out["contrast"] = nt_xent(z[:n], z[n:], cfg.temperature)
        if "recon" in wanted:
            goal = torch.cat([target[:, :, 0].flatten(0, 1), target[:, :, 1].flatten(0, 1)])
            out["recon"] = F.l1_loss(self.recon_head(deepest).float(), goal.float())
        weights = {"rot": cfg.lambda_rot, "contrast": cfg.lambda_contrast, "recon": cfg.lambda_recon}
        out["loss"] = sum(weights[k] * v for k, v in out.items())
        return out

    def training_step(self, batch, batch_idx):
        parts = self.losses(batch)
        loss = log_loss_parts(self, parts, batch["view"].shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        return loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: the Swin encoder and the three heads (the registered decoder never runs)."""
        modules = (self.model.swinViT, self.rotation_head, self.contrastive_head, self.recon_head)
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def configure_optimizers(self):
        opt = make_optimizer(self.trainable_parameters(), "adamw", self.cfg.lr, self.cfg.weight_decay)
        return scheduled_optimization(opt, self.cfg)  # one-cycle, or warm-up then constant (lr_schedule)


# --------------------------------------------------------------------------------------------------
# MONAI's published SSL layout


def to_monai_ssl_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our encoder in the layout of MONAI's published ``model_swinvit.pt``: ``{"state_dict": {...}}`` with every
    ``swinViT.<key>`` as ``module.<key>`` and the MLP layers named ``mlp.fc1``/``mlp.fc2`` (MONAI's
    ``SwinUNETR.load_from`` reads this). Other tensors (decoder, output layer) are left out."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("swinViT."):
            continue
        new = "module." + key[len("swinViT."):]
        new = new.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        out[new] = value
    return {"state_dict": out}


# --------------------------------------------------------------------------------------------------
# Registration


def _build_module(cfg: SwinSSLConfig):
    return SwinSSLModule(cfg)


def _build_dataset(cfg: SwinSSLConfig, data):
    return SwinSSLDataset(data, cfg)


def _model_meta(cfg: SwinSSLConfig) -> dict:
    return {"in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
            "pretrained": "swinViT (encoder) only; the decoder and output layer are as initialised",
            "head_input": cfg.head_input, "crops_per_step": cfg.crops_per_step}


@torch.no_grad()
def _pretext_baselines(cfg: SwinSSLConfig, dataset, samples: int):
    """Rotation: the uniform guess (the rotations are drawn uniformly), CE ``ln 4``; perfect 0. Contrast: a
    collapsed embedding (all similarities equal), ``ln(2N - 1)`` for the step's ``N`` crops; perfect: the NT-Xent
    floor at the temperature (:func:`nt_xent_floor`). Reconstruction: the median intensity of the samples'
    targets everywhere (the best constant under L1); perfect 0."""
    from medpretrain.blocks.pretext import PretextBaseline, baseline_samples

    wanted = cfg.loss_names()
    out = []
    n = cfg.crops_per_step
    if "rot" in wanted:
        out.append(PretextBaseline("rot", math.log(ROTATIONS), 0.0, "the uniform guess over the 4 rotations",
                                   samples))
    if "contrast" in wanted:
        out.append(PretextBaseline("contrast", nt_xent_collapsed(n), nt_xent_floor(n, cfg.temperature),
                                   f"a collapsed embedding (every similarity equal) over {2 * n} views; perfect: "
                                   f"identical positives, crops on a simplex (temperature {cfg.temperature})",
                                   samples))
    if "recon" in wanted:
        items = baseline_samples(dataset, samples)
        targets = [s["target"].float() for s in items]
        # The median of a regular sub-sample of the voxels (memory), then the L1 over every voxel.
        median = torch.cat([t.flatten()[::7] for t in targets]).median()
        total = sum(float((t - median).abs().sum()) for t in targets)
        recon = total / sum(t.numel() for t in targets)
        out.append(PretextBaseline("recon", recon, 0.0, "the median intensity at every voxel", len(items)))
    return out


METHOD = register_method(PretrainMethod(
    name=NAME,
    description="Swin UNETR SSL (Tang et al. 2022): rotation, NT-Xent between two views, in-painting of cutouts; "
                "the Swin encoder goes downstream (unlabelled pool)",
    config_cls=SwinSSLConfig,
    needs_data=True,
    build_dataset=_build_dataset,
    build_module=_build_module,
    model_meta=_model_meta,
    pretext_baselines=_pretext_baselines,
    presets={
        "cpu": {},
        # Seconds on a CPU: one Swin block per stage and one attention head (the stride-2 stage's 7^3-window
        # attention dominates the time at 64^3, the smallest patch Swin UNETR takes), batch 1 scan x 2 crops
        # (the fewest NT-Xent can use: 4 views, each with 1 positive and 2 negatives), a narrow contrastive head.
        "smoke": {"model_options": {"depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}, "patch": (64, 64, 64),
                  "contrast_dim": 32,
                  "steps": 2, "batch": 1, "crops": 2, "num_workers": 0, "checkpoint_every": 1,
                  "precision": "32-true"},
        # The reference code (research-contributions SwinUNETR/Pretrain, main.py defaults unless noted):
        # feature size 48 (--feature_size; our "swinunetr"), 96^3 crops (--roi_x/y/z), batch_size 2 scans x
        # sw_batch_size 2 crops per GPU, AdamW (--opt) lr 4e-4 (--lr), weight decay 0.1 (--decay), 100,000 steps
        # (--num_steps) with 500 warm-up steps (--warmup_steps: 0.005 of them), contrastive head 512 wide and
        # temperature 0.5 (ssl_head.py, loss.py), loss weights 1 (loss.py), SSLHead's default "vae" up-sampling,
        # first/second deepest token for the rotation/contrastive heads (ssl_head.py), 4 loader workers
        # (data_utils.py). Ours: checkpoints every 1,000 steps; the one-cycle schedule shape (see above).
        "paper": {"model": "swinunetr", "patch": (96, 96, 96), "batch": 2, "crops": 2, "lr": 4e-4,
                  "weight_decay": 0.1, "steps": 100000, "warmup_fraction": 0.005, "contrast_dim": 512,
                  "temperature": 0.5, "recon_head": "vae", "head_input": "tokens", "lambda_rot": 1.0,
                  "lambda_contrast": 1.0, "lambda_recon": 1.0, "checkpoint_every": 1000, "num_workers": 4},
    },
    models=("swin",),
    unused_parameters=True,
))
