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

import numpy as np
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


def teacher_init_share(total: int, base: float, final: float = 1.0) -> float:
    """The share of its initial weights a teacher still holds after ``total`` EMA updates on the cosine schedule
    (``prod_s m(s)``, see :func:`cosine_momentum`): a teacher started as a copy of a randomly initialised student
    is ``share * init + (1 - share) * (weighted average of the student's past weights)``.

    Args:
        total: number of updates (the run's training steps).
        base, final: the schedule's momenta at the first and the last update.
    """
    if total < 1:
        raise ValueError(f"total must be >= 1 (the number of training steps), got {total}")
    t = np.arange(total, dtype=np.float64) / total
    m = final - (final - base) * (1.0 + np.cos(np.pi * t)) / 2.0  # cosine_momentum at every update, at once
    if np.any(m <= 0.0):
        return 0.0
    return float(np.exp(np.sum(np.log(m))))


def auto_base_momentum(total: int, max_init_share: float = 0.01, cap: float | None = None) -> float:
    """The largest base momentum whose cosine schedule to 1 over ``total`` updates leaves the teacher at most
    ``max_init_share`` of its initial weights at the end, optionally capped at ``cap`` (a paper's value).

    Why: a paper's base momentum (0.996-0.999) is meant for 10^4-10^5 steps; over a few hundred steps it leaves
    a teacher that is mostly its random initialisation (0.999 over 600 steps: 74%), so what goes downstream
    carries little of what the student learnt. Roughly ``1 - base = 2 ln(1 / max_init_share) / total``.

    Args:
        total: number of updates (training steps).
        max_init_share: the share of the initial weights allowed at the end, within (0, 1).
        cap: the base momentum is never above this (the paper's value, when the run is long enough for it).
    """
    if not 0.0 < max_init_share < 1.0:
        raise ValueError(f"max_init_share must lie within (0, 1), got {max_init_share}")
    lo, hi = 0.0, 1.0  # share(lo) = 0 <= target < share(hi) = 1; the share grows with the base
    for _ in range(60):
        mid = (lo + hi) / 2
        if teacher_init_share(total, mid) <= max_init_share:
            lo = mid
        else:
            hi = mid
    return min(lo, cap) if cap is not None else lo


def resolve_ema_momentum(setting, total: int, paper_base: float, max_init_share: float = 0.01
                         ) -> tuple[float, float]:
    """``(base, final)`` of an ``ema_momentum`` setting: a pair as given, or ``"auto"``: the paper's base
    momentum when the run is long enough for it, else the base derived from the run length that leaves at most
    ``max_init_share`` of the initial weights in the teacher (:func:`auto_base_momentum`); final 1."""
    if setting == "auto":
        return auto_base_momentum(total, max_init_share, cap=paper_base), 1.0
    base, final = setting
    return float(base), float(final)


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
