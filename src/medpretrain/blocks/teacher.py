"""The student / EMA-teacher wiring of self-distillation methods (ASA, Alice, SwinUNETR-style SSL, ...).

A method with an EMA teacher subclasses :class:`StudentTeacherModule` and states two things: which modules
are teachers of which students (:meth:`~StudentTeacherModule.teacher_pairs`) and which parameters the optimiser
trains (:meth:`~StudentTeacherModule.student_parameters`). The base does the rest the same way for every
method: teachers start as frozen copies (``blocks.ema.make_teacher``), run in eval mode, and follow their
students after every optimiser step on the cosine momentum schedule of ``cfg.ema_schedule()``; the momentum is
logged; the optimiser and one-cycle schedule come from ``cfg`` (``optimizer``, ``lr``, ``weight_decay`` and,
when the configuration has them, ``betas`` and ``sgd_momentum``).
"""

from __future__ import annotations

from typing import Sequence

import lightning.pytorch as pl
import torch.nn as nn

from medpretrain.blocks.ema import cosine_momentum, ema_update
from medpretrain.blocks.optim import make_optimizer, scheduled_optimization


class StudentTeacherModule(pl.LightningModule):
    """Base of a Lightning module with EMA teachers. ``self.cfg`` must provide ``steps``, ``lr``,
    ``weight_decay``, ``warmup_fraction`` and ``ema_schedule() -> (base, final)``."""

    def teacher_pairs(self) -> Sequence[tuple[nn.Module, nn.Module]]:
        """``(teacher, student)`` pairs the EMA updates; each teacher built with ``make_teacher(student)``."""
        raise NotImplementedError

    def student_parameters(self) -> list[nn.Parameter]:
        """What the optimiser trains (never a teacher's parameters)."""
        raise NotImplementedError

    # ---- EMA

    def momentum_at(self, updates_done: int) -> float:
        """The teacher's momentum for the update that follows ``updates_done`` earlier ones."""
        base, final = self.cfg.ema_schedule()
        return cosine_momentum(updates_done, self.cfg.steps, base, final)

    def update_teacher(self, updates_done: int) -> float:
        """One EMA step of every teacher towards its student; returns the momentum used."""
        m = self.momentum_at(updates_done)
        for teacher, student in self.teacher_pairs():
            ema_update(teacher, student, m)
        return m

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Updates done before this step, read before the optimiser step moves Lightning's counter.
        self._updates_done = self.global_step

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # The teacher follows right here, not in on_train_batch_end: checkpoint callbacks run before that hook,
        # and a checkpoint whose teacher lags its student by one update would make a resumed run differ.
        self.update_teacher(getattr(self, "_updates_done", self.global_step))

    def log_momentum(self) -> None:
        """Log ``train/ema_momentum`` of the current step (call from ``training_step``)."""
        self.log("train/ema_momentum", self.momentum_at(self.global_step), on_step=True)

    def train(self, mode: bool = True):
        super().train(mode)
        # Teachers only ever run as inference networks (no dropout, no drop-path, fixed statistics).
        for teacher, _ in self.teacher_pairs():
            teacher.eval()
        return self

    # ---- optimiser

    def configure_optimizers(self):
        cfg = self.cfg
        opt = make_optimizer(self.student_parameters(), getattr(cfg, "optimizer", "adamw"), cfg.lr,
                             cfg.weight_decay, betas=tuple(getattr(cfg, "betas", (0.9, 0.999))),
                             sgd_momentum=getattr(cfg, "sgd_momentum", 0.9))
        return scheduled_optimization(opt, cfg)
