"""Contrastive and self-distillation losses shared by the self-supervised methods (ASA, Alice, the matcher)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def embedding_loss(a: torch.Tensor, b: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Distance between student and (detached) teacher embeddings ``(..., D)``.

    ``normalize``: mean over embeddings of the squared L2 distance of the L2-normalised vectors
    (``2 - 2 cos``, the BYOL/SimSiam "cosine similarity loss", in [0, 4] whatever ``D``); otherwise the plain
    MSE over all elements.
    """
    if normalize:
        return (F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1)).pow(2).sum(-1).mean()
    return F.mse_loss(a.float(), b.float())


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
             temperature: float = 0.1, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE over L2-normalised embeddings: anchor ``i``'s positive is ``positives[i]``; its negatives are the
    other rows of ``positives`` and the ``negatives``.

    Args:
        anchors: ``(N, D)``.
        positives: ``(N, D)``.
        negatives: ``(M, D)`` negatives shared by every anchor, ``(N, K, D)`` negatives per anchor (e.g. hard
            negatives near each positive), or None.
        temperature: softmax temperature.
        exclude: ``(N,)`` a row of ``positives`` that is no negative of anchor ``i`` (e.g. another view of the same
            sample), or None; ignored where it is ``i`` itself.
    """
    a = F.normalize(anchors.float(), dim=-1)
    own = a @ F.normalize(positives.float(), dim=-1).T
    if exclude is not None:
        rows = torch.arange(len(own), device=own.device)
        own = own.masked_fill(F.one_hot(exclude, len(own)).bool() & (exclude != rows)[:, None], float("-inf"))
    logits = [own]
    if negatives is not None:
        n = F.normalize(negatives.float(), dim=-1)
        logits.append(a @ n.T if n.dim() == 2 else torch.einsum("nd,nkd->nk", a, n))
    return F.cross_entropy(torch.cat(logits, 1) / temperature, torch.arange(a.shape[0], device=a.device))


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the DDP processes (itself when not distributed): the batch statistics an EMA centre
    follows are then the global batch's."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return value


class DINOLoss(nn.Module):
    """DINO's self-distillation cross-entropy: ``-softmax((t - center) / t_temp) . log_softmax(s / s_temp)``,
    with the centre an EMA of the teacher outputs (updated by :meth:`update_center`, in the caller's
    ``no_grad``), which with sharpening keeps the teacher from collapsing.

    Args:
        dim: output width of the projection heads.
        student_temp, teacher_temp: temperatures (DINO: 0.1 and 0.04).
        center_momentum: EMA momentum of the centre (DINO: 0.9).
    """

    def __init__(self, dim: int, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 center_momentum: float = 0.9):
        super().__init__()
        self.student_temp, self.teacher_temp, self.center_momentum = student_temp, teacher_temp, center_momentum
        self.register_buffer("center", torch.zeros(dim))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Mean over rows of ``(..., dim)`` student logits and (detached) teacher logits."""
        t = F.softmax((teacher.detach().float() - self.center) / self.teacher_temp, dim=-1)
        s = F.log_softmax(student.float() / self.student_temp, dim=-1)
        return -(t * s).sum(-1).mean()

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        batch_center = mean_over_processes(teacher.detach().float().reshape(-1, teacher.shape[-1]).mean(0))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
