"""Bad input gets a clear one-line error, nothing is lost, interrupted work resumes.

One test per kind of bad input. Each builds real files in tmp_path: an nnU-Net v2 raw dataset of two good
cases plus the bad one (``case_bad``), and runs the real ``medpretrain prepare`` command in a subprocess. The
training checks use the Python API (a subprocess would spend seconds importing Lightning).

Run with ``-s`` to see every message as the user sees it (lines starting ``[bad-input]``); docs/bad-input.md
lists them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _niftis import blob_case, ras_affine, save_nifti

SHAPE = (16, 16, 12)
GOOD = ["case_000", "case_001"]
BAD = "case_bad"
LABELS = {"background": 0, "outer": 1, "inner": 2}
PATCH = (32, 16, 16)  # (16, 16, 16) is refused for unet: see test_wrong_model_name_config_key_or_patch


# --------------------------------------------------------------------------- building bad datasets


def make_dataset(root: Path, labels: dict | None = None, bad_image=None, bad_label=None, image_affine=None,
                 label_affine=None, n_good: int = 2) -> Path:
    """nnU-Net v2 raw dataset: ``n_good`` good blob cases and, unless both are None, ``case_bad`` made of
    ``bad_image`` / ``bad_label`` (a good blob stands in for the one not given)."""
    root = Path(root)
    labels = labels or LABELS
    classes = max(labels.values())
    aff = ras_affine()
    for i in range(n_good):
        img, lab = blob_case(SHAPE, seed=i, classes=classes)
        save_nifti(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz", img, aff)
        save_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", lab, aff)
    n = n_good
    if bad_image is not None or bad_label is not None:
        img, lab = blob_case(SHAPE, seed=7, classes=classes)
        save_nifti(root / "imagesTr" / f"{BAD}_0000.nii.gz", img if bad_image is None else bad_image,
                   aff if image_affine is None else image_affine)
        save_nifti(root / "labelsTr" / f"{BAD}.nii.gz", lab if bad_label is None else bad_label,
                   aff if label_affine is None else label_affine)
        n += 1
    meta = {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def bad_image_path(root: Path) -> Path:
    return root / "imagesTr" / f"{BAD}_0000.nii.gz"


def bad_label_path(root: Path) -> Path:
    return root / "labelsTr" / f"{BAD}.nii.gz"


def good_case(seed=7):
    return blob_case(SHAPE, seed=seed)


# --------------------------------------------------------------------------- running and checking


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medpretrain", *map(str, args)], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=300, env={**os.environ, "MEDPRETRAIN_NO_TCMALLOC": "1"})


def prepare(source: Path, out: Path, *extra, pool: bool = False) -> subprocess.CompletedProcess:
    return cli("prepare", "--pool" if pool else "--dataset", source, "--out", out, *extra)


def show(kind: str, message: str) -> None:
    print(f"[bad-input] {kind}: {message}")


def names(message: str, path: Path) -> bool:
    return str(path) in message or str(path.resolve()) in message


def assert_nothing_left(out: Path, case: str = BAD) -> None:
    """No file of the bad case, and no temporary file, in the cache folder."""
    if not out.exists():
        return
    left = [p.name for p in out.iterdir() if p.name.startswith((case + ".", case + "_", ".")) or ".tmp" in p.name]
    assert left == [], left


def assert_skipped(proc, out: Path, bad_file: Path, *phrases, kind: str, good=GOOD) -> str:
    """Exit 0, the good cases prepared, the bad one skipped with one line naming the file, the problem and the
    fix, listed again at the end and in manifest["skipped"]. Returns the message."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    skip_lines = [ln for ln in lines if f"SKIP {BAD}: " in ln]
    assert len(skip_lines) == 1, proc.stderr
    message = skip_lines[0].split(f"SKIP {BAD}: ", 1)[1]
    assert names(message, bad_file), message
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    # Listed again at the end, after every case was handled.
    assert "1 case(s) skipped" in lines[-1] and BAD in lines[-1] and "manifest.json" in lines[-1], lines[-1]
    assert proc.stdout.strip().endswith("skipped 1"), proc.stdout
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(manifest["cases"]) == sorted(good)
    (skip,) = manifest["skipped"]
    assert skip["case_id"] == BAD and Path(skip["file"]).resolve() == bad_file.resolve()
    assert skip["reason"] == message  # the whole reason is on the one line
    for cid in good:
        assert (out / f"{cid}.npy").is_file() and (out / f"{cid}.json").is_file()
    assert_nothing_left(out)
    show(kind, message)
    return message


