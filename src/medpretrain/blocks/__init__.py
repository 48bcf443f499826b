"""Building blocks that several methods and the engine share (losses, heads, EMA teachers, ...)."""

from medpretrain.blocks.deep_supervision import DeepSupervisionLoss, deep_supervision_weights, pooled_targets
from medpretrain.blocks.ema import cosine_momentum, ema_update, make_teacher
from medpretrain.blocks.heads import ProjectionHead

__all__ = ["DeepSupervisionLoss", "ProjectionHead", "cosine_momentum", "deep_supervision_weights", "ema_update",
           "make_teacher", "pooled_targets"]
