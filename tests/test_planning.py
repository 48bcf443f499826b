"""Planning: the fingerprint of a prepared cache and the patch/batch plan for a network and a budget."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from _niftis import ras_affine, save_nifti
from medpretrain.data.cache import prepare_dataset
from medpretrain.data.preprocess import PreprocessConfig
from medpretrain.models import get_spec
from medpretrain.planning import (Budget, dataset_fingerprint, padding_fraction, plan_training, target_spacing,
                                  write_plan)


def _dataset(root, shape, spacing, n=3):
    """An images/ + labels/ dataset of ``n`` cases: a bright box (label 1) in a noisy body."""
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.normal(100, 10, size=shape).astype(np.float32)
        lab = np.zeros(shape, np.uint8)
        sl = tuple(slice(s // 4, s // 4 + max(1, s // 2)) for s in shape)
        img[sl] += 200
        lab[sl] = 1
        save_nifti(root / "images" / f"c{i}.nii.gz", img, ras_affine(spacing))
        save_nifti(root / "labels" / f"c{i}.nii.gz", lab, ras_affine(spacing))
    return root


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """Prepared isotropic, thick-slice (10 slices of 8 mm) and elongated datasets."""
    root = tmp_path_factory.mktemp("planning")
    out = {}
    for name, shape, spacing in (("isotropic", (96, 96, 96), (1.0, 1.0, 1.0)),
                                 ("thick", (128, 128, 10), (1.2, 1.2, 8.0)),
                                 ("elongated", (48, 48, 200), (1.0, 1.0, 1.0))):
        raw = _dataset(root / name, shape, spacing)
        out[name] = prepare_dataset(raw, root / f"{name}-prepared",
                                    PreprocessConfig(modality="MR", spacing=spacing, crop_foreground=False),
                                    workers=1, seed=0, progress=False)
    return out


def test_fingerprint_describes_the_data(kinds):
    fp = dataset_fingerprint(kinds["thick"])
    assert fp["cases"] == 3 and fp["anisotropy"] == pytest.approx(8.0 / 1.2)
    assert fp["prepared_shape"]["median"] == [128, 128, 10]
    assert fp["class_voxel_fraction"]["background"] + sum(
        v for k, v in fp["class_voxel_fraction"].items() if k != "background") == pytest.approx(1.0)
    (obj,) = fp["objects"].values()
    assert obj["objects_per_case"] == 1 and obj["median_mm3"] == pytest.approx(64 * 64 * 5 * 1.2 * 1.2 * 8.0)
    # nnU-Net's rule for anisotropic data: the coarse axis at its 10th percentile (here all equal)
    assert target_spacing(fp) == pytest.approx([1.2, 1.2, 8.0])


@pytest.mark.parametrize("kind", ["isotropic", "thick", "elongated"])
@pytest.mark.parametrize("model", ["unet", "dynunet-small"])
def test_plans_are_mostly_data_divisible_within_budget_and_deterministic(kinds, kind, model):
    data = kinds[kind]
    fp = dataset_fingerprint(data)
    budget = Budget("cpu", threads=2, step_seconds=1.0)
    plan = plan_training(fp, model, budget)
    spec = get_spec(model)
    spec.check_patch(plan.patch)  # divisible and large enough
    median = fp["prepared_shape"]["median"]
    lows = [-(-spec.min_size // d) * d for d in spec.divisors(3)]
    # never longer than the data along an axis, unless the network cannot take less
    assert all(p <= max(m, lo) for p, m, lo in zip(plan.patch, median, lows))
    assert plan.step_seconds <= 1.0 or "exceeds the budget" in " ".join(plan.notes)
    if kind != "thick":
        assert plan.padding_fraction < 0.05
    else:  # 10 slices: the padding is the network's minimum input, and the plan says so
        assert plan.padding_fraction == pytest.approx(1 - 10 / lows[2])
        assert any("thinner" in n for n in plan.notes)
    assert plan_training(fp, model, budget) == plan


def test_a_bigger_budget_gives_a_bigger_patch_and_a_gpu_a_bigger_batch(kinds):
    fp = dataset_fingerprint(kinds["isotropic"])
    small = plan_training(fp, "unet", Budget("cpu", threads=1, step_seconds=0.5))
    large = plan_training(fp, "unet", Budget("cpu", threads=2, step_seconds=20.0))
    assert math.prod(small.patch) < math.prod(large.patch) and large.patch == [96, 96, 96]
    gpu = plan_training(fp, "unet", Budget("gpu", gpu_memory_gb=80))
    assert gpu.batch >= 2 and gpu.memory_gb <= 80
    tight = plan_training(fp, "unet", Budget("gpu", gpu_memory_gb=4.05))  # 50 MB beside the 4 GB reserve
    assert math.prod(tight.patch) < math.prod(gpu.patch) and tight.batch == 2
    assert tight.memory_gb <= 0.05 or "exceeds the budget" in " ".join(tight.notes)


def test_padding_fraction():
    assert padding_fraction([(10, 10, 10)], (10, 10, 20)) == pytest.approx(0.5)
    assert padding_fraction([(64, 64, 64)], (32, 32, 32)) == 0.0


def test_plan_cli_writes_plan_json(kinds):
    data = kinds["elongated"]
    proc = subprocess.run([sys.executable, "-m", "medpretrain", "plan", "--data", str(data.root), "--model", "unet",
                           "--step-seconds", "1.5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads((data.root / "plan.json").read_text(encoding="utf-8"))
    assert "patch (voxels)" in proc.stdout and plan["model"] == "unet" and (data.root / "fingerprint.json").is_file()
    assert write_plan(data, "unet", Budget("cpu", threads=2, step_seconds=1.5)).patch == plan["patch"]


def test_finetune_and_pretrain_take_the_plan_unless_told_otherwise(kinds, tmp_path):
    data = kinds["isotropic"]
    plan = write_plan(data, "unet", Budget("cpu", threads=1, step_seconds=0.3))
    common = ["--steps", "1", "--num-workers", "0", "--precision", "32-true", "--n-labeled", "1"]

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "medpretrain", *args], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]

    run("finetune", "--data", str(data.root), "--out", str(tmp_path / "planned"), *common)
    cfg = json.loads((tmp_path / "planned" / "run.json").read_text(encoding="utf-8"))["config"]
    assert cfg["patch"] == plan.patch and cfg["batch"] == plan.batch
    run("finetune", "--data", str(data.root), "--out", str(tmp_path / "told"), "--patch", "32", "32", "32", *common)
    assert json.loads((tmp_path / "told" / "run.json").read_text(encoding="utf-8"))["config"]["patch"] == [32, 32, 32]
    run("pretrain", "--method", "avsdb", "--untrained", "--plan", str(data.root / "plan.json"), "--out",
        str(tmp_path / "pre"), "--config", str(_yaml(tmp_path, {"generator": {"size": [96, 96, 96]}})))
    assert json.loads((tmp_path / "pre" / "run.json").read_text(encoding="utf-8"))["config"]["patch"] == plan.patch


def _yaml(tmp_path, values):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path
