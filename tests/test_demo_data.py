"""The synthetic demo set: layout, content, determinism."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medpretrain.errors import ConfigError
from medpretrain.synthetic.demo_data import make_demo_dataset

SIZE = (48, 48, 32)
SPACING = (1.5, 1.5, 2.0)


def _load(root, case_id):
    img = nib.load(str(root / "imagesTr" / f"{case_id}_0000.nii.gz"))
    lab = nib.load(str(root / "labelsTr" / f"{case_id}.nii.gz"))
    return img, lab


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return make_demo_dataset(root, n_cases=4, size=SIZE, seed=3, spacing=SPACING)


def test_layout_and_dataset_json(demo):
    ids = [f"demo_{i:03d}" for i in range(4)]
    for case_id in ids:
        assert (demo / "imagesTr" / f"{case_id}_0000.nii.gz").is_file()
        assert (demo / "labelsTr" / f"{case_id}.nii.gz").is_file()
    ds = json.loads((demo / "dataset.json").read_text(encoding="utf-8"))
    assert ds["channel_names"] == {"0": "MR"}
    assert ds["labels"] == {"background": 0, "organ_a": 1, "organ_b": 2}
    assert ds["numTraining"] == 4
    assert ds["file_ending"] == ".nii.gz"
    assert ds["training"][0] == {"image": "./imagesTr/demo_000_0000.nii.gz", "label": "./labelsTr/demo_000.nii.gz"}
    assert len(ds["training"]) == 4
    splits = json.loads((demo / "splits.json").read_text(encoding="utf-8"))
    assert len(splits["test"]) == 1 and len(splits["train"]) == 3
    assert sorted(splits["train"] + splits["test"]) == ids
    assert not [p for p in demo.rglob(".*")]  # no temporary files left behind


def test_images_labels_and_affine(demo):
    for i in range(4):
        img, lab = _load(demo, f"demo_{i:03d}")
        assert img.shape == SIZE and lab.shape == SIZE
        assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
        np.testing.assert_allclose(np.diag(img.affine)[:3], SPACING)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_array_equal(img.affine, lab.affine)
        label = np.asarray(lab.dataobj)
        counts = np.bincount(label.ravel(), minlength=3)
        assert counts.size == 3 and np.all(counts > 0), counts
        assert counts[1] > counts[2]  # organ_a is the large one
        image = np.asarray(img.dataobj)
        assert np.isfinite(image).all()
        # Learnable: each organ differs from its surroundings on average...
        ring = _ring(label)
        for k in (1, 2):
            assert abs(image[label == k].mean() - image[ring[k]].mean()) > 0.03


def _ring(label):
    from scipy import ndimage

    return {k: ndimage.binary_dilation(label == k, iterations=2) & (label == 0) for k in (1, 2)}


def test_deterministic_and_seed_dependent(tmp_path, demo):
    again = make_demo_dataset(tmp_path / "again", n_cases=2, size=SIZE, seed=3, spacing=SPACING)
    other = make_demo_dataset(tmp_path / "other", n_cases=2, size=SIZE, seed=4, spacing=SPACING)
    for i in range(2):
        a_img, a_lab = _load(demo, f"demo_{i:03d}")
        b_img, b_lab = _load(again, f"demo_{i:03d}")
        c_img, c_lab = _load(other, f"demo_{i:03d}")
        np.testing.assert_array_equal(np.asarray(a_img.dataobj), np.asarray(b_img.dataobj))
        np.testing.assert_array_equal(np.asarray(a_lab.dataobj), np.asarray(b_lab.dataobj))
        assert not np.array_equal(np.asarray(a_lab.dataobj), np.asarray(c_lab.dataobj))
        assert not np.array_equal(np.asarray(a_img.dataobj), np.asarray(c_img.dataobj))


def test_more_classes_all_present(tmp_path):
    root = make_demo_dataset(tmp_path / "d", n_cases=3, size=(32, 32, 24), seed=0, num_classes=3)
    ds = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    assert ds["labels"]["organ_c"] == 3
    for i in range(3):
        _, lab = _load(root, f"demo_{i:03d}")
        assert set(np.unique(np.asarray(lab.dataobj)).tolist()) == {0, 1, 2, 3}


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        make_demo_dataset(tmp_path, n_cases=0)
    with pytest.raises(ConfigError):
        make_demo_dataset(tmp_path, size=(8, 64, 64))
