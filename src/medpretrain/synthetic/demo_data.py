"""A small procedurally generated, labelled 3D data set standing in for abdominal MR.

Each case is a deformed ellipsoidal "body" holding ``num_classes`` organ-like objects: odd
classes are large smooth blobs, even classes smaller bent tubes. Every organ has its own mean
intensity and texture; the body also holds one or two unlabelled "distractor" blobs whose
intensity is close to an organ's, so that a threshold alone does not segment the organs. The
image then gets partial-volume blur, a smooth multiplicative bias field and Gaussian noise.
Intensity ranges of organs and surrounding tissue overlap, so the task is learnable but not
trivial.

The set is written in the nnU-Net v2 raw layout (``imagesTr``, ``labelsTr``, ``dataset.json``)
with an MSD-style ``training`` list, plus ``splits.json`` holding a seeded train/test split.
Everything depends only on ``seed`` (case ``i`` draws from ``numpy.random.default_rng([seed, i])``),
so re-running gives the same arrays and adding cases does not change the earlier ones.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from medpretrain.atomic import atomic_write_json
from medpretrain.data.io import write_nifti
from medpretrain.errors import ConfigError

GENERATOR_VERSION = 1
CASE_PREFIX = "demo"
TEST_FRACTION = 0.25


def class_names_for(num_classes: int) -> dict[str, int]:
    """Label names of the demo set: ``{"background": 0, "organ_a": 1, "organ_b": 2, ...}``.

    Args:
        num_classes: number of foreground classes (1 to 26).
    """
    labels = {"background": 0}
    for k in range(1, num_classes + 1):
        labels[f"organ_{string.ascii_lowercase[k - 1]}"] = k
    return labels


def case_ids_for(n_cases: int) -> list[str]:
    """Case identifiers ``demo_000``, ``demo_001``, ... of a demo set with ``n_cases`` cases.

    Args:
        n_cases: number of cases.
    """
    return [f"{CASE_PREFIX}_{i:03d}" for i in range(n_cases)]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))  # makes the draw uniform over rotations
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _fourier_field(
    rng: np.random.Generator, grid: Sequence[np.ndarray], extent_mm: np.ndarray, n_components: int, max_cycles: float
) -> np.ndarray:
    """Smooth random field with unit standard deviation: a sum of a few random plane waves.

    Far cheaper than upsampling coarse noise with splines, and band-limited by construction
    (at most ``max_cycles`` periods across the volume).
    """
    shape = np.broadcast_shapes(*(g.shape for g in grid))
    field = np.zeros(shape, dtype=np.float32)
    for _ in range(n_components):
        freq = rng.uniform(-max_cycles, max_cycles, size=3) * 2.0 * np.pi / extent_mm
        phase = rng.uniform(0.0, 2.0 * np.pi)
        field += np.cos(grid[0] * freq[0] + grid[1] * freq[1] + grid[2] * freq[2] + phase).astype(np.float32)
    return field / np.float32(np.sqrt(n_components / 2.0))


def _texture(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float) -> np.ndarray:
    """Smoothed white noise with unit standard deviation (organ-specific texture)."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma)
    return noise / max(float(noise.std()), 1e-6)


def _organ_shape(
    rng: np.random.Generator,
    grid: Sequence[np.ndarray],
    extent_mm: np.ndarray,
    body_radii: np.ndarray,
    kind: str,
    scale: float,
) -> np.ndarray:
    """Boolean mask of one randomly placed, oriented and deformed blob or bent tube."""
    r_min = float(body_radii.min())
    centre = body_radii * rng.uniform(-0.4, 0.4, size=3)
    rot = _random_rotation(rng)
    rel = [grid[i] - centre[i] for i in range(3)]
    q = [rel[0] * rot[0, j] + rel[1] * rot[1, j] + rel[2] * rot[2, j] for j in range(3)]
    deform = _fourier_field(rng, grid, extent_mm, n_components=5, max_cycles=2.5)
    if kind == "blob":
        radii = r_min * scale * rng.uniform(0.32, 0.48) * rng.uniform(0.75, 1.25, size=3)
        f = (q[0] / radii[0]) ** 2 + (q[1] / radii[1]) ** 2 + (q[2] / radii[2]) ** 2
        amp = rng.uniform(0.10, 0.22)
    else:
        length = r_min * scale * rng.uniform(0.40, 0.60)
        thick = r_min * scale * rng.uniform(0.12, 0.18) * rng.uniform(0.8, 1.2, size=2)
        bend = rng.uniform(-1.0, 1.0) / length
        v = q[1] - bend * q[0] ** 2
        # Fourth power along the axis: a capped tube rather than a cigar.
        f = (q[0] / length) ** 4 + (v / thick[0]) ** 2 + (q[2] / thick[1]) ** 2
        amp = rng.uniform(0.05, 0.15)
    return f * (1.0 + amp * deform) < 1.0


