"""Exponential moving average (EMA) teachers: a frozen copy of a network whose weights trail the student's.

Mean-teacher style self-supervision (BYOL, DINO, ASA, ...) keeps a teacher network with the student's
architecture and, after every optimiser step, moves each teacher weight a small step towards the student's:
``teacher = m * teacher + (1 - m) * student``. The momentum ``m`` usually rises on a cosine schedule from a
base value (e.g. 0.996 or 0.999) to 1 over training, so the teacher moves less and less as training ends.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn as nn


def cosine_momentum(step: int, total: int, base: float = 0.999, final: float = 1.0) -> float:
    """Momentum of the EMA update after ``step`` updates out of ``total``: ``base`` at step 0, rising along a
    half cosine to ``final`` at ``total`` (and staying there beyond it).

    ``m(step) = final - (final - base) * (1 + cos(pi * step / total)) / 2``.

    Args:
        step: number of EMA updates done so far (0 for the first).
        total: number of updates over which the momentum reaches ``final`` (usually the training steps).
        base: momentum at step 0.
        final: momentum at step ``total``.
    """
    if total < 1:
        raise ValueError(f"total must be >= 1 (the number of training steps), got {total}")
    if not 0.0 <= base <= 1.0 or not 0.0 <= final <= 1.0:
        raise ValueError(f"momenta must lie within [0, 1], got base {base} and final {final}")
    t = min(max(step, 0), total) / total
    return final - (final - base) * (1.0 + math.cos(math.pi * t)) / 2.0


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of ``student`` with every parameter frozen (``requires_grad=False``): the teacher's
    starting point, so that both begin with the same weights.

    Args:
        student: the network (or module holding several networks and heads) the teacher follows.
    """
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float,
               buffers: Literal["copy", "ema", "keep"] = "copy") -> None:
    """Move the teacher's weights towards the student's in place: ``t = momentum * t + (1 - momentum) * s``.

    Parameters are matched by name; both modules must have the same architecture (the teacher is usually
    ``make_teacher(student)``).

    Args:
        teacher: updated in place.
        student: read only.
        momentum: weight of the teacher's current value, within [0, 1] (1 leaves the teacher unchanged,
            0 copies the student).
        buffers: what happens to buffers (normalisation statistics, index tables): ``copy`` the student's
            (default; constant tables stay equal, running statistics follow the student), ``ema`` average
            floating-point buffers like parameters (others are copied), or ``keep`` the teacher's.

    Raises:
        ValueError: momentum outside [0, 1], or the two modules' parameter names or shapes differ.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must lie within [0, 1], got {momentum}")
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    _check_same(t_params, s_params, "parameters")
    for name, t in t_params.items():
        s = s_params[name].detach()
        t.mul_(momentum).add_(s.to(t.dtype), alpha=1.0 - momentum)
    if buffers == "keep":
        return
    t_bufs = dict(teacher.named_buffers())
    s_bufs = dict(student.named_buffers())
    _check_same(t_bufs, s_bufs, "buffers")
    for name, t in t_bufs.items():
        s = s_bufs[name]
        if buffers == "ema" and t.is_floating_point():
            t.mul_(momentum).add_(s.to(t.dtype), alpha=1.0 - momentum)
        else:
            t.copy_(s)


def _check_same(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], what: str) -> None:
    if teacher.keys() != student.keys():
        only_t = sorted(teacher.keys() - student.keys())[:3]
        only_s = sorted(student.keys() - teacher.keys())[:3]
        raise ValueError(f"teacher and student {what} differ (only in teacher: {only_t}, only in student: "
                         f"{only_s}); build the teacher with make_teacher(student)")
    for name, t in teacher.items():
        if t.shape != student[name].shape:
            raise ValueError(f"teacher and student {what} '{name}' differ in shape ({tuple(t.shape)} vs "
                             f"{tuple(student[name].shape)}); build the teacher with make_teacher(student)")
