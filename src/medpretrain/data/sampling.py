"""Random patches from a prepared cache, read from memory-mapped arrays without decoding whole volumes.

Every sample is a pure function of (seed, global sample index): the same patch on any worker, process or
DDP rank, which makes interrupted runs resume to bitwise-identical weights and keeps ranks disjoint.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medpretrain.config import AugmentConfig
from medpretrain.data.cache import PreparedData
from medpretrain.data.crops import background_fill, read_crop


def crop_with_padding(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float = 0) -> np.ndarray:
    """Copy ``array[..., start:start+size]`` over the last three axes; parts outside the array are ``fill``.

    Reading a memory-mapped array this way touches only the requested region.
    """
    lead = array.shape[:-3]
    out = np.full(lead + tuple(size), fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape[-3:]):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(..., *dst)] = array[(..., *src)]
    return out


def choose_patch_start(
    shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator, centre: Sequence[int] | None
) -> list[int]:
    """Patch origin: centred on ``centre`` (kept inside the volume) or uniform; a side smaller than the patch
    is centred with random padding split."""
    start = []
    for axis, (dim, p) in enumerate(zip(shape, patch)):
        if dim <= p:
            # Volume thinner than the patch: pad, placing the volume at a random offset inside the patch.
            start.append(-int(rng.integers(0, p - dim + 1)))
        elif centre is None:
            start.append(int(rng.integers(0, dim - p + 1)))
        else:
            start.append(int(np.clip(centre[axis] - p // 2, 0, dim - p)))
    return start


def build_augmentation(cfg: AugmentConfig, patch: Sequence[int], device: torch.device | None = None):
    """MONAI transform chain over {"image", "label"} dicts of channel-first tensors, or None.

    ``device``: where the affine transform builds its sampling grid (the tensors' device; None = CPU). The
    identity grid of the patch is built once and kept (``cache_grid``): the patch size never changes."""
    if not cfg.enabled:
        return None
    from monai import transforms as T

    keys = ["image", "label"]
    chain = []
    if cfg.affine_prob > 0:
        r = math.radians(cfg.rotate_deg)
        chain.append(T.RandAffined(
            keys, spatial_size=tuple(int(p) for p in patch), prob=cfg.affine_prob, rotate_range=(r, r, r),
            scale_range=(cfg.scale,) * 3, mode=("bilinear", "nearest"), padding_mode="zeros", cache_grid=True,
            device=device,
        ))
    if cfg.flip_prob > 0:
        chain += [T.RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=a) for a in range(3)]
    if cfg.rotate90_prob > 0 and patch[0] == patch[1]:
        chain.append(T.RandRotate90d(keys, prob=cfg.rotate90_prob, spatial_axes=(0, 1)))
    if cfg.intensity_prob > 0:
        chain.append(T.RandScaleIntensityd("image", factors=0.1, prob=cfg.intensity_prob))
        chain.append(T.RandShiftIntensityd("image", offsets=0.1, prob=cfg.intensity_prob))
    if cfg.noise_prob > 0:
        chain.append(T.RandGaussianNoised("image", prob=cfg.noise_prob, std=0.05))
    return T.Compose(chain) if chain else None


def _plain(t) -> torch.Tensor:
    # MONAI returns MetaTensors; the training step needs none of their metadata, and plain tensors collate and
    # compute without the per-operation metadata bookkeeping.
    t = torch.as_tensor(t)
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


def augment_patch(chain, image: torch.Tensor, label: torch.Tensor, seed: int, fill: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One patch through the MONAI ``chain`` with its random state seeded by ``seed``: image ``(C, X, Y, Z)``
    float32, label ``(1, X, Y, Z)`` integer, ``fill`` ``(C,)`` the case's background. Augmented around the
    background: MONAI's spatial transforms pad with 0, which is then the case's fill again, and intensity
    scaling leaves "nothing" unchanged. Returns the image (float32) and the label (int64), on the input's
    device. The one implementation of fine-tuning augmentation, in a loader worker or on the training device."""
    fill = fill.to(image.device, torch.float32).reshape(-1, 1, 1, 1)
    chain.set_random_state(seed=int(seed))
    out = chain({"image": image - fill, "label": label.long()})
    return (_plain(out["image"]).float() + fill).contiguous(), _plain(out["label"]).round().long().contiguous()


class PatchAugmenter:
    """Fine-tuning augmentation of a batch on the training device (``SegmentationModule.batch_transform``):
    every patch through the same MONAI chain as in a loader worker, seeded with its ``aug_seed`` (drawn from
    the patch's ``(seed, index)`` generator), so the parameters of every patch's augmentation are those the
    worker would have drawn. The batch's ``aug_seed`` and ``fill`` are consumed; labels come back int64.

    Args:
        cfg: the augmentation settings.
        patch: the patch size.
    """

    def __init__(self, cfg: AugmentConfig, patch: Sequence[int]):
        self.cfg = cfg
        self.patch = tuple(int(p) for p in patch)
        self._chains: dict[str, object] = {}

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "aug_seed" not in batch:
            return batch
        image, label = batch["image"], batch["label"]
        key = str(image.device)
        if key not in self._chains:
            self._chains[key] = build_augmentation(self.cfg, self.patch, image.device)
        chain = self._chains[key]
        rest = {k: v for k, v in batch.items() if k not in ("image", "label", "aug_seed", "fill")}
        if chain is None:
            return {**rest, "image": image, "label": label.long()}
        seeds = batch["aug_seed"].tolist()
        pairs = [augment_patch(chain, image[i], label[i], seeds[i], batch["fill"][i]) for i in range(len(seeds))]
        return {**rest, "image": torch.stack([a for a, _ in pairs]), "label": torch.stack([b for _, b in pairs])}


class PatchDataset(Dataset):
    """Labelled random patches from prepared cases.

    Args:
        data: the prepared cache.
        case_ids: cases to draw from (the labelled subset).
        patch: patch size (X, Y, Z).
        foreground_fraction: share of patches centred on a random labelled voxel of a random present class.
        seed: base seed; sample ``i`` uses the generator seeded with ``(seed, i)``.
        augment: augmentation settings.
        length: nominal length (the sampler decides which indices are read).
        augment_on_device: leave the augmentation to the training device (:class:`PatchAugmenter`, set as the
            module's ``batch_transform``): items are then the raw patch, the label as ``uint8`` (an eighth of
            the int64 bytes through shared memory, pinning and the host-to-device copy), the patch's
            augmentation seed ``aug_seed`` and the case's background ``fill``.

    Padding: where a patch reaches past the volume (la2018 has 44 slices, fewer than many patches), the image
    is filled with the case's "nothing" intensity (``data.crops.background_fill``: 0 for CT, the lower clip
    value after z-scoring for MR), the value every self-supervised pretraining crop and sliding-window
    inference pad with too, so that a pretrained network meets the same "outside" in all three.
    """

    def __init__(
        self,
        data: PreparedData,
        case_ids: Sequence[str],
        patch: Sequence[int],
        foreground_fraction: float = 1 / 3,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        length: int = 2**62,
        augment_on_device: bool = False,
    ):
        if not case_ids:
            raise ValueError("PatchDataset needs at least one case")
        self.data = data
        self.case_ids = list(case_ids)
        self.patch = tuple(int(p) for p in patch)
        self.foreground_fraction = foreground_fraction
        self.seed = seed
        self.length = length
        self.augment_cfg = augment or AugmentConfig(enabled=False)
        self.augment_on_device = bool(augment_on_device and self.augment_cfg.enabled)
        self._augment = None  # built lazily in each worker
        # Foreground coordinates per case: {class_id: (N, 3) array}, read once from the manifest.
        self._foreground = {}
        for cid in self.case_ids:
            fg = self.data.case(cid).get("foreground", {}) or {}
            self._foreground[cid] = {
                int(k): np.asarray(v, dtype=np.int64).reshape(-1, 3) for k, v in fg.items() if len(v)
            }
        self.fill = {cid: background_fill(self.data.case(cid), self.data.in_channels) for cid in self.case_ids}

    def __len__(self) -> int:
        return self.length

    def locate(self, index: int) -> tuple[str, list[int], np.ndarray | None, np.random.Generator]:
        """Where sample ``index`` comes from: case, patch origin, the labelled voxel it is centred on (None
        for a uniform patch), and the generator positioned for the augmentation draw."""
        rng = np.random.default_rng([self.seed, int(index)])
        cid = self.case_ids[int(rng.integers(len(self.case_ids)))]
        centre = None
        fg = self._foreground[cid]
        if fg and rng.random() < self.foreground_fraction:
            cls = list(fg)[int(rng.integers(len(fg)))]
            coords = fg[cls]
            centre = coords[int(rng.integers(len(coords)))]
        shape = self.data.case(cid)["shape"][-3:]
        return cid, choose_patch_start(shape, self.patch, rng, centre), centre, rng

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        cid, start, _, rng = self.locate(index)
        image = self.data.image(cid)
        label = self.data.label(cid)
        img = torch.from_numpy(read_crop(image, start, self.patch, self.fill[cid]))
        lab = torch.from_numpy(crop_with_padding(label, start, self.patch, fill=0))[None]
        if not self.augment_cfg.enabled:
            return {"image": img, "label": lab.long()}
        seed = int(rng.integers(2**31))
        fill = torch.tensor(self.fill[cid], dtype=torch.float32)
        if self.augment_on_device:
            return {"image": img, "label": lab, "aug_seed": torch.tensor(seed), "fill": fill}
        if self._augment is None:
            self._augment = build_augmentation(self.augment_cfg, self.patch)
        if self._augment is None:
            return {"image": img, "label": lab.long()}
        img, lab = augment_patch(self._augment, img, lab, seed, fill)
        return {"image": img, "label": lab}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.sample(index)


class StepSampler(Sampler[int]):
    """Yields the global sample indices of the next ``steps`` optimizer steps of one process.

    Step ``s`` of rank ``r`` among ``w`` reads indices ``[(s*w + r)*b, (s*w + r + 1)*b)`` with ``b`` the batch
    size: disjoint across ranks and steps, and the same after a resume, because the first step is read from
    ``current_step()`` (the trainer's restored global step) each time an epoch's iterator is created.

    Args:
        steps: optimizer steps per epoch (batches the iterator yields).
        batch_size: samples per step and process.
        rank, world_size: this process among the DDP processes.
        current_step: returns the global step the next batch will train.
    """

    def __init__(self, steps: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 current_step: Callable[[], int] = lambda: 0):
        self.steps = steps
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.current_step = current_step

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __iter__(self):
        first = self.current_step()
        for step in range(first, first + self.steps):
            base = (step * self.world_size + self.rank) * self.batch_size
            yield from range(base, base + self.batch_size)