def assert_strict_stops(source: Path, out: Path, bad_file: Path, *phrases, pool: bool = False) -> str:
    """--strict: non-zero exit with the same message as one ``error:`` line, no manifest, nothing partial."""
    proc = prepare(source, out, "--strict", pool=pool)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert names(errors[0], bad_file) and all(p in errors[0] for p in phrases), errors[0]
    assert not (out / "manifest.json").exists()
    assert_nothing_left(out)
    return errors[0]


def assert_dataset_error(proc, out: Path, *phrases, kind: str) -> str:
    """A dataset-level problem: non-zero exit, exactly one ``error:`` line on stderr, no traceback, no cache."""
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    assert not (out / "manifest.json").exists()
    show(kind, lines[0][len("error: "):])
    return lines[0]


# --------------------------------------------------------------------------- 1-14: prepare


def test_truncated_nifti(tmp_path):
    root = make_dataset(tmp_path / "ds", bad_image=good_case()[0])
    bad = bad_image_path(root)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # an interrupted download: the gzip stream stops half way
    assert_skipped(prepare(root, tmp_path / "out"), tmp_path / "out", bad, "cannot read",
                   "is it a complete NIfTI file?", "re-download", kind="truncated .nii.gz")
    assert_strict_stops(root, tmp_path / "strict", bad, "complete NIfTI")


def test_text_file_with_image_extension(tmp_path):
    root = make_dataset(tmp_path / "ds", bad_image=good_case()[0])
    bad = bad_image_path(root)
    bad.write_text("patient notes, not an image\n", encoding="utf-8")
    assert_skipped(prepare(root, tmp_path / "out"), tmp_path / "out", bad, "cannot read", "is not a gzip file",
                   "is it a complete NIfTI file?", kind="text saved as .nii.gz")


def test_image_label_shape_mismatch(tmp_path):
    img, lab = good_case()
    root = make_dataset(tmp_path / "ds", bad_label=lab[:, :, :-2])
    bad = bad_label_path(root)
    msg = assert_skipped(prepare(root, tmp_path / "out"), tmp_path / "out", bad, "label shape (16, 16, 10)",
                         "shape (16, 16, 12)", "resample it with nearest neighbour", kind="image/label shape mismatch")
    assert names(msg, bad_image_path(root))  # and the image it does not fit
    assert_strict_stops(root, tmp_path / "strict", bad, "does not match")


def test_image_label_affine_mismatch(tmp_path):
    root = make_dataset(tmp_path / "ds", bad_label=good_case()[1], label_affine=ras_affine(origin=(5.0, 0.0, 0.0)))
    assert_skipped(prepare(root, tmp_path / "out"), tmp_path / "out", bad_label_path(root),
                   "does not lie on the image grid", "max affine difference 5", "resample the label onto the image",
                   kind="image/label affine mismatch")


def test_undeclared_label_values(tmp_path):
    lab = good_case()[1].copy()
    lab[0, 0, 0] = 7
    root = make_dataset(tmp_path / "ds", bad_label=lab)
    assert_skipped(prepare(root, tmp_path / "out"), tmp_path / "out", bad_label_path(root), "label values [7]",
                   "declared labels [0, 1, 2]", "add them to dataset.json 'labels'", kind="undeclared label values")


