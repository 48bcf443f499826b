"""The second bad-input probe (issue 25): failures on valid input, and user errors that must be one clear line.

Every test builds real files in tmp_path. Commands whose whole point is the message the user sees run the real
``medpretrain`` command in a subprocess (those that fail before torch is imported are fast); checks that need a
trained model use the Python API and one tiny run shared by the module. Run with ``-s`` to see each message
(lines starting ``[bad-input]``); docs/bad-input.md lists them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _niftis import blob_case, ras_affine, save_nifti
from test_bad_input import PATCH, SHAPE, cli, make_dataset, prepare, show

GAP_LABELS = {"background": 0, "outer": 1, "inner": 5}


# --------------------------------------------------------------------------- helpers


def one_error_line(proc: subprocess.CompletedProcess, *phrases: str, kind: str) -> str:
    """Exit code 1, no traceback, and exactly one ``error:`` line holding every phrase; returns the message."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    message = errors[0][len("error: "):]
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    show(kind, message)
    return message


def raises_one_line(error_type, call, *phrases: str, kind: str) -> str:
    """``call()`` raises ``error_type`` with a one-line message holding every phrase; returns the message."""
    with pytest.raises(error_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    show(kind, message)
    return message


def tiny_config(**kw):
    from medpretrain.config import FinetuneConfig

    base = dict(model="unet", steps=1, patch=PATCH, batch=1, checkpoint_every=1, num_workers=0, precision="32-true")
    base.update(kw)
    return FinetuneConfig(**base)


def gap_dataset(root: Path, n: int = 3) -> Path:
    """nnU-Net v2 raw dataset whose label ids have a gap: background 0, outer 1, inner 5."""
    for i in range(n):
        img, lab = blob_case(SHAPE, seed=i)
        lab = np.where(lab == 2, 5, lab).astype(np.uint8)
        save_nifti(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz", img, ras_affine())
        save_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", lab, ras_affine())
    meta = {"channel_names": {"0": "MRI"}, "labels": GAP_LABELS, "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextmanager
def read_only(folder: Path):
    """Make ``folder`` unwritable for this process (permission bits; for root, which ignores them, the immutable
    attribute), or skip the test where neither works."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o555)
    immutable = False
    probe = folder / "probe"
    try:
        probe.touch()
        probe.unlink()
        immutable = shutil.which("chattr") is not None and subprocess.run(
            ["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable:
            pytest.skip("cannot make a folder read-only here (root without chattr)")
    except PermissionError:
        pass
    try:
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        os.chmod(folder, 0o755)


@pytest.fixture(scope="module")
def gap(tmp_path_factory):
    """A prepared cache of a dataset with label ids 0, 1, 5 and a 1-step run on it: the trained model the
    predict/evaluate checks use (and failure 3 itself)."""
    from medpretrain.api import finetune
    from medpretrain.data.cache import prepare_dataset
    from medpretrain.data.preprocess import PreprocessConfig

    base = tmp_path_factory.mktemp("gap")
    raw = gap_dataset(base / "raw")
    data = prepare_dataset(raw, base / "prepared", PreprocessConfig(), progress=False)
    run = finetune(data.root, base / "run", tiny_config())
    return {"raw": raw, "data": data.root, "run": run, "base": base}


def scans_folder(root: Path, gap: dict) -> Path:
    """A folder of the gap dataset's images under their nnU-Net names (``case_000_0000.nii.gz``)."""
    root.mkdir(parents=True, exist_ok=True)
    for f in sorted((gap["raw"] / "imagesTr").iterdir()):
        shutil.copy(f, root / f.name)
    return root


# --------------------------------------------------------------------------- failures on valid input


def test_non_utf8_case_name_is_prepared_with_the_others(tmp_path):
    root = make_dataset(tmp_path / "ds")
    name = os.fsdecode(b"caf\xe9")  # Latin-1 bytes: not valid UTF-8
    img, lab = blob_case(SHAPE, seed=5)
    save_nifti(root / "imagesTr" / f"{name}_0000.nii.gz", img, ras_affine())
    save_nifti(root / "labelsTr" / f"{name}.nii.gz", lab, ras_affine())
    out = tmp_path / "out"
    proc = prepare(root, out)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("prepared 3 case(s) in " + str(out)), proc.stdout
    for suffix in (".npy", "_seg.npy", ".json"):
        assert (out / f"{name}{suffix}").is_file()
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(manifest["cases"]) == sorted(["case_000", "case_001", name]) and manifest["skipped"] == []


def test_non_utf8_case_name_is_evaluated(gap, tmp_path):
    from medpretrain.api import evaluate

    # The gap cache with its test case renamed to a name that is not valid UTF-8.
    data = tmp_path / "data"
    shutil.copytree(gap["data"], data)
    manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))
    (old,) = manifest["split"]["test"]
    new = os.fsdecode(b"caf\xe9")
    for suffix in (".npy", "_seg.npy", ".json"):
        (data / f"{old}{suffix}").rename(data / f"{new}{suffix}")
    manifest["cases"][new] = manifest["cases"].pop(old)
    manifest["split"]["test"] = [new]
    (data / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    metrics = evaluate(gap["run"], data, out=tmp_path / "eval")
    assert metrics["n_cases"] == 1
    assert "caf\\udce9" in (tmp_path / "eval" / "per_case.csv").read_text(encoding="utf-8")
    assert (tmp_path / "eval" / "overlays" / f"{new}.png").is_file()


def test_a_case_failing_unexpectedly_is_skipped_and_leaves_no_partial_array(tmp_path):
    # images/ + labels/ named by a 248-byte case id: a legal file name, but the cache's CASE_seg.npy would be 256
    # bytes, over the 255 a file system allows. The OS error must skip this case only, with nothing left behind.
    root = tmp_path / "ds"
    long_id = "c" * 248
    for i, cid in enumerate(["case_000", "case_001", long_id]):
        img, lab = blob_case(SHAPE, seed=i)
        save_nifti(root / "images" / f"{cid}.nii.gz", img, ras_affine())
        save_nifti(root / "labels" / f"{cid}.nii.gz", lab, ras_affine())
    out = tmp_path / "out"
    proc = prepare(root, out)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    skip = [ln for ln in proc.stderr.splitlines() if "SKIP " + long_id in ln]
    assert len(skip) == 1 and "too long" in skip[0] and "_seg.npy" in skip[0], proc.stderr
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(manifest["cases"]) == ["case_000", "case_001"]
    assert not [p.name for p in out.iterdir() if p.name.startswith((long_id, "." + long_id[:20]))]
    show("case id too long for the cache's file names", skip[0].split(f"SKIP {long_id}: ", 1)[1])


def test_predict_never_writes_over_its_input(gap, tmp_path):
    from medpretrain.api import predict
    from medpretrain.errors import ConfigError

    scans = scans_folder(tmp_path / "scans", gap)
    before = snapshot(scans)
    for out in (scans, scans / "pred"):
        raises_one_line(ConfigError, lambda: predict(gap["run"], scans, out), f"--out {out}", "input folder",
                        "overwrite input scans", "choose another --out", kind="predict --out is the input folder")
        assert snapshot(scans) == before
    # A single input named like its label map, with --out its own folder.
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(scans / "case_000_0000.nii.gz", single / "case_000.nii.gz")
    raises_one_line(ConfigError, lambda: predict(gap["run"], single / "case_000.nii.gz", single),
                    "would overwrite the input of the same name", kind="predict onto an input file")
    # What it says works: another folder.
    written = predict(gap["run"], scans, tmp_path / "pred")
    assert sorted(p.name for p in written) == ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]
    assert snapshot(scans) == before


def test_label_ids_with_gaps_are_renumbered_and_mapped_back(gap, tmp_path):
    from medpretrain.api import evaluate, predict
    from medpretrain.data.cache import PreparedData
    from medpretrain.data.preprocess import restore_label_values

    data = PreparedData(gap["data"])
    assert data.labels == {0: "background", 1: "outer", 2: "inner"} and data.label_values == [0, 1, 5]
    assert max(int(np.load(gap["data"] / f"{c}_seg.npy").max()) for c in data.case_ids) == 2
    assert (gap["run"] / "model.pt").is_file()  # finetune used to stop at "index 5 is out of bounds"
    metrics = evaluate(gap["run"], gap["data"], out=tmp_path / "eval")
    assert set(metrics["classes"]) == {"outer", "inner"}
    written = predict(gap["run"], gap["raw"] / "imagesTr", tmp_path / "pred")
    for path in written:
        assert set(np.unique(np.asarray(nib.load(path).dataobj)).tolist()) <= {0, 1, 5}
    np.testing.assert_array_equal(restore_label_values(np.array([0, 1, 2, 2]), [0, 1, 5]), [0, 1, 5, 5])


def test_246_byte_file_name_is_prepared_and_predicted(gap, tmp_path):
    from medpretrain.api import predict

    case_id = "c" * 234  # case_id + "_0000.nii.gz" = 246 bytes
    root = make_dataset(tmp_path / "ds")
    img, lab = blob_case(SHAPE, seed=3)
    image = save_nifti(root / "imagesTr" / f"{case_id}_0000.nii.gz", img, ras_affine())
    assert len(image.name.encode()) == 246
    save_nifti(root / "labelsTr" / f"{case_id}.nii.gz", lab, ras_affine())
    out = tmp_path / "out"
    proc = prepare(root, out)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (out / f"{case_id}.json").is_file() and (out / f"{case_id}_seg.npy").is_file()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    (written,) = predict(gap["run"], image, tmp_path / "pred")
    assert written.name == f"{case_id}.nii.gz" and nib.load(written).shape == SHAPE


def test_folder_dataset_reads_the_classes_of_every_label(tmp_path):
    root = tmp_path / "ds"
    for i in range(4):
        img, lab = blob_case(SHAPE, seed=i)
        if i == 0:
            lab = np.minimum(lab, 1)  # the first label file holds class 1 only
        save_nifti(root / "images" / f"case_{i:03d}_0000.nii.gz", img, ras_affine())
        save_nifti(root / "labels" / f"case_{i:03d}.nii.gz", lab, ras_affine())
    out = tmp_path / "out"
    proc = prepare(root, out)
    assert proc.returncode == 0 and "SKIP" not in proc.stderr, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert len(manifest["cases"]) == 4 and manifest["labels"] == {"0": "background", "1": "class_1", "2": "class_2"}


def test_second_prepare_into_the_same_folder_is_refused(tmp_path):
    from medpretrain.data.cache import cache_folder_lock

    root = make_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    out.mkdir()
    with cache_folder_lock(out):  # another prepare is writing into `out`
        proc = prepare(root, out)
        one_error_line(proc, f"{out} is in use by another prepare process", "wait for it to finish",
                       kind="two prepare runs into one folder")
        assert list(out.iterdir()) == []
    assert prepare(root, out).returncode == 0  # and once it is done, preparing works


# --------------------------------------------------------------------------- tracebacks that became one line


def test_unwritable_or_impossible_output_paths_are_one_line(tmp_path):
    root = make_dataset(tmp_path / "ds")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x", encoding="utf-8")
    one_error_line(prepare(root, a_file), f"--out {a_file} is an existing file, not a folder",
                   kind="--out is an existing file")
    one_error_line(prepare(root, a_file / "sub"), f"{a_file} is a file, not a folder", kind="--out under a file")
    long = tmp_path / ("a" * 10_000)
    msg = one_error_line(prepare(root, long), "--out path is too long", "(10", "choose a shorter --out",
                         kind="10,000-character --out")
    assert len(msg) < 400
    msg = one_error_line(prepare(long, tmp_path / "o"), "too long", "characters", kind="10,000-character --dataset")
    assert len(msg) < 400
    with read_only(tmp_path / "ro") as ro:
        one_error_line(prepare(root, ro), f"--out {ro} is not writable", "read-only", "choose another --out",
                       kind="read-only --out")
        one_error_line(prepare(root, ro / "new"), "is not writable", kind="--out inside a read-only folder")
        assert list(ro.iterdir()) == []


def test_os_errors_are_described_in_words():
    from medpretrain.errors import describe_os_error

    try:
        with open("/dev/full", "wb") as full:  # a device that is always full: a real ENOSPC
            full.write(b"x" * 1024)
            full.flush()
    except OSError as exc:
        exc.filename = exc.filename or "/dev/full"
        msg = describe_os_error(exc)
    else:  # pragma: no cover - no /dev/full
        pytest.skip("no /dev/full here")
    assert "no space left" in msg and "/dev/full" in msg and "free space" in msg, msg
    show("full disk", msg)
    assert "read-only" in describe_os_error(OSError(errno.EROFS, "Read-only file system", "/data/out"))
    assert "too long" in describe_os_error(OSError(errno.ENAMETOOLONG, "File name too long", "/x" * 3000))


@pytest.mark.parametrize("option, value, phrase", [
    ("--lr", "0", "'lr' = 0.0: must be a positive number"),
    ("--lr", "nan", "'lr' = nan: must be a positive number"),
    ("--num-workers", "-1", "'num_workers' = -1: must be >= 0"),
    ("--seed", "-1", "'seed' = -1: must be within 0..4294967295"),
    ("--precision", "fp8", "'precision' = 'fp8': must be one of auto, 32-true"),
    ("--devices", "0", "'devices' = 0: must be a count >= 1"),
])
def test_bad_training_options_are_one_line(tmp_path, option, value, phrase):
    out = tmp_path / "run"
    one_error_line(cli("finetune", "--data", tmp_path / "never-read", "--out", out, option, value), phrase,
                   kind=f"finetune {option} {value}")
    assert not out.exists()


def test_settings_lightning_cannot_run_leave_no_run_folder(gap, tmp_path):
    import torch

    from medpretrain.api import finetune
    from medpretrain.errors import ConfigError

    out = tmp_path / "run"
    cases = [(dict(strategy="nonsense"), ["--strategy 'nonsense' is not a Lightning strategy"]),
             (dict(devices="0,1"), ["Lightning cannot run with", "--devices 0,1", "change these options"]),
             (dict(model_options={"features": [8]}), ["model_options {'features': [8]} do not build model 'unet'",
                                                      "features=(16, 16, 32, 64, 128, 16)"])]
    if not torch.cuda.is_available():
        cases.append((dict(accelerator="gpu"), ["--accelerator gpu: no CUDA GPU is visible", "--accelerator cpu"]))
    for settings, phrases in cases:
        raises_one_line(ConfigError, lambda: finetune(gap["data"], out, tiny_config(**settings)), *phrases,
                        kind=f"finetune {settings}")
        assert not out.exists()


def test_sliding_window_overlap_is_checked_and_a_bad_stored_one_can_be_overridden(gap, tmp_path):
    import torch

    from medpretrain.api import evaluate
    from medpretrain.config import EvaluateConfig, InferenceConfig
    from medpretrain.errors import ConfigError

    for value in ("1.0", "-0.1"):
        one_error_line(cli("evaluate", "--run", gap["run"], "--data", gap["data"], "--overlap", value),
                       f"'overlap' = {float(value)}: must be within [0, 1)", kind=f"evaluate --overlap {value}")
    # A run whose model.pt stores overlap 1.0 (written before the check existed).
    run = tmp_path / "old_run"
    shutil.copytree(gap["run"], run)
    model = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    model["inference"]["overlap"] = 1.0
    torch.save(model, run / "model.pt")
    raises_one_line(ConfigError, lambda: evaluate(run, gap["data"], out=tmp_path / "e1"), f"run {run}",
                    "overlap=1.0", "--overlap 0.5", kind="bad overlap stored in a run")
    fixed = EvaluateConfig(inference=InferenceConfig(overlap=0.5))
    assert evaluate(run, gap["data"], fixed, out=tmp_path / "e2")["n_cases"] == 1


def test_demo_and_generate_settings_that_cannot_run(tmp_path):
    out = tmp_path / "demo"
    one_error_line(cli("demo", "--out", out, "--steps", 0), "--steps 0 must be >= 1", kind="demo --steps 0")
    assert not out.exists()
    gen = tmp_path / "gen"
    one_error_line(cli("generate", "avsdb", "--n", 1, "--shapes", 0, "--out", gen),
                   "n_shapes (--shapes) must be 1..10000, got 0", kind="generate --shapes 0")
    assert not gen.exists()


def test_tiny_spacing_is_refused_before_allocating(tmp_path):
    root = make_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    one_error_line(prepare(root, out, "--spacing", 0.01, 0.01, 0.01), "at spacing (0.01, 0.01, 0.01) mm",
                   "more voxels than fit in memory", "choose a coarser --spacing", "--max-voxels",
                   kind="tiny --spacing")
    assert not out.exists()


# --------------------------------------------------------------------------- misleading messages


def test_overflowing_scl_slope_is_named_as_the_cause(tmp_path):
    root = make_dataset(tmp_path / "ds", bad_image=np.zeros(SHAPE))
    bad = root / "imagesTr" / "case_bad_0000.nii.gz"
    stored = (blob_case(SHAPE, seed=7)[0]).astype(np.int16)
    nii = nib.Nifti1Image(stored, ras_affine())
    nii.header.set_data_dtype(np.int16)
    nii.header.set_slope_inter(1e38, 0.0)  # stored values x 1e38: beyond float32
    nib.save(nii, str(bad))
    proc = prepare(root, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if "SKIP case_bad" in ln]
    assert "scl_slope=1e+38" in line and "header is wrong" in line and "--nan-policy" not in line, line
    assert "RuntimeWarning" not in proc.stderr
    show("overflowing scl_slope", line.split("SKIP case_bad: ", 1)[1])


def test_typo_in_a_nested_yaml_key_lists_that_sections_keys(tmp_path):
    from medpretrain.config import AugmentConfig, FinetuneConfig

    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 3\naugment:\n  flip_probability: 0.5\n", encoding="utf-8")
    msg = one_error_line(cli("finetune", "--data", tmp_path / "d", "--out", tmp_path / "r", "--config", cfg),
                         "unknown key 'augment.flip_probability'", "valid keys of 'augment'",
                         kind="typo in a nested YAML key")
    assert all(k in msg for k in AugmentConfig.model_fields)
    assert not any(k in msg for k in ("weight_decay", "n_labeled", "checkpoint_every"))  # not the top-level keys
    assert "augment" in FinetuneConfig.model_fields


def test_missing_or_non_run_folder_is_not_called_unfinished(gap, tmp_path):
    from medpretrain.api import evaluate, predict
    from medpretrain.errors import CheckpointError

    missing = tmp_path / "no-such-run"
    for call in (lambda: evaluate(missing, gap["data"]), lambda: predict(missing, gap["raw"], tmp_path / "p")):
        msg = raises_one_line(CheckpointError, call, f"run folder {missing} does not exist",
                              "pass the --out of a finished finetune run", kind="--run does not exist")
        assert "--resume" not in msg
    msg = raises_one_line(CheckpointError, lambda: evaluate(gap["raw"], gap["data"]),
                          f"{gap['raw']} is not a medpretrain run", kind="--run is not a run folder")
    assert "--resume" not in msg


def test_a_nan_scan_in_a_batch_is_skipped_and_the_rest_predicted(gap, tmp_path):
    from medpretrain.api import predict

    scans = scans_folder(tmp_path / "scans", gap)
    img = blob_case(SHAPE, seed=9)[0]
    img[2, 2, 2] = np.nan
    save_nifti(scans / "nan_case_0000.nii.gz", img, ras_affine())
    written = predict(gap["run"], scans, tmp_path / "pred")
    assert sorted(p.name for p in written) == ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]
    (skip,) = written.skipped
    assert skip["case_id"] == "nan_case" and "1 NaN/Inf voxels" in skip["reason"], skip
    assert "--nan-policy zero" in skip["reason"]
    show("NaN scan in a predict batch (skipped, the rest predicted)", skip["reason"])
    # ... and the option it names exists.
    again = predict(gap["run"], scans, tmp_path / "pred0", nan_policy="zero")
    assert len(again) == 4 and not again.skipped


