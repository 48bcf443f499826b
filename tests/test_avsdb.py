"""The AVS-DB generator: classes, shapes, arrangement, rendering, determinism, dataset and writer."""

from __future__ import annotations

import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.path import Path as MplPath
from pydantic import ValidationError

from medpretrain.data.datasets import discover_dataset
from medpretrain.errors import ConfigError
from medpretrain.synthetic.avsdb import (
    AVSDBConfig,
    AVSDBDataset,
    class_names,
    generate_shape,
    generate_volume,
    place_shapes,
    write_avsdb_dataset,
)

SMALL = (48, 48, 40)


def _gen(args):
    cfg_json, seed, index = args
    return generate_volume(AVSDBConfig.model_validate(cfg_json), seed, index)


# ---------------------------------------------------------------------------------------------- config


def test_class_sets_and_names():
    assert AVSDBConfig().num_classes == 17
    assert AVSDBConfig(classes="xy4-z2").num_classes == 9
    assert AVSDBConfig(classes="xy8-z4").num_classes == 33
    names = class_names(AVSDBConfig())
    assert names[0] == "background" and names[1] == "ellipse-constant" and names[2] == "ellipse-hourglass"
    assert names[3] == "3gon-constant" and names[16] == "9gon-hourglass" and len(names) == 17
    assert list(class_names(AVSDBConfig(classes="xy4-z2")).values())[1:] == [
        f"{xy}-{z}" for xy in ("ellipse", "3gon", "4gon", "5gon") for z in ("constant", "hourglass")]
    z4 = class_names(AVSDBConfig(classes="xy8-z4"))
    assert [z4[k] for k in (1, 2, 3, 4, 5)] == [
        "ellipse-constant", "ellipse-hourglass", "ellipse-rhombus", "ellipse-pyramid", "3gon-constant"]
    with pytest.raises(ValidationError):
        AVSDBConfig(bogus=1)
    with pytest.raises(ValidationError):
        AVSDBConfig(max_overlap_ratio=0.0)
    with pytest.raises(ValidationError):
        AVSDBConfig(classes="xy3-z3")


# ---------------------------------------------------------------------------------------------- shapes


def _pixel_centres(shape):
    ii, jj = np.meshgrid(np.arange(shape.mask.shape[0]), np.arange(shape.mask.shape[1]), indexing="ij")
    return np.stack([ii.ravel() + shape.origin[0], jj.ravel() + shape.origin[1]], axis=1), ii.shape


@pytest.mark.parametrize("n", range(3, 10))
def test_polygon_has_its_vertex_count_and_rasterises_exactly(n):
    for t in range(6):
        s = generate_shape(f"{n}gon", "hourglass", np.random.default_rng([n, t]))
        v = s.vertices
        assert v.shape == (n, 2) and s.ellipse is None
        # Counter-clockwise, and the centre it is scaled about lies strictly inside every sector.
        cross = v[:, 0] * np.roll(v[:, 1], -1) - v[:, 1] * np.roll(v[:, 0], -1)
        assert np.all(cross > 0)
        pts, grid = _pixel_centres(s)
        for k in {0, int(np.argmin(s.scale)), len(s.scale) - 1}:
            ref = MplPath(v * s.scale[k]).contains_points(pts).reshape(grid)
            assert np.count_nonzero(ref != s.mask[:, :, k]) <= 2, (n, t, k)
            assert s.mask[:, :, k].sum() > 0


def test_ellipse_rasterises_exactly():
    for t in range(8):
        s = generate_shape("ellipse", "constant", np.random.default_rng(t))
        a, b, cs, sn = s.ellipse
        assert 15 <= min(a, b) and max(a, b) <= 40
        pts, grid = _pixel_centres(s)
        u = (pts[:, 0] * cs + pts[:, 1] * sn) / a
        w = (pts[:, 1] * cs - pts[:, 0] * sn) / b
        ref = (u * u + w * w <= 1.0).reshape(grid)
        assert np.count_nonzero(ref != s.mask[:, :, 0]) <= 2
        assert abs(s.mask[:, :, 0].sum() - np.pi * a * b) < 0.05 * np.pi * a * b


def _runs(d):
    """Signs of the per-slice area steps, consecutive duplicates and zeros removed."""
    signs = [int(x) for x in np.sign(d) if x != 0]
    return [x for i, x in enumerate(signs) if i == 0 or x != signs[i - 1]]


