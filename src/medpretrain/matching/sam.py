"""A self-supervised anatomical embedding matcher (after SAM, Yan et al. 2022), trained on the unlabelled pool.

Network (:class:`AnatomicalEmbeddingNet`): a small fully convolutional 3D encoder; every voxel gets a
*coarse* embedding (stride 16 features: global context, tells body regions apart) and a *fine* one (stride 4
features fused with the up-sampled coarse features: local detail), both L2-normalised.

Training (``medpretrain train-matcher``): from one pool volume two overlapping views are read, each a region
of ``patch * s`` voxels (``s`` drawn per view and axis from ``scale``) resized to ``patch``, with a random
intensity scale and shift; the second view's centre is the first's plus a random shift of up to
``max_shift`` of the patch. The mapping view voxel -> volume voxel is known, so for anchor points in view 1
(body voxels inside the overlap) the corresponding points in view 2 are known: positives. InfoNCE at each
level: coarse negatives are the other anchors' positives and random points of view 2; fine negatives are the
other anchors' positives and ``fine_negatives`` points near the positive (``near`` voxels, at least
``min_negative_distance`` away), the hard negatives that teach fine localisation.

Matching (:class:`SamMatcher`): the query point's coarse and fine embeddings (trilinear at the point) against
every voxel of the key's maps (fine grid, stride 4): ``score = (cos_coarse + cos_fine) / 2``; the argmax is
the match. The maps of a volume are computed once and cached (float16).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import model_validator
from torch.utils.data import Dataset

from medpretrain.blocks.contrastive import info_nce
from medpretrain.config import TrainingConfig
from medpretrain.data.crops import PoolCases, read_crop, resize_linear
from medpretrain.engine.module import log_loss_parts, one_cycle_scheduler
from medpretrain.errors import ConfigError
from medpretrain.matching import Match, MatchVolume

log = logging.getLogger("medpretrain")

_TAG = 0x53414D  # "SAM": the matcher's sample streams differ from every method's
FINE_STRIDE = 4
COARSE_STRIDE = 16


class MatcherConfig(TrainingConfig):
    """``train-matcher`` settings (shared training settings as in ``TrainingConfig``).

    Args:
        patch: view size (X, Y, Z), multiples of 16.
        width: channels of the first level (doubling per level, capped at 8x).
        coarse_dim, fine_dim: embedding widths.
        scale: range of the per-axis scale of a view's region relative to ``patch``.
        max_shift: largest shift of view 2's centre, as a share of the patch per axis.
        intensity: ``(scale, shift)`` half-ranges of the per-view intensity change (normalised units).
        anchors: anchor points per view pair.
        coarse_negatives: extra random negatives per view pair at the coarse level.
        fine_negatives: hard negatives per anchor at the fine level.
        near: radius (voxels) within which fine negatives are drawn around the positive.
        min_negative_distance: fine negatives lie at least this far (voxels) from the positive.
        temperature: InfoNCE temperature.
        in_channels: image channels of the pool.
    """

    model: str = "sam-matcher"
    steps: int = 400
    patch: tuple[int, int, int] = (64, 64, 48)
    batch: int = 2
    lr: float = 1e-3
    warmup_fraction: float = 0.1
    width: int = 16
    coarse_dim: int = 64
    fine_dim: int = 32
    scale: tuple[float, float] = (0.8, 1.25)
    max_shift: float = 0.25
    intensity: tuple[float, float] = (0.2, 0.2)
    anchors: int = 96
    coarse_negatives: int = 256
    fine_negatives: int = 32
    near: float = 16.0
    min_negative_distance: float = 4.0
    temperature: float = 0.1
    in_channels: int = 1

    @model_validator(mode="after")
    def _check(self):
        if any(p % COARSE_STRIDE for p in self.patch):
            v = tuple(max(COARSE_STRIDE, p // COARSE_STRIDE * COARSE_STRIDE) for p in self.patch)
            raise ValueError(f"patch {tuple(self.patch)} must be a multiple of {COARSE_STRIDE} per axis, e.g. {v}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale {tuple(self.scale)} must be (low, high) with 0 < low <= high, e.g. (0.8, 1.25)")
        if not 0 <= self.max_shift < 1:
            raise ValueError(f"max_shift {self.max_shift} must be within [0, 1) (the views must overlap)")
        if self.min_negative_distance >= self.near:
            raise ValueError(f"min_negative_distance {self.min_negative_distance} must be below near {self.near}")
        if min(self.anchors, self.width, self.coarse_dim, self.fine_dim) < 1 or self.temperature <= 0:
            raise ValueError("anchors, width, coarse_dim, fine_dim must be >= 1 and temperature > 0")
        return self


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    from monai.networks.blocks import Convolution

    return nn.Sequential(
        Convolution(3, cin, cout, strides=stride, kernel_size=3, norm="INSTANCE", act="LEAKYRELU"),
        Convolution(3, cout, cout, kernel_size=3, norm="INSTANCE", act="LEAKYRELU"),
    )


class AnatomicalEmbeddingNet(nn.Module):
    """Coarse (stride 16) and fine (stride 4) voxel embeddings, L2-normalised along channels.

    Args:
        in_channels: image channels.
        width: channels of the first level (levels: width, 2w, 4w, 8w, 8w at strides 1, 2, 4, 8, 16).
        coarse_dim, fine_dim: output widths.
    """

    def __init__(self, in_channels: int = 1, width: int = 16, coarse_dim: int = 64, fine_dim: int = 32):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.levels = nn.ModuleList([_block(in_channels, w[0])] + [_block(w[i - 1], w[i], 2) for i in range(1, 5)])
        self.coarse_head = nn.Conv3d(w[4], coarse_dim, 1)
        self.fuse = _block(w[2] + w[4], w[2])
        self.fine_head = nn.Conv3d(w[2], fine_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, X, Y, Z)`` (sides multiples of 16) -> coarse ``(B, Dc, X/16, ...)``, fine ``(B, Df, X/4, ...)``."""
        feats = []
        h = x
        for level in self.levels:
            h = level(h)
            feats.append(h)
        coarse = self.coarse_head(feats[4])
        up = F.interpolate(feats[4], size=feats[2].shape[2:], mode="trilinear", align_corners=False)
        fine = self.fine_head(self.fuse(torch.cat([feats[2], up], 1)))
        return F.normalize(coarse, dim=1), F.normalize(fine, dim=1)


