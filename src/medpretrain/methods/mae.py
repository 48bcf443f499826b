"""MAE for convolutional U-Nets: masked image modelling of 3D crops with the whole segmentation network.

Reference: T. Wald, C. Ulrich, S. Lukyanenko, A. Goncharov, A. Paderno, M. Miller, L. Maerkisch, P. F. Jaeger,
K. Maier-Hein, "Revisiting MAE pre-training for 3D medical image segmentation", CVPR 2025 (arXiv 2410.23132),
and its public code, nnssl (MIC-DKFZ), whose default MAE recipe (``BaseMAETrainer``) is what this module follows.

What the method does (the paper's, as nnssl implements it):

* **Data.** Random crops of ``patch`` voxels (paper 160^3) from an unlabelled pool (no labels, no
  foreground-biased sampling).
* **Mask.** The crop is tiled into cubic blocks of ``mask_block`` voxels (paper 16^3: a 10 x 10 x 10 grid at
  160^3); ``mask_ratio`` of the blocks (paper 75%) are masked, drawn uniformly without replacement, and every
  voxel of a masked block is set to 0 in every channel. 0 is in the *normalised* intensity space of the prepared
  pool: the mean intensity of a z-scored MR scan, the lower end of the window (air) of a CT scan.
* **Network.** The whole registered U-Net (encoder and decoder) sees the masked crop (a dense CNN: the
  masked voxels are zeros, not dropped) and reconstructs the image (``out_channels = in_channels``).
* **Loss.** Mean squared error between reconstruction and the unmasked crop over the masked voxels only
  (every channel); visible voxels do not enter the loss. The batch's masked voxels are pooled, as nnssl's
  ``MAEMSELoss``: every sample of a batch masks the same number of voxels, so this is also the mean of the
  per-sample losses (implemented with ``blocks.masking.patchify`` + ``masked_mse`` over the block grid).
* **What goes downstream.** The registered network with its reconstruction head (``model.pt`` has its key
  names); fine-tuning replaces the head for the class count (``finetune --init RUN/model.pt``, encoder or
  ``--init-part all``).

Choices that are ours (each stated; the switches keep the paper reachable):

* **Block size scales with the patch (``mask_block``).** The paper's 16^3 is a tenth of its 160^3 patch side.
  A tenth of the CPU patch (64 x 64 x 48) is 5-6 voxels, which does not divide the sides; we use the nearest
  power of two that divides every side and keeps at least 6 blocks per axis: **8** (an 8 x 8 x 6 grid of 384
  blocks, 288 masked). ``--preset paper`` sets 16 at 160^3. The patch must be a whole number of blocks per side
  (the validator names a patch and a block that fit) and hold at least 2 blocks.
* **Mask counts.** ``blocks.masking.random_token_mask``: the visible count is rounded down (MAE's rule), nnssl
  rounds the masked count down; both give exactly 75% whenever ``0.25 * blocks`` is whole (384 and 1000 blocks
  are). The mask is drawn in the dataset from the sample's own generator (a function of ``(seed, index)``),
  not per step from the global generator as in nnssl, so resumed and DDP runs see the same masks.
* **Augmentation.** Random crops plus a mirror along each axis with probability 0.5 (``mirror``, as nnssl's
  ``MirrorTransform``). nnssl's ``BaseMAETrainer`` also applies nnU-Net's spatial transform (rotation and
  scaling 0.7-1.4, each with probability 0.2 per sample); we leave them out (cost on CPU loader workers;
  minor next to the masking) -- a stated deviation.
* **Optimiser and schedule.** The nnssl/nnU-Net recipe is the default: SGD with Nesterov momentum 0.99,
  lr 1e-2, weight decay 3e-5, polynomial decay ``(1 - step / steps) ** 0.9`` per step (nnssl steps it per
  250-step epoch), no warm-up (``warmup_fraction`` 0; > 0 adds a linear warm-up of that share of the steps),
  and gradients clipped to norm 12 (``grad_clip``). ``optimizer: adamw`` with ``schedule: one-cycle`` gives the
  project's yardstick recipe instead (``blocks.optim``).
* **Deep supervision** is refused: the reconstruction is supervised at full resolution only (nnssl builds its
  networks without deep supervision).
* **Not implemented:** the sparse-convolution variant (Spark3D, S3D) and its mask token; the paper's best
  network (ResEnc-L, 160^3, batch 8, 250k steps) is approximated in ``--preset paper`` by the registered
  residual ``dynunet`` (see the preset's comment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from pydantic import field_validator, model_validator
from torch.utils.data import Dataset

from medpretrain.blocks.masking import masked_mse, patchify, random_token_mask
from medpretrain.blocks.optim import make_optimizer, scheduled_optimization
from medpretrain.config import TrainingConfig
from medpretrain.data.crops import PoolDataset, read_crop
from medpretrain.data.sampling import choose_patch_start
from medpretrain.engine.module import float32_loss, log_loss_parts
from medpretrain.errors import ConfigError
from medpretrain.methods import PretrainMethod, register_method
from medpretrain.models import build_model

Int3 = tuple[int, int, int]


class MAEConfig(TrainingConfig):
    """MAE pretraining of a convolutional U-Net (shared training settings as in ``TrainingConfig``); the defaults
    are the CPU preset (BasicUNet, 64 x 64 x 48 crops, 8^3 mask blocks, 75% masked, batch 2, 600 steps, the
    nnssl optimiser). ``--preset paper`` gives nnssl's recipe (160^3, 16^3 blocks, batch 8, 250k steps).

    Args:
        in_channels: image channels of the pool (the network reconstructs all of them).
        mask_ratio: share of the mask blocks that are masked (paper 0.75).
        mask_block: side in voxels of a cubic mask block; every patch side must be a multiple (paper 16 at 160^3).
        mirror: mirror the crop along each axis with probability 0.5 (nnssl's mirroring).
        optimizer: ``sgd`` (nnssl), ``adamw`` or ``adam`` (``blocks.optim.make_optimizer``).
        sgd_momentum, nesterov: SGD's momentum and whether it is Nesterov's (nnssl: 0.99, True).
        betas: Adam(W)'s betas.
        schedule: ``poly`` (nnssl: ``(1 - step / steps) ** poly_exponent`` after an optional linear warm-up of
            ``warmup_fraction`` of the steps) or ``one-cycle`` (``blocks.optim``). ``lr_schedule:
            warmup-constant`` (``TrainingConfig``) replaces either: the warm-up, then the peak lr to the end, for
            snapshots of one long run that no decay tied to its end has reached.
        poly_exponent: exponent of the polynomial decay (nnU-Net: 0.9).
        grad_clip: clip the gradient norm to this value (nnssl: 12); None = no clipping.
    """

    model: str = "unet"
    steps: int = 600
    patch: Int3 = (64, 64, 48)
    batch: int = 2
    lr: float = 1e-2
    weight_decay: float = 3e-5
    warmup_fraction: float = 0.0
    in_channels: int = 1
    mask_ratio: float = 0.75
    mask_block: int = 8
    mirror: bool = True
    optimizer: Literal["sgd", "adamw", "adam"] = "sgd"
    sgd_momentum: float = 0.99
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["poly", "one-cycle"] = "poly"
    poly_exponent: float = 0.9
    grad_clip: float | None = 12.0

    @field_validator("in_channels", "mask_block")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("mask_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not (math.isfinite(v) and 0.0 < v < 1.0):
            raise ValueError("must be within (0, 1), e.g. 0.75 (the paper)")
        return v

    @field_validator("sgd_momentum")
    @classmethod
    def _momentum(cls, v: float) -> float:
        if not (math.isfinite(v) and 0.0 <= v < 1.0):
            raise ValueError("must be within [0, 1), e.g. 0.99 (nnssl)")
        return v

    @field_validator("poly_exponent")
    @classmethod
    def _exponent(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError("must be > 0, e.g. 0.9 (nnU-Net)")
        return v

    @field_validator("grad_clip")
    @classmethod
    def _clip(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError("must be > 0 (nnssl: 12), or null for no clipping")
        return v

    @model_validator(mode="after")
    def _check(self):
        b = self.mask_block
        if any(p % b for p in self.patch):
            sides = tuple(max(b, int(round(p / b)) * b) for p in self.patch)
            fits = max(d for d in range(1, b + 1) if all(p % d == 0 for p in self.patch))
            raise ValueError(f"patch {tuple(self.patch)} is not a whole number of {b}^3 mask blocks along every "
                             f"side; use patch {sides} or a mask_block that divides every side (e.g. {fits})")
        if math.prod(p // b for p in self.patch) < 2:
            raise ValueError(f"patch {tuple(self.patch)} holds a single {b}^3 mask block; use a smaller mask_block "
                             "(the paper: 16 at 160^3, a 10^3 grid)")
        if self.nesterov and self.optimizer == "sgd" and self.sgd_momentum == 0:
            raise ValueError("nesterov needs sgd_momentum > 0 (nnssl: 0.99); or set nesterov: false")
        if _deep_supervision(self.model, self.model_options):
            raise ValueError(f"model '{self.model}' with deep supervision: MAE reconstructs at full resolution only; "
                             "set model_options: {deep_supervision: false}")
        return self

    @property
    def grid(self) -> Int3:
        """Mask blocks per axis."""
        return tuple(p // self.mask_block for p in self.patch)  # type: ignore[return-value]


def _deep_supervision(model: str, options: dict) -> bool:
    from medpretrain.models import get_spec

    try:
        defaults = get_spec(model).defaults
    except ConfigError:
        return False  # an unknown network is reported by the job, with the list of registered ones
    return bool({**defaults, **options}.get("deep_supervision", False))


# --------------------------------------------------------------------------------------------------
# Masks and loss


def block_mask(grid: Sequence[int], ratio: float, rng: np.random.Generator) -> np.ndarray:
    """``(gx, gy, gz)`` boolean block mask, True = masked: ``ratio`` of the blocks, uniform without replacement
    (``blocks.masking.random_token_mask``; the visible count rounded down)."""
    return random_token_mask(grid, ratio, rng).reshape(tuple(int(g) for g in grid))


def voxel_mask(mask: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, gx, gy, gz)`` block mask -> ``(B, 1, gx*block, gy*block, gz*block)`` voxel mask (same dtype)."""
    m = mask[:, None]
    for axis in (2, 3, 4):
        m = m.repeat_interleave(block, dim=axis)
    return m


def mask_input(image: torch.Tensor, mask: torch.Tensor, block: int) -> torch.Tensor:
    """The network's input: ``image`` ``(B, C, X, Y, Z)`` with every voxel of a masked block set to 0 (all
    channels)."""
    return image * (~voxel_mask(mask.bool(), block)).to(image.dtype)


def reconstruction_loss(pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, block: int) -> torch.Tensor:
    """Mean squared error over the masked voxels (all channels) of ``(B, C, X, Y, Z)`` tensors with a
    ``(B, gx, gy, gz)`` block mask; visible voxels are ignored. Computed in float32."""
    b = pred.shape[0]
    with float32_loss(pred.device):
        return masked_mse(patchify(pred.float(), block), patchify(image.float(), block), mask.reshape(b, -1).bool())


# --------------------------------------------------------------------------------------------------
# Data


@dataclass
class MAESample:
    """One sample with what made it (for tests and inspection).

    Attributes:
        image: the crop, float32 ``(C, X, Y, Z)`` (unmasked: the reconstruction target; mirrored if drawn).
        mask: the block mask ``(gx, gy, gz)``, True = masked.
        case: the scan it comes from; start: the crop's origin in the prepared volume (may be negative: padded);
        flips: mirrored axes (X, Y, Z).
    """

    image: np.ndarray
    mask: np.ndarray
    case: str
    start: tuple[int, int, int]
    flips: tuple[bool, bool, bool]


class MAEDataset(PoolDataset, Dataset):
    """Crops of a prepared pool with their block masks: sample ``i`` is a pure function of ``(seed, i)`` and the
    data (drawn from ``sample_rng(seed, i)``), so loader workers, DDP ranks and resumed runs agree.

    Items: ``image`` float32 ``(C, *patch)`` and ``mask`` bool ``(*grid)``; masking runs on the training device.

    Args:
        data: a prepared cache (``prepare --pool``; a labelled cache contributes its train split only).
        cfg: the method's configuration.
        length: nominal length (the sampler decides which indices are read).

    Raises:
        CacheError: no case to read. ConfigError: the pool's channel count is not ``cfg.in_channels``.
    """

    def __init__(self, data, cfg: MAEConfig, length: int = 2**62):
        super().__init__(data, cfg, length)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.sample(index)
        return {"image": torch.from_numpy(s.image), "mask": torch.from_numpy(s.mask)}

    def sample(self, index: int) -> MAESample:
        """Sample ``index`` with its ingredients (see :class:`MAESample`)."""
        rng = METHOD.sample_rng(self.cfg.seed, index)
        # Every draw happens whatever the data or switches, so the stream stays aligned.
        cid = self.case_ids[int(rng.integers(len(self.case_ids)))]
        start = tuple(choose_patch_start(self._shape[cid], self.patch, rng, None))
        flips = rng.random(3) < 0.5
        mask = block_mask(self.cfg.grid, self.cfg.mask_ratio, rng)
        image = read_crop(self.data.image(cid), start, self.patch, self._fill[cid])
        flips = flips & self.cfg.mirror
        axes = tuple(int(a) + 1 for a in np.flatnonzero(flips))
        if axes:
            image = np.ascontiguousarray(np.flip(image, axes))
        return MAESample(image=image, mask=mask, case=cid, start=start,  # type: ignore[arg-type]
                         flips=tuple(bool(f) for f in flips))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Training


def poly_factor(step: int, total_steps: int, warmup_fraction: float, exponent: float) -> float:
    """Learning-rate multiplier of the poly schedule: linear warm-up over ``warmup_fraction`` of the steps (none
    by default, as nnssl), then ``(1 - t) ** exponent`` with ``t`` the share of the decay steps done."""
    warmup = int(round(warmup_fraction * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    decay = max(total_steps - warmup, 1)
    return max(1.0 - (step - warmup) / decay, 0.0) ** exponent


class MAEModule(pl.LightningModule):
    """The registered network (``in_channels`` in and out) trained to reconstruct the masked blocks.

    Args:
        cfg: the method's configuration.
    """

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        self.model = build_model(cfg.model, cfg.in_channels, cfg.in_channels, cfg.patch, **cfg.model_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, mask = batch["image"], batch["mask"].bool()
        pred = self.model(mask_input(image, mask, self.cfg.mask_block))
        recon = reconstruction_loss(pred, image, mask, self.cfg.mask_block)
        return {"loss": recon, "recon": recon}

    def training_step(self, batch, batch_idx):
        loss = log_loss_parts(self, self.losses(batch), batch["image"].shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        return loss

    def exported_state_dict(self) -> dict[str, torch.Tensor]:
        """What ``model.pt`` holds: the registered network (its head reconstructs the image)."""
        return self.model.state_dict()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # nnssl clips every step to norm 12; the job's Trainer sets no clipping of its own.
        clip = gradient_clip_val if gradient_clip_val is not None else self.cfg.grad_clip
        if clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd" and cfg.nesterov:
            # blocks.optim.make_optimizer's SGD has no Nesterov switch; nnssl's (nnU-Net's) SGD is Nesterov.
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay,
                                  nesterov=True)
        else:
            opt = make_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay, betas=tuple(cfg.betas),
                                 sgd_momentum=cfg.sgd_momentum)
        if cfg.lr_schedule == "warmup-constant" or cfg.schedule == "one-cycle":
            return scheduled_optimization(opt, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: poly_factor(step, cfg.steps, cfg.warmup_fraction, cfg.poly_exponent))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# --------------------------------------------------------------------------------------------------
# Registration


def _model_meta(cfg: MAEConfig) -> dict:
    return {"in_channels": cfg.in_channels, "out_channels": cfg.in_channels, "mask_ratio": cfg.mask_ratio,
            "mask_block": cfg.mask_block,
            "output": "the whole network reconstructs the masked image; fine-tuning replaces the head"}


@torch.no_grad()
def _pretext_baselines(cfg: MAEConfig, dataset, samples: int):
    """``recon``: trivial = each sample's mean intensity (per channel) over its *visible* voxels, predicted at
    every voxel (what can be said without any understanding of the image); perfect = the image itself (0)."""
    from medpretrain.blocks.pretext import PretextBaseline, baseline_samples

    items = baseline_samples(dataset, samples)
    trivial, perfect, n = 0.0, 0.0, 0
    for i in range(0, len(items), cfg.batch):
        chunk = items[i:i + cfg.batch]
        image = torch.stack([s["image"] for s in chunk]).float()
        mask = torch.stack([s["mask"] for s in chunk]).bool()
        visible = (~voxel_mask(mask, cfg.mask_block)).to(image.dtype)  # (B, 1, X, Y, Z)
        mean = (image * visible).sum((2, 3, 4), keepdim=True) / visible.sum((2, 3, 4), keepdim=True).clamp_min(1)
        trivial += float(reconstruction_loss(mean.expand_as(image), image, mask, cfg.mask_block)) * len(chunk)
        perfect += float(reconstruction_loss(image, image, mask, cfg.mask_block)) * len(chunk)
        n += len(chunk)
    return [PretextBaseline("recon", trivial / n, perfect / n,
                            "each sample's mean visible intensity (per channel) at every masked voxel", n)]


METHOD = register_method(PretrainMethod(
    name="mae",
    description="MAE for CNN U-Nets (Wald et al. CVPR 2025, nnssl): reconstruct 75% masked 3D blocks with the "
                "whole network (unlabelled pool)",
    config_cls=MAEConfig,
    needs_data=True,
    build_dataset=lambda cfg, data: MAEDataset(data, cfg),
    build_module=lambda cfg: MAEModule(cfg),
    model_meta=_model_meta,
    pretext_baselines=_pretext_baselines,
    models=("cnn",),
    presets={
        "cpu": {},
        # Seconds on a CPU: the method contract test and the GPU check's dry run (32^3 = a 4^3 grid of 8^3 blocks).
        "smoke": {"model": "unet", "patch": (32, 32, 32), "model_options": {"features": (4, 4, 8, 8, 16, 4)},
                  "steps": 2, "batch": 1, "num_workers": 0, "checkpoint_every": 1, "precision": "32-true"},
        # nnssl BaseMAETrainer_BS8_1000ep (the paper's MAE recipe): 160^3 crops, 16^3 blocks, 75% masked, batch 8,
        # 1000 epochs x 250 steps = 250k steps; SGD lr 1e-2, Nesterov momentum 0.99, weight decay 3e-5, poly 0.9,
        # no warm-up, gradient norm clipped to 12 (nnssl AbstractBaseTrainer). The network is ours: the paper
        # pretrains nnU-Net's ResEnc-L; "dynunet" is the registered residual nnU-Net-like U-Net (5 levels,
        # 32..320 filters, divisor 16). Checkpoints every 1000 steps and 4 loader workers are ours.
        "paper": {"model": "dynunet", "patch": (160, 160, 160), "mask_block": 16, "mask_ratio": 0.75, "batch": 8,
                  "steps": 250000, "lr": 1e-2, "weight_decay": 3e-5, "optimizer": "sgd", "sgd_momentum": 0.99,
                  "nesterov": True, "schedule": "poly", "poly_exponent": 0.9, "warmup_fraction": 0.0,
                  "grad_clip": 12.0, "mirror": True, "checkpoint_every": 1000, "num_workers": 4},
    },
))