def test_nan_and_inf_voxels(tmp_path):
    img = good_case()[0].copy()
    img[1, 1, 1] = img[2, 3, 4] = img[5, 5, 5] = np.nan
    img[0, 0, 0], img[3, 3, 3] = np.inf, -np.inf
    root = make_dataset(tmp_path / "ds", bad_image=img)
    bad = bad_image_path(root)
    assert_skipped(prepare(root, tmp_path / "out"), tmp_path / "out", bad, "5 NaN/Inf voxels", "--nan-policy zero",
                   kind="NaN/Inf voxels")
    assert_strict_stops(root, tmp_path / "strict", bad, "NaN/Inf")
    # Asked for: replaced by 0 and recorded.
    out = tmp_path / "zero"
    proc = prepare(root, out, "--nan-policy", "zero")
    assert proc.returncode == 0 and "SKIP" not in proc.stderr, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(manifest["cases"]) == GOOD + [BAD] and manifest["skipped"] == []
    assert manifest["preprocess"]["nan_policy"] == "zero"
    assert manifest["cases"][BAD]["stats"]["nan_replaced"] == 5
    assert manifest["cases"]["case_000"]["stats"]["nan_replaced"] == 0
    assert np.isfinite(np.load(out / f"{BAD}.npy")).all()


def test_constant_image(tmp_path):
    root = make_dataset(tmp_path / "ds", bad_image=np.full(SHAPE, 100.0, np.float32))
    assert_skipped(prepare(root, tmp_path / "out"), tmp_path / "out", bad_image_path(root),
                   "is constant (all voxels = 100)", "remove the case", kind="constant image")


def test_empty_label_map(tmp_path):
    root = make_dataset(tmp_path / "ds", bad_label=np.zeros(SHAPE, np.uint8))
    assert_skipped(prepare(root, tmp_path / "out"), tmp_path / "out", bad_label_path(root),
                   "label is empty (all background)", "fix the label or remove the case", kind="empty label map")


def test_2d_image(tmp_path):
    root = make_dataset(tmp_path / "ds", bad_image=good_case()[0][:, :, 5])
    assert_skipped(prepare(root, tmp_path / "out"), tmp_path / "out", bad_image_path(root), "2D image",
                   "a 3D volume is needed", "not a single slice", kind="2D image")


def test_4d_image_where_one_channel_is_declared(tmp_path):
    img = good_case()[0]
    root = make_dataset(tmp_path / "ds", bad_image=np.stack([img, img + 5], axis=-1))
    bad = bad_image_path(root)
    assert_skipped(prepare(root, tmp_path / "out"), tmp_path / "out", bad, "has 2 channel(s) but 1 is declared",
                   "channel_names in", "fix channel_names or the image", kind="4D image, one channel declared")
    assert_strict_stops(root, tmp_path / "strict", bad, "2 channel(s)")


def _msd(root: Path, entries: list[dict]) -> Path:
    aff = ras_affine()
    for i in range(2):
        img, lab = blob_case(SHAPE, seed=i)
        save_nifti(root / "imagesTr" / f"case_{i:03d}.nii.gz", img, aff)
        save_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", lab, aff)
    training = [{"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"}
                for i in range(2)] + entries
    meta = {"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "outer", "2": "inner"},
            "numTraining": len(training), "training": training}
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