def sample_at(maps: torch.Tensor, points: torch.Tensor, stride: int) -> torch.Tensor:
    """Trilinear values of ``(B, D, x, y, z)`` maps of the given stride at voxel coordinates ``(B, P, 3)`` of
    the full-resolution volume -> ``(B, P, D)``. Map cell ``i`` is taken to stand for voxel
    ``(i + 0.5) * stride - 0.5``, the centre of the voxels it covers (training and matching use the same
    convention, so any offset of the true receptive-field centre cancels out)."""
    size = torch.tensor(maps.shape[2:], dtype=torch.float32, device=maps.device)
    cell = (points.float() + 0.5) / stride - 0.5
    norm = (2 * cell + 1) / size - 1  # align_corners=False normalisation
    grid = norm.flip(-1)[:, :, None, None, :]  # grid_sample wants (z, y, x) for (X, Y, Z) = (D, H, W)
    out = F.grid_sample(maps.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, :, 0, 0].transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# Training data


class MatcherDataset(Dataset):
    """Two overlapping augmented views of one pool volume with their point correspondences.

    Items: ``view1``, ``view2`` ``(C, *patch)``; ``anchors`` ``(P, 3)`` voxel coordinates in view 1;
    ``positives`` ``(P, 3)`` the same anatomy in view 2; ``coarse_negatives`` ``(M, 3)`` and
    ``fine_negatives`` ``(P, K, 3)`` in view 2. Sample ``i`` is a pure function of ``(seed, i)``.
    """

    def __init__(self, data, cfg: MatcherConfig, length: int = 2**62):
        self.data, self.cfg, self.length = data, cfg, length
        cases = PoolCases(data, cfg.in_channels, "train the matcher on")
        self.case_ids, self._fill, self._shape = cases.case_ids, cases.fill, cases.shape

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        rng = np.random.default_rng([_TAG, int(cfg.seed), int(index)])
        cid = self.case_ids[int(rng.integers(len(self.case_ids)))]
        volume, shape, fill = self.data.image(cid), np.array(self._shape[cid]), self._fill[cid]
        patch = np.array(cfg.patch, float)
        regions = [np.maximum(1, np.round(patch * rng.uniform(*cfg.scale, 3))).astype(int) for _ in range(2)]
        centre1 = rng.uniform(0, 1, 3) * shape
        for _ in range(32):  # prefer a centre inside the body: views of air teach nothing
            c = np.minimum((rng.uniform(0, 1, 3) * shape).astype(int), shape - 1)
            if volume[(0, *c)] > fill[0] + 1e-3:
                centre1 = c.astype(float)
                break
        centre2 = centre1 + rng.uniform(-1, 1, 3) * cfg.max_shift * patch
        starts = [np.round(centre1 - regions[0] / 2).astype(int), np.round(centre2 - regions[1] / 2).astype(int)]
        raw = [resize_linear(read_crop(volume, start, region, fill), cfg.patch) for start, region in zip(starts, regions)]
        views = []
        for v in raw:
            a, b = rng.uniform(1 - cfg.intensity[0], 1 + cfg.intensity[0]), rng.uniform(-1, 1) * cfg.intensity[1]
            views.append((v * a + b).astype(np.float32))
        # View voxel u <-> volume voxel: start + (u + 0.5) * region / patch - 0.5.
        to_vol = lambda u, k: starts[k] + (u + 0.5) * regions[k] / patch - 0.5  # noqa: E731
        to_view = lambda p, k: (p - starts[k] + 0.5) * patch / regions[k] - 0.5  # noqa: E731
        cand = np.stack(np.meshgrid(*[np.arange(0, int(p), 2) for p in patch], indexing="ij"), -1).reshape(-1, 3)
        mapped = to_view(to_vol(cand, 0), 1)
        inside = np.all((mapped >= 0) & (mapped <= patch - 1), axis=1)
        body = raw[0][0][tuple(cand.T)] > fill[0] + 1e-3  # above the "nothing" intensity (air, padding)
        ok = np.flatnonzero(inside & body)
        if ok.size < cfg.anchors:  # too little body in the overlap: any overlapping voxel will do
            ok = np.flatnonzero(inside) if np.flatnonzero(inside).size else np.arange(len(cand))
        pick = ok[rng.choice(ok.size, cfg.anchors, replace=ok.size < cfg.anchors)]
        anchors = cand[pick].astype(np.float32)
        positives = np.clip(mapped[pick], 0, patch - 1).astype(np.float32)
        coarse_neg = (rng.uniform(0, 1, (cfg.coarse_negatives, 3)) * (patch - 1)).astype(np.float32)
        direction = rng.normal(size=(cfg.anchors, cfg.fine_negatives, 3))
        direction /= np.linalg.norm(direction, axis=-1, keepdims=True) + 1e-9
        radius = rng.uniform(cfg.min_negative_distance, cfg.near, (cfg.anchors, cfg.fine_negatives, 1))
        fine_neg = np.clip(positives[:, None] + direction * radius, 0, patch - 1).astype(np.float32)
        return {"view1": torch.from_numpy(views[0]), "view2": torch.from_numpy(views[1]),
                "anchors": torch.from_numpy(anchors), "positives": torch.from_numpy(positives),
                "coarse_negatives": torch.from_numpy(coarse_neg), "fine_negatives": torch.from_numpy(fine_neg)}


