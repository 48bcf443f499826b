"""Deep supervision: one loss over the outputs of a network at several scales.

Networks such as PCT-Net (``../shared/papers/mis-fm.md``, Sec. 3.1.4) predict a segmentation at the full
resolution and at coarser scales of their decoder. Each output is compared with the ground truth brought
to its own scale: the label map is one-hot encoded and average-pooled, so that a coarse voxel's target is
the share of each class among the full-resolution voxels it covers (a soft target) rather than a label
picked by nearest-neighbour sampling, which would drop thin structures and shift boundaries.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def deep_supervision_weights(n: int, decay: float = 0.5) -> list[float]:
    """Weights of ``n`` outputs, full resolution first: ``1, decay, decay^2, ...`` normalised to sum 1.

    Args:
        n: number of outputs (at least 1).
        decay: ratio of the weight of an output to that of the next finer one.
    """
    if n < 1:
        raise ValueError(f"deep supervision needs at least one output, got {n}")
    if not decay > 0:
        raise ValueError(f"decay must be > 0, got {decay}")
    raw = [decay**i for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def pooled_targets(one_hot: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The one-hot target averaged down to each of ``shapes`` (soft targets: class shares per coarse voxel).

    Args:
        one_hot: ``(B, C, *spatial)`` float one-hot (or probability) target at full resolution.
        shapes: spatial shape of each output. A shape equal to the target's returns the target itself; a
            shape that divides it exactly gives the mean over each block of ``full // coarse`` voxels
            (per axis, so anisotropic down-sampling is fine); other shapes use adaptive average pooling.
    """
    spatial = tuple(one_hot.shape[2:])
    if len(spatial) not in (1, 2, 3):
        raise ValueError(f"target must have 1 to 3 spatial axes, got shape {tuple(one_hot.shape)}")
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(spatial)]
    out = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(spatial):
            raise ValueError(f"output of spatial shape {shape} does not match the target's {spatial}")
        if any(s > t for s, t in zip(shape, spatial)):
            raise ValueError(
                f"output of spatial shape {shape} is larger than the target {spatial}; deep-supervision outputs "
                "must be at the target's resolution or coarser (full resolution first)"
            )
        out.append(one_hot if shape == spatial else pool(one_hot, shape))
    return out


def _probability_target_copy(loss: nn.Module) -> nn.Module:
    """``loss``, or a copy of it whose MONAI parts take probability targets (``to_onehot_y=False``).

    MONAI losses built with ``to_onehot_y=True`` expect a ``(B, 1, ...)`` label map; the targets given here are
    already class probabilities with the logits' channel count.
    """
    if not any(getattr(m, "to_onehot_y", False) for m in loss.modules()):
        return loss
    loss = copy.deepcopy(loss)
    for m in loss.modules():
        if getattr(m, "to_onehot_y", False):
            m.to_onehot_y = False
    return loss


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a base loss over the outputs of a network at several scales.

    The integer label map is one-hot encoded once and average-pooled to each output's spatial shape; output
    ``i`` (0 = full resolution) weighs ``decay^i``, the weights normalised to sum 1 (1, 1/2, 1/4, 1/8 ... for
    the default decay). With a single output this is the base loss on the one-hot target.

    Args:
        loss: base loss taking ``(logits, target)`` with ``target`` of the logits' shape holding class
            probabilities, e.g. MONAI ``DiceCELoss(softmax=True)``. A MONAI loss built with
            ``to_onehot_y=True`` for integer label maps is used through a copy with ``to_onehot_y=False``
            (the targets given to it are one-hot already), so the same loss object serves both uses.
        decay: weight ratio between consecutive scales.

    Example::

        loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))
        value = loss((full, half, quarter), label)  # label: (B, 1, X, Y, Z) integer classes
    """

    def __init__(self, loss: nn.Module, decay: float = 0.5):
        super().__init__()
        deep_supervision_weights(1, decay)  # validates decay
        self.loss = _probability_target_copy(loss)
        self.decay = decay

    def forward(self, outputs: Sequence[torch.Tensor] | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            outputs: logits ``(B, C, *spatial)`` per scale, full resolution first (a single tensor is one scale).
            target: ``(B, 1, *spatial)`` or ``(B, *spatial)`` integer labels in ``0..C-1`` at full resolution,
                or ``(B, C, *spatial)`` class probabilities.
        """
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        outputs = list(outputs)
        if not outputs:
            raise ValueError("deep supervision got no outputs")
        full = outputs[0]
        num_classes = full.shape[1]
        soft = self.one_hot(target, num_classes, full)
        if tuple(soft.shape[2:]) != tuple(full.shape[2:]):
            raise ValueError(
                f"the first output must be at the target's resolution: output {tuple(full.shape)}, "
                f"target {tuple(target.shape)}; order deep-supervision outputs full resolution first"
            )
        targets = pooled_targets(soft, [o.shape[2:] for o in outputs])
        weights = deep_supervision_weights(len(outputs), self.decay)
        total = full.new_zeros(())
        for w, out, tgt in zip(weights, outputs, targets):
            if out.shape[1] != num_classes:
                raise ValueError(f"outputs have {num_classes} and {out.shape[1]} channels; every scale must predict "
                                 "the same classes")
            total = total + w * self.loss(out, tgt)
        return total

    @staticmethod
    def one_hot(target: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` float one-hot of an integer label map (probability targets pass through)."""
        if target.dim() == like.dim() and target.shape[1] == num_classes and (
            num_classes > 1 or torch.is_floating_point(target)
        ):
            return target.to(like.dtype)
        if target.dim() == like.dim():
            if target.shape[1] != 1:
                raise ValueError(f"target of shape {tuple(target.shape)} is neither a (B, 1, ...) label map nor "
                                 f"(B, {num_classes}, ...) class probabilities for logits {tuple(like.shape)}")
            target = target[:, 0]
        labels = target.long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"target labels span {int(labels.min())}..{int(labels.max())} but the network predicts "
                             f"{num_classes} classes (0..{num_classes - 1})")
        dims = labels.dim()
        # one_hot appends the class axis last; move it behind the batch axis.
        return F.one_hot(labels, num_classes).permute(0, dims, *range(1, dims)).to(like.dtype)
