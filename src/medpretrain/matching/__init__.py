"""Anatomical matchers: for a point in a query volume, the corresponding point in a key volume.

Alice (``methods/alice.py``) crops the same body part from two different volumes; it needs, for a point in
the query, where that anatomy lies in the key. Two matchers answer that behind one interface:

* ``sam``: a self-supervised anatomical embedding network (after SAM, Yan et al., the matcher the Alice
  paper uses) trained on the unlabelled pool with ``medpretrain train-matcher`` (``matching/sam.py``);
* ``registration``: affine intensity-based alignment of the two volumes with SimpleITK
  (``matching/registration.py``), for comparison; needs no training.

Volumes are prepared arrays ``(C, X, Y, Z)`` with their voxel spacing; points are continuous voxel
coordinates ``(x, y, z)``. A match carries a score in [-1, 1] (cosine similarity for ``sam``, local
normalised cross-correlation after alignment for ``registration``) and is accepted when the score reaches the
matcher's threshold (the Alice authors use 0.7 with SAM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class MatchVolume:
    """A volume to match in.

    Attributes:
        name: identifies the volume (per-volume precomputation is cached under it).
        image: ``(C, X, Y, Z)`` float32 prepared image (channel 0 is used).
        spacing: voxel size (X, Y, Z) in mm.
    """

    name: str
    image: np.ndarray
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class Match:
    """Where the query point lies in the key volume.

    Attributes:
        point: continuous voxel coordinate ``(x, y, z)`` in the key.
        score: similarity in [-1, 1].
        accepted: ``score >= threshold`` of the matcher.
    """

    point: tuple[float, float, float]
    score: float
    accepted: bool


class Matcher(Protocol):
    """What Alice and the accuracy benchmark need from a matcher."""

    name: str
    threshold: float

    def match(self, query: MatchVolume, point: Sequence[float], key: MatchVolume) -> Match:
        """The point of ``key`` corresponding to ``point`` of ``query``."""
        ...


def build_matcher(kind: str, checkpoint=None, threshold: float | None = None, device: str = "cpu") -> Matcher:
    """A matcher by name.

    Args:
        kind: ``sam`` or ``registration``.
        checkpoint: ``sam`` only: the ``model.pt`` (or run folder) of ``medpretrain train-matcher``.
        threshold: acceptance score; default 0.7 for ``sam`` (the Alice authors'), 0.3 for ``registration``.
        device: where the ``sam`` network runs.
    """
    from medpretrain.errors import ConfigError

    if kind == "sam":
        if checkpoint is None:
            raise ConfigError("matcher 'sam' needs a trained matcher: run `medpretrain train-matcher --data POOL --out "
                              "RUN` and pass RUN (matcher_run in the config), or use matcher 'registration'")
        from medpretrain.matching.sam import SamMatcher

        return SamMatcher.from_checkpoint(checkpoint, threshold=0.7 if threshold is None else threshold,
                                          device=device)
    if kind == "registration":
        from medpretrain.matching.registration import RegistrationMatcher

        return RegistrationMatcher(threshold=0.3 if threshold is None else threshold)
    raise ConfigError(f"unknown matcher '{kind}'; matchers: sam, registration")
