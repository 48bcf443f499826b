"""Registry, network parts and weight loading with reports."""

import pytest
import torch

from medpretrain.errors import CheckpointError, ConfigError
from medpretrain.models import build_model, get_spec, list_models, load_weights


@pytest.mark.parametrize("name,patch", [("unet", (32, 32, 16)), ("dynunet-small", (32, 32, 16)),
                                        ("unetr-small", (32, 32, 32)), ("swinunetr-small", (64, 64, 64))])
def test_cpu_presets_forward_and_parts(name, patch):
    torch.manual_seed(0)
    model = build_model(name, 1, 3, patch)
    with torch.no_grad():
        out = model(torch.randn(1, 1, *patch))
    assert out.shape == (1, 3, *patch)
    spec = get_spec(name)
    parts = {spec.part_of(n) for n, _ in model.named_parameters()}
    assert parts == {"encoder", "decoder", "head"}
    # The head is the only part whose shape depends on the class count.
    other = build_model(name, 1, 5, patch).state_dict()
    differing = {n for n, t in model.state_dict().items() if other[n].shape != t.shape}
    assert differing and all(spec.part_of(n) == "head" for n in differing)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        build_model("resnet", 1, 2)
    assert "unet" in str(err.value) and "swinunetr" in str(err.value)
    with pytest.raises(ConfigError, match="options"):
        build_model("unet", 1, 2, widths=3)
    assert {s.name for s in list_models()} >= {"unet", "dynunet", "unetr", "swinunetr"}


def test_patch_check_names_nearest_valid():
    with pytest.raises(ConfigError, match=r"nearest valid patch: \(64, 64, 48\)"):
        get_spec("unet").check_patch((60, 64, 50))


def test_encoder_only_load_and_head_replacement(tmp_path):
    torch.manual_seed(0)
    source = build_model("unet", 1, 4)
    ckpt = tmp_path / "model.pt"
    torch.save({"state_dict": source.state_dict(), "model": "unet"}, ckpt)
    torch.manual_seed(1)
    target = build_model("unet", 1, 2)
    spec = get_spec("unet")
    report = load_weights(target, spec, ckpt, part="encoder")
    assert report.loaded and all(spec.part_of(n) == "encoder" for n in report.loaded)
    assert not report.missing and not report.shape_mismatch
    for n in report.loaded:
        assert torch.equal(target.state_dict()[n], source.state_dict()[n])
    decoder_name = next(n for n in report.not_requested if spec.part_of(n) == "decoder")
    assert not torch.equal(target.state_dict()[decoder_name], source.state_dict()[decoder_name])

    whole = load_weights(target, spec, ckpt, part="all")
    assert [m[0] for m in whole.shape_mismatch] == ["final_conv.weight", "final_conv.bias"]
    assert len(whole.loaded) == len(target.state_dict()) - 2


def test_pretext_head_of_a_pretraining_export_is_never_loaded(tmp_path):
    """An intensity or fusion-class head whose shape happens to equal the segmentation head's stays fresh."""
    source, spec = build_model("unet", 1, 2), get_spec("unet")
    head = [n for n in source.state_dict() if spec.part_of(n) == "head"]
    pretext, segmentation = tmp_path / "pretext.pt", tmp_path / "segmentation.pt"
    torch.save({"state_dict": source.state_dict(), "model": "unet", "kind": "pretrain:asa"}, pretext)
    torch.save({"state_dict": source.state_dict(), "model": "unet"}, segmentation)
    report = load_weights(build_model("unet", 1, 2), spec, pretext, part="all")
    assert head and sorted(report.not_requested) == sorted(head) and not set(head) & set(report.loaded)
    assert len(report.loaded) == len(source.state_dict()) - len(head)
    assert set(head) <= set(load_weights(build_model("unet", 1, 2), spec, segmentation, part="all").loaded)


def test_lightning_prefixed_checkpoint(tmp_path):
    source = build_model("unet", 1, 2)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}, "global_step": 3}, ckpt)
    report = load_weights(build_model("unet", 1, 2), get_spec("unet"), ckpt, part="all")
    assert report.key_mapping == "strip 'model.'" and len(report.loaded) == len(source.state_dict())


def test_monai_swin_ssl_layout(tmp_path):
    """MONAI's SwinUNETR SSL checkpoint: state_dict with 'module.'-prefixed swinViT keys plus SSL heads."""
    torch.manual_seed(0)
    source = build_model("swinunetr-small", 1, 2)
    ssl = {f"module.{k[len('swinViT.'):]}": v for k, v in source.state_dict().items() if k.startswith("swinViT.")}
    ssl["module.rotation_head.weight"] = torch.zeros(4, 12)
    ssl["module.contrastive_head.weight"] = torch.zeros(8, 12)
    ckpt = tmp_path / "model_swinvit.pt"
    torch.save({"state_dict": ssl, "epoch": 100}, ckpt)
    target = build_model("swinunetr-small", 1, 2)
    report = load_weights(target, get_spec("swinunetr-small"), ckpt, part="encoder")
    assert report.key_mapping == "'module.' -> 'swinViT.', mlp.fc -> mlp.linear"
    assert len(report.loaded) == len(ssl) - 2
    assert sorted(report.unexpected) == ["module.contrastive_head.weight", "module.rotation_head.weight"]
    key = "swinViT.layers1.0.blocks.0.attn.qkv.weight"
    assert torch.equal(target.state_dict()[key], source.state_dict()[key])


def test_other_architecture_refused(tmp_path):
    ckpt = tmp_path / "unetr.pt"
    torch.save(build_model("unetr-small", 1, 2, (32, 32, 32)).state_dict(), ckpt)
    with pytest.raises(CheckpointError, match="nothing loaded"):
        load_weights(build_model("unet", 1, 2), get_spec("unet"), ckpt, part="all")


def test_truncated_checkpoint_is_named(tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save(build_model("unet", 1, 2).state_dict(), ckpt)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(build_model("unet", 1, 2), get_spec("unet"), ckpt)
