"""End to end on real files: prepare -> finetune (a few steps) -> evaluate -> predict, resume, DDP, CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medpretrain.api import evaluate, finetune, predict
from medpretrain.config import AugmentConfig, EvaluateConfig, FinetuneConfig
from medpretrain.data.cache import PreparedData, prepare_dataset
from medpretrain.data.preprocess import PreprocessConfig
from medpretrain.data.sampling import PatchDataset, StepSampler
from medpretrain.engine.finetune import labeled_subset
from medpretrain.errors import ConfigError, TrainingError
from medpretrain.synthetic.demo_data import make_demo_dataset

PATCH = (32, 32, 16)


def tiny_config(**kw) -> FinetuneConfig:
    base = dict(model="unet", steps=4, patch=PATCH, batch=1, checkpoint_every=2, num_workers=0,
                precision="32-true", deterministic=True, augment=AugmentConfig(flip_prob=0.5))
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> PreparedData:
    root = tmp_path_factory.mktemp("pipeline")
    raw = make_demo_dataset(root / "raw", n_cases=4, size=(40, 36, 20), seed=3)
    return prepare_dataset(raw, root / "prepared", PreprocessConfig(modality="MR", spacing=(1.5, 1.5, 2.0)),
                           workers=1, seed=0, progress=False)


def _state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", map_location="cpu", weights_only=False)["state_dict"]


def test_sampler_ranks_and_steps_are_disjoint_and_resume_where_left():
    seen = []
    for first_step in (0, 3, 6):
        for rank in range(2):
            seen += list(StepSampler(3, 4, rank=rank, world_size=2, current_step=lambda: first_step))
    assert len(seen) == len(set(seen)) == 72
    # A run resumed at step 4 reads what an uninterrupted run reads at step 4.
    whole = list(StepSampler(6, 2, current_step=lambda: 0))
    assert list(StepSampler(2, 2, current_step=lambda: 4)) == whole[8:12]


def test_foreground_oversampling_ratio(prepared):
    ids = prepared.split("train")
    ds = PatchDataset(prepared, ids, PATCH, foreground_fraction=1 / 3, seed=0)
    n, centred = 1500, 0
    for i in range(n):
        cid, start, centre, _ = ds.locate(i)
        if centre is None:
            continue
        centred += 1
        # The labelled voxel the patch is centred on lies inside the patch and is foreground there.
        offset = [int(c) - s for c, s in zip(centre, start)]
        assert all(0 <= o < p for o, p in zip(offset, PATCH))
        patch_label = ds.sample(i)["label"][0].numpy() if i < 60 else None
        if patch_label is not None:
            assert patch_label[tuple(offset)] > 0
    # Binomial(1500, 1/3): std 0.012.
    assert abs(centred / n - 1 / 3) < 0.04
    assert all(ds.locate(i)[2] is None for i in range(50)) is False
    never = PatchDataset(prepared, ids, PATCH, foreground_fraction=0.0, seed=0)
    assert all(never.locate(i)[2] is None for i in range(200))


def test_patch_dataset_is_a_function_of_the_index(prepared):
    ds = PatchDataset(prepared, prepared.split("train"), PATCH, seed=5, augment=AugmentConfig())
    a, b = ds[17], ds[17]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["image"].shape == (1, *PATCH) and a["label"].dtype == torch.int64
    assert not torch.equal(ds[18]["image"], a["image"])


def test_labeled_subsets_are_nested_and_seeded():
    ids = [f"c{i:02d}" for i in range(80)]
    four, eight = labeled_subset(ids, 0, 4), labeled_subset(ids, 0, 8)
    assert set(four) <= set(eight) and len(eight) == 8
    assert labeled_subset(ids, 1, 4) != four
    assert labeled_subset(ids, 0, fraction=0.1) == eight
    with pytest.raises(ConfigError):
        labeled_subset(ids, 0, 81)


def test_finetune_evaluate_predict(prepared, tmp_path):
    run = finetune(prepared.root, tmp_path / "run", tiny_config(n_labeled=2))
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert info["training"]["steps_done"] == 4 and len(info["labeled_cases"]) == 2
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "logs" / "csv" / "metrics.csv").exists()

    metrics = evaluate(run, prepared.root, EvaluateConfig(overlays=2))
    n_test = len(prepared.split("test"))
    assert metrics["n_cases"] == n_test
    for name in ("metrics.json", "per_case.csv", "report.md"):
        assert (run / "eval" / name).exists()
    assert len(list((run / "eval" / "overlays").glob("*.png"))) == min(2, n_test)
    assert 0.0 <= metrics["overall"]["dice"]["mean"] <= 1.0

    raw_images = Path(prepared.manifest["source"]) / "imagesTr"
    out = predict(run, raw_images, tmp_path / "pred")
    assert len(out) == 4
    for path in out:
        src = nib.load(raw_images / f"{path.name[:-7]}_0000.nii.gz")
        pred = nib.load(path)
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)



def test_original_space_scores_what_predict_writes(prepared, tmp_path):
    """``original_space``: data prepared coarser than distributed (here 2.25x2.25x3 mm from 1.5x1.5x2 mm) are also
    scored in each case's source geometry: the label maps `predict` writes, against the label files as distributed
    (Dice computed by hand here), beside the unchanged prepared-grid metrics."""
    raw = Path(prepared.manifest["source"])
    coarse = prepare_dataset(raw, tmp_path / "coarse", PreprocessConfig(modality="MR", spacing=(2.25, 2.25, 3.0)),
                             workers=1, seed=0, progress=False)
    run = finetune(coarse.root, tmp_path / "run", tiny_config(n_labeled=2, steps=2))
    plain = evaluate(run, coarse.root, EvaluateConfig(overlays=0), out=tmp_path / "ev1")
    both = evaluate(run, coarse.root, EvaluateConfig(overlays=0, original_space=True), out=tmp_path / "ev2")
    assert both["overall"] == plain["overall"]
    test_ids = coarse.split("test")
    assert json.loads((tmp_path / "ev2" / "original" / "metrics.json").read_text(encoding="utf-8"))["n_cases"] == len(
        test_ids)
    rows = list(csv.DictReader((tmp_path / "ev2" / "original" / "per_case.csv").read_text(encoding="utf-8").splitlines()))
    assert {r["case_id"] for r in rows} == set(test_ids)
    predict(run, raw / "imagesTr", tmp_path / "pred")
    for r in rows:
        pred_file = nib.load(tmp_path / "pred" / f"{r['case_id']}.nii.gz")
        truth_file = nib.load(raw / "labelsTr" / f"{r['case_id']}.nii.gz")
        assert pred_file.shape == truth_file.shape != coarse.case(r["case_id"])["shape"][1:]
        pred = np.asarray(pred_file.dataobj) == int(r["class_id"])
        truth = np.asarray(truth_file.dataobj) == int(r["class_id"])
        assert int(r["label_voxels"]) == truth.sum() and int(r["pred_voxels"]) == pred.sum()
        dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) if truth.any() or pred.any() else 1.0
        assert float(r["dice"]) == pytest.approx(dice, abs=1e-4)
    # evaluated again into the same folder without it: the earlier source-geometry scores do not linger
    evaluate(run, coarse.root, EvaluateConfig(overlays=0), out=tmp_path / "ev2")
    assert not (tmp_path / "ev2" / "original").exists()


def test_resume_without_flag_is_refused_and_config_change_detected(prepared, tmp_path):
    run = finetune(prepared.root, tmp_path / "run", tiny_config(steps=2))
    with pytest.raises(TrainingError, match="--resume"):
        finetune(prepared.root, run, tiny_config(steps=2))
    with pytest.raises(ConfigError, match="lr"):
        finetune(prepared.root, run, tiny_config(steps=2, lr=0.5), resume=True)


def test_freeze_encoder_keeps_encoder_weights(prepared, tmp_path):
    from medpretrain.models import build_model, get_spec

    torch.manual_seed(0)
    init = tmp_path / "init.pt"
    torch.save({"state_dict": build_model("unet", 1, 3).state_dict()}, init)
    run = finetune(prepared.root, tmp_path / "frozen", tiny_config(steps=2, freeze_encoder=True, init=init))
    before = torch.load(init, weights_only=False)["state_dict"]
    after = _state(run)
    spec = get_spec("unet")
    report = json.loads((run / "init_report.json").read_text(encoding="utf-8"))
    assert report["loaded"] and not report["missing"]
    for name, tensor in after.items():
        if spec.part_of(name) == "encoder":
            assert torch.equal(tensor, before[name]), name
    assert any(not torch.equal(after[n], before[n]) for n in after if spec.part_of(n) == "decoder")


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from lightning.pytorch.callbacks import Callback
    from medpretrain.api import finetune
    from medpretrain.config import FinetuneConfig

    class KillAfter(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == int(sys.argv[4]):
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = FinetuneConfig.model_validate_json(sys.argv[3])
    finetune(sys.argv[1], sys.argv[2], cfg, callbacks=[KillAfter()])
""")


