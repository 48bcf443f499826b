"""The prepared cache's array formats: npy (default) and blosc2 give the same arrays and the same crops."""

from __future__ import annotations

import json
import pickle
import shutil
import sys

import numpy as np
import pytest

from _niftis import make_nnunet
from medpretrain.data import PreparedData, PreprocessConfig, prepare_dataset, prepare_pool
from medpretrain.data import arrays
from medpretrain.data.arrays import blosc2_layout
from medpretrain.data.crops import read_crop
from medpretrain.data.sampling import PatchDataset, crop_with_padding
from medpretrain.errors import CacheError, ConfigError

SHAPE = (40, 36, 28)
CFG = PreprocessConfig(crop_margin=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_nnunet(tmp_path_factory.mktemp("ds"), n=3, shape=SHAPE, spacing=(1.0, 1.0, 1.0), channels=("T1", "T2"))


@pytest.fixture(scope="module")
def npy(dataset, tmp_path_factory):
    return prepare_dataset(dataset, tmp_path_factory.mktemp("npy"), CFG, progress=False)


@pytest.fixture(scope="module")
def both(npy, dataset, tmp_path_factory):
    """The same dataset prepared as npy and as blosc2, the latter with small blocks and chunks so that crops
    cross chunk and block borders."""
    pytest.importorskip("blosc2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(arrays, "BLOCK_BYTES", 4096)  # 8^3 float32 blocks
        mp.setattr(arrays, "CHUNK_BYTES", 64 * 1024)  # 16x16x16 float32 chunks: several per volume
        b2 = prepare_dataset(dataset, tmp_path_factory.mktemp("b2"), CFG, progress=False, cache_format="blosc2")
    return npy, b2


def test_manifest_records_the_format_and_files_follow_it(both):
    npy, b2 = both
    m_npy = json.loads((npy.root / "manifest.json").read_text(encoding="utf-8"))
    m_b2 = json.loads((b2.root / "manifest.json").read_text(encoding="utf-8"))
    assert m_npy["array_format"] == "npy" and m_b2["array_format"] == "blosc2"
    assert m_b2["arrays"]["format"] == "blosc2" and m_b2["arrays"]["codec"] == "zstd"
    assert npy.array_format == "npy" and b2.array_format == "blosc2"
    names = sorted(p.name for p in b2.root.iterdir())
    assert not [n for n in names if n.endswith(".npy")] and not [n for n in names if n.startswith(".")]
    assert sorted(n for n in names if n.endswith(".b2nd")) == sorted(
        f"{c}{s}" for c in b2.case_ids for s in (".b2nd", "_seg.b2nd"))
    # Everything but the storage is the same cache.
    for key in ("preprocess", "split", "labels", "channels", "cases"):
        assert m_b2[key] == m_npy[key], key


def test_round_trip_equal_arrays(both):
    npy, b2 = both
    for cid in npy.case_ids:
        img, lab = b2.image(cid), b2.label(cid)
        assert isinstance(img, arrays.CompressedArray) and img.cbytes < img.nbytes
        assert img.shape == npy.image(cid).shape and img.dtype == np.float32 and img.ndim == 4
        assert lab.shape == npy.label(cid).shape and lab.dtype == np.uint8 and len(lab) == lab.shape[0]
        assert np.array_equal(np.asarray(img), npy.image(cid)) and np.array_equal(np.asarray(lab), npy.label(cid))
        assert np.array_equal(np.asarray(img, dtype=np.float64), np.asarray(npy.image(cid), np.float64))
        loaded = b2.image(cid, mmap=False)
        assert type(loaded) is np.ndarray and np.array_equal(loaded, npy.image(cid, mmap=False))
        assert np.array_equal(b2.label(cid, mmap=False), npy.label(cid, mmap=False))
        copy = pickle.loads(pickle.dumps(img))  # DataLoader workers started by spawn get a reopened file
        assert np.array_equal(copy[:, 1:5], npy.image(cid)[:, 1:5])


def test_random_crops_equal_between_formats(both):
    npy, b2 = both
    rng = np.random.default_rng(0)
    for cid in npy.case_ids:
        a, b = npy.image(cid), b2.image(cid)
        la, lb = npy.label(cid), b2.label(cid)
        shape = a.shape[1:]
        for _ in range(20):
            size = [int(s) for s in rng.integers(1, 24, 3)]
            start = [int(rng.integers(-8, d)) for d in shape]  # partly or wholly outside the volume too
            assert np.array_equal(read_crop(b, start, size, [-1.0, -2.0]), read_crop(a, start, size, [-1.0, -2.0]))
            assert np.array_equal(crop_with_padding(lb, start, size), crop_with_padding(la, start, size))
            assert np.array_equal(crop_with_padding(b, start, size, 3.0), crop_with_padding(a, start, size, 3.0))
            voxel = tuple(int(rng.integers(0, d)) for d in shape)
            assert b[(0, *voxel)] == a[(0, *voxel)] and lb[voxel] == la[voxel]
        assert np.array_equal(b[..., 3:9], a[..., 3:9]) and np.array_equal(b[1, :, -5:], a[1, :, -5:])
    # The training sampler reads the same patches (images and labels) from either cache.
    ids = npy.split("train")
    da, db = PatchDataset(npy, ids, (16, 16, 12), seed=3), PatchDataset(b2, ids, (16, 16, 12), seed=3)
    for i in range(12):
        sa, sb = da.sample(i), db.sample(i)
        assert np.array_equal(sa["image"].numpy(), sb["image"].numpy())
        assert np.array_equal(sa["label"].numpy(), sb["label"].numpy())


def test_pool_blosc2_and_format_switch_refused(tmp_path, dataset):
    pytest.importorskip("blosc2")
    pool = prepare_pool(dataset / "imagesTr" / "*_0000.nii.gz", tmp_path / "pool", CFG, progress=False,
                        cache_format="blosc2")
    assert pool.array_format == "blosc2" and not list(pool.root.glob("*_seg.*"))
    assert np.asarray(pool.image(pool.case_ids[0])).shape[0] == 1
    with pytest.raises(CacheError, match="stored as blosc2, not npy; re-run with --cache-format blosc2"):
        prepare_pool(dataset / "imagesTr" / "*_0000.nii.gz", tmp_path / "pool", CFG, progress=False)
    # A re-run in the same format redoes nothing.
    stamps = {p.name: p.stat().st_mtime_ns for p in pool.root.glob("*.b2nd")}
    prepare_pool(dataset / "imagesTr" / "*_0000.nii.gz", tmp_path / "pool", CFG, progress=False, cache_format="blosc2")
    assert {p.name: p.stat().st_mtime_ns for p in pool.root.glob("*.b2nd")} == stamps
    # A missing array is reported under its real name.
    (pool.root / f"{pool.case_ids[0]}.b2nd").unlink()
    with pytest.raises(CacheError, match=rf"{pool.case_ids[0]}\.b2nd"):
        PreparedData(pool.root)
    # A run interrupted before its manifest, continued in the other format: every case is redone in that format
    # and no array of the first one is left behind.
    (pool.root / "manifest.json").unlink()
    again = prepare_pool(dataset / "imagesTr" / "*_0000.nii.gz", tmp_path / "pool", CFG, progress=False)
    assert again.array_format == "npy" and isinstance(again.image(again.case_ids[0]), np.memmap)
    assert not list(again.root.glob("*.b2nd")) and len(list(again.root.glob("*.npy"))) == len(again)


def _copy_with_manifest(npy, folder, **changes):
    """A copy of the npy cache whose manifest says ``changes`` (None removes a key)."""
    shutil.copytree(npy.root, folder)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def test_manifest_without_format_reads_as_npy(npy, tmp_path):
    # a cache written before the option existed
    old = PreparedData(_copy_with_manifest(npy, tmp_path / "old", array_format=None, arrays=None))
    assert old.array_format == "npy" and isinstance(old.image(old.case_ids[0]), np.memmap)
    with pytest.raises(CacheError, match="arrays stored as 'zarr', which this medpretrain version cannot read"):
        PreparedData(_copy_with_manifest(npy, tmp_path / "zarr", array_format="zarr"))


def test_missing_blosc2_is_one_line_naming_the_fix(npy, dataset, tmp_path, monkeypatch):
    b2 = _copy_with_manifest(npy, tmp_path / "b2", array_format="blosc2")  # needs no blosc2 to be refused
    monkeypatch.setitem(sys.modules, "blosc2", None)  # `import blosc2` now raises ImportError
    with pytest.raises(CacheError) as err:
        PreparedData(b2)
    msg = str(err.value)
    assert "pip install blosc2" in msg and "blosc2-compressed" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"--cache-format blosc2 needs the blosc2 package.*pip install blosc2"):
        prepare_dataset(dataset, tmp_path / "never", CFG, progress=False, cache_format="blosc2")
    assert not (tmp_path / "never").exists()  # refused before anything is written
    with pytest.raises(ConfigError, match="not an array format"):
        prepare_dataset(dataset, tmp_path / "never", CFG, progress=False, cache_format="zarr")


@pytest.mark.parametrize("shape,itemsize", [((1, 256, 256, 200), 4), ((256, 256, 200), 1), ((2, 95, 71, 9), 4),
                                            ((1, 512, 512, 40), 4), ((3, 5, 7), 2)])
def test_blosc2_layout(shape, itemsize):
    chunks, blocks = blosc2_layout(shape, itemsize)
    assert len(chunks) == len(blocks) == len(shape) and all(c == 1 for c in chunks[:-3] + blocks[:-3])
    assert np.prod(blocks) * itemsize <= arrays.BLOCK_BYTES and np.prod(chunks) * itemsize <= arrays.CHUNK_BYTES
    for c, b, s in zip(chunks[-3:], blocks[-3:], shape[-3:]):
        assert b <= min(c, s) and c % b == 0 and c < s + b  # whole blocks, never a block's worth past the volume
    if shape == (1, 256, 256, 200):
        assert blocks == (1, 32, 32, 32) and chunks == (1, 128, 128, 64)