@pytest.mark.parametrize("kind_xy", ["ellipse", "3gon", "6gon", "9gon"])
def test_z_profiles(kind_xy):
    for t in range(6):
        rng = np.random.default_rng(t)
        for kind_z in ("constant", "hourglass", "rhombus", "pyramid"):
            s = generate_shape(kind_xy, kind_z, rng)
            area = s.mask.sum(axis=(0, 1)).astype(float)
            depth = s.mask.shape[2]
            assert depth <= 50 and area[0] > 0 and area[-1] > 0  # the box holds no empty end slices
            assert depth >= (10 if kind_z != "pyramid" else 5)
            steps = _runs(np.diff(area))
            if kind_z == "constant":
                assert steps == [] and np.all(area == area[0])
            elif kind_z == "hourglass":  # falls, then rises; waist at 0.3..0.5 of the ends' scale
                assert steps in ([-1, 1], [-1], [1]) and area.min() < 0.35 * area.max()
                assert 3 <= int(np.argmin(s.scale)) <= depth - 3
            elif kind_z == "rhombus":  # rises, then falls
                assert steps in ([1, -1], [1], [-1]) and area.min() < 0.35 * area.max()
                assert 3 <= int(np.argmax(s.scale)) <= depth - 3
            else:  # pyramid: monotonic down to (nearly) a point
                assert steps in ([1], [-1]) and min(area[0], area[-1]) <= 0.02 * area.max() + 2
            assert s.volume == int(area.sum())


def test_shape_ranges_scale_with_volume_size():
    small = [generate_shape("5gon", "constant", np.random.default_rng(t), size=(48, 48, 48)) for t in range(10)]
    big = [generate_shape("5gon", "constant", np.random.default_rng(t), size=(96, 96, 96)) for t in range(10)]
    for s, b in zip(small, big):
        assert s.mask.shape[2] * 2 in (b.mask.shape[2] - 1, b.mask.shape[2], b.mask.shape[2] + 1)
        assert 0.10 < s.volume / b.volume < 0.15  # about 1/8


# ---------------------------------------------------------------------------------------------- arrangement


@pytest.mark.parametrize("classes", ["xy8-z2", "xy4-z2", "xy8-z4"])
def test_overlap_ratio_order_and_overwrite(classes):
    cfg = AVSDBConfig(classes=classes, n_shapes=25)
    for index in range(2):
        label, placements, dropped = place_shapes(cfg, 7, index)
        assert len(placements) + dropped == 25 and len(placements) >= 10
        assert label.dtype == np.uint8 and label.max() < cfg.num_classes
        vols = [p.shape.volume for p in placements]
        assert vols == sorted(vols, reverse=True)  # largest first
        filled = np.zeros(cfg.size, dtype=bool)
        ref = np.zeros(cfg.size, dtype=np.uint8)
        best = np.full(cfg.size, np.inf)
        for p in placements:
            view = p.slices
            shared = np.count_nonzero(filled[view] & p.shape.mask)
            assert shared == p.overlap and shared / p.shape.volume < cfg.max_overlap_ratio
            filled[view] |= p.shape.mask
            # Rule, stated independently of the painting order: the smallest covering shape wins.
            win = p.shape.mask & (p.shape.volume <= best[view])
            best[view][win] = p.shape.volume
            ref[view][win] = p.class_id
        assert np.array_equal(label, ref)
        assert np.array_equal(label > 0, filled)
        assert any(p.overlap > 0 for p in placements)


def test_no_overlap():
    cfg = AVSDBConfig(overlap=False, n_shapes=25)
    label, placements, _ = place_shapes(cfg, 3, 0)
    count = np.zeros(cfg.size, dtype=np.int32)
    for p in placements:
        count[p.slices] += p.shape.mask
        assert p.overlap == 0
    assert count.max() == 1
    assert np.count_nonzero(label) == sum(p.shape.volume for p in placements)


# ---------------------------------------------------------------------------------------------- rendering


def test_outline_render():
    cfg = AVSDBConfig(size=SMALL)
    image, label = generate_volume(cfg, 0, 5)
    assert image.shape == label.shape == SMALL and image.dtype == np.uint8 and label.dtype == np.uint8
    assert set(np.unique(image).tolist()) == {0, 128}
    _, placements, _ = place_shapes(cfg, 0, 5)
    edge = np.zeros(SMALL, dtype=bool)
    for p in placements:
        rim = p.shape.outline()
        assert rim.any() and np.all(p.shape.mask[rim])
        edge[p.slices] |= rim
    assert np.array_equal(image > 0, edge)
    assert not np.any(image[label == 0])  # outlines lie inside the shapes

    noisy, label2 = generate_volume(cfg.model_copy(update={"noise": 0.1}), 0, 5)
    assert np.array_equal(label, label2) and noisy.dtype == np.uint8
    assert noisy.max() <= 128 + 26 and np.all(noisy >= image) and noisy[image == 0].max() > 0


def test_filled_render_shares_labels():
    outline = AVSDBConfig(size=SMALL)
    filled = AVSDBConfig(size=SMALL, render="filled")
    _, lab_o = generate_volume(outline, 4, 2)
    img_f, lab_f = generate_volume(filled, 4, 2)
    assert np.array_equal(lab_o, lab_f)
    assert img_f.dtype == np.float32 and img_f.min() >= 0.0 and img_f.max() <= 1.0
    fg, bg = img_f[lab_f > 0], img_f[lab_f == 0]
    assert abs(float(np.median(fg)) - float(np.median(bg))) > 0.05  # the shapes stand out on average
    assert np.std(bg) > 0.0  # textured


# ---------------------------------------------------------------------------------------------- determinism


