"""The prepared cache: end to end preparation, re-runs, bad cases, validation on open."""

from __future__ import annotations

import json
import logging
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from _niftis import SHARED_DATA, blob_case, make_nnunet, ras_affine, save_nifti
from medpretrain.data import PreparedData, PreprocessConfig, prepare_dataset, prepare_pool, restore_to_original
from medpretrain.errors import CacheError, DataError

SHAPE = (24, 20, 16)
CFG = PreprocessConfig(crop_margin=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    # Anisotropic spacings so the median spacing and resampling are exercised.
    make_nnunet(root, n=4, shape=SHAPE, spacing=(1.0, 1.0, 2.0), channels=("MRI",))
    return root


@pytest.fixture(scope="module")
def prepared(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep1")
    return prepare_dataset(dataset, out, CFG, workers=1, seed=0, progress=False)


def test_prepare_end_to_end(prepared, dataset):
    root = prepared.root
    ids = ["case_000", "case_001", "case_002", "case_003"]
    assert prepared.case_ids == ids
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["fingerprint.json", "manifest.json"] + [f"{c}{s}" for c in ids for s in (".npy", "_seg.npy", ".json")]
    )
    m = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    assert m["format"] == "medpretrain-cache" and m["format_version"] == 1 and m["kind"] == "labelled"
    assert m["preprocess"]["spacing"] == [1.0, 1.0, 2.0] and m["preprocess"]["modality"] == "MR"
    assert m["labels"] == {"0": "background", "1": "outer", "2": "inner"} and m["skipped"] == []
    assert prepared.labels == {0: "background", 1: "outer", 2: "inner"}
    assert prepared.num_classes == 3 and prepared.in_channels == 1 and prepared.spacing == (1.0, 1.0, 2.0)
    train, test = prepared.split("train"), prepared.split("test")
    assert sorted(train + test) == ids and len(test) == 1
    with pytest.raises(CacheError, match=r"available splits: \['test', 'train'\]"):
        prepared.split("val")
    for cid in ids:
        img, lab = prepared.image(cid), prepared.label(cid)
        assert isinstance(img, np.memmap) and img.dtype == np.float32 and img.ndim == 4
        assert lab.dtype == np.uint8 and lab.shape == img.shape[1:]
        entry = prepared.case(cid)
        assert entry["shape"] == list(img.shape) and entry["classes_present"] == [1, 2]
        for cls, coords in entry["foreground"].items():
            coords = np.asarray(coords)
            assert 0 < len(coords) <= 1000 and np.all(lab[tuple(coords.T)] == int(cls))
        # The geometry maps the prepared label back onto the source label exactly.
        src = np.asarray(nib.load(entry["source_label"]).dataobj)
        assert np.array_equal(restore_to_original(np.asarray(lab), prepared.geometry(cid), False), src)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_workers_2_gives_same_cache(prepared, dataset, tmp_path):
    other = prepare_dataset(dataset, tmp_path / "p2", CFG, workers=2, seed=0, progress=False)
    assert other.case_ids == prepared.case_ids
    assert other.manifest["split"] == prepared.manifest["split"]
    for cid in prepared.case_ids:
        assert np.array_equal(other.image(cid), prepared.image(cid))
        assert np.array_equal(other.label(cid), prepared.label(cid))
        assert other.case(cid)["foreground"] == prepared.case(cid)["foreground"]


def test_rerun_skips_done_cases_and_redoes_incomplete(dataset, tmp_path):
    out = tmp_path / "p"
    prepare_dataset(dataset, out, CFG, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    (out / "case_002.json").unlink()  # as if interrupted before the case was complete
    data = prepare_dataset(dataset, out, CFG, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    assert after["case_000.npy"] == stamps["case_000.npy"]
    assert after["case_002.npy"] != stamps["case_002.npy"]
    assert (out / "case_002.json").is_file() and data.case_ids == [f"case_{i:03d}" for i in range(4)]
    with pytest.raises(CacheError, match="different preprocessing settings.*new --out"):
        prepare_dataset(dataset, out, PreprocessConfig(crop_margin=3), progress=False)


def test_bad_cases_skipped_listed_and_strict(tmp_path, caplog):
    root = make_nnunet(tmp_path / "ds", n=4, shape=SHAPE, split={"train": ["case_000", "case_001", "case_002"],
                                                                  "test": ["case_003"]})
    aff = ras_affine()
    img, lab = blob_case(SHAPE, seed=1)
    img[2, 3, 4] = np.nan
    save_nifti(root / "imagesTr" / "case_001_0000.nii.gz", img, aff)
    save_nifti(root / "labelsTr" / "case_003.nii.gz", lab[:, :, :-2], aff)
    with caplog.at_level(logging.WARNING, logger="medpretrain"):
        data = prepare_dataset(root, tmp_path / "out", CFG, progress=False)
    assert data.case_ids == ["case_000", "case_002"]
    skipped = {s["case_id"]: s for s in data.manifest["skipped"]}
    assert set(skipped) == {"case_001", "case_003"}
    assert "NaN/Inf" in skipped["case_001"]["reason"] and skipped["case_001"]["file"].endswith("case_001_0000.nii.gz")
    assert skipped["case_003"]["file"].endswith("labelsTr/case_003.nii.gz")
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("SKIP case_001: ") and "--nan-policy zero" in line for line in lines)
    assert any(line.startswith("SKIP case_003: ") for line in lines)
    assert data.split("train") == ["case_000", "case_002"] and data.split("test") == []
    with pytest.raises(DataError, match="NaN/Inf"):
        prepare_dataset(root, tmp_path / "strict", CFG, strict=True, progress=False)


def test_declared_channels_must_match(tmp_path):
    root = make_nnunet(tmp_path / "ds", n=2, shape=SHAPE)
    img, _ = blob_case(SHAPE, seed=0)
    save_nifti(root / "imagesTr" / "case_000_0000.nii.gz", np.stack([img, img], -1), ras_affine())
    with pytest.raises(DataError, match=r"case_000_0000\.nii\.gz: has 2 channel\(s\) but 1 is declared"):
        prepare_dataset(root, tmp_path / "out", CFG, strict=True, progress=False)


def test_prepared_data_validation(prepared, tmp_path):
    with pytest.raises(CacheError, match=r"no manifest\.json in .*run `medpretrain prepare"):
        PreparedData(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(prepared.root, copy)
    os.remove(copy / "case_001_seg.npy")
    with pytest.raises(CacheError, match="case_001_seg.npy"):
        PreparedData(copy)
    m = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    m["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    with pytest.raises(CacheError, match="re-run `medpretrain prepare`"):
        PreparedData(copy)
    with pytest.raises(CacheError, match="not in this cache"):
        prepared.image("nope")


def test_pool_cache(tmp_path):
    aff = np.diag([-1.5, -1.5, 2.0, 1.0])  # LPS
    for i in range(3):
        img, _ = blob_case(SHAPE, seed=i)
        save_nifti(tmp_path / "pool" / f"scan{i}.nii.gz", img, aff)
    save_nifti(tmp_path / "pool" / "broken.nii.gz", np.ones(SHAPE, np.float32), aff)  # constant
    data = prepare_pool(tmp_path / "pool", tmp_path / "out", CFG, workers=2, progress=False)
    assert data.kind == "pool" and data.case_ids == ["scan0", "scan1", "scan2"]
    assert [s["case_id"] for s in data.manifest["skipped"]] == ["broken"]
    assert data.spacing == (1.5, 1.5, 2.0) and data.in_channels == 1 and data.num_classes == 0
    assert data.split("train") == data.case_ids
    assert not list(data.root.glob("*_seg.npy"))
    with pytest.raises(CacheError, match="no labels"):
        data.label("scan0")


def test_la2018_three_cases_and_one_pool_file(tmp_path):
    la = SHARED_DATA / "la2018"
    ct = SHARED_DATA / "pool" / "ct_abdomen_totalseg_example.nii.gz"
    if not la.is_dir() or not ct.is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA} (../shared/data beside the repository)")
    ids = ["la_000", "la_001", "la_095"]
    data = prepare_dataset(la, tmp_path / "la", PreprocessConfig(), case_ids=ids, progress=False)
    assert data.case_ids == ids and data.manifest["skipped"] == []
    assert data.spacing == (1.25, 1.25, 1.25) and data.manifest["preprocess"]["modality"] == "MR"
    assert data.labels == {0: "background", 1: "left_atrium"} and data.in_channels == 1
    # The dataset's own splits.json is honoured (la_095 is a test case there).
    assert data.split("test") == ["la_095"] and data.split("train") == ["la_000", "la_001"]
    assert data.case("la_000")["classes_present"] == [1]

    listing = tmp_path / "pool.json"
    listing.write_text(json.dumps([{"image": str(ct), "modality": "CT"}]), encoding="utf-8")
    pool = prepare_pool(listing, tmp_path / "pool", PreprocessConfig(spacing=(4.0, 4.0, 4.0)), progress=False)
    (cid,) = pool.case_ids
    entry = pool.case(cid)
    assert entry["modality"] == "CT"
    img = pool.image(cid)
    assert img.min() >= 0.0 and img.max() <= 1.0  # CT window scaling
    assert entry["stats"]["channels"][0]["min"] < -500  # air in HU before normalisation
