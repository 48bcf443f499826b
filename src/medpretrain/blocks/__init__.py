"""Building blocks that several methods and the engine share (losses, heads, ...)."""

from medpretrain.blocks.deep_supervision import DeepSupervisionLoss, deep_supervision_weights, pooled_targets

__all__ = ["DeepSupervisionLoss", "deep_supervision_weights", "pooled_targets"]
