"""Reading images (NIfTI, NRRD, MHA, DICOM) and finding datasets / pools on disk."""

from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from _niftis import blob_case, make_msd, make_nnunet, ras_affine, save_nifti
from medpretrain.data import discover_dataset, discover_pool, make_split, read_header, read_image, write_nifti
from medpretrain.errors import DataError

# ----------------------------------------------------------------------------- read_image


def _world(affine, ijk):
    return (np.asarray(affine) @ np.array([*ijk, 1.0]))[:3]


def test_nifti_3d_int_labels_exact_and_spacing(tmp_path):
    lab = np.zeros((6, 5, 4), np.uint16)
    lab[1:3, 1:4, 2] = 300  # above uint8 on purpose
    aff = ras_affine((0.5, 0.75, 2.0), (1, 2, 3))
    p = save_nifti(tmp_path / "lab.nii.gz", lab, aff)
    img = read_image(p)
    assert img.array.shape == (1, 6, 5, 4)
    assert np.issubdtype(img.array.dtype, np.integer)
    assert np.array_equal(img.array[0], lab)
    assert img.spacing == pytest.approx((0.5, 0.75, 2.0))
    assert np.allclose(img.affine, aff)
    assert img.path == p


def test_nifti_scaling_is_applied(tmp_path):
    raw = np.arange(60, dtype=np.uint8).reshape(5, 4, 3)
    nii = nib.Nifti1Image(raw, ras_affine())
    nii.header.set_slope_inter(0.5, -3.0)
    p = tmp_path / "scaled.nii"
    nib.save(nii, str(p))
    arr = read_image(p).array[0]
    assert arr.dtype == np.float32
    assert np.allclose(arr, raw * 0.5 - 3.0)


def test_nifti_4d_gives_channels(tmp_path):
    data = np.random.default_rng(0).normal(size=(6, 5, 4, 3)).astype(np.float32)
    p = save_nifti(tmp_path / "four.nii.gz", data, ras_affine())
    img = read_image(p)
    assert img.array.shape == (3, 6, 5, 4)
    assert np.allclose(img.array[2], data[..., 2])
    assert read_header(p) == ((6, 5, 4), 3, pytest.approx(ras_affine()))


def test_mgz(tmp_path):
    data = np.arange(120, dtype=np.float32).reshape(6, 5, 4)
    aff = ras_affine((1.0, 1.0, 1.5), (3, 4, 5))
    nib.save(nib.MGHImage(data, aff), str(tmp_path / "brain.mgz"))
    img = read_image(tmp_path / "brain.mgz")
    assert np.array_equal(img.array[0], data) and np.allclose(img.affine, aff)


def _itk_image(arr_xyz, spacing, origin, direction):
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_xyz.transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_world_positions_match_itk(tmp_path, suffix):
    arr = np.random.default_rng(1).integers(0, 1000, size=(7, 6, 5)).astype(np.int16)
    # An oblique-ish direction (axes permuted and flipped) to exercise the LPS -> RAS conversion.
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    itk = _itk_image(arr, (0.6, 0.9, 2.5), (12.0, -7.0, 30.0), direction)
    p = tmp_path / f"vol{suffix}"
    sitk.WriteImage(itk, str(p))
    img = read_image(p)
    assert img.array.shape == (1, 7, 6, 5)
    assert np.array_equal(img.array[0], arr)
    assert img.spacing == pytest.approx((0.6, 0.9, 2.5))
    for ijk in [(0, 0, 0), (6, 0, 0), (3, 5, 4), (1, 2, 3)]:
        lps = np.asarray(itk.TransformIndexToPhysicalPoint(ijk))
        assert _world(img.affine, ijk) == pytest.approx(lps * [-1, -1, 1])
    shape, channels, aff = read_header(p)
    assert shape == (7, 6, 5) and channels == 1 and np.allclose(aff, img.affine)


def test_lps_nrrd_matches_equivalent_nifti(tmp_path):
    arr = np.random.default_rng(2).normal(size=(8, 6, 5)).astype(np.float32)
    # ITK identity direction = axes along L, P, S.
    itk = _itk_image(arr, (1.0, 1.5, 2.0), (5.0, 6.0, 7.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(itk, str(tmp_path / "lps.nrrd"))
    nifti_aff = np.array([[-1.0, 0, 0, -5.0], [0, -1.5, 0, -6.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
    save_nifti(tmp_path / "lps.nii.gz", arr, nifti_aff)
    a, b = read_image(tmp_path / "lps.nrrd"), read_image(tmp_path / "lps.nii.gz")
    assert nib.aff2axcodes(a.affine) == ("L", "P", "S")
    assert np.allclose(a.affine, b.affine)
    assert np.allclose(a.array, b.array)


def _write_dicom_series(folder, arr_zyx, uid, spacing=(0.7, 0.8, 2.0), origin=(10.0, 20.0, 30.0)):
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(arr_zyx.shape[0]):
        s = img[:, :, z]
        s.SetMetaData("0020|000e", uid)
        s.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, z)))))
        s.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        s.SetMetaData("0020|0013", str(z + 1))
        s.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(folder / f"{uid[-3:]}_{z}.dcm"))
        writer.Execute(s)
    return img


