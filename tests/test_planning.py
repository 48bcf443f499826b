"""Planning: the fingerprint of a prepared cache and the patch/batch plan for a network and a budget."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from _niftis import ras_affine, save_nifti
from medpretrain.data.cache import prepare_dataset
from medpretrain.data.preprocess import PreprocessConfig
from medpretrain.errors import ConfigError
from medpretrain.models import build_model, get_spec
from medpretrain.planning import (Budget, dataset_fingerprint, fit_topology, padding_fraction, plan_overrides,
                                  plan_training, pool_and_conv_props, read_plan, target_spacing, write_plan)


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
    spec.check_patch(plan.patch, plan.model_options)  # divisible (per axis for DynUNet's strides) and large enough
    median = fp["prepared_shape"]["median"]
    lows = [-(-spec.min_size // d) * d for d in spec.divisors(3)]
    # never longer than the data along an axis, unless the network cannot take less
    assert all(p <= max(m, lo) for p, m, lo in zip(plan.patch, median, lows))
    assert plan.step_seconds <= 1.0 or "exceeds the budget" in " ".join(plan.notes)
    if kind != "thick" or plan.strides is not None:
        # DynUNet's planned strides leave the 10 slices of the thick data unpooled: no padding there either
        assert plan.padding_fraction < 0.05 and not any("thinner" in n for n in plan.notes)
    else:  # 10 slices: the padding is the U-Net's minimum input, and the plan says so
        assert plan.padding_fraction == pytest.approx(1 - 10 / lows[2])
        assert any("thinner" in n for n in plan.notes)
    assert (plan.strides is not None) == (model == "dynunet-small")
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


# ---------------------------------------------------------------------------------- DynUNet topology (nnU-Net's rule)


def _fingerprint(spacing, median, cases=10):
    """A fingerprint of ``cases`` volumes of the median shape (what plan_training reads)."""
    return {"prepared_spacing": list(spacing), "prepared_shape": {"median": list(median)},
            "shapes": [list(median)] * cases, "voxels_total": cases * math.prod(median),
            "original_spacing": {"median": list(spacing), "p10": list(spacing)}}


ISO = [[1, 1, 1]] + [[2, 2, 2]] * 4
THICK_STRIDES = [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2]]
THICK_KERNELS = [[3, 3, 1], [3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]]


def test_pool_and_conv_props_follow_nnunet():
    # isotropic: every axis pooled at every stage, 3x3x3 kernels, at most the preset's 5 stages
    assert pool_and_conv_props([1.0, 1.0, 1.0], [128, 128, 128], 5) == (ISO, [[3, 3, 3]] * 5)
    # thick slices: Z pooled only once the in-plane spacing (0.7 -> 5.6 mm) is within 2x of its 6.5 mm, and
    # 1 along Z in the kernels until then; 3x3x3 at the bottleneck
    assert pool_and_conv_props([0.7, 0.7, 6.5], [256, 256, 24], 5) == (THICK_STRIDES, THICK_KERNELS)
    # elongated: X and Y stop at the smallest feature map (48 -> 6 < 2 x 4); Z, alone, goes on (25 >= 3 x 4)
    strides, kernels = pool_and_conv_props([1.0, 1.0, 1.0], [48, 48, 200], 5)
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 2]] and kernels == [[3, 3, 3]] * 5
    # too few slices to pool along Z at all; a small patch gives fewer stages
    assert pool_and_conv_props([1.0, 1.0, 1.0], [64, 64, 6], 5)[0] == [[1, 1, 1]] + [[2, 2, 1]] * 4
    assert pool_and_conv_props([1.0, 1.0, 1.0], [16, 16, 16], 5)[0] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]  # 16, 8, 4


def test_fit_topology_rounds_down_to_a_fixed_point():
    # 60 voxels pool 4 times (60, 30, 15, 8), but 60 rounded down to 48 pools only 3 times (48, 24, 12, 6):
    # the patch and its topology are re-derived until they agree, never growing past the data
    patch, strides, kernels = fit_topology([1.0, 1.0, 1.0], [60, 60, 60], 5)
    assert patch == [48, 48, 48] and strides == [[1, 1, 1]] + [[2, 2, 2]] * 3 and len(kernels) == 4
    patch, strides, _ = fit_topology([0.7, 0.7, 6.5], [250, 250, 25], 5)
    assert patch == [240, 240, 24] and strides == THICK_STRIDES


@pytest.mark.parametrize("name,spacing,median,strides,kernels", [
    ("isotropic", [1.0, 1.0, 1.0], [64, 64, 64], ISO, [[3, 3, 3]] * 5),
    ("thick", [0.7, 0.7, 6.5], [64, 64, 24], THICK_STRIDES, THICK_KERNELS),
    ("elongated", [1.0, 1.0, 1.0], [32, 32, 96], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 2]],
     [[3, 3, 3]] * 5),
])
def test_dynunet_plan_builds_the_planned_network(name, spacing, median, strides, kernels):
    fp = _fingerprint(spacing, median)
    budget = Budget("gpu", gpu_memory_gb=80)  # room for the whole median shape: the topology is the data's
    plan = plan_training(fp, "dynunet-small", budget)
    assert plan.patch == median and plan.strides == strides and plan.kernels == kernels
    assert plan_training(fp, "dynunet-small", budget) == plan  # deterministic
    divisors = [math.prod(s[a] for s in plan.strides) for a in range(3)]
    assert all(p % d == 0 for p, d in zip(plan.patch, divisors))
    spec = get_spec("dynunet-small")
    spec.check_patch(plan.patch, plan.model_options)  # the registry's check uses the per-axis strides
    if name == "thick":
        table = " ".join(plan.table().split())
        assert "strides 1x1x1 2x2x1 2x2x1 2x2x1 2x2x2" in table and "kernels 3x3x1 3x3x1 3x3x1 3x3x3 3x3x3" in table
        with pytest.raises(ConfigError, match="multiple of 16"):
            spec.check_patch(plan.patch)  # 24 slices do not fit the isotropic default
    net = build_model("dynunet-small", 1, 3, plan.patch, **plan.model_options)
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *plan.patch))
    assert out.shape == (1, 3, *plan.patch)


def test_dynunet_default_and_explicit_layouts():
    spec = get_spec("dynunet")
    assert spec.divisors() == (16, 16, 16) and spec.divisors(3, {"levels": 4}) == (8, 8, 8)
    net = build_model("dynunet-small", 1, 2, (32, 32, 16))  # today's network without a plan
    assert net.strides == ISO and net.kernel_size == [[3, 3, 3]] * 5
    with pytest.raises(ConfigError, match="one \\[X, Y, Z\\] per stage"):
        build_model("dynunet-small", 1, 2, (32, 32, 16), strides=[[1, 1, 1], [3, 2, 2]])
    with pytest.raises(ConfigError, match="kernels but"):
        build_model("dynunet-small", 1, 2, (32, 32, 16), kernels=[[3, 3, 3]] * 3, strides=[[1, 1, 1]] * 2)
    with pytest.raises(ConfigError, match="needs at least 3"):  # a tiny patch plans 2 stages; MONAI needs 3
        build_model("dynunet-small", 1, 2, (12, 12, 12), kernels=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]])


def test_weights_of_another_dynunet_layout_are_refused_not_left_random(tmp_path):
    """A DynUNet pretrained with a plan's 3x3x1 kernels does not fit the default 3x3x3 network: loading refuses,
    naming the layer and the fix, instead of keeping those layers freshly initialised."""
    from medpretrain.errors import CheckpointError
    from medpretrain.models.loading import load_weights

    planned = dict(kernels=[[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                   strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]])
    source = build_model("dynunet-small", 1, 2, (32, 32, 16), **planned)
    torch.save(source.state_dict(), tmp_path / "planned.pt")
    with pytest.raises(CheckpointError, match="other kernel sizes.*pretrain --plan"):
        load_weights(build_model("dynunet-small", 1, 2, (32, 32, 16)), get_spec("dynunet-small"),
                     tmp_path / "planned.pt", part="all")
    same = build_model("dynunet-small", 1, 3, (32, 32, 16), **planned)  # same layout, other classes: loads
    report = load_weights(same, get_spec("dynunet-small"), tmp_path / "planned.pt", part="all")
    assert report.loaded and report.shape_mismatch  # only the class head differs
    assert {get_spec("dynunet-small").part_of(n) for n, _, _ in report.shape_mismatch} == {"head"}


def test_plan_overrides_pass_the_planned_network(kinds, tmp_path):
    data = kinds["thick"]
    plan = write_plan(data, "dynunet-small", Budget("cpu", threads=2, step_seconds=1.0))
    assert read_plan(data.root)["strides"] == plan.strides and plan.strides[1][2] == 1  # Z not pooled at the top
    chosen = plan_overrides(data.root, None, {"model": "dynunet-small"}, "unet")
    assert chosen["model_options"] == {"kernels": plan.kernels, "strides": plan.strides}
    # YAML's other options are kept; YAML's own strides win
    cfg = _yaml(tmp_path, {"model": "dynunet-small", "model_options": {"deep_supervision": True}})
    assert plan_overrides(data.root, cfg, {}, "unet")["model_options"] == {
        "kernels": plan.kernels, "strides": plan.strides, "deep_supervision": True}
    cfg = _yaml(tmp_path, {"model": "dynunet-small", "model_options": {"strides": [[1, 1, 1], [2, 2, 2]]}})
    assert "model_options" not in plan_overrides(data.root, cfg, {}, "unet")
    assert "model_options" not in plan_overrides(data.root, None, {"model": "unet"}, "unet")  # another network


def test_pretrain_with_a_dynunet_plan_builds_the_planned_network(kinds, tmp_path):
    data = kinds["thick"]
    plan = write_plan(data, "dynunet-small", Budget("cpu", threads=2, step_seconds=1.0))
    proc = subprocess.run([sys.executable, "-m", "medpretrain", "pretrain", "--method", "avsdb", "--untrained",
                           "--plan", str(data.root / "plan.json"), "--out", str(tmp_path / "pre"), "--config",
                           str(_yaml(tmp_path, {"generator": {"size": [128, 128, 128]}}))],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads((tmp_path / "pre" / "run.json").read_text(encoding="utf-8"))
    assert run["config"]["patch"] == plan.patch and run["config"]["model_options"] == plan.model_options
    assert run["network"]["strides"] == plan.strides and run["network"]["kernels"] == plan.kernels
    # the fine-tuning network built from the same plan takes the pretrained weights as they are (head aside)
    state = torch.load(tmp_path / "pre" / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
    target = build_model("dynunet-small", 1, 2, plan.patch, **plan.model_options).state_dict()
    spec = get_spec("dynunet-small")
    body = {k: v.shape for k, v in state.items() if spec.part_of(k) != "head"}
    assert body == {k: v.shape for k, v in target.items() if spec.part_of(k) != "head"}
    assert state["input_block.conv1.conv.weight"].shape[-3:] == (3, 3, 1)  # 3x3x1 at the top, as planned


def _yaml(tmp_path, values):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path
