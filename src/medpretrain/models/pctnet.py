"""PCT-Net, the Parallel Convolution and Transformer Network of MIS-FM (Wang et al., section 3.1.4, Fig. 3).

Three parts: a convolutional embedding module (levels 0-1), a pyramid of PCT blocks in an encoder-decoder
(levels 2-4; each block adds a convolution branch and a shifted-window transformer branch) and a prediction
head that mirrors the embedding module. Parameter names, order and shapes equal the authors' released model
(``../shared/reference/pctnet_misfm_state_dict.json``), so their pretrained weights load without renaming.

Axis convention. Every network in this project takes ``(N, C, X, Y, Z)`` tensors (prepared volumes are RAS
arrays, so Z is the slice axis). The released weights are ``(D, H, W)`` = ``(Z, Y, X)`` kernels (ITK array
order), so the network reverses the spatial axes on entry and again on every output: the "2D" (1x3x3)
convolutions are in-plane (X, Y), the slice axis Z is down-sampled 8 times and X, Y 16 times in the default
resolution mode, and the paper's 64x128x128 (DxHxW) patch is ``--patch 128 128 64`` here.

Differences from the authors' code, none of which changes a parameter name or shape:
- one built model accepts every valid input size (theirs is rebuilt per size): windows are computed per
  forward; a feature-map side not larger than the window becomes the window along that axis, with no shift
  along it (as Swin does); other sides are padded to a multiple of the window and the padding is masked out
  of the attention (theirs attends to the zero padding);
- attention runs through ``torch.nn.functional.scaled_dot_product_attention`` with the relative position bias
  and the shift/padding mask as ``attn_mask`` (fused kernels where the device has them);
- the relative position index buffer of a fresh model uses the collision-free formula; a loaded checkpoint's
  buffer (the released one maps several offsets to one table entry) is used as it is, also for shrunk
  windows, so released weights compute what they computed for the authors;
- parameters the forward pass never uses are created frozen (see :class:`PCTNet`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch.utils.checkpoint import checkpoint

from medpretrain.errors import ConfigError

__all__ = ["PCTNet", "shifted_window_mask"]

_Triple = tuple[int, int, int]


def _kernel(two_d: bool) -> tuple[_Triple, _Triple]:
    """Kernel and padding of a 3x3x3 convolution, or of its in-plane 1x3x3 ("2D") version."""
    return ((1, 3, 3), (0, 1, 1)) if two_d else ((3, 3, 3), (1, 1, 1))


def _scale(two_d: bool) -> _Triple:
    """Resampling factor between a level and the next: in-plane only after a "2D" level."""
    return (1, 2, 2) if two_d else (2, 2, 2)


class ConvBlock(nn.Module):
    """BN-PReLU-Conv, BN-PReLU-Dropout-Conv (``conv_conv.0`` ... ``conv_conv.6``).

    Args:
        channels: input and output channels.
        two_d: 1x3x3 kernels instead of 3x3x3.
        dropout: dropout probability before the second convolution.
    """

    def __init__(self, channels: int, two_d: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        kernel, pad = _kernel(two_d)
        self.conv_conv = nn.Sequential(
            nn.BatchNorm3d(channels), nn.PReLU(), nn.Conv3d(channels, channels, kernel, padding=pad),
            nn.BatchNorm3d(channels), nn.PReLU(),
            # Identity at p=0: the released model has a Dropout(0) here, which would still cost a pass.
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv3d(channels, channels, kernel, padding=pad),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_conv(x)


class DownSample(nn.Module):
    """MaxPool, then BN-PReLU-Conv to the next width.

    Args:
        in_channels: channels of the finer level.
        out_channels: channels of the coarser level.
        pool_2d: pool 1x2x2 (after a "2D" level) instead of 2x2x2.
        conv_2d: 1x3x3 convolution (into a "2D" level) instead of 3x3x3.
    """

    def __init__(self, in_channels: int, out_channels: int, pool_2d: bool, conv_2d: bool) -> None:
        super().__init__()
        kernel, pad = _kernel(conv_2d)
        self.pool = nn.MaxPool3d(_scale(pool_2d))
        self.conv = nn.Sequential(
            nn.BatchNorm3d(in_channels), nn.PReLU(), nn.Conv3d(in_channels, out_channels, kernel, padding=pad)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class UpCat(nn.Module):
    """BN-PReLU-transposed conv of the coarse features, concatenation after the skip, BN-PReLU-Conv.

    Args:
        low_channels: channels of the skip (finer level) and of the output.
        high_channels: channels of the coarser level.
        up_2d: up-sample 1x2x2 (into a "2D" level) instead of 2x2x2.
        conv_2d: 1x3x3 fusing convolution instead of 3x3x3.
    """

    def __init__(self, low_channels: int, high_channels: int, up_2d: bool, conv_2d: bool) -> None:
        super().__init__()
        scale = _scale(up_2d)
        kernel, pad = _kernel(conv_2d)
        self.up = nn.Sequential(
            nn.BatchNorm3d(high_channels), nn.PReLU(),
            nn.ConvTranspose3d(high_channels, low_channels, scale, stride=scale),
        )
        self.conv = nn.Sequential(
            nn.BatchNorm3d(2 * low_channels), nn.PReLU(),
            nn.Conv3d(2 * low_channels, low_channels, kernel, padding=pad),
        )

    def forward(self, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        # Skip first: the order the released fusing convolutions were trained with.
        return self.conv(torch.cat([skip, self.up(coarse)], dim=1))


class OutConv(nn.Module):
    """BN-PReLU-1x1x1 convolution to class logits."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.BatchNorm3d(in_channels), nn.PReLU(), nn.Conv3d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Embedding(nn.Module):
    """Multi-scale embedding: projection and conv block at level 0, down-sampling and conv block at level 1,
    down-sampling to the first PCT level.

    Args:
        in_channels: image channels.
        features: channels of levels 0, 1 and 2.
        two_d: whether levels 0 and 1 use in-plane ("2D") convolutions.
    """

    def __init__(self, in_channels: int, features: Sequence[int], two_d: tuple[bool, bool]) -> None:
        super().__init__()
        f0, f1, f2 = features
        kernel, pad = _kernel(two_d[0])
        self.proj = nn.Conv3d(in_channels, f0, kernel, padding=pad)
        self.conv0 = ConvBlock(f0, two_d[0])
        self.conv1 = ConvBlock(f1, two_d[1])
        self.down1 = DownSample(f0, f1, pool_2d=two_d[0], conv_2d=two_d[1])
        self.down2 = DownSample(f1, f2, pool_2d=two_d[1], conv_2d=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x0 = self.conv0(self.proj(x))
        x1 = self.conv1(self.down1(x0))
        return x0, x1, self.down2(x1)


class PredictionHead(nn.Module):
    """Mirror of :class:`Embedding`: up-sampling with skip fusion and a conv block at levels 1 and 0, and a
    1x1x1 output convolution at each.

    Args:
        features: channels of levels 0, 1 and 2.
        out_channels: classes.
        two_d: whether levels 0 and 1 use in-plane ("2D") convolutions.
    """

    def __init__(self, features: Sequence[int], out_channels: int, two_d: tuple[bool, bool]) -> None:
        super().__init__()
        f0, f1, f2 = features
        self.up1 = UpCat(f0, f1, up_2d=two_d[0], conv_2d=two_d[0])
        self.up2 = UpCat(f1, f2, up_2d=two_d[1], conv_2d=two_d[1])
        self.conv0 = ConvBlock(f0, two_d[0])
        self.conv1 = ConvBlock(f1, two_d[1])
        self.out_conv0 = OutConv(f0, out_channels)
        self.out_conv1 = OutConv(f1, out_channels)

    def forward(self, x0, x1, x2, deep: bool) -> list[torch.Tensor]:
        d1 = self.conv1(self.up2(x1, x2))
        d0 = self.conv0(self.up1(x0, d1))
        return [self.out_conv0(d0), self.out_conv1(d1)] if deep else [self.out_conv0(d0)]


# --- shifted-window attention --------------------------------------------------------------------------


def _windows_and_shifts(sizes: Sequence[int], window: int, shifted: bool) -> tuple[_Triple, _Triple]:
    """Effective window and shift per axis for a feature map: a side not larger than the window becomes
    the window along that axis and is not shifted (one window already sees the whole side)."""
    win = tuple(s if s <= window else window for s in sizes)
    shift = tuple(window // 2 if shifted and s > window else 0 for s in sizes)
    return win, shift


@lru_cache(maxsize=64)
def shifted_window_mask(
    sizes: _Triple, window: _Triple, shift: _Triple, device: torch.device = torch.device("cpu")
) -> torch.Tensor | None:
    """Which token pairs of each window may not attend to each other, or None when all may.

    The feature map (``sizes``, D x H x W) is padded at the end to a multiple of ``window`` and rolled by
    ``-shift`` before being cut into windows. Two tokens of a window are kept apart when one of them is
    padding, or when the roll brought them together from opposite ends of an axis.

    Args:
        sizes: feature-map sides before padding.
        window: window sides.
        shift: cyclic shift per axis (0 for none).
        device: where to build the mask.

    Returns:
        bool tensor ``(windows, tokens, tokens)``, True where attention is blocked, in the window order of
        the partition (D-major); None when no window needs a mask. Cached: do not modify it.
    """
    padded = [s + (-s) % w for s, w in zip(sizes, window)]
    label = torch.zeros(padded, dtype=torch.long, device=device)
    is_pad = torch.zeros(padded, dtype=torch.bool, device=device)
    for axis, (side, full, s) in enumerate(zip(sizes, padded, shift)):
        view = [1, 1, 1]
        view[axis] = full
        pos = torch.arange(full, device=device).view(view)
        # Positions [0, s) end up in the last window of the axis after the roll, beside the far end.
        label = label + (pos < s).long() * (2 ** axis)
        is_pad = is_pad | (pos >= side)
    label = label.masked_fill(is_pad, 8)  # padding: a label of its own, so no real token sees it
    if any(shift):
        label = torch.roll(label, [-s for s in shift], dims=(0, 1, 2))
    (nd, wd), (nh, wh), (nw, ww) = [(p // w, w) for p, w in zip(padded, window)]
    label = label.view(nd, wd, nh, wh, nw, ww).permute(0, 2, 4, 1, 3, 5).reshape(nd * nh * nw, wd * wh * ww)
    blocked = label.unsqueeze(2) != label.unsqueeze(1)
    return blocked if bool(blocked.any()) else None


def _relative_position_index(window: int) -> torch.Tensor:
    """Table row of every token pair of a cubic window: one row per distinct 3D offset."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(window)] * 3, indexing="ij")).flatten(1)  # (3, N)
    offsets = (coords[:, :, None] - coords[:, None, :]) + (window - 1)  # (3, N, N), each in [0, 2w-2]
    side = 2 * window - 1
    return offsets[0] * side * side + offsets[1] * side + offsets[2]


def _attend(qkv: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None, heads: int,
            dropout: float) -> torch.Tensor:
    """Attention core: ``qkv`` (B, windows, N, 3C), ``bias`` (heads, N, N) -> (B, windows, N, C)."""
    b, nw, n, c3 = qkv.shape
    c = c3 // 3
    qkv = qkv.view(b, nw, n, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, heads, N, d)
    if mask is None:
        # One bias for every window: batch and windows share the batch axis, the bias broadcasts.
        q, k, v = (t.reshape(b * nw, heads, n, -1) for t in qkv.unbind(0))
        attn_mask = bias.unsqueeze(0)
    else:
        # Per-window masks: windows join the head axis so the (windows, heads) mask broadcasts over the
        # batch instead of being copied for every sample.
        q, k, v = (t.reshape(b, nw * heads, n, -1) for t in qkv.unbind(0))
        attn_mask = bias.unsqueeze(0).masked_fill(mask.unsqueeze(1), float("-inf")).view(1, nw * heads, n, n)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
    return out.view(b, nw, heads, n, -1).transpose(2, 3).reshape(b, nw, n, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    Args:
        dim: token channels.
        num_heads: attention heads.
        window_size: full (cubic) window side; the bias table covers its offsets, so smaller windows reuse it.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 3, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self, window: _Triple) -> torch.Tensor:
        """Bias ``(heads, N, N)`` for a window of sides ``window`` (each at most the full window)."""
        index = self.relative_position_index
        full = self.window_size
        if window != (full, full, full):
            # Tokens of a smaller window are the corner sub-grid of the full one; since the index depends
            # only on the offset between two tokens, its sub-matrix is right whatever formula filled it.
            grid = torch.meshgrid(*[torch.arange(w, device=index.device) for w in window], indexing="ij")
            sub = (grid[0] * full * full + grid[1] * full + grid[2]).flatten()
            index = index[sub][:, sub]
        n = index.shape[0]
        bias = self.relative_position_bias_table[index.reshape(-1)].view(n, n, self.num_heads)
        return bias.permute(2, 0, 1)

    def forward(self, x: torch.Tensor, window: _Triple, mask: torch.Tensor | None) -> torch.Tensor:
        """Attend within windows.

        Args:
            x: ``(B, windows, N, C)`` tokens, N = prod(window).
            window: window sides.
            mask: ``shifted_window_mask`` output for these windows, or None.
        """
        qkv = self.qkv(x)
        bias = self.position_bias(window).to(qkv.dtype)  # autocast: the mask must match the query dtype
        dropout = self.attn_drop if self.training else 0.0
        if qkv.requires_grad and qkv.device.type == "cpu":
            # On CPU, a bias that needs a gradient sends SDPA to its math kernel, which keeps the whole
            # attention matrix, its softmax and dropout for the backward pass (most of the memory of a
            # training step at level 2); recomputing them there costs far less than the convolutions.
            out = checkpoint(_attend, qkv, bias, mask, self.num_heads, dropout, use_reentrant=False)
        else:
            out = _attend(qkv, bias, mask, self.num_heads, dropout)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """Linear-GELU-Dropout-Linear-Dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window self-attention and MLP, each with a drop-path residual.

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: window side.
        shifted: shift windows by half a window (SP-MSA) instead of not (P-MSA).
        mlp_ratio: MLP hidden width / dim.
        drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on the attention weights.
        drop_path: stochastic depth probability of each residual branch.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shifted: bool, mlp_ratio: float = 4.0,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, D, H, W, C)`` channels-last feature map; returns the same shape."""
        b, *sizes, c = x.shape
        window, shift = _windows_and_shifts(sizes, self.window_size, self.shifted)
        pads = [(-s) % w for s, w in zip(sizes, window)]
        y = self.norm1(x)
        if any(pads):
            y = F.pad(y, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        if any(shift):
            y = torch.roll(y, [-s for s in shift], dims=(1, 2, 3))
        padded = y.shape[1:4]
        counts = [p // w for p, w in zip(padded, window)]
        y = y.reshape(b, counts[0], window[0], counts[1], window[1], counts[2], window[2], c)
        y = y.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, window[0] * window[1] * window[2], c)
        mask = shifted_window_mask(tuple(sizes), window, shift, x.device)
        y = self.attn(y, window, mask)
        y = y.view(b, *counts, *window, c).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, *padded, c)
        if any(shift):
            y = torch.roll(y, list(shift), dims=(1, 2, 3))
        if any(pads):
            y = y[:, : sizes[0], : sizes[1], : sizes[2]]
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinLayer(nn.Module):
    """Window attention blocks alternating plain and shifted windows (``blocks.0`` P-MSA, ``blocks.1`` SP-MSA)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 drop: float, drop_path: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window_size, shifted=i % 2 == 1, mlp_ratio=mlp_ratio, drop=drop,
                      attn_drop=drop, drop_path=drop_path)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PCTBlock(nn.Module):
    """Parallel convolution and transformer block: ``conv(x) + trans(x)``, no residual around the sum.

    Args:
        channels: channels.
        num_heads: attention heads.
        window_size: window side.
        mlp_ratio: MLP hidden width / channels.
        dropout: dropout of the conv branch, of the tokens entering the transformer, of attention and MLP.
        drop_path: stochastic depth of the transformer residuals.
        depth: transformer blocks (alternating plain and shifted windows).
    """

    def __init__(self, channels: int, num_heads: int, window_size: int, mlp_ratio: float, dropout: float,
                 drop_path: float, depth: int = 2) -> None:
        super().__init__()
        self.conv = ConvBlock(channels, two_d=False, dropout=dropout)
        self.trans = SwinLayer(channels, depth, num_heads, window_size, mlp_ratio, dropout, drop_path)
        # Held so the released weights load; the released forward never applies it, and neither do we.
        self.norm_layer = nn.LayerNorm(channels)
        self.pos_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.pos_drop(x.permute(0, 2, 3, 4, 1))
        return self.conv(x) + self.trans(tokens).permute(0, 4, 1, 2, 3)


class PyramidPCT(nn.Module):
    """Encoder-decoder of PCT blocks over levels 2-4, with 1x1x1 outputs at levels 2 and 3.

    Args:
        features: channels of levels 2, 3 and 4.
        num_heads: attention heads at levels 2, 3 and 4.
        out_channels: classes.
        window_size, mlp_ratio, dropout, drop_path: see :class:`PCTBlock`.
    """

    def __init__(self, features: Sequence[int], num_heads: Sequence[int], out_channels: int, window_size: int,
                 mlp_ratio: float, dropout: float, drop_path: float) -> None:
        super().__init__()
        f2, f3, f4 = features

        def pct(level: int) -> PCTBlock:
            return PCTBlock(features[level], num_heads[level], window_size, mlp_ratio, dropout, drop_path)

        self.down3 = DownSample(f2, f3, pool_2d=False, conv_2d=False)
        self.down4 = DownSample(f3, f4, pool_2d=False, conv_2d=False)
        self.up3 = UpCat(f2, f3, up_2d=False, conv_2d=False)
        self.up4 = UpCat(f3, f4, up_2d=False, conv_2d=False)
        self.convtrans_e2 = pct(0)
        self.convtrans_d2 = pct(0)
        self.convtrans_e3 = pct(1)
        self.convtrans_d3 = pct(1)
        self.convtrans_e4 = pct(2)
        self.out_conv2 = OutConv(f2, out_channels)
        self.out_conv3 = OutConv(f3, out_channels)

    def forward(self, x2: torch.Tensor, deep: bool) -> list[torch.Tensor]:
        """Returns ``[decoded level 2]``, plus the level-2 and level-3 logits when ``deep``."""
        e2 = self.convtrans_e2(x2)
        e3 = self.convtrans_e3(self.down3(e2))
        e4 = self.convtrans_e4(self.down4(e3))
        d3 = self.convtrans_d3(self.up4(e3, e4))
        d2 = self.convtrans_d2(self.up3(e2, d3))
        return [d2, self.out_conv2(d2), self.out_conv3(d3)] if deep else [d2]


class PCTNet(nn.Module):
    """PCT-Net (MIS-FM): convolutional embedding, pyramid of parallel convolution + Swin blocks, prediction
    head, with the authors' parameter names so their released weights load as they are.

    Input ``(N, C, X, Y, Z)``; every side must be a multiple of :attr:`divisor` (X, Y: 16; Z: 16, 8 or 4 for
    resolution mode 0, 1 or 2), otherwise ConfigError names the nearest valid sizes. One built model takes
    every valid size. Internally the network runs on ``(N, C, Z, Y, X)``, the layout of the released kernels
    (see the module docstring).

    Output: full-resolution logits ``(N, out_channels, X, Y, Z)``. With ``deep_supervision=True`` and the
    model in training mode, a tuple of 4 logits tensors instead, finest first: full resolution, level 1,
    level 2, level 3 (mode 1: ``(X/2, Y/2, Z)``, ``(X/4, Y/4, Z/2)``, ``(X/8, Y/8, Z/4)``). The paper weights
    their losses 1, 1/2, 1/4, 1/8 (normalised) against the label average-pooled to each scale. In eval mode
    the output is always one tensor.

    The released model holds three embedding modules and three prediction heads, one pair per resolution
    mode (``embeddings.i`` / ``pred_heads.i``), around one shared ``pyramid_ct``. Only the selected pair runs.
    Parameters the forward pass never uses (the other modes' pairs, the PCT blocks' ``norm_layer``, and the
    deep-supervision output convolutions when ``deep_supervision=False``) are created with
    ``requires_grad=False``: optimisers skip them and DDP does not wait for their gradients; they are still
    saved and loaded with the state dict.

    Args:
        in_channels: image channels.
        out_channels: classes including background.
        features: channels of the five levels (paper: 24, 48, 128, 256, 512).
        num_heads: attention heads of the PCT levels 2, 3, 4 (paper: 4, 8, 16, i.e. 32 channels per head).
        window_size: attention window side (paper: 6; shifted windows move by half of it).
        mlp_ratio: transformer MLP width / channels.
        dropout: dropout in the PCT module (conv branch, tokens, attention, MLP; paper 0.2). The embedding
            and head conv blocks have none, as released.
        drop_path: stochastic depth of the transformer residuals (0.2).
        resolution_mode: 0 all levels 3D; 1 level 0 in-plane ("2D": 1x3x3 convolutions, 1x2x2 resampling),
            for anisotropic data, the paper's setting; 2 levels 0 and 1 in-plane.
        deep_supervision: return the 4 outputs in training mode.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] = (24, 48, 128, 256, 512),
        num_heads: Sequence[int] = (4, 8, 16),
        window_size: int = 6,
        mlp_ratio: float = 4.0,
        dropout: float = 0.2,
        drop_path: float = 0.2,
        resolution_mode: int = 1,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        features, num_heads = tuple(features), tuple(num_heads)
        if len(features) != 5:
            raise ConfigError(f"PCT-Net features must give 5 channel counts (one per level), got {features}")
        if len(num_heads) != 3 or any(f % h for f, h in zip(features[2:], num_heads)):
            raise ConfigError(
                f"PCT-Net num_heads {num_heads} must give 3 head counts that divide the PCT level channels "
                f"{features[2:]} (e.g. {tuple(max(1, f // 32) for f in features[2:])} for 32 channels per head)"
            )
        if resolution_mode not in (0, 1, 2):
            raise ConfigError(
                f"PCT-Net resolution_mode {resolution_mode!r} is not 0 (all 3D), 1 (level 0 in-plane) "
                "or 2 (levels 0 and 1 in-plane)"
            )
        if window_size < 2:
            raise ConfigError(f"PCT-Net window_size {window_size} must be at least 2 (shifted windows move by half)")
        self._mode = resolution_mode
        self.deep_supervision = deep_supervision
        modes = [(False, False), (True, False), (True, True)]
        self.embeddings = nn.ModuleList([Embedding(in_channels, features[:3], two_d) for two_d in modes])
        self.pyramid_ct = PyramidPCT(features[2:], num_heads, out_channels, window_size, mlp_ratio, dropout,
                                     drop_path)
        self.pred_heads = nn.ModuleList([PredictionHead(features[:3], out_channels, two_d) for two_d in modes])

        unused = [m for i, m in enumerate(self.embeddings) if i != resolution_mode]
        unused += [m for i, m in enumerate(self.pred_heads) if i != resolution_mode]
        unused += [m.norm_layer for m in self.modules() if isinstance(m, PCTBlock)]
        if not deep_supervision:
            unused += [self.pred_heads[resolution_mode].out_conv1, self.pyramid_ct.out_conv2,
                       self.pyramid_ct.out_conv3]
        for module in unused:
            module.requires_grad_(False)

    @property
    def resolution_mode(self) -> int:
        """The mode chosen at construction (which embedding/head pair runs)."""
        return self._mode

    @property
    def divisor(self) -> _Triple:
        """Every input side must be a multiple of this, in (X, Y, Z) order."""
        return (16, 16, 2 ** (4 - self._mode))

    def check_input_size(self, size: Sequence[int]) -> None:
        """Raise ConfigError naming the nearest valid sizes if spatial ``size`` (X, Y, Z) does not fit."""
        size = tuple(int(s) for s in size)
        if len(size) == 3 and all(s > 0 and s % d == 0 for s, d in zip(size, self.divisor)):
            return
        if len(size) != 3:
            raise ConfigError(f"PCT-Net takes 3D inputs (N, C, X, Y, Z); got spatial size {size}")
        down = tuple(max(d, s // d * d) for s, d in zip(size, self.divisor))
        up = tuple(max(d, -(-s // d) * d) for s, d in zip(size, self.divisor))
        nearest = tuple(lo if s - lo <= hi - s else hi for s, lo, hi in zip(size, down, up))
        others = " or ".join(str(v) for v in dict.fromkeys([down, up]) if v != nearest)
        raise ConfigError(
            f"input size {size} does not fit PCT-Net (resolution mode {self._mode}): X, Y, Z must be multiples "
            f"of {self.divisor} (its total down-sampling); nearest valid size: {nearest}"
            + (f" (also {others})" if others else "")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Logits at full resolution; in training with deep supervision, (full, level 1, level 2, level 3)."""
        if x.dim() != 5:
            raise ConfigError(f"PCT-Net takes (N, C, X, Y, Z) tensors; got shape {tuple(x.shape)}")
        self.check_input_size(x.shape[2:])
        deep = self.training and self.deep_supervision
        x = x.permute(0, 1, 4, 3, 2).contiguous()  # (X, Y, Z) -> the released (D, H, W) = (Z, Y, X)
        x0, x1, x2 = self.embeddings[self._mode](x)
        d2, *coarse = self.pyramid_ct(x2, deep)
        outs = self.pred_heads[self._mode](x0, x1, d2, deep) + coarse
        outs = [o.permute(0, 1, 4, 3, 2).contiguous() for o in outs]
        return tuple(outs) if deep else outs[0]
