"""Masked image modelling blocks: token masks over a 3D patch grid, patchify/unpatchify, MAE pixel targets.

A volume ``(B, C, X, Y, Z)`` is cut into non-overlapping cubes of ``p``^3 voxels ("patches", one per encoder
token), numbered row-major over the grid ``(X/p, Y/p, Z/p)`` (X slowest), the order MONAI's ViT and Swin
patch embeddings flatten their tokens in. A mask says, per patch, whether it is hidden from the encoder.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch


def mask_counts(n_tokens: int, ratio: float) -> tuple[int, int]:
    """``(masked, visible)`` patch counts for a masking ratio (MAE rounds the visible count down: at least one
    patch stays visible and, for ratio > 0, at least one is masked)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be within [0, 1), got {ratio}")
    visible = max(1, int(n_tokens * (1.0 - ratio)))
    if ratio > 0:
        visible = min(visible, n_tokens - 1)
    return n_tokens - visible, visible


def random_token_mask(grid: Sequence[int], ratio: float, rng: np.random.Generator,
                      kind: Literal["random", "tube"] = "random") -> np.ndarray:
    """Boolean mask over the patch grid, flattened row-major: True = masked.

    Args:
        grid: patches per axis ``(gx, gy, gz)``.
        ratio: share of patches masked (``random``), or of ``(x, y)`` columns masked (``tube``).
        rng: numpy generator (the dataset's per-sample stream, so a sample's mask is a function of its seed).
        kind: ``random`` masks patches independently of position (MAE); ``tube`` masks whole columns along z
            (every z of a chosen ``(x, y)``), the authors' Alice code.
    """
    gx, gy, gz = (int(g) for g in grid)
    if kind == "tube":
        masked, _ = mask_counts(gx * gy, ratio)
        cols = np.zeros(gx * gy, bool)
        cols[rng.permutation(gx * gy)[:masked]] = True
        return np.repeat(cols.reshape(gx, gy, 1), gz, axis=2).reshape(-1)
    if kind != "random":
        raise ValueError(f"mask kind must be 'random' or 'tube', got {kind!r}")
    n = gx * gy * gz
    masked, _ = mask_counts(n, ratio)
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[:masked]] = True
    return mask


def visible_indices(mask: torch.Tensor) -> torch.Tensor:
    """``(B, V)`` sorted indices of the visible patches of each row of a ``(B, N)`` boolean mask (every row must
    hide the same number of patches, as :func:`random_token_mask` guarantees for one grid and ratio)."""
    counts = (~mask).sum(1)
    if counts.numel() and not torch.all(counts == counts[0]):
        raise ValueError(f"masks hide different numbers of patches per sample ({counts.tolist()}); use one ratio")
    # A stable sort of the mask puts the visible (False) positions first, in their original order.
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    return order[:, : int(counts[0]) if counts.numel() else 0]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``(B, N, D)`` tokens and ``(B, K)`` indices -> ``(B, K, D)``."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(visible: torch.Tensor, index: torch.Tensor, fill: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """A full ``(B, N, D)`` token sequence: ``fill`` (a ``(D,)`` mask token) everywhere, ``visible`` at ``index``."""
    b, _, d = visible.shape
    out = fill.to(visible.dtype).expand(b, n_tokens, d).clone()
    return out.scatter(1, index[..., None].expand(-1, -1, d), visible)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, X, Y, Z)`` -> ``(B, N, p**3 * C)`` patches, row-major over the grid (voxel order within a patch:
    x, y, z, then channel)."""
    b, c, *spatial = x.shape
    if any(s % p for s in spatial):
        raise ValueError(f"volume {tuple(spatial)} is not a whole number of {p}^3 patches")
    gx, gy, gz = (s // p for s in spatial)
    v = x.reshape(b, c, gx, p, gy, p, gz, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return v.reshape(b, gx * gy * gz, p**3 * c)


def unpatchify(tokens: torch.Tensor, p: int, grid: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = tokens.shape[0]
    gx, gy, gz = (int(g) for g in grid)
    v = tokens.reshape(b, gx, gy, gz, p, p, p, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return v.reshape(b, channels, gx * p, gy * p, gz * p)


def normalized_pixels(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's reconstruction target: each patch's voxels standardised by the patch's own mean and variance."""
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error per patch, averaged over the masked patches (``mask`` True) of each sample then over
    the batch (eq. 1 of Alice: ``1/n_m * sum``); ``mask=None`` averages over every patch."""
    per_patch = (pred.float() - target.float()).pow(2).mean(-1)
    if mask is None:
        return per_patch.mean()
    m = mask.to(per_patch.dtype)
    return ((per_patch * m).sum(1) / m.sum(1).clamp_min(1.0)).mean()
