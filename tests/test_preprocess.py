"""Preprocessing: reorientation, resampling, cropping, normalisation, validation, restoring."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from _niftis import SHARED_DATA, dice, save_nifti
from medpretrain.data import (
    Geometry,
    Image3D,
    PreprocessConfig,
    preprocess_case,
    preprocess_image,
    read_image,
    restore_to_original,
)
from medpretrain.errors import DataError

NO_CROP = PreprocessConfig(crop_foreground=False)


def _affine(codes_matrix, spacing, origin):
    """4x4 affine with direction matrix (columns = voxel axes) scaled by spacing."""
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(codes_matrix, float) * np.asarray(spacing, float)
    aff[:3, 3] = origin
    return aff


LPS = _affine(np.diag([-1, -1, 1]), (1.0, 1.0, 1.0), (20.0, 15.0, -5.0))
# L, I, A: voxel axis 0 -> left, 1 -> inferior, 2 -> anterior.
LIA = _affine([[-1, 0, 0], [0, 0, 1], [0, -1, 0]], (0.8, 2.0, 1.2), (30.0, -10.0, 40.0))


def _world_grid(affine, shape):
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=0).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *shape)


@pytest.mark.parametrize("affine", [LPS, LIA], ids=["LPS", "LIA"])
def test_reorientation_matches_ras_flip(tmp_path, affine):
    data = np.random.default_rng(0).normal(size=(10, 8, 6)).astype(np.float32)
    p = save_nifti(tmp_path / "x.nii.gz", data, affine)
    img = read_image(p)
    canonical = nib.as_closest_canonical(nib.load(str(p)))
    ras_spacing = canonical.header.get_zooms()[:3]
    cfg = PreprocessConfig(crop_foreground=False, modality="CT", ct_window=(-1e6, 1e6))
    out = preprocess_case(img, None, cfg, ras_spacing, "CT")
    expected = canonical.get_fdata(dtype=np.float32)
    # CT scaling with a huge window is affine: undo it and compare the voxel values exactly.
    assert np.allclose(out.image[0] * 2e6 - 1e6, expected, atol=1e-1)
    prepared = np.asarray(out.geometry.prepared_affine)
    assert nib.aff2axcodes(prepared) == ("R", "A", "S")
    assert np.allclose(prepared, canonical.affine)
    assert np.allclose(prepared[:3, :3], np.diag(ras_spacing))


def test_resampled_grid_keeps_world_positions():
    # Channels hold the world x, y, z of each voxel: after any reorientation/resampling the
    # prepared value must equal the world coordinate of the prepared voxel.
    shape = (30, 12, 20)
    world = _world_grid(LIA, shape).astype(np.float32)
    img = Image3D(world, LIA)
    cfg = PreprocessConfig(crop_foreground=False, ct_window=(-1000.0, 1000.0))
    out = preprocess_image(img, cfg, (1.5, 1.5, 1.5), "CT")
    geo = out.geometry
    values = out.image * 2000.0 - 1000.0
    expect = _world_grid(np.asarray(geo.prepared_affine), geo.prepared_shape)
    inner = (slice(None), slice(2, -2), slice(2, -2), slice(2, -2))  # edges extend, not interpolate
    assert np.abs(values[inner] - expect[inner]).max() < 1e-2


def _anisotropic_case():
    shape = (40, 30, 20)
    lab = np.zeros(shape, np.uint8)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    # An ellipsoid (in mm) so that resampling changes its voxels but not its extent.
    lab[((x - 20) * 0.8 / 11) ** 2 + ((y - 15) * 2.0 / 12) ** 2 + ((z - 10) * 1.2 / 9) ** 2 <= 1] = 1
    lab[((x - 22) * 0.8 / 5) ** 2 + ((y - 14) * 2.0 / 5) ** 2 + ((z - 10) * 1.2 / 5) ** 2 <= 1] = 2
    img = (np.random.default_rng(3).normal(0, 1, shape) + 5 * lab + 10).astype(np.float32)
    return img, lab


@pytest.mark.parametrize("interp", ["linear", "nearest"])
def test_roundtrip_restore_label_and_probabilities(interp):
    img, lab = _anisotropic_case()
    cfg = PreprocessConfig(label_interpolation=interp)
    out = preprocess_case(Image3D(img[None], LIA), Image3D(lab[None], LIA), cfg, (1.5, 1.5, 1.5), "MR",
                          declared_labels={0, 1, 2})
    geo = out.geometry
    assert out.image.dtype == np.float32 and out.label.dtype == np.uint8
    assert out.image.shape[1:] == out.label.shape == tuple(geo.prepared_shape)
    assert geo.spacing == [1.5, 1.5, 1.5]
    # JSON round trip of the geometry must not change the result.
    geo = Geometry.from_dict(json.loads(json.dumps(geo.to_dict())))
    restored = restore_to_original(out.label, geo, is_probability=False)
    assert restored.shape == lab.shape and restored.dtype == np.uint8
    assert np.allclose(geo.original_affine, LIA)
    assert dice(restored > 0, lab > 0) >= 0.95
    assert dice(restored == 2, lab == 2) >= 0.8
    probs = np.stack([(out.label == c).astype(np.float32) for c in range(3)])
    restored_p = restore_to_original(probs, geo, is_probability=True)
    assert restored_p.shape == lab.shape
    assert dice(restored_p > 0, lab > 0) >= 0.95


def test_restore_is_exact_without_resampling():
    img, lab = _anisotropic_case()
    out = preprocess_case(Image3D(img[None], LIA), Image3D(lab[None], LIA), PreprocessConfig(), (0.8, 1.2, 2.0), "MR")
    assert out.geometry.resampled_shape == [40, 20, 30]  # RAS order of L, I, A axes
    assert np.array_equal(restore_to_original(out.label, out.geometry, False), lab)


def test_ct_window_and_body_crop():
    shape = (30, 28, 20)
    img = np.full(shape, -1000.0, np.float32)
    img[8:20, 5:25, 4:16] = 40.0  # the "body"
    img[10:12, 10:12, 10:12] = 400.0  # bone, above the window
    lab = np.zeros(shape, np.uint8)
    lab[10:14, 8:12, 6:9] = 1
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    out = preprocess_case(Image3D(img[None], aff), Image3D(lab[None], aff), PreprocessConfig(crop_margin=2),
                          (1.0, 1.0, 1.0), "CT")
    geo = out.geometry
    assert geo.crop_start == [6, 3, 2] and geo.crop_end == [22, 27, 18]
    assert out.image.min() == 0.0 and out.image.max() == 1.0
    assert np.isclose(out.image[0, 10 - 6, 10 - 3, 10 - 2], 1.0)
    assert np.isclose(out.image[0, 9 - 6, 6 - 3, 5 - 2], (40 + 175) / 425)
    assert out.stats["channels"][0]["max"] == 400.0
    assert out.stats["normalisation"]["window"] == [-175.0, 250.0]
    assert np.allclose(np.asarray(geo.prepared_affine)[:3, 3], [6, 3, 2])
    assert np.array_equal(restore_to_original(out.label, geo, False), lab)


def test_mr_normalisation_and_multichannel():
    img, lab = _anisotropic_case()
    two = np.stack([img, 3 * img + 50])
    out = preprocess_case(Image3D(two, LIA), Image3D(lab[None], LIA), NO_CROP, (1.5, 1.5, 1.5), "MR")
    assert out.image.shape[0] == 2
    for c in range(2):
        assert abs(float(out.image[c].mean())) < 1e-3 and abs(float(out.image[c].std()) - 1) < 1e-3
    assert len(out.stats["channels"]) == 2 and len(out.stats["normalisation"]["clip"]) == 2


def test_validation_errors(tmp_path):
    img, lab = _anisotropic_case()
    lab_path = save_nifti(tmp_path / "lab.nii.gz", lab, LIA)
    image, label = Image3D(img[None], LIA), read_image(lab_path)
    sp = (1.5, 1.5, 1.5)
    with pytest.raises(DataError, match="does not match"):
        preprocess_case(image, Image3D(lab[None, :-1], LIA), NO_CROP, sp, "MR", source="case.nii.gz")
    shifted = LIA.copy()
    shifted[0, 3] += 0.5
    moved = read_image(save_nifti(tmp_path / "moved.nii.gz", lab, shifted))
    with pytest.raises(DataError, match=r"label .*moved\.nii\.gz does not lie on the image grid: max affine difference 0\.5"):
        preprocess_case(image, moved, NO_CROP, sp, "MR")
    tiny_shift = LIA.copy()
    tiny_shift[0, 3] += 1e-3  # within tolerance
    preprocess_case(image, Image3D(lab[None], tiny_shift), NO_CROP, sp, "MR")
    with pytest.raises(DataError, match=r"lab\.nii\.gz.*\[2\] are not among the dataset's declared labels"):
        preprocess_case(image, label, NO_CROP, sp, "MR", declared_labels={0, 1})
    with pytest.raises(DataError, match="empty"):
        preprocess_case(image, Image3D(np.zeros_like(lab)[None], LIA), NO_CROP, sp, "MR")
    with pytest.raises(DataError, match="non-integer"):
        preprocess_case(image, Image3D((lab * 0.5)[None], LIA), NO_CROP, sp, "MR")
    with pytest.raises(DataError, match="constant"):
        preprocess_case(Image3D(np.ones_like(img)[None], LIA), label, NO_CROP, sp, "MR")
    with pytest.raises(DataError, match="max_voxels"):
        preprocess_case(image, label, PreprocessConfig(max_voxels=1000), sp, "MR")

    nan_img = img.copy()
    nan_img[0, 0, :3] = np.nan
    nan_img[1, 1, 1] = np.inf
    with pytest.raises(DataError, match=r"scan\.nii\.gz: contains 4 NaN/Inf voxels; pass --nan-policy zero"):
        preprocess_case(Image3D(nan_img[None], LIA), label, NO_CROP, sp, "MR", source="scan.nii.gz")
    out = preprocess_case(Image3D(nan_img[None], LIA), label, PreprocessConfig(nan_policy="zero"), sp, "MR")
    assert out.stats["nan_replaced"] == 4 and np.all(np.isfinite(out.image))


def test_config_validation():
    with pytest.raises(ValueError):
        PreprocessConfig(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError):
        PreprocessConfig(unknown_option=1)
    with pytest.raises(ValueError):
        PreprocessConfig(ct_window=(100, -100))
    assert PreprocessConfig(spacing=[1, 2, 3]).spacing == (1.0, 2.0, 3.0)


def test_real_lsa_pool_mr_roundtrip():
    path = SHARED_DATA / "pool" / "mr_brain_t1_itk.nii.gz"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path} (../shared/data beside the repository)")
    img = read_image(path)
    assert nib.aff2axcodes(img.affine) == ("L", "S", "A")
    out = preprocess_image(img, PreprocessConfig(), (2.0, 2.0, 2.0), "MR")
    assert nib.aff2axcodes(np.asarray(out.geometry.prepared_affine)) == ("R", "A", "S")
    # A brain mask from the original, carried through the prepared grid and back.
    mask = (img.array[0] > np.percentile(img.array[0], 60)).astype(np.uint8)
    lab = preprocess_case(img, Image3D(mask[None], img.affine), PreprocessConfig(), (2.0, 2.0, 2.0), "MR")
    back = restore_to_original(lab.label, lab.geometry, is_probability=False)
    assert back.shape == mask.shape
    assert dice(back, mask) >= 0.9