def _make_case(
    rng: np.random.Generator, size: tuple[int, int, int], spacing: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    shape = tuple(int(s) for s in size)
    extent = np.asarray(shape, dtype=np.float64) * spacing
    # Open (broadcasting) grids in mm, centred on the volume: no full-size index arrays needed.
    grid = [((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * np.float32(spacing[i])) for i, n in enumerate(shape)]
    grid = [grid[0][:, None, None], grid[1][None, :, None], grid[2][None, None, :]]

    body_radii = extent / 2.0 * rng.uniform(0.74, 0.88, size=3)
    body_f = sum((grid[i] / np.float32(body_radii[i])) ** 2 for i in range(3))
    body_deform = _fourier_field(rng, grid, extent, n_components=6, max_cycles=1.5)
    body = np.sqrt(body_f) * (1.0 + rng.uniform(0.04, 0.09) * body_deform) < 1.0

    label = np.zeros(shape, dtype=np.uint8)
    occupied = ~body
    for k in range(1, num_classes + 1):
        kind = "blob" if k % 2 == 1 else "tube"
        scale = 0.85 ** ((k - 1) // 2)  # later pairs of organs are smaller
        # Organs must not overlap and must stay visible: retry placements that are mostly hidden.
        min_voxels = max(15, int(0.004 * body.sum()) if kind == "blob" else int(0.0008 * body.sum()))
        best = None
        for _ in range(25):
            mask = _organ_shape(rng, grid, extent, body_radii, kind, scale)
            visible = mask & ~occupied
            n_vis = int(visible.sum())
            if best is None or n_vis > int(best.sum()):
                best = visible
            if n_vis >= min_voxels and n_vis >= 0.7 * int(mask.sum()):
                break
        if best is None or not best.any():
            # Pathologically small volumes: fall back to a small ball at the body centre.
            r2 = sum((grid[i] / np.float32(2.5 * spacing.max())) ** 2 for i in range(3))
            best = (r2 < 1.0) & body
        label[best] = k
        occupied |= best

    tissue_mean = rng.uniform(0.35, 0.45)
    image = np.full(shape, 0.03, dtype=np.float32)
    image[body] = tissue_mean
    image += body * (0.05 * _texture(rng, shape, sigma=1.5))
    organ_means = []
    for k in range(1, num_classes + 1):
        # Like real organs, each class keeps its contrast sign across cases (odd brighter, even darker).
        mean = tissue_mean + (1.0 if k % 2 else -1.0) * rng.uniform(0.12, 0.22)
        organ_means.append(mean)
        region = label == k
        tex = _texture(rng, shape, sigma=rng.uniform(0.8, 1.6))
        image[region] = mean + rng.uniform(0.03, 0.06) * tex[region]

    # Unlabelled look-alikes: similar intensity to an organ, so intensity alone is not enough.
    n_distractors = int(rng.integers(1, 3))
    for _ in range(n_distractors):
        mask = _organ_shape(rng, grid, extent, body_radii, "blob", 0.45) & ~occupied
        like = organ_means[int(rng.integers(len(organ_means)))]
        image[mask] = like + rng.uniform(-0.06, 0.06) + 0.04 * _texture(rng, shape, sigma=1.0)[mask]
        occupied |= mask

    # Partial-volume blur, then scanner effects: smooth multiplicative bias and noise.
    image = ndimage.gaussian_filter(image, sigma=0.7)
    bias = np.exp(rng.uniform(0.10, 0.25) * _fourier_field(rng, grid, extent, n_components=4, max_cycles=0.8))
    image = image * bias + rng.uniform(0.03, 0.05) * rng.standard_normal(shape).astype(np.float32)
    return image.astype(np.float32), label


def make_demo_dataset(
    out_dir,
    n_cases: int = 12,
    size: tuple[int, int, int] = (64, 64, 48),
    seed: int = 0,
    num_classes: int = 2,
    spacing: Sequence[float] = (1.5, 1.5, 2.0),
) -> Path:
    """Generate a labelled synthetic 3D data set in the nnU-Net v2 raw layout.

    Writes ``out_dir/imagesTr/demo_NNN_0000.nii.gz`` (float32), ``out_dir/labelsTr/demo_NNN.nii.gz``
    (uint8, 0 = background, 1..num_classes = organs), ``out_dir/dataset.json`` (nnU-Net v2 keys
    ``channel_names`` = ``{"0": "MR"}``, ``labels`` = ``{"background": 0, "organ_a": 1, ...}``,
    ``numTraining``, ``file_ending``; MSD-style ``training`` list of ``{"image", "label"}``
    relative paths; generator settings under ``"demo"``) and ``out_dir/splits.json``
    (``{"seed", "train": [case ids], "test": [case ids]}``, 25 % test, at least one test case
    when there are two cases or more). The affine is RAS, diagonal with ``spacing``, and puts
    the volume centre at the origin. Existing files of the same name are replaced.

    Args:
        out_dir: folder to write the data set into; created if needed.
        n_cases: number of cases.
        size: volume shape (X, Y, Z) in voxels, each at least 16.
        seed: non-negative random seed; the same seed gives the same arrays, another seed other cases.
        num_classes: number of foreground classes (1 to 26); odd ones are blobs, even ones tubes.
        spacing: voxel size in mm along (X, Y, Z).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: if an argument is out of range.
    """
    if int(seed) < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed}.")
    if int(n_cases) < 1:
        raise ConfigError(f"n_cases must be at least 1, got {n_cases}.")
    if not 1 <= int(num_classes) <= 26:
        raise ConfigError(f"num_classes must be between 1 and 26, got {num_classes}.")
    size_t = tuple(int(s) for s in size)
    if len(size_t) != 3 or min(size_t) < 16:
        raise ConfigError(f"size must be 3 values of at least 16 voxels, got {tuple(size)}.")
    spacing_a = np.asarray([float(s) for s in spacing], dtype=np.float64)
    if spacing_a.shape != (3,) or not np.all(spacing_a > 0):
        raise ConfigError(f"spacing must be 3 positive values in mm, got {tuple(spacing)}.")

    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)

    affine = np.diag([*spacing_a, 1.0])
    affine[:3, 3] = -(np.asarray(size_t, dtype=np.float64) - 1.0) / 2.0 * spacing_a

    case_ids = case_ids_for(int(n_cases))
    training = []
    for i, case_id in enumerate(case_ids):
        rng = np.random.default_rng([int(seed), i])
        image, label = _make_case(rng, size_t, spacing_a, int(num_classes))
        write_nifti(image, affine, out / "imagesTr" / f"{case_id}_0000.nii.gz")
        write_nifti(label, affine, out / "labelsTr" / f"{case_id}.nii.gz")
        training.append({"image": f"./imagesTr/{case_id}_0000.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})

    dataset = {
        "name": "MedpretrainDemo",
        "description": "Procedurally generated organ-like 3D MR stand-in (medpretrain demo data).",
        "reference": "medpretrain.synthetic.demo_data",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "channel_names": {"0": "MR"},
        "modality": {"0": "MR"},
        "labels": class_names_for(int(num_classes)),
        "numTraining": len(case_ids),
        "numTest": 0,
        "file_ending": ".nii.gz",
        "training": training,
        "test": [],
        "demo": {
            "generator_version": GENERATOR_VERSION,
            "seed": int(seed),
            "size": list(size_t),
            "spacing": spacing_a.tolist(),
        },
    }
    atomic_write_json(out / "dataset.json", dataset, indent=2)

    n_test = max(1, int(round(TEST_FRACTION * len(case_ids)))) if len(case_ids) >= 2 else 0
    order = np.random.default_rng([int(seed), 10**6]).permutation(len(case_ids))
    test = sorted(case_ids[j] for j in order[:n_test])
    train = sorted(case_ids[j] for j in order[n_test:])
    atomic_write_json(out / "splits.json", {"seed": int(seed), "train": train, "test": test}, indent=2)
    return out