class MatcherModule(pl.LightningModule):
    """InfoNCE training of :class:`AnatomicalEmbeddingNet` at the coarse and fine levels."""

    def __init__(self, cfg: MatcherConfig):
        super().__init__()
        self.cfg = cfg
        self.model = AnatomicalEmbeddingNet(cfg.in_channels, cfg.width, cfg.coarse_dim, cfg.fine_dim)

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        c1, f1 = self.model(batch["view1"])
        c2, f2 = self.model(batch["view2"])
        coarse, fine = [], []
        for b in range(c1.shape[0]):
            a, p = batch["anchors"][b:b + 1], batch["positives"][b:b + 1]
            ac, pc = sample_at(c1[b:b + 1], a, COARSE_STRIDE)[0], sample_at(c2[b:b + 1], p, COARSE_STRIDE)[0]
            nc = sample_at(c2[b:b + 1], batch["coarse_negatives"][b:b + 1], COARSE_STRIDE)[0]
            coarse.append(info_nce(ac, pc, nc, cfg.temperature))
            af, pf = sample_at(f1[b:b + 1], a, FINE_STRIDE)[0], sample_at(f2[b:b + 1], p, FINE_STRIDE)[0]
            k = batch["fine_negatives"].shape[2]
            nf = sample_at(f2[b:b + 1], batch["fine_negatives"][b:b + 1].reshape(1, -1, 3), FINE_STRIDE)[0]
            fine.append(info_nce(af, pf, nf.reshape(af.shape[0], k, -1), cfg.temperature))
        out = {"coarse": torch.stack(coarse).mean(), "fine": torch.stack(fine).mean()}
        out["loss"] = out["coarse"] + out["fine"]
        return out

    def training_step(self, batch, batch_idx):
        return log_loss_parts(self, self.losses(batch), batch["view1"].shape[0])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        sched = one_cycle_scheduler(opt, self.cfg.steps, self.cfg.warmup_fraction)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train_matcher(data_dir: str | Path, out_dir: str | Path, cfg: MatcherConfig, resume: bool = False) -> Path:
    """Train the matcher on a prepared pool; ``RUN/model.pt`` is what ``SamMatcher.from_checkpoint`` loads."""
    from medpretrain.data.cache import PreparedData
    from medpretrain.engine.job import run_training

    data = PreparedData(data_dir)
    meta = {"network": "AnatomicalEmbeddingNet", "in_channels": cfg.in_channels, "width": cfg.width,
            "coarse_dim": cfg.coarse_dim, "fine_dim": cfg.fine_dim, "spacing": list(data.spacing)}
    log.info("training the anatomical matcher on %d volumes for %d steps", len(data.case_ids), cfg.steps)
    return run_training(out_dir, cfg, kind="matcher:sam", build_module=lambda fresh: MatcherModule(cfg),
                        dataset=MatcherDataset(data, cfg), run_info={"data": str(Path(data_dir).resolve()), **meta},
                        model_meta=lambda module: meta, resume=resume)


