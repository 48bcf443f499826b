"""nnU-Net interop: nnU-Net's networks in the registry, `medpretrain export --format nnunet` checked against
nnU-Net v2's own loader (``nnunetv2.run.load_pretrained_weights``), and nnU-Net's own scratch training as the
benchmark's ``nnunet-scratch`` arm (``medpretrain nnunet-scratch``), scored with our evaluation."""

import json
import pydoc
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from medpretrain.errors import ConfigError, DataError
from medpretrain.models import build_model, get_spec

NEEDS = "needs the optional extra medpretrain[nnunet]"
NETS = ["resenc-l", "resenc-l-cpu", "plainconv-unet", "plainconv-unet-cpu"]


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The console script in this process: (exit code, stdout, stderr)."""
    from medpretrain import cli

    monkeypatch.setattr(sys, "argv", ["medpretrain", *map(str, args)])
    # main() re-executes training verbs with tcmalloc preloaded when it is installed: in this process that would
    # replace the test runner itself
    monkeypatch.setenv("MEDPRETRAIN_NO_TCMALLOC", "1")
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def untrained_run(out, model: str, patch=(32, 32, 32)):
    """A pretraining run folder as `medpretrain pretrain --method avsdb --untrained` writes it (model.pt, run.json)."""
    from medpretrain.engine.pretrain import pretrain, pretrain_config

    cfg = pretrain_config("avsdb", overrides={"model": model, "patch": patch, "accelerator": "cpu"})
    return pretrain("avsdb", None, out, cfg, untrained=True)


def test_registration_imports_no_optional_package():
    import subprocess

    code = ("import sys, medpretrain.models as m; names = {s.name for s in m.list_models()}; "
            f"assert names >= {set(NETS)!r}, names; assert 'dynamic_network_architectures' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_registry_facts_patch_divisors_parts_and_forward():
    pytest.importorskip("dynamic_network_architectures", reason=NEEDS)
    # 6 stages: sides multiple of 32; 5 stages (CPU presets): multiple of 16.
    assert get_spec("resenc-l").divisors() == (32, 32, 32) and get_spec("plainconv-unet").divisors() == (32, 32, 32)
    assert get_spec("resenc-l-cpu").divisors() == (16, 16, 16) and get_spec("plainconv-unet-cpu").divisors() == (16,) * 3
    get_spec("resenc-l-cpu").check_patch((64, 64, 48))
    get_spec("resenc-l").check_patch((128, 128, 128))
    with pytest.raises(ConfigError, match=r"multiple of 32.*nearest valid patch: \(64, 64, 64\)"):
        get_spec("resenc-l").check_patch((64, 64, 48))
    with pytest.raises(ConfigError, match="instance normalisation"):
        get_spec("resenc-l-cpu").check_patch((16, 16, 16))  # a single bottleneck voxel

    with torch.device("meta"):  # the GPU presets' parameter count (ResEnc-L: ~102 M) without memory
        big = build_model("resenc-l", 1, 2, (128, 128, 128))
    assert 100e6 < sum(p.numel() for p in big.parameters()) < 105e6

    for name in ("resenc-l-cpu", "plainconv-unet-cpu"):
        spec = get_spec(name)
        torch.manual_seed(0)
        net = build_model(name, 1, 3, (32, 32, 32))
        state = net.state_dict()
        parts = {k: spec.part_of(k) for k in state}
        assert {k for k, p in parts.items() if p == "encoder"} == {
            k for k in state if k.startswith(("encoder.", "decoder.encoder."))}
        assert {k for k, p in parts.items() if p == "head"} == {k for k in state if ".seg_layers." in k}
        assert {k.split(".")[1] for k, p in parts.items() if p == "decoder"} == {"stages", "transpconvs"}
        assert {spec.part_of(n) for n, _ in net.named_parameters()} == {"encoder", "decoder", "head"}
        # The head is the only part whose shape depends on the class count.
        other = build_model(name, 1, 5, (32, 32, 32)).state_dict()
        assert {k for k in state if other[k].shape != state[k].shape} == {k for k in state if parts[k] == "head"}
        # Without deep supervision the coarser segmentation layers are unused, hence frozen (DDP).
        frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
        assert frozen and all(".seg_layers." in n for n in frozen) and not any("seg_layers.3" in n for n in frozen)
        x = torch.randn(1, 1, 16, 32, 48)  # any multiple of 16, not only the training patch
        with torch.no_grad():
            assert net.eval()(x).shape == (1, 3, 16, 32, 48)

    ds = build_model("resenc-l-cpu", 1, 3, (32, 32, 32), deep_supervision=True, features_per_stage=(4, 4, 8, 8, 8))
    outputs = ds.train()(torch.randn(1, 1, 32, 32, 32))
    assert [tuple(o.shape[2:]) for o in outputs] == [(32,) * 3, (16,) * 3, (8,) * 3, (4,) * 3]  # full resolution first
    from monai.losses import DiceCELoss

    from medpretrain.blocks.deep_supervision import DeepSupervisionLoss

    loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))(outputs, torch.randint(0, 3, (1, 1, 32, 32, 32)))
    loss.backward()
    assert all(p.grad is not None for p in ds.parameters())
    with torch.no_grad():
        assert ds.eval()(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    with pytest.raises(ConfigError, match="3-stage network needs 3 features_per_stage"):
        build_model("resenc-l-cpu", 1, 2, (32, 32, 32), features_per_stage=(16, 32, 64))


def _nnunet_network(arch: dict, in_channels: int, num_classes: int, deep_supervision: bool):
    """The network as nnU-Net v2 builds it from a plans file's 'architecture' entry (get_network_from_plans)."""
    kwargs = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    network = pydoc.locate(arch["network_class_name"])(input_channels=in_channels, num_classes=num_classes,
                                                       deep_supervision=deep_supervision, **kwargs)
    network.apply(network.initialize)
    return network


