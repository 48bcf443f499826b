"""nnU-Net interop: nnU-Net's networks in the registry, and `medpretrain export --format nnunet` checked against
nnU-Net v2's own loader (``nnunetv2.run.load_pretrained_weights``)."""

import json
import pydoc
import sys

import pytest
import torch

from medpretrain.errors import ConfigError
from medpretrain.models import build_model, get_spec

NEEDS = "needs the optional extra medpretrain[nnunet]"
NETS = ["resenc-l", "resenc-l-cpu", "plainconv-unet", "plainconv-unet-cpu"]


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The console script in this process: (exit code, stdout, stderr)."""
    import logging

    from medpretrain import cli

    logger = logging.getLogger("medpretrain")
    saved = logger.handlers[:], logger.level, logger.propagate
    monkeypatch.setattr(sys, "argv", ["medpretrain", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:  # the CLI logs to this test's captured stderr, which is closed after the test
        logger.handlers[:], logger.level, logger.propagate = saved
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