# --------------------------------------------------------------------------- silent surprises


def test_prepare_that_skipped_every_case_fails(tmp_path):
    empty = np.zeros(SHAPE, np.uint8)
    root = make_dataset(tmp_path / "ds", n_good=0, bad_label=empty)
    out = tmp_path / "out"
    proc = prepare(root, out)
    one_error_line(proc, "none of the 1 case(s) could be prepared", "case_bad", "label is empty", "fix them and re-run",
                   kind="prepare skipped every case")
    assert not (out / "manifest.json").exists()


def test_empty_test_split_is_refused_and_keeps_the_previous_evaluation(gap, tmp_path):
    from medpretrain.api import evaluate
    from medpretrain.errors import ConfigError

    data = tmp_path / "data"
    shutil.copytree(gap["data"], data)
    manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))
    manifest["split"]["test"] = []
    (data / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    previous = tmp_path / "eval"
    previous.mkdir()
    (previous / "metrics.json").write_text('{"previous": true}', encoding="utf-8")
    raises_one_line(ConfigError, lambda: evaluate(gap["run"], data, out=previous), "split 'test'", "holds no case",
                    "is left as it was", kind="empty test split")
    assert (previous / "metrics.json").read_text(encoding="utf-8") == '{"previous": true}'


def test_predict_out_that_looks_like_a_file_is_refused(gap, tmp_path):
    from medpretrain.api import predict
    from medpretrain.errors import ConfigError

    out = tmp_path / "seg.nii.gz"
    raises_one_line(ConfigError, lambda: predict(gap["run"], gap["raw"] / "imagesTr", out),
                    f"--out {out} looks like a file name", "pass a folder", kind="predict --out seg.nii.gz")
    assert not out.exists()


def test_resume_with_other_data_is_refused(gap, tmp_path):
    from medpretrain.api import finetune
    from medpretrain.errors import ConfigError

    other = tmp_path / "other"
    shutil.copytree(gap["data"], other)
    run_json = (gap["run"] / "run.json").read_text(encoding="utf-8")
    raises_one_line(ConfigError, lambda: finetune(other, gap["run"], tiny_config(), resume=True),
                    "--resume of the run in", f"--data: was {gap['data'].resolve()}, now {other.resolve()}",
                    "resume with the original --data", kind="--resume with another --data")
    assert (gap["run"] / "run.json").read_text(encoding="utf-8") == run_json


def test_mostly_padded_patches_are_warned_about(gap):
    from medpretrain.data.cache import PreparedData
    from medpretrain.engine.finetune import padding_warning
    from medpretrain.models import get_spec

    data = PreparedData(gap["data"])
    msg = padding_warning(data, data.split("train"), (64, 64, 48), "unet")
    assert msg is not None and "% padding" in msg and "--patch" in msg, msg
    suggested = tuple(int(v) for v in msg.split("--patch ", 1)[1].split(",")[0].split()[:3])
    get_spec("unet").check_patch(suggested)  # the suggestion is a patch the network takes, and a smaller one
    assert np.prod(suggested) < 64 * 64 * 48
    assert padding_warning(data, data.split("train"), PATCH[:2] + (8,), "unet") is None
    show("patch mostly padding (warning)", msg)


def test_mostly_padded_patches_are_refused_unless_allowed(gap, tmp_path):
    from medpretrain.config import FinetuneConfig
    from medpretrain.engine.finetune import finetune
    from medpretrain.errors import ConfigError

    cfg = dict(model="unet", steps=1, patch=(64, 64, 48), batch=1, num_workers=0, precision="32-true", n_labeled=1)
    # 16x16x12 volumes: (64, 64, 48) is 98% padding while (32, 16, 16), the network's smallest, is 62%
    with pytest.raises(ConfigError, match=r"% padding.*medpretrain plan.*--allow-padding") as err:
        finetune(gap["data"], tmp_path / "refused", FinetuneConfig(**cfg))
    assert not (tmp_path / "refused" / "run.json").exists()
    show("patch mostly padding (refused)", str(err.value))
    run = finetune(gap["data"], tmp_path / "allowed", FinetuneConfig(**cfg, allow_padding=True))
    assert (run / "model.pt").is_file()
    # the network's smallest patch is still 62% padding here, but nothing smaller exists: trained, with a warning
    smallest = finetune(gap["data"], tmp_path / "smallest", FinetuneConfig(**{**cfg, "patch": (32, 16, 16)}))
    assert (smallest / "model.pt").is_file()


# --------------------------------------------------------------------------- a quiet first run


def test_trainer_start_up_prints_no_library_chatter():
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (its import resets its loggers to INFO: what used to let the chatter through)

    from medpretrain.engine.trainer import check_trainer_settings, quiet_library_chatter

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    keep = Keep()
    chatter = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    chatter.addHandler(keep)
    try:
        check_trainer_settings(tiny_config())  # builds a Lightning Trainer, as every training command does
    finally:
        chatter.removeHandler(keep)
    assert not [ln for ln in keep.lines if "available" in ln or "Tip" in ln], keep.lines
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_library_chatter()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("our own warning", UserWarning)
    assert [str(w.message) for w in caught] == ["our own warning"]


def test_devices_that_do_not_match_the_torchrun_world_are_refused_before_any_data_is_read(monkeypatch):
    """Under torchrun the launcher sets the world; Lightning compares it with --devices x --num-nodes only when
    fit() launches. The entry points' check does it first, with the launcher's numbers in the message."""
    from medpretrain.engine.trainer import check_trainer_settings
    from medpretrain.errors import ConfigError

    # What torchrun --nnodes 2 --nproc-per-node 2 sets in the first process.
    for var, value in {"TORCHELASTIC_RUN_ID": "t", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": "0",
                       "LOCAL_RANK": "0", "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29511"}.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=r"--devices 1 .*--num-nodes 1.*world size \(4\)"):
        check_trainer_settings(tiny_config(accelerator="cpu", devices=1, strategy="ddp"))
    check_trainer_settings(tiny_config(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp"))


@pytest.mark.slow
def test_training_command_shows_only_our_progress(gap, tmp_path):
    proc = cli("finetune", "--data", gap["data"], "--out", tmp_path / "run", "--steps", 1, "--patch", *PATCH,
               "--batch", 1, "--num-workers", 0, "--precision", "32-true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for chatter in ("GPU available", "TPU available", "Tip:", "litlogger", "deprecated", "Trainer.fit` stopped"):
        assert chatter not in proc.stderr, (chatter, proc.stderr)
    assert "fine-tuning unet" in proc.stderr and "step 1/1" in proc.stderr and "run finished" in proc.stderr