def test_export_round_trip_through_nnunets_own_loader(tmp_path, monkeypatch, capsys):
    pytest.importorskip("dynamic_network_architectures", reason=NEEDS)
    nnunet_loader = pytest.importorskip("nnunetv2.run.load_pretrained_weights", reason=NEEDS)
    run = untrained_run(tmp_path / "null", "resenc-l-cpu")
    ours = torch.load(run / "model.pt", weights_only=False)["state_dict"]

    out = tmp_path / "nnunet" / "pretrained.pth"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "export", "--run", run, "--format", "nnunet", "--out", out)
    assert code == 0, stderr
    assert out.is_file() and (tmp_path / "nnunet" / "pretrained.json").is_file(), stdout
    desc = json.loads((tmp_path / "nnunet" / "pretrained.json").read_text(encoding="utf-8"))
    arch = desc["architecture"]
    assert arch["network_class_name"] == "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    assert arch["arch_kwargs"]["features_per_stage"] == [16, 32, 64, 128, 160]
    assert arch["arch_kwargs"]["n_blocks_per_stage"] == [1, 3, 4, 6, 6]
    assert desc["plans_configuration"] == {"inherits_from": "3d_fullres", "patch_size": [32, 32, 32],
                                           "architecture": arch}
    assert desc["pretraining"]["method"] == "avsdb" and desc["pretraining"]["steps"] == 0
    assert desc["pretraining"]["untrained"] is True and desc["num_input_channels"] == 1
    assert desc["key_to_encoder"] == "encoder.stages" and desc["key_to_stem"] == "encoder.stem"
    assert desc["encoder_keys"] and all(k.startswith(("encoder.", "decoder.encoder.")) for k in desc["encoder_keys"])
    assert desc["not_loaded_by_nnunet"] and all(".seg_layers." in k for k in desc["not_loaded_by_nnunet"])
    # Duplicate names of one tensor stay one tensor: the file is about the size of the network.
    assert out.stat().st_size < 1.2 * (run / "model.pt").stat().st_size

    # nnU-Net's side: its network from the plans entry (its own class count, deep supervision on, as nnUNetTrainer
    # builds it), then its own loader, which asserts that every key but the segmentation layers fits.
    torch.manual_seed(1)
    net = _nnunet_network(arch, 1, 2, deep_supervision=True)
    fresh_seg = {k: v.clone() for k, v in net.state_dict().items() if ".seg_layers." in k}
    nnunet_loader.load_pretrained_weights(net, str(out))
    loaded = net.state_dict()
    assert set(loaded) == set(ours)
    for key, value in ours.items():
        if ".seg_layers." in key:
            assert torch.equal(loaded[key], fresh_seg[key]), key  # nnU-Net keeps its own head
        else:
            expected = value.permute(0, 1, 4, 3, 2) if value.dim() == 5 else value  # (X, Y, Z) -> (Z, Y, X)
            assert torch.equal(loaded[key], expected), key
    capsys.readouterr()

    # Same function: nnU-Net's network on the (Z, Y, X) array equals ours on the (X, Y, Z) array.
    with_head = _nnunet_network(arch, 1, 17, deep_supervision=False)
    with_head.load_state_dict(torch.load(out, weights_only=False)["network_weights"])
    mine = build_model("resenc-l-cpu", 1, 17, (32, 32, 32))
    mine.load_state_dict(ours)
    x = torch.randn(1, 1, 16, 32, 48)  # three different sides: a transposed axis would show
    with torch.no_grad():
        theirs = with_head.eval()(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)
        assert torch.allclose(theirs, mine.eval()(x), atol=1e-4, rtol=1e-4)

    # --axes xyz: the kernels as trained.
    raw = tmp_path / "raw.pth"
    from medpretrain.api import export_nnunet

    export_nnunet(run, raw, axes="xyz")
    raw_weights = torch.load(raw, weights_only=False)["network_weights"]
    assert all(torch.equal(raw_weights[k], v) for k, v in ours.items())