@pytest.mark.slow
def test_kill_then_resume_equals_uninterrupted(prepared, tmp_path):
    cfg = tiny_config(steps=6, checkpoint_every=2)
    reference = finetune(prepared.root, tmp_path / "reference", cfg)

    run = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script), str(prepared.root), str(run), cfg.model_dump_json(), "3"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (run / "model.pt").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2

    finetune(prepared.root, run, cfg, resume=True)
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert info["training"]["steps_done"] == 6
    ref, res = _state(reference), _state(run)
    for name in ref:
        torch.testing.assert_close(res[name], ref[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_truncated_last_checkpoint_falls_back(prepared, tmp_path):
    run = finetune(prepared.root, tmp_path / "run", tiny_config(steps=4, checkpoint_every=2))
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    from medpretrain.engine.checkpointing import find_resume_checkpoint

    found = find_resume_checkpoint(run / "checkpoints")
    assert found is not None and found.name.startswith("step")


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "medpretrain", *args], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_ddp_two_gloo_processes(prepared, tmp_path):
    run = tmp_path / "ddp"
    proc = _cli("finetune", "--data", str(prepared.root), "--out", str(run), "--steps", "4", "--patch", *map(str, PATCH),
                "--batch", "1", "--checkpoint-every", "2", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                "--num-workers", "0", "--precision", "32-true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert info["training"]["world_size"] == 2 and info["training"]["steps_done"] == 4
    assert (run / "model.pt").exists()


def test_cli_errors_are_one_line(prepared, tmp_path):
    proc = _cli("finetune", "--data", str(prepared.root), "--out", str(tmp_path / "r"), "--model", "resnet")
    assert proc.returncode == 1 and "unknown model 'resnet'" in proc.stderr and "Traceback" not in proc.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("stpes: 3\n", encoding="utf-8")
    proc = _cli("finetune", "--data", str(prepared.root), "--out", str(tmp_path / "r"), "--config", str(cfg))
    assert proc.returncode == 1 and "unknown key 'stpes'" in proc.stderr and "steps" in proc.stderr
    proc = _cli("models")
    assert proc.returncode == 0 and "swinunetr" in proc.stdout
    proc = _cli("methods")
    assert proc.returncode == 0 and "avsdb" in proc.stdout
    proc = _cli("pretrain", "--method", "simclr", "--out", str(tmp_path / "p"))
    assert proc.returncode == 1 and "registered methods: alice, asa, avsdb, mae, models-genesis, swinunetr-ssl, volume-fusion" in proc.stderr


def test_predict_groups_channel_files_only_for_multichannel_models(tmp_path):
    from medpretrain.api import _group_channels
    from medpretrain.data.datasets import CaseSource
    from medpretrain.errors import DataError

    def src(name, folder="a"):
        return CaseSource(case_id=f"{folder}_{name}", images=[tmp_path / folder / f"{name}.nii.gz"], label=None)

    single = _group_channels([src("amos_0001"), src("amos_0004"), src("image", "b"), src("image", "c")], 1)
    assert len(single) == 4 and all(len(v) == 1 for v in single.values())
    multi = _group_channels([src("x_0001"), src("x_0000"), src("y_0000", "b"), src("y_0001", "b")], 2)
    assert multi == {"x": [tmp_path / "a" / "x_0000.nii.gz", tmp_path / "a" / "x_0001.nii.gz"],
                     "y": [tmp_path / "b" / "y_0000.nii.gz", tmp_path / "b" / "y_0001.nii.gz"]}
    with pytest.raises(DataError, match="channel files"):
        _group_channels([src("x_0000")], 2)


def test_predict_names_single_channel_outputs_like_nnunet(tmp_path):
    from medpretrain.api import _group_channels
    from medpretrain.data.datasets import CaseSource

    def src(name):
        return CaseSource(case_id=name, images=[tmp_path / f"{name}.nii.gz"], label=None)

    # CASE_0000 -> CASE (nnU-Net's prediction names); a clash keeps the full id; other digits are kept
    names = _group_channels([src("la_001_0000"), src("la_002_0000"), src("la_002"), src("amos_0001")], 1)
    assert sorted(names) == ["amos_0001", "la_001", "la_002", "la_002_0000"]


def test_second_process_on_a_run_folder_is_refused(prepared, tmp_path):
    import fcntl

    run = tmp_path / "busy"
    run.mkdir()
    # another process (here: this one, through its own file descriptor) is training in the folder
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242")
    try:
        with pytest.raises(TrainingError, match=r"in use by another training process \(pid 4242\)"):
            finetune(prepared.root, run, tiny_config(steps=1))
    finally:
        os.close(fd)
    assert not (run / "model.pt").exists()


def test_commands_that_do_not_train_do_not_import_lightning():
    """``evaluate``, ``predict``, ``prepare`` and ``select-hparams`` run as child processes many times per benchmark:
    Lightning's import (seconds on a 2-core CPU) is paid only by the commands that train."""
    code = ("import sys; import medpretrain.api, medpretrain.benchmark, medpretrain.evaluation.inference; "
            "from medpretrain.api import evaluate, predict, prepare; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
