"""Alice self-supervised pretraining (``../shared/papers/alice.md``): masked image modelling plus contrast
between crops of the SAME body part in DIFFERENT volumes, with conditional anatomical semantic alignment (CASA).

Data. A query volume and a key volume (a different scan) are picked; a random body point in the query and its
match in the key (an anatomical matcher, ``matching/``: ``sam`` trained with ``medpretrain train-matcher``, or
``registration``) centre the crops Q and K (``patch`` voxels). Matching runs once, when the dataset is built:
for every pool case, ``match_points`` body points are matched into ``match_partners`` other cases; matches whose
score reaches the matcher's threshold (``match_threshold``; SAM: 0.7 as the authors) form the table samples
are drawn from (when a point finds no accepted partner it is retried in the next partner: the bounded retries;
if a case has no accepted match at all its best-scoring one is used, and the acceptance rate is logged).

Views. ``X_u^Q`` and ``X_r^K``: Q and K with ``mask_ratio`` of their patches masked (MAE random masking; the
patches are the encoder's tokens, ``mask_patch``^3 voxels); ``X_w^Q`` and ``X_v^K``: Q and K under strong
augmentation (rotation about z within ``rotation_deg``, flips, intensity scale and shift).

Networks. The online encoder (the registered network's encoder: UNETR's ViT or SwinUNETR's Swin encoder) sees
only the masked views. ViT: masked patches are dropped before the transformer blocks (MAE). Swin: windows need
the full grid, so masked patches are replaced by a learnt mask token right after the patch embedding (SimMIM;
the paper's Green-MIM grouping saves compute but is not in MONAI): their content never reaches the encoder
either way. The Swin tokens are its stride-16 hidden state (``mask_patch`` 16): Alice trains the Swin encoder
up to ``layers3``; its last stage (``layers4``, stride 32) keeps its initial weights, which fine-tuning loads
with the rest of ``swinViT.`` (as random as a fresh initialisation). The online decoder is a light
stack of transformer blocks over the visible tokens plus mask tokens with positional embeddings; it predicts
the normalised pixels of every patch. The target encoder is the EMA of the online encoder and sees the intact
augmented views.

Losses (weights ``lambda_r``, ``lambda_dv``, ``lambda_st``):

* ``l_r`` (eq. 1): MSE on MAE-normalised pixels of the masked patches of Q and K;
* ``l_dv`` (eq. 2): projection heads phi (on the online decoder's tokens) and psi (on the target encoder's;
  psi is the EMA of phi, the DINO convention) are 3-layer MLPs with an L2-normalised bottleneck; ``[cls]`` is
  their global average; ``l_s(q([cls]_u^Q), [cls]_v^K) + l_s(q([cls]_r^K), [cls]_w^Q)`` with ``l_s`` the cosine
  similarity loss ``2 - 2 cos`` and ``q`` the online prediction head (below);
* ``l_st`` (eq. 3-5, CASA): queries ``LN(V) W_q`` from the online encoder's visible tokens of the masked view;
  keys and values ``LN(.) W_k``, ``LN(.) W_v`` from phi's decoder tokens (student ``S``) or from psi's target
  encoder tokens of the intact view (teacher ``T``); ``softmax(q k^T / sqrt(C)) v`` then a projection zeta;
  ``l_s(q'(S_u^Q), T_w^Q) + l_s(q'(S_r^K), T_v^K)`` per visible token. The teacher side is computed without
  gradient (a stop-gradient, as every EMA-teacher loss): otherwise both sides of ``l_st`` could move to meet.

Heads against collapse (``predictor``, ``head_norm``, default on). The paper's ``l_s`` is "a general cosine
similarity loss [BYOL, SimSiam]" with "the same projection head structure as [MoCo v3, BYOL]": phi is their
projector (a 3-layer MLP with BatchNorm in the hidden layers, to ``head_bottleneck`` features; every token of the
batch is a row of the BatchNorm), and the online branch alone has their predictor, a 2-layer MLP with BatchNorm
(``q`` on ``[cls]``, ``q'`` on CASA's output); zeta has no bias. With the first heads (an un-normalised DINO-style
projector, no predictor, a biased zeta) every embedding of a random network pointed nearly the same way (spread
~0.02 at step 0), the cosine losses were solved by keeping it so, and a 16k-step la2018 run lost both embedding
losses within ~600 steps. These heads start spread (about 0.2-0.46), but on the CPU they, ``infonce``, lr 1e-4,
batch 8 and the CASA options (``casa_teacher``, ``casa_centre``, ``casa_kv_norm_bias``; defaults = the paper) all
turn CASA's alignment content-free within ~300-2,000 steps, and ``dino`` learnt nothing in 880
(``docs/results/scaling/alice-collapse/``). Monitors, logged every step: ``st_spread`` and ``dv_spread`` (1 - norm
of the mean unit embedding of CASA's student outputs and of the online ``[cls]``; 0 = collapsed), ``st_own`` and
``st_other`` (the cosine loss of q'(S) against its own crop's T and against another sample's T over the same
queries; equal = the alignment ignores the content), ``h_content`` and ``y_content`` (``content_share`` of phi's
and psi's tokens: 0 = a function of the position alone); ``AlignmentWatch`` warns in the log when the alignment
goes content-free or collapses. ``contrast_loss: infonce`` contrasts instead (temperature
``temperature``): ``[cls]`` against the other samples' (the matched pair's other view excluded), and each CASA
token against the other tokens and against the other samples' T over its queries. With ``contrast_loss: dino``
(the authors' code) phi is DINO's head (to an L2-normalised bottleneck, then ``head_dim`` prototypes), both
contrasts use DINO's centred, sharpened cross-entropy (CASA's with its own centre) and there is no predictor.

Only the online encoder goes downstream: ``AliceModule.model`` is the registered network whose encoder is the
online encoder (fine-tune with ``--init-part encoder``).

Switches for the authors' public code (paper = default; ``--preset authors`` sets all):
``contrast_loss: dino`` (DINO cross-entropy with centring instead of the cosine loss), ``casa_keys:
target_decoder`` (the teacher's CASA keys/values from an EMA copy of the decoder run on the target encoder's
tokens), ``mask_kind: tube`` (masks whole columns along z), ``recon_region: all`` (reconstruction over every
patch) and 64^3 crops; ``contrast_loss`` applies to ``l_dv``, to the pooled contrast of ``casa: false`` and to
CASA's ``l_st`` (its own centre, as iBOT's patch loss in that code). Not from the paper (it does not give them):
head widths (the paper preset: hidden 2048, projector output 256 as MoCo v3's, DINO prototypes 4096), the decoder depth (2 on CPU, 4 in the paper
preset), the warm-up as a fraction of steps (the paper warms up for 100 epochs), and no MAE crop/flip on the
masked views (the crops are already anatomy-centred). Ablations (paper Tables 4-5): ``inter_volume: false`` takes K from the same volume as
Q (another of that volume's ``match_points`` body points; Q's centres are the match table's) and drops ``l_dv``; ``casa: false`` replaces CASA by the plain siamese contrast of the
masked and intact views' pooled embeddings, ``l_s([cls]_u^Q, [cls]_w^Q) + l_s([cls]_r^K, [cls]_v^K)``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import model_validator
from torch.utils.data import Dataset

from medpretrain.blocks.contrastive import DINOLoss, embedding_loss, info_nce, mean_over_processes
from medpretrain.blocks.ema import make_teacher, resolve_ema_momentum, teacher_init_share
from medpretrain.blocks.heads import ProjectionHead
from medpretrain.blocks.masking import (gather_tokens, masked_mse, normalized_pixels, patchify, random_token_mask,
                                        scatter_tokens, visible_indices)
from medpretrain.config import TrainingConfig
from medpretrain.data.crops import PoolCases, background_fill, body_points, read_crop
from medpretrain.blocks.teacher import StudentTeacherModule
from medpretrain.engine.module import log_loss_parts
from medpretrain.errors import CacheError, ConfigError
from medpretrain.matching import MatchVolume, build_matcher
from medpretrain.methods import PretrainMethod, register_method
from medpretrain.models import build_model

log = logging.getLogger("medpretrain")

_TAG = 0x414C  # "AL"
_TABLE, _SAMPLE = 0, 1
Int3 = tuple[int, int, int]


class AliceConfig(TrainingConfig):
    """Alice pretraining (shared training settings as in ``TrainingConfig``); defaults = the CPU preset
    (unetr-small, 64x64x48 crops, 16^3 patches, 75% masked, batch 2, 600 steps).

    Args:
        patch: crop size (X, Y, Z), multiples of ``mask_patch`` (UNETR: its ViT's image size; fine-tune at the
            same patch so that positional embeddings load).
        in_channels: image channels of the pool.
        mask_ratio: share of patches hidden from the online encoder (MAE: 0.75).
        mask_kind: ``random`` (paper) or ``tube`` (whole z-columns, the authors' code).
        mask_patch: side of a masked patch = one encoder token (16: ViT patch size, Swin's stride-16 stage).
        recon_region: ``masked`` (eq. 1) or ``all`` patches (the authors' code).
        decoder_depth, decoder_heads: the light online decoder (transformer blocks at the encoder's width).
        head_hidden, head_bottleneck: phi/psi (and the predictors): hidden width and output width of the
            BYOL/MoCo v3 projector (cosine loss); with ``contrast_loss: dino`` the width of DINO's L2-normalised
            bottleneck, followed by a weight-normalised linear layer to ``head_dim`` prototypes.
        head_norm: BatchNorm in the hidden layers of the projector and predictors (cosine loss; False only for
            the ablation: the embeddings then start and stay collapsed, see the module documentation).
        casa_dim: CASA's projection width C.
        lambda_r, lambda_dv, lambda_st: loss weights.
        predictor: online prediction heads before every cosine loss (BYOL/SimSiam/MoCo v3). False only for the
            ablation.
        contrast_loss: ``cosine`` (paper's l_s), ``infonce`` (in-batch negatives) or ``dino`` (cross-entropy with
            centring, authors' code).
        temperature: InfoNCE's temperature (MoCo v3: 0.2).
        casa: use CASA for ``l_st`` (False: pooled siamese contrast, paper Table 5 "w/o").
        casa_keys: teacher keys/values from the ``target_encoder`` (paper) or an EMA ``target_decoder``.
        casa_centre: ``none`` (paper), ``position``: CASA's key/value tokens minus an EMA of their mean at each
            grid position (student and teacher sides each their own), so that what every crop shares at a
            position (the positional code) cannot carry the alignment, or ``projector``: the same done to the
            tokens phi and psi project (the online decoder's, the target encoder's), so that the projector's
            BatchNorm can only find its variance between rows in the content. Not from the paper: a probe of the
            content-free alignment seen on the CPU (``docs/results/scaling/alice-collapse/``).
        casa_teacher: CASA's weights on the teacher side (T): the ``online`` module itself (the paper: "similar",
            the same queries) or an ``ema`` copy (BYOL's target projector), so that the student's gradient cannot
            move both sides of ``l_st`` at once (with shared weights, e.g., a zeta that maps every input to one
            direction would solve it: a hypothesis, and the EMA copy did not stop the content-free solution
            either). The query tokens are the online encoder's either way (projected by the EMA copy's W_q on the
            teacher side). Not from the paper: a collapse probe.
        casa_kv_norm_bias: the learnt shift of CASA's key/value LayerNorm (paper's LN: True). False: no constant
            vector shared by every key and value (a collapse probe).
        inter_volume: K from another volume via the matcher (paper); False: from the query volume, no l_dv.
        rotation_deg, intensity: strong augmentation of the target views (max rotation about z;
            (scale, shift) half-ranges).
        ema_momentum: (base, final) of the target encoder's cosine momentum schedule, or ``auto`` (default):
            the paper's base 0.996 when the run is long enough, else the base that leaves at most 1% of the
            target's random initialisation at the end of ``steps`` (``blocks.ema.auto_base_momentum``). The
            ``paper`` and ``authors`` presets set (0.996, 1).
        export: the encoder written to ``model.pt``: the ``student`` (online encoder, the paper's choice) or the
            EMA ``teacher`` (target encoder).
        matcher: ``sam`` or ``registration``; matcher_run: ``train-matcher`` run folder (``sam``).
        match_threshold: acceptance score (None: the matcher's default); match_points, match_partners: body
            points per case and partner cases tried per point when the match table is built.
        betas: AdamW betas (paper 0.9, 0.95).
    """

    model: str = "unetr-small"
    steps: int = 600
    patch: Int3 = (64, 64, 48)
    batch: int = 2
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    in_channels: int = 1
    mask_ratio: float = 0.75
    mask_kind: Literal["random", "tube"] = "random"
    mask_patch: int = 16
    recon_region: Literal["masked", "all"] = "masked"
    decoder_depth: int = 2
    decoder_heads: int = 4
    head_dim: int = 1024
    head_hidden: int = 512
    head_bottleneck: int = 128
    casa_dim: int = 128
    lambda_r: float = 1.0
    lambda_dv: float = 1.0
    lambda_st: float = 1.0
    predictor: bool = True
    head_norm: bool = True
    contrast_loss: Literal["cosine", "infonce", "dino"] = "cosine"
    temperature: float = 0.2
    casa: bool = True
    casa_keys: Literal["target_encoder", "target_decoder"] = "target_encoder"
    casa_centre: Literal["none", "position", "projector"] = "none"
    casa_teacher: Literal["online", "ema"] = "online"
    casa_kv_norm_bias: bool = True
    inter_volume: bool = True
    rotation_deg: float = 15.0
    intensity: tuple[float, float] = (0.1, 0.1)
    ema_momentum: tuple[float, float] | Literal["auto"] = "auto"
    export: Literal["student", "teacher"] = "student"
    matcher: Literal["sam", "registration"] = "registration"
    matcher_run: Path | None = None
    match_threshold: float | None = None
    match_points: int = 4
    match_partners: int = 2
    betas: tuple[float, float] = (0.9, 0.95)

    @model_validator(mode="after")
    def _check(self):
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio {self.mask_ratio} must be within [0, 1), e.g. 0.75")
        if any(p % self.mask_patch for p in self.patch):
            v = tuple(max(self.mask_patch, p // self.mask_patch * self.mask_patch) for p in self.patch)
            raise ValueError(f"patch {tuple(self.patch)} is not a whole number of {self.mask_patch}^3 patches; use "
                             f"e.g. {v}")
        if self.matcher == "sam" and self.inter_volume and self.matcher_run is None:
            raise ValueError("matcher sam needs matcher_run: the folder of `medpretrain train-matcher --data POOL "
                             "--out RUN` (or set matcher: registration)")
        if min(self.match_points, self.match_partners, self.decoder_depth, self.decoder_heads) < 1:
            raise ValueError("match_points, match_partners, decoder_depth and decoder_heads must be >= 1")
        if self.ema_momentum != "auto":
            base, final = self.ema_momentum
            if not 0.0 <= base <= final <= 1.0:
                raise ValueError(f"ema_momentum {tuple(self.ema_momentum)} must be (base, final), "
                                 "0 <= base <= final <= 1, or auto")
        return self

    def ema_schedule(self) -> tuple[float, float]:
        """``(base, final)`` of the target's momentum schedule, ``auto`` resolved for ``steps``."""
        return resolve_ema_momentum(self.ema_momentum, self.steps, paper_base=0.996)

    @property
    def grid(self) -> Int3:
        return tuple(p // self.mask_patch for p in self.patch)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Data: the match table, then crops and views' ingredients per sample


def query_points(data, case_ids, cfg: AliceConfig):
    """Per case: ``(case, partners, points)``: up to ``match_partners`` other cases in random order and
    ``match_points`` body points ``(n, 3)`` (a quarter patch from the border). The one source of Q centres, for
    the match table and for the same-volume ablation alike, so ``inter_volume`` changes nothing else."""
    rng = np.random.default_rng([_TAG, _TABLE, int(cfg.seed)])
    margin = [p // 4 for p in cfg.patch]
    for q in case_ids:
        others = [c for c in case_ids if c != q]
        if not others:
            raise CacheError(f"{data.root}: Alice needs at least two volumes (query and key from different scans)")
        partners = [others[i] for i in rng.permutation(len(others))[: cfg.match_partners]]
        fill = background_fill(data.case(q), data.in_channels)[0]
        yield q, partners, body_points(np.asarray(data.image(q))[0], fill + 1e-3, cfg.match_points, rng, margin,
                                       step=4)


def build_match_table(data, case_ids, cfg: AliceConfig, matcher) -> list[dict]:
    """For every case, ``match_points`` body points matched into up to ``match_partners`` other cases (next
    partner only while unaccepted); one row per point: query/key case and points, score, accepted."""
    spacing = tuple(float(s) for s in data.spacing)
    volumes = {c: MatchVolume(c, np.asarray(data.image(c)), spacing) for c in case_ids}
    rows = []
    for q, partners, points in query_points(data, case_ids, cfg):
        for p in points:
            best = None
            for k in partners:
                m = matcher.match(volumes[q], p, volumes[k])
                row = {"query": q, "q_point": [float(v) for v in p], "key": k, "k_point": list(m.point),
                       "score": m.score, "accepted": m.accepted}
                if best is None or m.score > best["score"]:
                    best = row
                if m.accepted:
                    break
            rows.append(best)
        if getattr(matcher, "release_after_query", False):
            matcher.forget(q)  # large per-volume caches (registration keeps whole images): free as we go
    accepted = sum(r["accepted"] for r in rows)
    log.info("Alice match table (%s matcher): %d of %d points matched above the threshold", matcher.name, accepted,
             len(rows))
    return rows


class AliceDataset(Dataset):
    """Alice samples: ``q``, ``k`` crops ``(C, *patch)``; ``mask_q``, ``mask_k`` ``(N,)`` bool (True = masked);
    ``aug`` ``(2, 6)`` target-view augmentation of Q and K: flip x, y, z, rotation (rad), intensity scale,
    shift. Sample ``i`` is a pure function of ``(seed, i)``, the pool and the match table.
    """

    def __init__(self, data, cfg: AliceConfig, length: int = 2**62, matcher=None):
        self.data, self.cfg, self.length = data, cfg, length
        cases = PoolCases(data, cfg.in_channels)
        self.case_ids, self._fill = cases.case_ids, cases.fill
        if cfg.inter_volume:
            if matcher is None:
                matcher = build_matcher(cfg.matcher, cfg.matcher_run, cfg.match_threshold)
            self.table = build_match_table(data, self.case_ids, cfg, matcher)
            usable = [r for r in self.table if r["accepted"]]
            self.acceptance = len(usable) / max(1, len(self.table))
            # Cases without any accepted match still contribute their best-scoring pair: every scan is used.
            covered = {r["query"] for r in usable}
            best: dict[str, dict] = {}
            for r in self.table:
                if r["query"] not in covered and (r["query"] not in best or r["score"] > best[r["query"]]["score"]):
                    best[r["query"]] = r
            self.rows = usable + list(best.values())
        else:
            # Same-volume ablation: Q and K centres are two different points of the table's per-case body points,
            # so Q's distribution and the crop variety equal the full method's; only K's volume differs.
            self.table, self.acceptance = [], 1.0
            self.points = {q: [[float(v) for v in p] for p in pts] for q, _, pts in
                           query_points(data, self.case_ids, cfg)}
            self.rows = [{"query": q, "q_point": p, "point_index": i} for q, pts in self.points.items()
                         for i, p in enumerate(pts)]

    def __len__(self) -> int:
        return self.length

    def _crop(self, cid: str, centre) -> np.ndarray:
        start = [int(round(c - p / 2)) for c, p in zip(centre, self.cfg.patch)]
        return read_crop(self.data.image(cid), start, self.cfg.patch, self._fill[cid])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        rng = np.random.default_rng([_TAG, _SAMPLE, int(cfg.seed), int(index)])
        row = self.rows[int(rng.integers(len(self.rows)))]
        q_case, q_point = row["query"], row["q_point"]
        if cfg.inter_volume:
            k_case, k_point = row["key"], row["k_point"]
        else:
            points = self.points[q_case]
            others = [j for j in range(len(points)) if j != row["point_index"]] or [row["point_index"]]
            k_case, k_point = q_case, points[others[int(rng.integers(len(others)))]]
        masks = [random_token_mask(cfg.grid, cfg.mask_ratio, rng, cfg.mask_kind) for _ in range(2)]
        aug = np.zeros((2, 6), np.float32)
        aug[:, :3] = rng.random((2, 3)) < 0.5
        aug[:, 3] = np.radians(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 2))
        aug[:, 4] = rng.uniform(1 - cfg.intensity[0], 1 + cfg.intensity[0], 2)
        aug[:, 5] = rng.uniform(-cfg.intensity[1], cfg.intensity[1], 2)
        return {"q": torch.from_numpy(self._crop(q_case, q_point)), "k": torch.from_numpy(self._crop(k_case, k_point)),
                "mask_q": torch.from_numpy(masks[0]), "mask_k": torch.from_numpy(masks[1]),
                "aug": torch.from_numpy(aug)}


def augment_views(x: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
    """Strong augmentation of ``(B, C, X, Y, Z)`` with per-sample ``aug`` rows (flip x, y, z, rotation about z in
    radians, intensity scale, shift): rotation by resampling (border values), then flips, then intensity."""
    b = x.shape[0]
    theta = torch.zeros(b, 3, 4, device=x.device, dtype=x.dtype)
    cos, sin = torch.cos(aug[:, 3]).to(x.dtype), torch.sin(aug[:, 3]).to(x.dtype)
    # affine_grid's (x, y, z) columns address (W, H, D) = (Z, Y, X) of our arrays: rotate the (Y, X) pair.
    # In normalised coordinates a rotation of voxels in an X x Y plane gets the aspect ratio off the diagonal.
    sx, sy = x.shape[2], x.shape[3]
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1], theta[:, 1, 2], theta[:, 2, 1], theta[:, 2, 2] = cos, -sin * sx / sy, sin * sy / sx, cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    rows = []
    for i in range(b):
        dims = [d + 1 for d in range(3) if aug[i, d] > 0.5]
        rows.append(out[i].flip(dims) if dims else out[i])
    out = torch.stack(rows)
    return out * aug[:, 4].view(b, 1, 1, 1, 1).to(x.dtype) + aug[:, 5].view(b, 1, 1, 1, 1).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Encoders with masking


class ViTEncoder(nn.Module):
    """MONAI ViT (UNETR's ``vit``) as Alice's encoder: the transformer blocks see only the visible tokens."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.width = int(vit.patch_embedding.position_embeddings.shape[-1])

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, V, D)`` features of the visible tokens (all ``N`` when ``visible`` is None)."""
        t = self.vit.patch_embedding(x)  # position embeddings included
        if visible is not None:
            t = gather_tokens(t, visible)
        for blk in self.vit.blocks:
            t = blk(t)
        return self.vit.norm(t)


class SwinEncoder(nn.Module):
    """MONAI Swin encoder (SwinUNETR's ``swinViT``) as Alice's encoder: masked patches are replaced by a learnt
    mask token after the patch embedding; the tokens are the stride-16 hidden state (SwinTransformer.forward's
    stages up to ``layers3``)."""

    def __init__(self, swin: nn.Module, mask_patch: int):
        super().__init__()
        self.swin = swin
        embed = int(swin.embed_dim)
        self.width = embed * 8
        self.cell = mask_patch // 2  # patch-embedding cells (stride 2) per masked patch side
        if mask_patch != 16:
            raise ConfigError(f"mask_patch {mask_patch}: with a Swin encoder the tokens are its stride-16 stage; "
                              "set mask_patch: 16")
        self.mask_token = nn.Parameter(torch.zeros(embed))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        s = self.swin
        h = s.patch_embed(x)  # (B, C, X/2, Y/2, Z/2)
        if mask is not None:
            b, _, gx, gy, gz = h.shape
            m = mask.view(b, gx // self.cell, gy // self.cell, gz // self.cell).to(h.dtype)
            m = m.repeat_interleave(self.cell, 1).repeat_interleave(self.cell, 2).repeat_interleave(self.cell, 3)
            m = m[:, None]
            h = h * (1 - m) + self.mask_token.view(1, -1, 1, 1, 1).to(h.dtype) * m
        h = s.pos_drop(h)
        for stage in ("1", "2", "3"):
            if s.use_v2:
                h = getattr(s, f"layers{stage}c")[0](h.contiguous())
            h = getattr(s, f"layers{stage}")[0](h.contiguous())
        t = s.proj_out(h, True).flatten(2).transpose(1, 2)  # (B, N, 8 * embed), row-major grid
        return gather_tokens(t, visible) if visible is not None else t


class MaskedDecoder(nn.Module):
    """Light MAE decoder: visible tokens scattered into a full grid of mask tokens, learnt positional
    embeddings, transformer blocks; returns the token features and the predicted patch voxels."""

    def __init__(self, dim: int, n_tokens: int, depth: int, heads: int, patch_voxels: int):
        super().__init__()
        from monai.networks.blocks import TransformerBlock

        if dim % heads:
            raise ConfigError(f"decoder width {dim} is not divisible by decoder_heads {heads}; choose a divisor")
        self.n_tokens = n_tokens
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.pos = nn.Parameter(torch.zeros(1, n_tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, 4 * dim, heads, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_voxels)

    def forward(self, tokens: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = scatter_tokens(tokens, visible, self.mask_token, self.n_tokens) + self.pos
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        return t, self.pred(t)


def embedding_spread(emb: torch.Tensor) -> torch.Tensor:
    """``1 - ||mean of the L2-normalised rows||`` over all rows of ``(..., C)`` embeddings: 0 when every
    embedding points the same way (collapse), near 1 for directions spread over the sphere."""
    unit = F.normalize(emb.reshape(-1, emb.shape[-1]).float(), dim=-1)
    return 1.0 - unit.mean(0).norm()


def content_share(tokens: torch.Tensor) -> torch.Tensor:
    """Of the variance of ``(B, N, C)`` unit token embeddings over all ``B * N`` rows, the share that lies between
    samples at the same grid position (mean over positions of the variance over ``B``): 0 when the embedding is a
    function of the position alone (every sample alike), near 1 when the mean embedding is the same at every position
    (the position carries nothing). Needs ``B >= 2``."""
    unit = F.normalize(tokens.float(), dim=-1)
    total = unit.reshape(-1, unit.shape[-1]).var(0, unbiased=False).sum()
    return unit.var(0, unbiased=False).mean(0).sum() / total.clamp_min(1e-12)


class CASA(nn.Module):
    """Conditional anatomical semantic alignment (eq. 3-4): ``zeta(softmax(q k^T / sqrt(C)) v)`` with
    ``q = LN(V) W_q`` and ``k, v = LN(H) W_k, LN(H) W_v``.

    Args:
        query_dim: width of the encoder tokens V.
        key_dim: width of the tokens H keys and values come from.
        dim: projection width C.
        kv_norm_bias: a learnt shift in the keys' and values' LayerNorm (the paper's LN; False for the probe).
    """

    def __init__(self, query_dim: int, key_dim: int, dim: int, kv_norm_bias: bool = True):
        super().__init__()
        # kv_norm_bias False: LN(H)'s learnt shift is a vector every key and value share, so W_v of it is a
        # constant both S and T could meet at (as zeta's bias was)
        self.norm_q, self.norm_kv = nn.LayerNorm(query_dim), nn.LayerNorm(key_dim, bias=kv_norm_bias)
        self.w_q = nn.Linear(query_dim, dim, bias=False)
        self.w_k = nn.Linear(key_dim, dim, bias=False)
        self.w_v = nn.Linear(key_dim, dim, bias=False)
        self.zeta = nn.Linear(dim, dim, bias=False)  # a bias would be a constant both sides could collapse to
        self.dim = dim

    def attention(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``(B, Nq, Nk)`` attention weights (rows sum to 1)."""
        q = self.w_q(self.norm_q(queries))
        k = self.w_k(self.norm_kv(keys))
        return torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.dim), dim=-1)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``(B, Nq, C)`` aligned embeddings of ``(B, Nq, Dq)`` queries over ``(B, Nk, Dk)`` key tokens."""
        att = self.attention(queries, keys)
        return self.zeta(att @ self.w_v(self.norm_kv(keys)))


class AlignmentWatch:
    """Warns in the log when Alice's contrastive terms stop carrying content (what 16 CPU runs did,
    ``docs/results/scaling/alice-collapse/``): every ``window`` steps it reads the window's per-step ``st_other /
    st_own`` (CASA's prediction against another crop's teacher embeddings over against its own) and ``st_spread``,
    and reports a change of state: **content-free** when the median ratio is at most ``1 + tolerance`` (the
    alignment no longer prefers its own crop), **collapsed** when the median ``st_spread`` is below ``min_spread`` (every
    CASA output alike), and the return to neither.

    Args:
        window: steps per verdict.
        tolerance: how far above 1 the median ratio must be to count as content-dependent (content-free runs read
            0.94-1.05, learning ones 1.1-2.5).
        min_spread: the collapsed ``st_spread``.
    """

    def __init__(self, window: int = 200, tolerance: float = 0.05, min_spread: float = 0.05):
        self.window, self.tolerance, self.min_spread = window, tolerance, min_spread
        self.ratios: list[torch.Tensor] = []  # kept as tensors: one device sync per window, not per step
        self.spreads: list[torch.Tensor] = []
        self.state = "ok"
        self.where = ""  # the last verdict's window and medians

    def update(self, step: int, parts: dict[str, torch.Tensor]) -> str | None:
        """Record one step's losses (``Alice.losses``' output); at the end of each window, the message for a change
        of state (None otherwise)."""
        if "st_own" in parts:
            self.ratios.append((parts["st_other"] / parts["st_own"]).detach().float())
        if "st_spread" in parts:
            self.spreads.append(parts["st_spread"].detach().float())
        if (step + 1) % self.window:
            return None
        ratios, spreads, self.ratios, self.spreads = self.ratios, self.spreads, [], []
        ratio = float(torch.stack(ratios).nanmedian()) if ratios else float("nan")  # 0/0 = nan: skipped
        spread = float(torch.stack(spreads).median()) if spreads else float("nan")
        state = ("collapsed" if spread < self.min_spread else
                 "content-free" if ratio <= 1.0 + self.tolerance else "ok")  # nan (no monitor): ok
        if state == self.state:
            return None
        self.state = state
        self.where = where = f"steps {step + 1 - self.window}-{step + 1}: median st_other/st_own {ratio:.2f}, st_spread {spread:.2f}"
        if state == "ok":
            return f"Alice's CASA alignment carries content again ({where})"
        what = ("CASA's outputs have collapsed to one direction" if state == "collapsed" else
                "CASA's prediction is as close to another crop's teacher embeddings as to its own: l_st no longer "
                "looks at the content")
        return (f"Alice: {what} ({where}). The run now trains mostly its masked-image reconstruction; "
                "see docs/results/scaling/alice-collapse/ (larger batch, e.g. the paper preset on GPUs)")


class PositionCentre(nn.Module):
    """Subtracts from ``(B, N, D)`` tokens an EMA (momentum ``momentum``) of their batch mean at each of the ``N``
    grid positions: the part every sample shares at a position (e.g. a positional embedding) is removed, the
    content that differs between samples is kept. The centre is updated in training from the detached batch
    (averaged over processes under DDP), as DINO's centre."""

    def __init__(self, n_tokens: int, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("centre", torch.zeros(n_tokens, dim))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                batch = mean_over_processes(tokens.detach().float().mean(0))
                # the first batch sets the centre: from zeros the positional part would take ~1/(1-m) steps to go
                self.centre.copy_(torch.where(self.seen, self.momentum * self.centre + (1 - self.momentum) * batch,
                                              batch))
                self.seen.fill_(True)
        return tokens - self.centre.to(tokens.dtype)


# --------------------------------------------------------------------------------------------------
# Training


class AliceModule(StudentTeacherModule):
    """Online encoder (inside ``model``, the registered network that goes downstream), online decoder, phi,
    CASA; target encoder and psi (EMA copies). See the module's documentation for the losses."""

    def __init__(self, cfg: AliceConfig):
        super().__init__()
        self.cfg = cfg
        self.model = build_model(cfg.model, cfg.in_channels, cfg.in_channels, cfg.patch, **cfg.model_options)
        if hasattr(self.model, "vit"):
            if int(self.model.patch_size[0]) != cfg.mask_patch:
                raise ConfigError(f"mask_patch {cfg.mask_patch} must equal the ViT's patch size 16")
            self.online = ViTEncoder(self.model.vit)
        elif hasattr(self.model, "swinViT"):
            self.online = SwinEncoder(self.model.swinViT, cfg.mask_patch)
        else:
            raise ConfigError(f"Alice's online encoder is a ViT (unetr, unetr-small) or Swin (swinunetr, "
                              f"swinunetr-small); model '{cfg.model}' is a {type(self.model).__name__}")
        dim = self.online.width
        n_tokens = int(np.prod(cfg.grid))
        self.decoder = MaskedDecoder(dim, n_tokens, cfg.decoder_depth, cfg.decoder_heads,
                                     cfg.mask_patch**3 * cfg.in_channels)
        if cfg.contrast_loss != "dino":
            # BYOL / MoCo v3 projector: BatchNorm in the hidden layers (every token of the batch a row)
            self.phi = ProjectionHead(dim, cfg.head_bottleneck, hidden_dim=cfg.head_hidden, n_layers=3,
                                      norm="batch" if cfg.head_norm else None)
        else:  # DINO head: to an L2-normalised bottleneck, then head_dim "prototypes"
            self.phi = ProjectionHead(dim, cfg.head_dim, hidden_dim=cfg.head_hidden, n_layers=3,
                                      bottleneck_dim=cfg.head_bottleneck, normalize_bottleneck=True,
                                      weight_norm_last=True)
        self.casa = CASA(dim, self.phi.out_dim, cfg.casa_dim, kv_norm_bias=cfg.casa_kv_norm_bias)
        self.centre_s = self.centre_t = None
        if cfg.casa_centre != "none":
            width = self.phi.out_dim if cfg.casa_centre == "position" else dim
            self.centre_s, self.centre_t = PositionCentre(n_tokens, width), PositionCentre(n_tokens, width)
        # Online-only prediction heads (module documentation: what keeps the cosine losses from collapsing).
        self.predict_cls = self.predict_st = None
        if cfg.predictor and cfg.contrast_loss != "dino":
            norm = "batch" if cfg.head_norm else None
            self.predict_cls = ProjectionHead(self.phi.out_dim, self.phi.out_dim, hidden_dim=cfg.head_hidden, norm=norm)
            self.predict_st = ProjectionHead(cfg.casa_dim, cfg.casa_dim, hidden_dim=cfg.head_hidden, norm=norm)
        self.target = make_teacher(self.online)
        self.psi = make_teacher(self.phi)
        self.target_casa = make_teacher(self.casa) if cfg.casa_teacher == "ema" else None
        self.target_decoder = make_teacher(self.decoder) if cfg.casa_keys == "target_decoder" else None
        self.dino = DINOLoss(cfg.head_dim) if cfg.contrast_loss == "dino" else None
        # l_st's own centre: CASA's outputs are casa_dim wide and per token (iBOT's patch loss in the authors' code)
        self.dino_st = DINOLoss(cfg.casa_dim) if cfg.contrast_loss == "dino" else None
        self._updates_done = 0
        self.alignment_watch = AlignmentWatch() if cfg.casa and cfg.contrast_loss != "dino" else None

    def teacher_pairs(self):
        pairs = [(self.target, self.online), (self.psi, self.phi)]
        if self.target_decoder is not None:
            pairs.append((self.target_decoder, self.decoder))
        if self.target_casa is not None:
            pairs.append((self.target_casa, self.casa))
        return pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def exported_state_dict(self) -> dict[str, torch.Tensor]:
        """What ``model.pt`` holds: the registered network with the online encoder (``export: student``) or with
        the target encoder's weights in its place (``export: teacher``)."""
        state = self.model.state_dict()
        if self.cfg.export == "teacher":
            prefix = "vit." if isinstance(self.target, ViTEncoder) else "swinViT."
            inner = self.target.vit if isinstance(self.target, ViTEncoder) else self.target.swin
            for name, value in inner.state_dict().items():
                state[prefix + name] = value
        return state

    def _contrast(self, student: torch.Tensor, teacher: torch.Tensor, positive: torch.Tensor,
                  exclude: torch.Tensor) -> torch.Tensor:
        """The pooled contrast: online ``[cls]`` row ``i`` against target row ``positive[i]`` (``(2b, D)`` each);
        with ``infonce`` every other target row but ``exclude[i]`` (the other view of the same pair, not a
        negative) is a negative."""
        if self.dino is not None:
            return self.dino(student, teacher[positive])
        s = self.predict_cls(student) if self.predict_cls is not None else student
        if self.cfg.contrast_loss == "cosine":
            return embedding_loss(s, teacher[positive])
        # info_nce's candidates are teacher[positive]: teacher row e sits at position argsort(positive)[e] there
        return info_nce(s, teacher[positive], temperature=self.cfg.temperature,
                        exclude=torch.argsort(positive)[exclude])

    def _online(self, x: torch.Tensor, mask: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        if isinstance(self.online, SwinEncoder):
            return self.online(x, visible, mask)
        return self.online(x, visible)

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        b = batch["q"].shape[0]
        x = torch.cat([batch["q"], batch["k"]])           # Q then K
        mask = torch.cat([batch["mask_q"], batch["mask_k"]]).bool()
        visible = visible_indices(mask)
        v_tokens = self._online(x, mask, visible)           # V_u^Q, V_r^K
        dec_tokens, pred = self.decoder(v_tokens, visible)
        target = normalized_pixels(patchify(x.float(), cfg.mask_patch))
        out: dict[str, torch.Tensor] = {"recon": masked_mse(pred, target, mask if cfg.recon_region == "masked" else None)}
        if cfg.casa_centre == "projector":
            dec_tokens = self.centre_s(dec_tokens)
        h = self.phi(dec_tokens)                            # H_u^Q, H_r^K
        with torch.no_grad():
            views = augment_views(x, torch.cat([batch["aug"][:, 0], batch["aug"][:, 1]]))  # X_w^Q, X_v^K
            y_tokens = self.target(views)
            if cfg.casa_centre == "projector":
                y_tokens = self.centre_t(y_tokens)
            y = self.psi(y_tokens)                          # Y_w^Q, Y_v^K
            if self.target_decoder is not None:
                full = torch.arange(y_tokens.shape[1], device=x.device).expand(x.shape[0], -1)
                y_keys = self.psi(self.target_decoder(y_tokens, full)[0])
            else:
                y_keys = y
        cls_h, cls_y = h.mean(1), y.mean(1)
        out["dv_spread"] = embedding_spread(cls_h.detach())  # collapse monitor of the pooled embeddings
        # content monitors (logged): how much of phi's / psi's token embeddings differs between samples at a position
        out["h_content"], out["y_content"] = content_share(h.detach()), content_share(y)
        swap = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(x.device)  # Q <-> K
        same = torch.arange(2 * b, device=x.device)
        if cfg.inter_volume and cfg.lambda_dv:
            out["dv"] = self._contrast(cls_h, cls_y, swap, same)  # (u^Q, v^K) and (r^K, w^Q)
        if cfg.lambda_st:
            if cfg.casa:
                if cfg.casa_centre == "position":
                    h, y_keys = self.centre_s(h), self.centre_t(y_keys)
                s = self.casa(v_tokens, h)
                casa_t = self.target_casa if self.target_casa is not None else self.casa
                with torch.no_grad():
                    t = casa_t(v_tokens, y_keys)
                if self.dino_st is not None:
                    out["st"] = self.dino_st(s, t)
                    if self.training:
                        self.dino_st.update_center(t)
                else:
                    p = self.predict_st(s) if self.predict_st is not None else s
                    # T of the same queries over ANOTHER sample's keys and values (Q's among the Q crops, K's among
                    # the K crops: the matched crop is no negative): infonce's negatives, and the shortcut monitor.
                    with torch.no_grad():
                        others = [casa_t(v_tokens, y_keys[torch.cat([torch.arange(b).roll(r),
                                                                         torch.arange(b, 2 * b).roll(r)]).to(x.device)])
                                  for r in range(1, b)]
                    if cfg.contrast_loss == "infonce":
                        c = t.shape[-1]
                        negatives = torch.stack(others, 2).reshape(-1, b - 1, c) if others else None
                        out["st"] = info_nce(p.reshape(-1, c), t.reshape(-1, c), negatives, cfg.temperature)
                    else:
                        out["st"] = embedding_loss(p, t)
                    if others:
                        # Shortcut monitor (logged, not optimised): the cosine loss against another sample's T. Near
                        # the cosine loss against its own T: the alignment ignores the crop's content (e.g. it
                        # matches positions only).
                        out["st_own"] = embedding_loss(p.detach(), t)
                        out["st_other"] = embedding_loss(p.detach(), others[0])
                # Collapse monitor (logged, not optimised): S and T share W_v and zeta, so a small l_st can also
                # mean every embedding became one constant. Spread = 1 - |mean of the unit S vectors|: 0 when all
                # tokens of all samples point the same way.
                out["st_spread"] = embedding_spread(s.detach())
            else:
                out["st"] = self._contrast(cls_h, cls_y, same, swap)  # (u^Q, w^Q) and (r^K, v^K)
        if self.dino is not None and self.training:
            self.dino.update_center(cls_y)
        out["loss"] = (cfg.lambda_r * out["recon"] + cfg.lambda_dv * out.get("dv", 0.0)
                       + cfg.lambda_st * out.get("st", 0.0))
        return out

    def training_step(self, batch, batch_idx):
        parts = self.losses(batch)
        loss = log_loss_parts(self, parts, batch["q"].shape[0])
        if self.alignment_watch is not None:
            message = self.alignment_watch.update(self.global_step, parts)
            if message and self.global_rank == 0:
                log.warning(message)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        return loss

    def student_parameters(self) -> list[nn.Parameter]:
        modules = (self.online, self.decoder, self.phi, self.casa, self.predict_cls, self.predict_st)
        return [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]


def _model_meta(cfg: AliceConfig) -> dict:
    base, final = cfg.ema_schedule()
    return {"in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
            "network": "target encoder" if cfg.export == "teacher" else "online encoder",
            "ema_momentum": [base, final], "teacher_init_share": teacher_init_share(cfg.steps, base, final),
            "output": "only the encoder is pretrained; fine-tune with --init-part encoder"}


@torch.no_grad()
def _pretext_baselines(cfg: AliceConfig, dataset, samples: int):
    """Reconstruction of per-patch normalised pixels: the trivial prediction is 0 (every patch's mean), perfect is
    0 loss. The contrastive terms have no such scale (a collapsed embedding scores 0) and are not stated."""
    from medpretrain.blocks.pretext import PretextBaseline, baseline_samples

    items = baseline_samples(dataset, samples)
    total = 0.0
    for s in items:
        x = torch.stack([s["q"], s["k"]]).float()
        mask = torch.stack([s["mask_q"], s["mask_k"]]).bool()
        target = normalized_pixels(patchify(x, cfg.mask_patch))
        total += float(masked_mse(torch.zeros_like(target), target, mask if cfg.recon_region == "masked" else None))
    return [PretextBaseline("recon", total / len(items), 0.0, "each patch's mean (0 after per-patch normalisation)",
                            len(items))]


register_method(PretrainMethod(
    name="alice",
    description="Alice: MAE + cross-volume contrast of matched crops + CASA; online encoder goes downstream "
                "(UNETR ViT or Swin UNETR, unlabelled pool)",
    config_cls=AliceConfig,
    needs_data=True,
    build_dataset=lambda cfg, data: AliceDataset(data, cfg),
    build_module=lambda cfg: AliceModule(cfg),
    model_meta=_model_meta,
    pretext_baselines=_pretext_baselines,
    presets={
        "cpu": {},
        # Seconds on a CPU: the method contract test and the GPU check's dry run.
        "smoke": {"patch": (32, 32, 32), "match_points": 1, "match_partners": 1, "head_dim": 64, "head_hidden": 32,
                  "head_bottleneck": 16, "casa_dim": 16, "steps": 2, "batch": 1, "num_workers": 0, "checkpoint_every": 1, "precision": "32-true"},
        # Sec. 4: 192x192x64 crops, AdamW (0.9, 0.95), lr 5e-5, batch 8 per GPU, 100k iterations, SAM matcher.
        "paper": {"model": "unetr", "patch": (192, 192, 64), "batch": 8, "ema_momentum": (0.996, 1.0), "lr": 5e-5, "steps": 100000,
                  "warmup_fraction": 0.05, "matcher": "sam", "checkpoint_every": 1000, "num_workers": 4,
                  "head_hidden": 2048, "head_bottleneck": 256, "head_dim": 4096, "decoder_depth": 4,
                  "decoder_heads": 8, "casa_dim": 256},
        # The authors' public code: DINO loss, CASA keys from the target decoder, tube masking, reconstruction
        # over the whole volume, 64^3 crops.
        "authors": {"model": "unetr", "patch": (64, 64, 64), "batch": 8, "ema_momentum": (0.996, 1.0), "lr": 5e-5, "steps": 100000,
                    "warmup_fraction": 0.05, "matcher": "sam", "contrast_loss": "dino",
                    "casa_keys": "target_decoder", "mask_kind": "tube", "recon_region": "all",
                    "checkpoint_every": 1000, "num_workers": 4, "head_hidden": 2048, "head_bottleneck": 256,
                    "head_dim": 4096, "decoder_depth": 4, "decoder_heads": 8, "casa_dim": 256},
    },
    models=("vit", "swin"),
    unused_parameters=True,
    sample_tag=_TAG,
))
