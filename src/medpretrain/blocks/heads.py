"""Projection heads: small MLPs that map encoder features to the space a self-supervised loss compares.

One class covers the common shapes:

* SimCLR/BYOL-style projector: ``Linear - GELU - Linear`` (``n_layers=2``);
* a per-token regression head (e.g. predicting coordinates): the same on ``(B, N, C)`` token tensors;
* DINO-style head: a 3-layer MLP to a bottleneck, L2-normalised, then a bias-free (optionally weight-
  normalised) linear layer to the output dimension (``n_layers=3, bottleneck_dim=256,
  normalize_bottleneck=True, weight_norm_last=True``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


class ProjectionHead(nn.Module):
    """MLP over the last axis of its input (any leading axes: ``(B, C)`` embeddings or ``(B, N, C)`` tokens).

    Layout: ``n_layers`` linear layers ``in_dim -> hidden_dim -> ... -> D`` with a normalisation (optional)
    and GELU between them, where ``D`` is ``out_dim``, or ``bottleneck_dim`` when given; in that case the
    bottleneck is optionally L2-normalised and followed by a bias-free ``Linear(bottleneck_dim, out_dim)``.

    Args:
        in_dim: input features.
        out_dim: output features.
        hidden_dim: width of the hidden layers (``n_layers >= 2``); default ``max(in_dim, out_dim)``.
        n_layers: linear layers of the MLP (1 = a single linear map).
        norm: normalisation after each hidden linear layer: None, ``layer`` (LayerNorm) or ``batch``
            (BatchNorm1d over all leading axes together).
        bottleneck_dim: if given, the MLP ends at this width and a last linear layer maps it to ``out_dim``.
        normalize_bottleneck: L2-normalise the bottleneck before the last layer (DINO).
        weight_norm_last: weight-normalise the last layer (DINO; its norm ``g`` is fixed at 1 when
            ``freeze_last_norm``).
        freeze_last_norm: keep the weight-norm magnitude of the last layer at 1 (not learned).

    Example::

        proj = ProjectionHead(384, 256, hidden_dim=512)                          # Linear-GELU-Linear
        dino = ProjectionHead(768, 65536, hidden_dim=2048, n_layers=3, bottleneck_dim=256,
                              normalize_bottleneck=True, weight_norm_last=True)
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, n_layers: int = 2,
                 norm: Literal["layer", "batch"] | None = None, bottleneck_dim: int | None = None,
                 normalize_bottleneck: bool = False, weight_norm_last: bool = False,
                 freeze_last_norm: bool = True):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if min(in_dim, out_dim) < 1 or (hidden_dim is not None and hidden_dim < 1):
            raise ValueError(f"dimensions must be >= 1, got in_dim {in_dim}, out_dim {out_dim}, "
                             f"hidden_dim {hidden_dim}")
        if norm not in (None, "layer", "batch"):
            raise ValueError(f"norm must be None, 'layer' or 'batch', got {norm!r}")
        if (normalize_bottleneck or weight_norm_last) and bottleneck_dim is None:
            raise ValueError("normalize_bottleneck and weight_norm_last need a bottleneck: set bottleneck_dim "
                             "(e.g. 256)")
        hidden = hidden_dim if hidden_dim is not None else max(in_dim, out_dim)
        mlp_out = bottleneck_dim if bottleneck_dim is not None else out_dim
        dims = [in_dim] + [hidden] * (n_layers - 1) + [mlp_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(
            (nn.LayerNorm(d) if norm == "layer" else nn.BatchNorm1d(d)) for d in dims[1:-1]
        ) if norm else None
        self.act = nn.GELU()
        self.normalize_bottleneck = normalize_bottleneck
        self.last = None
        if bottleneck_dim is not None:
            last = nn.Linear(bottleneck_dim, out_dim, bias=False)
            if weight_norm_last:
                last = nn.utils.parametrizations.weight_norm(last)
                if freeze_last_norm:
                    g = last.parametrizations.weight.original0
                    g.data.fill_(1.0)
                    g.requires_grad_(False)
            self.last = last
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``(..., in_dim)`` features.

        Returns:
            ``(..., out_dim)``.
        """
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"ProjectionHead expects {self.in_dim} features on the last axis, got shape "
                             f"{tuple(x.shape)}")
        lead = x.shape[:-1]
        h = x.reshape(-1, x.shape[-1])  # BatchNorm1d wants (N, C); every leading axis counts as samples
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                if self.norms is not None:
                    h = self.norms[i](h)
                h = self.act(h)
        if self.last is not None:
            if self.normalize_bottleneck:
                h = F.normalize(h, dim=-1)
            h = self.last(h)
        return h.reshape(*lead, h.shape[-1])