# --------------------------------------------------------------------------------------------------
# Matching


class SamMatcher:
    """Matches points with a trained :class:`AnatomicalEmbeddingNet` (see the module's documentation).

    Args:
        net: the trained network.
        threshold: a match is accepted when its score (mean of coarse and fine cosine similarity) reaches it.
        device: where embeddings are computed.
    """

    name = "sam"

    def __init__(self, net: AnatomicalEmbeddingNet, threshold: float = 0.7, device: str = "cpu",
                 window: Sequence[int] = (64, 64, 48)):
        self.net = net.eval().to(device)
        self.threshold, self.device = float(threshold), device
        self.window = tuple(int(w) for w in window)
        self._maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_checkpoint(cls, path: str | Path, threshold: float = 0.7, device: str = "cpu") -> "SamMatcher":
        path = Path(path)
        if path.is_dir():
            path = path / "model.pt"
        if not path.is_file():
            raise ConfigError(f"matcher checkpoint {path} does not exist; train one with `medpretrain train-matcher "
                              "--data POOL --out RUN` and pass RUN")
        blob = torch.load(path, map_location="cpu", weights_only=False)
        meta = blob
        if blob.get("kind") != "matcher:sam":
            raise ConfigError(f"{path} is not a matcher (kind {blob.get('kind')!r}); pass the run folder of "
                              "`medpretrain train-matcher`")
        net = AnatomicalEmbeddingNet(int(meta["in_channels"]), int(meta["width"]), int(meta["coarse_dim"]),
                                     int(meta["fine_dim"]))
        net.load_state_dict(blob["state_dict"])
        return cls(net, threshold, device, window=blob.get("patch", (64, 64, 48)))

    @torch.no_grad()
    def embed(self, volume: MatchVolume) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse and fine maps ``(D, x, y, z)`` of a whole volume (cached by name, float16), computed in sliding
        windows of the training view size: instance normalisation then sees the statistics it was trained with."""
        if volume.name in self._maps:
            return self._maps[volume.name]
        img = np.asarray(volume.image, np.float32)
        shape = np.array(img.shape[1:])
        from monai.inferers import sliding_window_inference

        padded = np.maximum(-(-shape // COARSE_STRIDE) * COARSE_STRIDE, self.window)
        fill = float(np.min(img[0]))
        x = np.full((img.shape[0], *padded), fill, np.float32)
        x[:, : shape[0], : shape[1], : shape[2]] = img
        coarse, fine = sliding_window_inference(torch.from_numpy(x)[None].to(self.device), self.window, 2, self.net,
                                                overlap=0.25, mode="gaussian")
        # Blending averages unit vectors: normalise again.
        maps = (F.normalize(coarse[0], dim=0).half().cpu(), F.normalize(fine[0], dim=0).half().cpu())
        self._maps[volume.name] = maps
        return maps

    def forget(self, name: str) -> None:
        """Drop a volume's cached maps."""
        self._maps.pop(name, None)

    @torch.no_grad()
    def similarity(self, query: MatchVolume, point: Sequence[float], key: MatchVolume) -> torch.Tensor:
        """``(x, y, z)`` map of the key's fine grid: mean of coarse and fine cosine similarity to the point."""
        qc, qf = self.embed(query)
        kc, kf = self.embed(key)
        p = torch.tensor([[list(map(float, point))]])
        vc = F.normalize(sample_at(qc[None], p, COARSE_STRIDE)[0, 0], dim=0)
        vf = F.normalize(sample_at(qf[None], p, FINE_STRIDE)[0, 0], dim=0)
        sim_c = torch.einsum("d,dxyz->xyz", vc, kc.float())
        sim_f = torch.einsum("d,dxyz->xyz", vf, kf.float())
        sim_c = F.interpolate(sim_c[None, None], size=sim_f.shape, mode="trilinear", align_corners=False)[0, 0]
        return (sim_c + sim_f) / 2

    def match(self, query: MatchVolume, point: Sequence[float], key: MatchVolume) -> Match:
        sim = self.similarity(query, point, key)
        # Only cells whose centre lies inside the key (the maps cover its padding too).
        limit = [-(-s // FINE_STRIDE) for s in key.image.shape[1:]]
        sim = sim[: limit[0], : limit[1], : limit[2]]
        flat = int(torch.argmax(sim))
        idx = np.unravel_index(flat, sim.shape)
        score = float(sim[idx])
        pt = tuple(float(min((i + 0.5) * FINE_STRIDE - 0.5, s - 1)) for i, s in zip(idx, key.image.shape[1:]))
        return Match(point=pt, score=score, accepted=score >= self.threshold)