@pytest.mark.parametrize("kind", ["missing key", "no label file", "listed image missing", "duplicate case ids"])
def test_dataset_level_errors_stop_with_one_line(tmp_path, kind):
    root = tmp_path / "ds"
    if kind == "missing key":
        make_dataset(root, bad_image=good_case()[0])
        meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        del meta["labels"]
        (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
        phrases = [str(root / "dataset.json"), "missing ['labels']", "needs keys"]
    elif kind == "no label file":
        make_dataset(root, bad_image=good_case()[0])
        bad_label_path(root).unlink()
        phrases = [str(root), "label file(s) of the cases in imagesTr/ do not exist", f"labelsTr/{BAD}.nii.gz",
                   "add the labels"]
    elif kind == "listed image missing":
        _msd(root, [{"image": f"./imagesTr/{BAD}.nii.gz", "label": "./labelsTr/case_000.nii.gz"}])
        phrases = [str(root), "image file(s) listed in dataset.json do not exist", f"imagesTr/{BAD}.nii.gz",
                   "fix the paths in dataset.json"]
    else:
        _msd(root, [{"image": "./imagesTr/case_001.nii.gz", "label": "./labelsTr/case_001.nii.gz"}])
        phrases = [str(root / "dataset.json"), "duplicate case ids ['case_001']", "rename or remove the duplicates"]
    out = tmp_path / "out"
    assert_dataset_error(prepare(root, out), out, *phrases, kind=f"dataset: {kind}")
    assert_dataset_error(prepare(root, tmp_path / "strict", "--strict"), tmp_path / "strict", *phrases,
                         kind=f"dataset: {kind} (--strict)")


def _write_dicom_series(folder: Path, uid: str, n_slices: int = 4) -> None:
    import SimpleITK as sitk

    vol = sitk.GetImageFromArray((np.random.default_rng(0).random((n_slices, 16, 16)) * 100).astype(np.int16))
    vol.SetSpacing((1.0, 1.0, 1.0))
    study = "1.2.826.0.1.3680043.2.1125.9"
    for z in range(n_slices):
        sl = vol[:, :, z]
        for tag, value in (("0008|0060", "MR"), ("0020|000d", study), ("0020|000e", uid),
                           ("0008|0018", f"{uid}.{z + 1}"), ("0020|0013", str(z + 1)),
                           ("0020|0032", f"0\\0\\{z}"), ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "1\\1")):
            sl.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{uid[-1]}_{z:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_folder_with_several_series(tmp_path):
    import SimpleITK as sitk

    pool = tmp_path / "pool"
    for i in range(2):
        save_nifti(pool / f"case_{i:03d}.nii.gz", blob_case(SHAPE, seed=i)[0], ras_affine())
    series = pool / BAD
    series.mkdir()
    uids = ["1.2.826.0.1.3680043.2.1125.9.1", "1.2.826.0.1.3680043.2.1125.9.2"]
    try:
        for uid in uids:
            _write_dicom_series(series, uid)
        found = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(series))
    except RuntimeError as exc:
        pytest.skip(f"SimpleITK cannot write DICOM here: {exc}")
    if sorted(found) != uids:
        pytest.skip(f"SimpleITK wrote DICOM series it does not read back as two series: {found}")
    out = tmp_path / "out"
    assert_skipped(prepare(pool, out, pool=True), out, series, "holds 2 DICOM series", uids[0], uids[1],
                   "move each series into its own folder", kind="DICOM folder with several series (pool)")
    assert_strict_stops(pool, tmp_path / "strict", series, "2 DICOM series", pool=True)


@pytest.mark.parametrize("kind", ["zero pixdim", "negative pixdim", "zero affine column"])
def test_zero_or_negative_spacing(tmp_path, kind):
    root = make_dataset(tmp_path / "ds", bad_image=good_case()[0])
    bad = bad_image_path(root)
    nii = nib.Nifti1Image(good_case()[0], None)  # no sform/qform: nibabel builds the affine from pixdim
    if kind == "zero pixdim":
        nii.header["pixdim"][1:4] = [1.0, 0.0, 1.0]
        expected = "(1.0, 0.0, 1.0)"
    elif kind == "negative pixdim":
        nii.header["pixdim"][1:4] = [1.0, -2.0, 1.0]
        expected = "(1.0, -2.0, 1.0)"
    else:
        nii.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
        expected = "(1.0, 0.0, 1.0)"
    nib.save(nii, str(bad))
    proc = prepare(root, tmp_path / "out")
    assert_skipped(proc, tmp_path / "out", bad, f"voxel spacing {expected}", "zero, negative or NaN", "fix the header",
                   kind=f"spacing: {kind}")
    assert "setting" not in proc.stderr  # nibabel's own "fixing pixdim" note would contradict the refusal
    if kind == "zero pixdim":
        assert_strict_stops(root, tmp_path / "strict", bad, "voxel spacing")