def test_export_refuses_a_network_nnunet_cannot_build(tmp_path, monkeypatch, capsys):
    run = untrained_run(tmp_path / "unet-null", "unet")
    out = tmp_path / "pretrained.pth"
    code, _, stderr = run_cli(monkeypatch, capsys, "export", "--run", run, "--format", "nnunet", "--out", out)
    lines = [ln for ln in stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert code == 1 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "model 'unet' is not one of nnU-Net's networks" in lines[0] and "--model resenc-l" in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "pretrained.json").exists()
    code, _, stderr = run_cli(monkeypatch, capsys, "export", "--run", run, "--format", "onnx", "--out", out)
    assert code == 1 and "--format 'onnx': the formats are nnunet" in stderr


# --- nnU-Net's own scratch training as a yardstick (interop/nnunet_scratch.py) ---------------------------------

NEEDS_STACK = "needs nnU-Net v2 with its training stack (pip install 'medpretrain[nnunet]'; docs/nnunet.md)"


def _require_nnunet_stack():
    from medpretrain.interop.nnunet_scratch import require_nnunet

    try:
        require_nnunet()
    except ConfigError as exc:
        pytest.skip(f"{NEEDS_STACK}: {exc}")


def _prepared(tmp_path, n=6, n_test=2, shape=(24, 20, 16), spacing=(1.25, 1.25, 1.25), affine=None, **cfg):
    """A tiny nnU-Net-layout dataset (blob cases, two classes) and its prepared cache at ``spacing``."""
    from _niftis import make_nnunet, save_nifti

    from medpretrain.data.cache import prepare
    from medpretrain.data.preprocess import PreprocessConfig

    ids = [f"case_{i:03d}" for i in range(n)]
    raw = make_nnunet(tmp_path / "raw", n=n, shape=shape, split={"train": ids[:n - n_test], "test": ids[n - n_test:]})
    if affine is not None:  # the same arrays on another grid (orientation, spacing)
        import nibabel as nib

        for path in [*(raw / "imagesTr").glob("*.nii.gz"), *(raw / "labelsTr").glob("*.nii.gz")]:
            save_nifti(path, np.asarray(nib.load(str(path)).dataobj), affine)
    return prepare(dataset=raw, out=tmp_path / "prepared", progress=False,
                   cfg=PreprocessConfig(spacing=spacing, modality="MR", **cfg))


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_label_to_prepared_reproduces_the_prepared_ground_truth(tmp_path, interpolation):
    """nnU-Net's predictions are scored on our prepared grid: the mapping must put the original label map exactly on
    the prepared label, for an oblique-free but flipped, permuted, anisotropic source grid and a resampling."""
    from medpretrain.data.io import read_image
    from medpretrain.data.preprocess import label_to_prepared

    affine = np.array([[0.0, 0.0, -2.0, 40.0], [-0.8, 0.0, 0.0, 10.0], [0.0, 1.1, 0.0, -5.0], [0, 0, 0, 1.0]])
    data = _prepared(tmp_path, n=3, n_test=1, affine=affine, label_interpolation=interpolation)
    for cid in data.case_ids:
        geometry = data.geometry(cid)
        original = read_image(data.case(cid)["source_label"]).array[0]
        mapped = label_to_prepared(original, geometry, interpolation)
        assert mapped.shape == tuple(geometry.prepared_shape)
        assert np.array_equal(mapped, np.asarray(data.label(cid))), cid
    with pytest.raises(DataError, match="does not lie on the source grid"):
        label_to_prepared(original[:-1], geometry, interpolation)