def test_dicom_series_folder(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    try:
        itk = _write_dicom_series(tmp_path / "series", arr, "1.2.826.0.1.3680043.2.1125.101")
    except RuntimeError as exc:  # pragma: no cover - depends on the SimpleITK build
        pytest.skip(f"SimpleITK cannot write DICOM here: {exc}")
    img = read_image(tmp_path / "series")
    assert img.array.shape == (1, 6, 5, 4)
    assert np.array_equal(img.array[0], arr.transpose(2, 1, 0))
    assert img.spacing == pytest.approx((0.7, 0.8, 2.0))
    lps = np.asarray(itk.TransformIndexToPhysicalPoint((2, 3, 1)))
    assert _world(img.affine, (2, 3, 1)) == pytest.approx(lps * [-1, -1, 1])
    pool = discover_pool(tmp_path)
    assert [(c.case_id, c.images) for c in pool] == [("series", [tmp_path / "series"])]
    # A second series in the same folder must be refused with both ids named.
    _write_dicom_series(tmp_path / "series", arr, "1.2.826.0.1.3680043.2.1125.202")
    with pytest.raises(DataError) as err:
        read_image(tmp_path / "series")
    msg = str(err.value)
    assert "1.2.826.0.1.3680043.2.1125.101" in msg and "1.2.826.0.1.3680043.2.1125.202" in msg
    assert "one series folder" in msg


def test_truncated_nifti_is_a_data_error(tmp_path):
    p = save_nifti(tmp_path / "full.nii.gz", np.ones((20, 20, 20), np.float32), ras_affine())
    raw = gzip.decompress(p.read_bytes())
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DataError, match=r"cannot read .*cut\.nii\.gz.*complete NIfTI"):
        read_image(bad)
    junk = tmp_path / "junk.nrrd"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"cannot read .*junk\.nrrd.*complete NRRD"):
        read_image(junk)