def test_deterministic_across_processes():
    cfgs = [AVSDBConfig(size=SMALL), AVSDBConfig(size=SMALL, render="filled", noise=0.05, classes="xy8-z4")]
    jobs = [(c.model_dump(mode="json"), seed, index) for c in cfgs for seed, index in ((0, 0), (11, 3))]
    with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
        remote = list(pool.map(_gen, jobs))
    for job, (img_r, lab_r) in zip(jobs, remote):
        img, lab = _gen(job)
        assert np.array_equal(img, img_r) and np.array_equal(lab, lab_r)
        img2, lab2 = _gen(job)  # and within one process, twice
        assert np.array_equal(img, img2) and np.array_equal(lab, lab2)


def test_different_seed_or_index_differ():
    cfg = AVSDBConfig(size=SMALL)
    labels = [generate_volume(cfg, s, i)[1] for s, i in ((0, 0), (0, 1), (1, 0), (1, 1))]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not np.array_equal(labels[a], labels[b])


# ---------------------------------------------------------------------------------------------- dataset


def test_dataset_items():
    cfg = AVSDBConfig(size=SMALL)
    ds = AVSDBDataset(cfg, seed=2, length=4)
    assert len(ds) == 4
    item = ds[1]
    assert item["image"].shape == (1, *SMALL) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, *SMALL) and item["label"].dtype == torch.int64
    img, lab = generate_volume(cfg, 2, 1)
    assert torch.equal(item["label"][0], torch.from_numpy(lab.astype(np.int64)))
    assert torch.allclose(item["image"][0], torch.from_numpy(img.astype(np.float32) / 255))
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert torch.equal(ds[-3]["label"], item["label"])
    assert torch.equal(ds[5]["label"], item["label"])  # a second pass over the 4 volumes
    with pytest.raises(IndexError):
        ds[-5]
    unbounded = AVSDBDataset(cfg, seed=2, length=None)
    assert len(unbounded) > 10**9 and torch.equal(unbounded[1]["label"], item["label"])
    assert not torch.equal(unbounded[5]["label"], item["label"])

    cropped = AVSDBDataset(cfg.model_copy(update={"render": "filled"}), seed=2, length=4, patch=(32, 40, 24))
    a, b = cropped[1], cropped[1]
    assert a["image"].shape == (1, 32, 40, 24) and a["label"].shape == (1, 32, 40, 24)
    assert a["image"].dtype == torch.float32 and a["label"].dtype == torch.int64
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(cropped[5]["label"], a["label"])  # same volume, another crop on the next pass
    with pytest.raises(ValueError):
        AVSDBDataset(cfg, patch=(64, 8, 8))


def test_dataloader_workers_give_the_indexed_volumes():
    ds = AVSDBDataset(AVSDBConfig(size=(32, 32, 32), n_shapes=8), seed=9, length=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
    labels = [batch["label"][0] for batch in loader]
    for i, lab in enumerate(labels):
        assert torch.equal(lab, ds[i]["label"])
    assert all(not torch.equal(labels[a], labels[b]) for a in range(4) for b in range(a + 1, 4))


def test_write_dataset(tmp_path):
    cfg = AVSDBConfig(size=(32, 32, 32), n_shapes=8)
    out = write_avsdb_dataset(tmp_path / "avs", n=3, cfg=cfg, seed=5, workers=2, preview=1, progress=False)
    src = discover_dataset(out)
    assert [c.case_id for c in src.cases] == ["avsdb_00000", "avsdb_00001", "avsdb_00002"]
    assert src.labels == class_names(cfg) and src.channel_names == ["synthetic"]
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert meta["training"][2] == {"image": "./imagesTr/avsdb_00002_0000.nii.gz", "label": "./labelsTr/avsdb_00002.nii.gz"}
    assert (out / "preview" / "avsdb_00000.png").stat().st_size > 1000
    assert not (out / "preview" / "avsdb_00001.png").exists()
    img = nib.load(str(out / "imagesTr" / "avsdb_00001_0000.nii.gz"))
    lab = nib.load(str(out / "labelsTr" / "avsdb_00001.nii.gz"))
    assert img.get_data_dtype() == np.uint8 and lab.get_data_dtype() == np.uint8
    ref_img, ref_lab = generate_volume(cfg, 5, 1)
    assert np.array_equal(np.asarray(img.dataobj), ref_img) and np.array_equal(np.asarray(lab.dataobj), ref_lab)
    assert not [p for p in out.rglob(".*")]  # no temporary files left

    # Same settings: resumes (keeps what is there) and can shrink; other settings: refused.
    before = (out / "labelsTr" / "avsdb_00000.nii.gz").stat().st_mtime_ns
    write_avsdb_dataset(out, n=2, cfg=cfg, seed=5, progress=False)
    assert (out / "labelsTr" / "avsdb_00000.nii.gz").stat().st_mtime_ns == before
    assert len(discover_dataset(out).cases) == 2
    with pytest.raises(ConfigError):
        write_avsdb_dataset(out, n=2, cfg=cfg, seed=6, progress=False)
