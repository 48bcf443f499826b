"""nnU-Net v2's own trainer with a fixed short budget (used by ``interop.nnunet_scratch``; imports nnunetv2).

``nnUNetTrainerBudget`` is ``nnunetv2``'s ``nnUNetTrainer`` with three changes and nothing else:

- the run length is a budget, ``budget_iterations`` optimizer steps or ``budget_seconds`` of training wall time,
  instead of 1000 epochs of 250 iterations. The clock starts before nnU-Net's ``on_train_start`` (network,
  optimizer, data-loader processes and their first batches), as our runs' clock (Lightning's ``on_train_start``)
  starts before their loader workers do;
- the poly learning-rate schedule (nnU-Net's ``PolyLRScheduler``, ``1e-2 * (1 - t / T) ** 0.9``) runs over that
  budget in iterations, stepped every iteration. For a time budget, ``T`` is fixed once, after
  ``WARMUP_ITERATIONS`` steps and ``WARMUP_FRACTION`` of the budget, as the iterations the remaining time allows at
  the mean step time so far (the first step, which waits for the loaders, left out); the run then
  does exactly ``T`` iterations (a schedule in iterations, not seconds, so that the load of a neighbouring job
  changes how long the run takes, not the lr each step gets);
- no per-epoch validation batches (the pseudo Dice only picks ``checkpoint_best``, which is not used) and no final
  validation: ``medpretrain evaluate`` scores the test cases with our metrics.

Network, deep supervision, Dice + CE loss, SGD (momentum 0.99, Nesterov, weight decay 3e-5), gradient clipping,
patch sampling with foreground oversampling and the whole batchgeneratorsv2 augmentation pipeline are
nnU-Net's, from its plans. The class lives outside nnunetv2's package, so it is instantiated directly (not by name)
and nnU-Net's predictor is initialised manually with the trained network.
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

log = logging.getLogger("medpretrain")


class nnUNetTrainerBudget(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming (the class name goes into its checkpoint)
    """nnUNetTrainer for a budget of ``budget_iterations`` steps or ``budget_seconds`` of training; set one of the
    two attributes after construction (the constructor's signature must stay nnU-Net's: it records its arguments).

    After ``run_training``: ``history`` (one ``(iteration, seconds since the clock started, loss, lr)`` per step),
    ``iterations_done``, ``planned_iterations`` (the schedule's ``T``), ``train_seconds`` (the budgeted clock, start-up
    included), ``setup_seconds`` (nnU-Net's start-up, part of ``train_seconds``) and ``stopped_by``.
    """

    budget_iterations: int | None = None
    budget_seconds: float | None = None
    seed: int | None = None  # seeds nnU-Net's augmentation processes (it leaves them to the OS's entropy)
    log_every_s: float = 60.0
    # A time budget's iteration count is fixed once both have passed: the first steps are slower (augmentation
    # processes filling their queues), and an estimate from them alone ended runs ~12% before the budget.
    WARMUP_ITERATIONS = 4
    WARMUP_FRACTION = 0.2

    def _check_budget(self) -> None:
        if (self.budget_iterations is None) == (self.budget_seconds is None):
            raise ValueError("set exactly one of budget_iterations and budget_seconds")

    def configure_optimizers(self):
        optimizer, _ = super().configure_optimizers()  # nnU-Net's SGD; its per-epoch poly schedule is replaced
        # The horizon of a time budget is set after the warm-up steps (run_training); until then a provisional one.
        horizon = self.budget_iterations if self.budget_iterations is not None else 10**9
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, horizon)

    def run_training(self):
        self._check_budget()
        self.history: list[tuple[int, float, float, float]] = []
        t0 = time.perf_counter()
        with _seeded_augmenters(self.seed):
            self.on_train_start()  # network, loss, optimizer, data loaders (first batch drawn), plans copied
        self.setup_seconds = time.perf_counter() - t0
        self.on_epoch_start()
        self.network.train()
        outputs = []
        last_log = time.perf_counter()
        it = 0
        horizon = self.budget_iterations
        self.stopped_by = "iterations"
        try:
            while horizon is None or it < horizon:
                elapsed = time.perf_counter() - t0
                warm = it >= self.WARMUP_ITERATIONS and elapsed >= self.WARMUP_FRACTION * (self.budget_seconds or 0)
                if horizon is None and warm:
                    mean = (time.perf_counter() - t_first) / max(it - 1, 1)  # step 1 includes the loaders' warm-up
                    horizon = max(it, it + int((self.budget_seconds - elapsed) // mean))
                    self.lr_scheduler.max_steps = horizon
                    self.stopped_by = "max_seconds"
                    if it >= horizon:  # the warm-up used the whole budget
                        break
                self.lr_scheduler.step(it)
                lr = float(self.optimizer.param_groups[0]["lr"])
                out = self.train_step(next(self.dataloader_train))
                it += 1
                if it == 1:
                    t_first = time.perf_counter()
                loss = float(np.mean(out["loss"]))
                outputs.append(out)
                now = time.perf_counter()
                self.history.append((it, now - t0, loss, lr))
                if it == 1 or now - last_log >= self.log_every_s:
                    last_log = now
                    log.info("nnU-Net iteration %d%s  loss %.4f  lr %.2e  %.2f s/iteration  %.0f s", it,
                             f"/{horizon}" if horizon else "", loss, lr, (now - t0) / it, now - t0)
        finally:
            self.iterations_done = it
            self.planned_iterations = horizon
            self.train_seconds = time.perf_counter() - t0
            if outputs:
                self.on_train_epoch_end(outputs)
            self.on_epoch_end_budget()
            self.on_train_end()  # checkpoint_final.pth, data-loader workers stopped

    def on_epoch_end_budget(self):
        """nnU-Net's logger entry for the (single) epoch; its ``on_epoch_end`` also expects validation values."""
        self.logger.log("epoch_end_timestamps", time.time(), self.current_epoch)
        self.current_epoch += 1

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trained network's weights (what ``checkpoint_final.pth`` holds as ``network_weights``)."""
        return {k: v.detach().clone() for k, v in self.network.state_dict().items()}


@contextlib.contextmanager
def _seeded_augmenters(seed: int | None):
    """nnUNetTrainer starts its augmentation processes with ``seeds=None``, and each then seeds NumPy from the OS
    (batchgenerators' ``producer``), so patch sampling would differ between runs of one seed. While the trainer
    builds its loaders, give worker ``i`` the seed ``(seed, i)`` instead (NumPy and torch)."""
    if seed is None:
        yield
        return
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as module

    original = module.NonDetMultiThreadedAugmenter

    def seeded(*args, **kwargs):
        n = int(kwargs.get("num_processes", 1))
        kwargs["seeds"] = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(n)]
        return original(*args, **kwargs)

    module.NonDetMultiThreadedAugmenter = seeded
    try:
        yield
    finally:
        module.NonDetMultiThreadedAugmenter = original