def test_bad_spacing_and_2d_are_data_errors(tmp_path):
    # nibabel repairs a zero pixdim on load, but a degenerate sform gets through.
    nii = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None)
    nii.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=2)
    nib.save(nii, str(tmp_path / "zero.nii.gz"))
    with pytest.raises(DataError, match=r"zero\.nii\.gz.*spacing"):
        read_image(tmp_path / "zero.nii.gz")
    save_nifti(tmp_path / "flat.nii.gz", np.ones((5, 4), np.float32), ras_affine())
    with pytest.raises(DataError, match=r"flat\.nii\.gz.*2D"):
        read_image(tmp_path / "flat.nii.gz")
    # A single slice stored as 3D is allowed.
    assert read_image(save_nifti(tmp_path / "slab.nii.gz", np.ones((5, 4, 1)), ras_affine())).array.shape == (1, 5, 4, 1)
    with pytest.raises(DataError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")


def test_write_nifti_atomic_roundtrip(tmp_path):
    arr = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    aff = np.array([[0, -2.0, 0, 1], [1.5, 0, 0, 2], [0, 0, 3.0, 3], [0, 0, 0, 1]])
    out = write_nifti(arr, aff, tmp_path / "sub" / "out.nii.gz")
    assert sorted(os.listdir(tmp_path / "sub")) == ["out.nii.gz"]  # no temporary left
    back = read_image(out)
    assert np.array_equal(back.array[0], arr) and np.allclose(back.affine, aff)
    assert nib.load(str(out)).get_data_dtype() == np.uint8  # smallest type holding 0..23
    write_nifti(arr.astype(np.float32), aff, out, dtype=np.float32)
    assert nib.load(str(out)).get_data_dtype() == np.float32


# ----------------------------------------------------------------------------- datasets


def test_discover_nnunet_with_split(tmp_path):
    root = make_nnunet(tmp_path / "nn", n=4, channels=("T2", "ADC"),
                       split={"train": ["case_000", "case_001", "case_002"], "test": ["case_003"]})
    ds = discover_dataset(root)
    assert ds.layout == "nnunet"
    assert [c.case_id for c in ds.cases] == ["case_000", "case_001", "case_002", "case_003"]
    assert [p.name for p in ds.cases[1].images] == ["case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    assert ds.cases[1].label.name == "case_001.nii.gz"
    assert ds.labels == {0: "background", 1: "outer", 2: "inner"}
    assert ds.channel_names == ["T2", "ADC"]
    assert ds.modality == "MR"
    assert ds.split == {"train": ["case_000", "case_001", "case_002"], "test": ["case_003"]}


def test_nnunet_preferred_over_msd_and_splits_final(tmp_path):
    root = make_nnunet(tmp_path / "both", n=3, channels=("CT",),
                       extra={"training": [{"image": "./nowhere.nii.gz", "label": "./nowhere.nii.gz"}]})
    (root / "splits_final.json").write_text(json.dumps([
        {"train": ["case_000", "case_001"], "val": ["case_002"]},
        {"train": ["case_001", "case_002"], "val": ["case_000"]},
    ]), encoding="utf-8")
    ds = discover_dataset(root)
    assert ds.layout == "nnunet" and ds.modality == "CT"
    assert ds.split == {"train": ["case_000", "case_001"], "test": ["case_002"]}


def test_discover_msd_4d(tmp_path):
    root = make_msd(tmp_path / "msd", n=3, channels=2)
    ds = discover_dataset(root)
    assert ds.layout == "msd"
    assert [c.case_id for c in ds.cases] == ["vol_0", "vol_1", "vol_2"]
    assert len(ds.cases[0].images) == 1 and ds.cases[0].images[0].is_file()
    assert ds.channel_names == ["CT", "CT"] and ds.modality == "CT"
    assert ds.labels == {0: "background", 1: "outer", 2: "inner"}
    assert ds.split is None


def test_discover_folders(tmp_path):
    root = tmp_path / "plain"
    aff = ras_affine()
    for i in range(3):
        img, lab = blob_case(seed=i)
        save_nifti(root / "images" / f"p{i}_0000.nii.gz", img, aff)
        save_nifti(root / "labels" / f"p{i}.nii.gz", lab, aff)
    ds = discover_dataset(root)
    assert ds.layout == "folders"
    assert [c.case_id for c in ds.cases] == ["p0", "p1", "p2"]
    assert ds.labels == {0: "background", 1: "class_1", 2: "class_2"}
    assert ds.channel_names == ["channel_0"] and ds.modality is None
    # An image without a label is named in the error.
    save_nifti(root / "images" / "lonely.nii.gz", img, aff)
    with pytest.raises(DataError, match="lonely.nii.gz"):
        discover_dataset(root)


def test_dataset_errors(tmp_path):
    root = make_nnunet(tmp_path / "a", n=2)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    del meta["file_ending"]
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(DataError, match=r"nnU-Net.*missing \['file_ending'\]"):
        discover_dataset(root)

    root = make_msd(tmp_path / "b", n=3)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    meta["training"][1]["label"] = "./labelsTr/gone.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(DataError, match=r"do not exist: labelsTr/gone\.nii\.gz"):
        discover_dataset(root)
    meta["training"][1]["label"] = meta["training"][0]["label"]
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(DataError, match=r"duplicate case ids \['vol_0'\]"):
        discover_dataset(root)
    del meta["training"]
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(DataError, match="neither"):
        discover_dataset(root)

    root = make_nnunet(tmp_path / "c", n=2)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    with pytest.raises(DataError, match="case_001.nii.gz"):
        discover_dataset(root)

    root = make_nnunet(tmp_path / "d", n=2, split={"train": ["case_000"], "test": ["case_099"]})
    with pytest.raises(DataError, match="case_099"):
        discover_dataset(root)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no cases found"):
        discover_dataset(tmp_path / "empty")


def test_discover_pool_folder_glob_json(tmp_path):
    aff = ras_affine()
    img, _ = blob_case(seed=0)
    save_nifti(tmp_path / "pool" / "a" / "scan.nii.gz", img, aff)
    save_nifti(tmp_path / "pool" / "b" / "scan.nii.gz", img, aff)
    sitk.WriteImage(_itk_image(img, (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), str(tmp_path / "pool" / "c.mha"))
    (tmp_path / "pool" / "notes.txt").write_text("ignored", encoding="utf-8")
    cases = discover_pool(tmp_path / "pool")
    assert [c.case_id for c in cases] == ["scan", "scan_2", "c"]
    assert all(c.label is None for c in cases)
    assert [c.case_id for c in discover_pool(str(tmp_path / "pool" / "*" / "*.nii.gz"))] == ["scan", "scan_2"]
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"image": "pool/c.mha", "modality": "CT"}, str(tmp_path / "pool" / "a" / "scan.nii.gz")]), encoding="utf-8")
    cases = discover_pool(listing)
    assert [c.case_id for c in cases] == ["c", "scan"] and cases[0].modality == "CT" and cases[0].images[0].is_file()
    listing.write_text(json.dumps(["pool/missing.nii.gz"]), encoding="utf-8")
    with pytest.raises(DataError, match="missing.nii.gz"):
        discover_pool(listing)
    (tmp_path / "void").mkdir()
    with pytest.raises(DataError, match="no images found"):
        discover_pool(tmp_path / "void")


def test_make_split_deterministic():
    ids = [f"c{i}" for i in range(10)]
    a = make_split(ids, seed=1)
    assert a == make_split(list(reversed(ids)), seed=1)
    assert len(a["test"]) == 2 and sorted(a["train"] + a["test"]) == ids
    assert a["train"] == sorted(a["train"])
    assert make_split(ids, seed=2) != a or make_split(ids, seed=3) != a
