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


def build_augmentation(cfg: AugmentConfig, patch: Sequence[int]):
    """MONAI transform chain over {"image", "label"} dicts of channel-first tensors, or None."""
    if not cfg.enabled:
        return None
    from monai import transforms as T

    keys = ["image", "label"]
    chain = []
    if cfg.affine_prob > 0:
        r = math.radians(cfg.rotate_deg)
        chain.append(T.RandAffined(
            keys, prob=cfg.affine_prob, rotate_range=(r, r, r), scale_range=(cfg.scale,) * 3,
            mode=("bilinear", "nearest"), padding_mode="zeros",
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
        fill = np.asarray(self.fill[cid], np.float32).reshape(-1, 1, 1, 1)
        img = read_crop(image, start, self.patch, self.fill[cid])
        lab = crop_with_padding(label, start, self.patch, fill=0)
        item = {
            "image": torch.from_numpy(img),
            "label": torch.from_numpy(lab.astype(np.int64))[None],
        }
        if self.augment_cfg.enabled:
            if self._augment is None:
                self._augment = build_augmentation(self.augment_cfg, self.patch)
            if self._augment is not None:
                self._augment.set_random_state(seed=int(rng.integers(2**31)))
                # Augmented around the background: MONAI's spatial transforms pad with 0, which is then the
                # case's fill again, and intensity scaling leaves "nothing" unchanged.
                item["image"] -= torch.from_numpy(fill)
                out = self._augment(item)
                item = {
                    "image": (torch.as_tensor(out["image"]).float() + torch.from_numpy(fill)).contiguous(),
                    "label": torch.as_tensor(out["label"]).round().long().contiguous(),
                }
        return item

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