def test_the_time_budget_is_the_whole_training_of_the_paired_run(tmp_path):
    """--max-seconds-from reads the paired run's training wall time, and refuses a resumed run, whose run.json
    records the time of its last session only (needs no nnunetv2)."""
    from medpretrain.interop.nnunet_scratch import budget_from_run

    run = tmp_path / "scratch"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"training": {"steps_done": 200, "steps_this_session": 200,
                                                           "wall_time_s": 237.5}}), encoding="utf-8")
    assert budget_from_run(run) == 237.5
    (run / "run.json").write_text(json.dumps({"training": {"steps_done": 200, "steps_this_session": 80,
                                                           "wall_time_s": 95.0}}), encoding="utf-8")
    with pytest.raises(ConfigError, match="was resumed.*steps_this_session 80 of steps_done 200"):
        budget_from_run(run)
    with pytest.raises(ConfigError, match="no finished training there"):
        budget_from_run(tmp_path / "missing")


def test_nnunet_scratch_whole_chain_and_our_evaluation(tmp_path, monkeypatch, capsys):
    """nnU-Net's own planning, preprocessing, trainer (2 iterations) and predictor on our labelled subset, then our
    evaluation of its test predictions on the prepared grid."""
    _require_nnunet_stack()
    from medpretrain.api import evaluate
    from medpretrain.data.io import read_image
    from medpretrain.engine.finetune import labeled_subset, validation_split
    from medpretrain.interop.nnunet_scratch import is_finished

    data = _prepared(tmp_path, n=7, n_test=2)
    run = tmp_path / "nnunet-run"
    monkeypatch.setenv("MEDPRETRAIN_NO_TCMALLOC", "1")  # the CLI in this process, never re-executed
    code, stdout, stderr = run_cli(monkeypatch, capsys, "nnunet-scratch", "--data", data.root, "--out", run,
                                   "--n-labeled", 2, "--seed", 3, "--iterations", 2, "--gpu-memory-target", 0.05,
                                   "--workers", 0, "--validation-cases", 1)
    assert code == 0, stderr[-3000:]
    assert "nnU-Net scratch run" in stdout and is_finished(run)
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    # The subset is finetune's: the same functions, seed and validation set-aside.
    validation, trainable = validation_split(data.split("train"), 1, 0)
    assert info["labeled_cases"] == labeled_subset(trainable, 3, 2) and info["validation_cases"] == validation
    assert sorted(p.name for p in (run / "nnunet" / "raw" / "Dataset999_medpretrain" / "labelsTr").iterdir()) == [
        f"{c}.nii.gz" for c in info["labeled_cases"]]
    t = info["training"]
    assert t["steps_done"] == 2 and t["stopped_by"] == "iterations" and t["wall_time_s"] > 0 and t["s_per_step"] > 0
    assert t["final_lr"] < 1e-2  # nnU-Net's poly schedule over the 2 iterations
    nn = info["nnunet"]
    assert nn["configuration"] == "3d_fullres" and nn["fold"] == "all" and nn["gpu_memory_target_gb"] == 0.05
    assert nn["spacing"] == [1.0, 1.0, 1.0] and len(nn["patch_size"]) == 3 and nn["batch_size"] >= 2
    assert nn["network"]["class"].endswith("PlainConvUNet") and nn["network"]["parameters"] > 0
    assert nn["inference"]["use_mirroring"] is True and nn["inference"]["mirror_axes"] == [0, 1, 2]
    assert (run / nn["checkpoint"]).is_file()
    # One prediction per test case, on the grid of its source image (nnU-Net's export).
    for cid in data.split("test"):
        pred = read_image(run / "predictions" / f"{cid}.nii.gz")
        geometry = data.geometry(cid)
        assert list(pred.spatial_shape) == geometry.original_shape
        assert np.allclose(pred.affine, geometry.original_affine, atol=1e-4)
        assert set(np.unique(pred.array)) <= {0, 1, 2}

    metrics = evaluate(run, data.root)
    assert metrics["context"]["arm"] == "nnunet-scratch" and metrics["context"]["steps"] == 2
    assert metrics["context"]["spacing_mm"] == [1.25, 1.25, 1.25]  # scored on our prepared grid
    assert 0.0 <= metrics["overall"]["dice"]["mean"] <= 1.0
    with open(run / "eval" / "per_case.csv", encoding="utf-8") as fh:
        assert {row.split(",")[0] for row in fh.read().splitlines()[1:]} == set(data.split("test"))
    assert (run / "eval" / "training_curve.png").is_file()

    # The time budget, on the same preprocessed data: the clock includes nnU-Net's start-up; after the warm-up steps
    # the iteration count the remaining time allows is fixed, and the poly schedule runs over those iterations.
    from medpretrain.interop.nnunet_scratch import build_trainer, nnunet_environment

    with nnunet_environment(run / "nnunet", workers=0):
        trainer = build_trainer(run / "nnunet", "nnUNetPlans", seed=0, iterations=None, max_seconds=2.0)
        trainer.run_training()
    steps = [h[1] for h in trainer.history]
    assert trainer.stopped_by == "max_seconds" and trainer.iterations_done == len(steps)
    assert trainer.iterations_done == trainer.planned_iterations >= trainer.WARMUP_ITERATIONS
    assert trainer.train_seconds >= trainer.setup_seconds > 0
    lrs = [h[3] for h in trainer.history]
    assert lrs[0] == pytest.approx(1e-2, rel=1e-3) and all(a > b for a, b in zip(lrs, lrs[1:]))
    if trainer.planned_iterations > trainer.WARMUP_ITERATIONS:  # the schedule's horizon is the planned count
        k, lr = len(lrs) - 1, lrs[-1]
        assert lr == pytest.approx(1e-2 * (1 - k / trainer.planned_iterations) ** 0.9, rel=1e-6)

    # A second run of the same command finds the run finished and changes nothing; other settings are refused.
    mtime = (run / "run.json").stat().st_mtime_ns
    code, _, stderr = run_cli(monkeypatch, capsys, "nnunet-scratch", "--data", data.root, "--out", run,
                              "--n-labeled", 2, "--seed", 3, "--iterations", 2, "--gpu-memory-target", 0.05,
                              "--workers", 0, "--validation-cases", 1)
    assert code == 0 and (run / "run.json").stat().st_mtime_ns == mtime, stderr[-2000:]
    code, _, stderr = run_cli(monkeypatch, capsys, "nnunet-scratch", "--data", data.root, "--out", run,
                              "--n-labeled", 2, "--seed", 4, "--iterations", 2)
    assert code == 1 and "other settings" in stderr