def test_image_over_the_voxel_budget(tmp_path):
    big = blob_case((24, 24, 20), seed=7)
    root = make_dataset(tmp_path / "ds", bad_image=big[0], bad_label=big[1])
    assert_skipped(prepare(root, tmp_path / "out", "--max-voxels", 5000), tmp_path / "out", bad_image_path(root),
                   "would have 11520 voxels (24x24x20)", "max_voxels=5000",
                   "raise max_voxels or choose a coarser spacing",
                   kind="over --max-voxels")


# --------------------------------------------------------------------------- 15-18: training and evaluation


def _tiny_config(**kw):
    from medpretrain.config import FinetuneConfig

    base = dict(model="unet", steps=1, patch=PATCH, batch=1, checkpoint_every=1, num_workers=0, precision="32-true")
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Prepared caches of three good cases: 3 classes (with its source dataset) and 2 classes."""
    from medpretrain.data.cache import prepare_dataset
    from medpretrain.data.preprocess import PreprocessConfig

    base = tmp_path_factory.mktemp("caches")
    raw3 = make_dataset(base / "raw3", n_good=3)
    raw2 = make_dataset(base / "raw2", labels={"background": 0, "organ": 1}, n_good=3)
    cfg = PreprocessConfig()
    c3 = prepare_dataset(raw3, base / "c3", cfg, progress=False)
    c2 = prepare_dataset(raw2, base / "c2", cfg, progress=False)
    assert c3.num_classes == 3 and c2.num_classes == 2
    return {"raw3": raw3, "c3": c3.root, "c2": c2.root, "cfg": cfg}


@pytest.fixture(scope="module")
def run_2class(caches, tmp_path_factory):
    """A 1-step run on the 2-class cache, initialised (init_part="all") from a 5-class UNet checkpoint: serves
    the evaluate-mismatch check and the class-count --init check."""
    import torch

    from medpretrain.api import finetune
    from medpretrain.models import build_model

    base = tmp_path_factory.mktemp("run2")
    torch.manual_seed(0)
    ckpt = base / "unet_5classes.pt"
    torch.save({"state_dict": build_model("unet", 1, 5, PATCH).state_dict()}, ckpt)
    return finetune(caches["c2"], base / "run", _tiny_config(init=ckpt, init_part="all"))


def test_incomplete_or_old_cache_and_mismatched_run_are_refused(caches, run_2class, tmp_path):
    from medpretrain.api import evaluate, finetune
    from medpretrain.data.cache import PreparedData, prepare_dataset
    from medpretrain.errors import CacheError

    def refused(data: Path, *phrases, kind: str):
        for call in (lambda: finetune(data, tmp_path / "never", _tiny_config()), lambda: evaluate(run_2class, data)):
            with pytest.raises(CacheError) as info:
                call()
            msg = str(info.value)
            assert "\n" not in msg and all(p in msg for p in phrases), msg
        assert not (tmp_path / "never").exists()  # refused before anything was written
        show(kind, msg)

    no_manifest = tmp_path / "no_manifest"
    shutil.copytree(caches["c3"], no_manifest)
    (no_manifest / "manifest.json").unlink()
    refused(no_manifest, f"no manifest.json in {no_manifest}", "run `medpretrain prepare", "re-run it",
            kind="cache without manifest.json")

    gone = tmp_path / "gone"
    shutil.copytree(caches["c3"], gone)
    (gone / "case_001.npy").unlink()
    refused(gone, str(gone), "case_001.npy", "missing", "re-run `medpretrain prepare` with the same --out",
            kind="cache with a case file deleted")
    # ... and doing what it says redoes exactly that case.
    stamp = (gone / "case_000.npy").stat().st_mtime_ns
    redone = prepare_dataset(caches["raw3"], gone, caches["cfg"], progress=False)
    assert (gone / "case_001.npy").is_file() and (gone / "case_000.npy").stat().st_mtime_ns == stamp
    assert redone.case_ids == PreparedData(caches["c3"]).case_ids

    old = tmp_path / "old"
    shutil.copytree(caches["c3"], old)
    manifest = json.loads((old / "manifest.json").read_text(encoding="utf-8"))
    manifest["format_version"] = 0
    (old / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    refused(old, str(old), "version 0", "re-run `medpretrain prepare` into a new folder",
            kind="cache of an older format version")

    with pytest.raises(CacheError) as info:
        evaluate(run_2class, caches["c3"])
    msg = str(info.value)
    assert all(p in msg for p in (str(run_2class), "1 channel(s) and 2 classes", "1 channel(s) and 3 classes",
                                  "evaluate on data prepared from the same dataset")), msg
    assert not (run_2class / "eval").exists()
    show("evaluate: run classes differ from the data", msg)


def test_wrong_model_name_config_key_or_patch(tmp_path):
    from medpretrain.config import FinetuneConfig
    from medpretrain.models import list_models

    data = tmp_path / "data"  # never read: the settings are checked first
    proc = cli("finetune", "--data", data, "--out", tmp_path / "r", "--model", "resnet")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "unknown model 'resnet'" in lines[0] and all(s.name in lines[0] for s in list_models())
    show("unknown --model", lines[0][len("error: "):])

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("steps: 3\nlearning_rate: 0.01\n", encoding="utf-8")
    proc = cli("finetune", "--data", data, "--out", tmp_path / "r", "--config", cfg)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(cfg) in lines[0] and "unknown key 'learning_rate'" in lines[0]
    assert all(k in lines[0] for k in FinetuneConfig.model_fields)
    assert not (tmp_path / "r").exists()
    show("unknown key in --config YAML", lines[0][len("error: "):])

    # A patch the network cannot train on (1x1x1 bottleneck under instance norm) is refused up front too.
    proc = cli("finetune", "--data", data, "--out", tmp_path / "r", "--patch", 16, 16, 16)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "patch (16, 16, 16)" in lines[0] and "model 'unet'" in lines[0] and "e.g. patch (32, 16, 16)" in lines[0]
    show("--patch too small for the model", lines[0][len("error: "):])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(caches, tmp_path):
    import torch
    from lightning.pytorch.callbacks import Callback

    from medpretrain.api import finetune
    from medpretrain.engine.checkpointing import find_resume_checkpoint
    from medpretrain.errors import TrainingError

    class PoisonAtStep3(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    next(module.model.parameters()).fill_(float("nan"))

    run = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        finetune(caches["c3"], run, _tiny_config(steps=6, checkpoint_every=2), callbacks=[PoisonAtStep3()])
    msg = str(info.value)
    assert "loss is nan at step 3" in msg and "last good checkpoint is intact" in msg and "--lr" in msg, msg
    show("NaN/Inf loss", msg)
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())
    assert find_resume_checkpoint(run / "checkpoints") == last
    assert not (run / "model.pt").exists()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".") or ".tmp" in p.name]


def test_init_from_another_architecture_or_class_count(caches, run_2class, tmp_path):
    import torch

    from medpretrain.api import finetune
    from medpretrain.errors import CheckpointError
    from medpretrain.models import build_model, get_spec

    other = tmp_path / "dynunet.pt"
    torch.save({"state_dict": build_model("dynunet-small", 1, 3, PATCH).state_dict()}, other)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError) as info:
        finetune(caches["c3"], run, _tiny_config(init=other, init_part="all"))
    msg = str(info.value)
    assert all(p in msg for p in (f"nothing loaded from {other}", "model 'unet'", "another architecture",
                                  "pass the matching --model")), msg
    assert not (run / "checkpoints").exists() and not (run / "model.pt").exists()
    assert not (run / "init_report.json").exists()
    show("--init from another architecture", msg)

    # Another class count (5-class checkpoint, 2-class data): loads, the head is reported as shape-mismatched.
    report = json.loads((run_2class / "init_report.json").read_text(encoding="utf-8"))
    spec = get_spec("unet")
    assert report["loaded"] and not report["missing"]
    mismatched = {name: (old, new) for name, old, new in report["shape_mismatch"]}
    assert mismatched and all(spec.part_of(name) == "head" for name in mismatched)
    assert any(old[0] == 5 and new[0] == 2 for old, new in mismatched.values())
    assert (run_2class / "model.pt").is_file()
    show("--init from another class count", f"init_report.json shape_mismatch: {report['shape_mismatch']}")
