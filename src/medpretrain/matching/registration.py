"""The ``registration`` matcher: affine intensity-based alignment of the key volume to the query with
SimpleITK (Mattes mutual information, so CT and MR pairs work; multi-resolution regular-step gradient
descent), then the query point mapped through the transform.

The score of a match is the normalised cross-correlation between the query's neighbourhood of the point
(``window`` voxels) and the aligned key resampled onto it, in [-1, 1]. Transforms are cached per
(query, key) pair.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medpretrain.matching import Match, MatchVolume


def to_sitk(volume: MatchVolume):
    """Channel 0 of a ``(C, X, Y, Z)`` array as a SimpleITK image (index ``(i, j, k)`` = array ``(x, y, z)``)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume.image[0], np.float32).transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in volume.spacing))
    return img


def register_affine(fixed, moving, shrink: Sequence[int] = (4, 2), iterations: int = 100, seed: int = 0):
    """An affine transform mapping physical points of ``fixed`` to ``moving`` (SimpleITK convention).

    Args:
        fixed, moving: SimpleITK images.
        shrink: shrink factor per resolution level (coarse to fine); 1 is full resolution.
        iterations: optimiser iterations per level.
        seed: metric sampling seed (repeatable results).
    """
    import SimpleITK as sitk

    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
                                                 gradientMagnitudeTolerance=1e-6, relaxationFactor=0.7)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel([max(0.0, s / 2.0) for s in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(init, inPlace=False)
    return reg.Execute(fixed, moving)


class RegistrationMatcher:
    """Affine-registration matcher (see the module's documentation).

    Args:
        threshold: a match is accepted when the local normalised cross-correlation reaches it.
        window: side (voxels) of the neighbourhood the score compares.
        shrink, iterations: registration pyramid and optimiser iterations per level.
    """

    name = "registration"
    release_after_query = True  # whole images are cached: callers iterating over queries free them

    def __init__(self, threshold: float = 0.3, window: int = 32, shrink: Sequence[int] = (4, 2),
                 iterations: int = 100):
        self.threshold, self.window, self.shrink, self.iterations = float(threshold), int(window), tuple(shrink), iterations
        self._images: dict[str, object] = {}
        self._transforms: dict[tuple[str, str], object] = {}

    def forget(self, name: str) -> None:
        """Drop a volume's cached image and every transform it is part of."""
        self._images.pop(name, None)
        self._transforms = {k: v for k, v in self._transforms.items() if name not in k}

    def _image(self, volume: MatchVolume):
        if volume.name not in self._images:
            self._images[volume.name] = to_sitk(volume)
        return self._images[volume.name]

    def transform(self, query: MatchVolume, key: MatchVolume):
        """The cached query -> key affine transform (registered on first use)."""
        pair = (query.name, key.name)
        if pair not in self._transforms:
            self._transforms[pair] = register_affine(self._image(query), self._image(key), self.shrink,
                                                     self.iterations)
        return self._transforms[pair]

    def match(self, query: MatchVolume, point: Sequence[float], key: MatchVolume) -> Match:
        import SimpleITK as sitk

        fixed, moving = self._image(query), self._image(key)
        tx = self.transform(query, key)
        physical = fixed.TransformContinuousIndexToPhysicalPoint([float(p) for p in point])
        mapped = moving.TransformPhysicalPointToContinuousIndex(tx.TransformPoint(physical))
        # Score: the query's neighbourhood of the point vs the aligned key resampled onto it.
        size = np.array(fixed.GetSize())
        half = self.window // 2
        lo = np.clip(np.round(point).astype(int) - half, 0, np.maximum(size - 1, 0))
        hi = np.clip(lo + self.window, 1, size)
        ref = sitk.RegionOfInterest(fixed, [int(v) for v in hi - lo], [int(v) for v in lo])
        warped = sitk.Resample(moving, ref, tx, sitk.sitkLinear, float(np.min(key.image[0])))
        a = sitk.GetArrayViewFromImage(ref).astype(np.float64).ravel()
        b = sitk.GetArrayViewFromImage(warped).astype(np.float64).ravel()
        a, b = a - a.mean(), b - b.mean()
        denom = np.sqrt((a * a).sum() * (b * b).sum())
        score = float((a * b).sum() / denom) if denom > 0 else 0.0
        return Match(point=tuple(float(v) for v in mapped), score=score, accepted=score >= self.threshold)