def test_nnunet_scratch_refuses_a_missing_budget(tmp_path, monkeypatch, capsys):
    code, _, stderr = run_cli(monkeypatch, capsys, "nnunet-scratch", "--data", tmp_path, "--out", tmp_path / "r",
                              "--n-labeled", 2)
    assert code == 1 and "--iterations K, --max-seconds T or --max-seconds-from RUN" in stderr
    code, _, stderr = run_cli(monkeypatch, capsys, "nnunet-scratch", "--data", tmp_path, "--out", tmp_path / "r",
                              "--n-labeled", 2, "--iterations", 3, "--max-seconds", 60)
    assert code == 1 and "one budget" in stderr


def test_benchmark_profile_key_adds_the_nnunet_scratch_arm(tmp_path):
    from medpretrain.benchmark import BenchmarkConfig, plan

    base = {
        "name": "tiny", "dataset": str(tmp_path / "ds"), "preprocess": {"modality": "MR"},
        "backbones": {"unet": {"model": "unet", "steps": 2, "patch": [32, 32, 16], "batch": 1}},
        "only": [], "pool_add_downstream_train": False, "n_labeled": [4, 8], "seeds": [0, 1, 2],
        "validation": {"cases": 8, "seed": 0, "n_labeled": 4, "run_seed": 0, "lr": [0.001]},
    }
    out = tmp_path / "out"
    assert not any(j.info.get("nnunet") for j in plan(BenchmarkConfig.model_validate(base), out))

    cfg = BenchmarkConfig.model_validate({**base, "nnunet_scratch": {"max_seconds": "scratch",
                                                                      "gpu_memory_target": 0.25, "workers": 1}})
    jobs = plan(cfg, out)
    arm = {j.name: j for j in jobs if j.info.get("method") == "nnunet-scratch"}
    assert sorted(arm) == sorted(f"nnunet-scratch-n{n}-s{s}" for n in (4, 8) for s in (0, 1, 2))
    for name, job in arm.items():
        n, seed = job.info["n_labeled"], job.info["seed"]
        cmd, ev = job.commands
        assert cmd[0] == "nnunet-scratch" and ev[0] == "evaluate" and job.kind == "finetune"
        assert cmd[cmd.index("--n-labeled") + 1] == str(n) and cmd[cmd.index("--seed") + 1] == str(seed)
        # the same validation set-aside as every fine-tuning run, so the same labelled cases
        assert cmd[cmd.index("--validation-cases") + 1] == "8" and cmd[cmd.index("--validation-seed") + 1] == "0"
        # the budget: the training wall time of the paired scratch run, which it waits for
        scratch = f"scratch-unet-n{n}-s{seed}"
        assert cmd[cmd.index("--max-seconds-from") + 1] == str(out / "runs" / scratch) and scratch in job.needs
        assert cmd[cmd.index("--gpu-memory-target") + 1] == "0.25" and "--mirroring" in cmd
        assert job.info["backbone"] == "unet" and job.done_marker == out / "runs" / name / "eval" / "metrics.json"
    assert len([j for j in jobs if j.kind == "finetune" and j.info["method"] == "scratch"
                and not j.info.get("validation")]) == 6
    # the `all` size with validation.all_includes_validation: nnU-Net trains on the validation cases too, like ours
    cfg = BenchmarkConfig.model_validate({**base, "n_labeled": [4, "all"], "seeds": [0], "nnunet_scratch": {"iterations": 10},
                                          "validation": {**base["validation"], "all_includes_validation": True}})
    cmds = {j.name: j.commands[0] for j in plan(cfg, tmp_path / "all")}
    assert cmds["nnunet-scratch-all-s0"][cmds["nnunet-scratch-all-s0"].index("--validation-cases") + 1] == "0"
    assert cmds["nnunet-scratch-n4-s0"][cmds["nnunet-scratch-n4-s0"].index("--validation-cases") + 1] == "8"
    assert cmds["scratch-unet-all-s0"][-2:] == ["--validation-cases", "0"]

    fixed = plan(BenchmarkConfig.model_validate({**base, "nnunet_scratch": {"iterations": 40}}), out)
    cmd = next(j for j in fixed if j.name == "nnunet-scratch-n4-s1").commands[0]
    assert cmd[cmd.index("--iterations") + 1] == "40" and "--max-seconds-from" not in cmd
    with pytest.raises(ValidationError, match="exactly one budget"):
        BenchmarkConfig.model_validate({**base, "nnunet_scratch": {"iterations": 4, "max_seconds": 60}})
    with pytest.raises(ValidationError, match="not a backbone"):
        BenchmarkConfig.model_validate({**base, "nnunet_scratch": {"iterations": 4, "backbone": "swin"}})
