"""Optimisers and learning-rate schedules shared by every training module (segmentation and pretraining).

One place for the choice a method's configuration makes (``adamw``, ``adam`` or ``sgd``) and for the one-cycle
schedule (warm-up, then cosine decay) stepped once per optimiser step, so that a new method does not copy the
wiring of an existing one.
"""

from __future__ import annotations

import math
from typing import Iterable, Literal

import torch


def one_cycle_factor(step: int, total_steps: int, warmup_fraction: float, start_div: float = 25.0,
                     final_div: float = 1e4) -> float:
    """Learning-rate multiplier of the one-cycle schedule: cosine warm-up from 1/start_div to 1 over the first
    ``warmup_fraction`` of the steps, then cosine decay to 1/final_div (PyTorch OneCycleLR's shape, defined for
    any number of steps, including runs of one or two)."""
    warmup = int(round(warmup_fraction * total_steps))
    lo, end = 1.0 / start_div, 1.0 / final_div
    if step < warmup:
        return lo + (1.0 - lo) * (1 - math.cos(math.pi * step / warmup)) / 2
    decay = max(total_steps - warmup - 1, 1)
    t = min((step - warmup) / decay, 1.0)
    return end + (1.0 - end) * (1 + math.cos(math.pi * t)) / 2


def one_cycle_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    """Warm-up then cosine decay, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: one_cycle_factor(step, total_steps, warmup_fraction)
    )


def make_optimizer(params: Iterable[torch.nn.Parameter], kind: Literal["adamw", "adam", "sgd"], lr: float,
                   weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                   sgd_momentum: float = 0.9) -> torch.optim.Optimizer:
    """The optimiser a configuration names.

    Args:
        params: the trainable parameters (a student's, never an EMA teacher's).
        kind: ``adamw`` (decoupled weight decay), ``adam`` (``weight_decay`` as an L2 term, as older papers) or
            ``sgd`` with Nesterov-free momentum ``sgd_momentum``.
        lr, weight_decay: as usual.
        betas: Adam(W)'s betas (MAE-style methods use (0.9, 0.95)).
    """
    params = [p for p in params if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=sgd_momentum, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{kind}'; use adamw, adam or sgd")


def warmup_constant_factor(step: int, total_steps: int, warmup_fraction: float, start_div: float = 25.0) -> float:
    """Learning-rate multiplier of ``warmup-constant``: the one-cycle warm-up, then 1 for every later step (a
    schedule that does not depend on where the run ends, so snapshots along it are comparable and the run can
    be continued past its planned length)."""
    warmup = int(round(warmup_fraction * total_steps))
    if step < warmup:
        lo = 1.0 / start_div
        return lo + (1.0 - lo) * (1 - math.cos(math.pi * step / warmup)) / 2
    return 1.0


def check_one_schedule(schedule: str, lr_schedule: str) -> None:
    """Refuse a method's own ``step`` schedule beside ``lr_schedule: warmup-constant``: two schedules, one lr."""
    if schedule == "step" and lr_schedule == "warmup-constant":
        raise ValueError("schedule 'step' and lr_schedule 'warmup-constant' are two schedules; keep one "
                         "(schedule: one-cycle with lr_schedule: warmup-constant for snapshots of a long run)")


def scheduled_optimization(optimizer: torch.optim.Optimizer, cfg) -> dict:
    """What ``LightningModule.configure_optimizers`` returns for ``optimizer`` under the schedule a
    ``TrainingConfig`` names (``lr_schedule``: one-cycle or warm-up then constant, over ``cfg.steps`` with
    ``cfg.warmup_fraction``), stepped once per optimiser step. Every training module uses this."""
    kind = getattr(cfg, "lr_schedule", "one-cycle")
    if kind == "warmup-constant":
        steps, warmup = cfg.steps, cfg.warmup_fraction
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                      lambda step: warmup_constant_factor(step, steps, warmup))
    elif kind == "one-cycle":
        scheduler = one_cycle_scheduler(optimizer, cfg.steps, cfg.warmup_fraction)
    else:
        raise ValueError(f"unknown lr_schedule '{kind}'; use one-cycle or warmup-constant")
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def one_cycle_optimization(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float) -> dict:
    """What ``LightningModule.configure_optimizers`` returns for ``optimizer`` under the one-cycle schedule
    (prefer :func:`scheduled_optimization`, which follows the configuration's ``lr_schedule``)."""
    return {"optimizer": optimizer,
            "lr_scheduler": {"scheduler": one_cycle_scheduler(optimizer, total_steps, warmup_fraction),
                             "interval": "step"}}
