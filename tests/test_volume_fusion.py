"""Volume Fusion pretraining: the synthesis (both variants), deep supervision, and a pretrain -> finetune run.

Every test reads a real pool: small NIfTI volumes written to tmp_path and prepared with ``prepare(pool=...)``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from _niftis import blob_case, init_report_of_one_step_finetune, ras_affine, save_nifti, smooth_scan
from medpretrain.blocks import DeepSupervisionLoss, deep_supervision_weights, pooled_targets
from medpretrain.data.cache import PreparedData, prepare, prepare_dataset
from medpretrain.data.preprocess import PreprocessConfig
from medpretrain.engine.module import SegmentationModule
from medpretrain.engine.pretrain import pretrain, pretrain_config
from medpretrain.errors import CacheError, ConfigError
from medpretrain.methods.volume_fusion import (
    VolumeFusionDataset, grid_fusion_map, scale_range, step_factor,
)
from medpretrain.models import get_spec

PATCH = (32, 32, 32)
# Shapes differ per scan; the last is thinner than the patch along Z, so its crops are padded.
SHAPES = [(40, 36, 34), (36, 44, 40), (44, 40, 20)]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> PreparedData:
    """Three scans in two folders, listed by a JSON file that mixes absolute and relative paths."""
    root = tmp_path_factory.mktemp("vf")
    paths = []
    for i, shape in enumerate(SHAPES):
        folder = root / ("site_a" if i < 2 else "site_b")
        paths.append(save_nifti(folder / f"scan_{i}.nii.gz", smooth_scan(shape, i), ras_affine()))
    listing = [{"image": str(paths[0]), "modality": "MR"}, "site_a/scan_1.nii.gz", {"file": str(paths[2])}]
    (root / "pool.json").write_text(json.dumps(listing), encoding="utf-8")
    return prepare(pool=root / "pool.json", out=root / "prepared",
                   cfg=PreprocessConfig(spacing=(1.0, 1.0, 1.0), crop_foreground=False), progress=False)


def _cfg(**kw):
    return pretrain_config("volume-fusion", overrides={"patch": PATCH, **kw})


def test_pool_from_mixed_json_list(pool):
    assert pool.kind == "pool" and pool.case_ids == ["scan_0", "scan_1", "scan_2"]
    assert [pool.case(c)["shape"][1:] for c in pool.case_ids] == [list(s) for s in SHAPES]


def test_paper_label_is_k_alpha_and_image_is_the_fusion(pool):
    cfg = _cfg()
    ds = VolumeFusionDataset(pool, cfg)
    for i in range(6):
        s = ds.synthesize(i)
        assert s.label.dtype == np.uint8 and s.label.shape == PATCH and s.image.shape == (1, *PATCH)
        alpha = s.label.astype(np.float32) / cfg.k
        np.testing.assert_array_equal(s.alpha, alpha)
        np.testing.assert_array_equal(cfg.k * s.alpha, s.label)  # K = 4: exact in binary
        np.testing.assert_array_equal(s.image, alpha * s.foreground + (1 - alpha) * s.background)
        assert set(np.unique(s.label)) <= set(range(cfg.k + 1))
        item = ds[i]
        assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
        assert torch.equal(item["label"][0], torch.from_numpy(s.label.astype(np.int64)))


def test_paper_crops_come_from_two_different_scans(pool):
    ds = VolumeFusionDataset(pool, _cfg())
    pairs = set()
    for i in range(40):
        s = ds.synthesize(i)
        assert s.background_case != s.foreground_case
        pairs.add((s.background_case, s.foreground_case))
        for role, crop in (("background", s.background), ("foreground", s.foreground)):
            info = s.crops[role]
            volume = np.asarray(pool.image(info["case"]))
            start = np.asarray(info["start"])
            lo, hi = np.maximum(start, 0), np.minimum(start + PATCH, volume.shape[1:])
            inside = tuple(slice(a - b, c - b) for a, b, c in zip(lo, start, hi))
            source = tuple(slice(a, c) for a, c in zip(lo, hi))
            np.testing.assert_array_equal(crop[(slice(None), *inside)], volume[(slice(None), *source)])
            outside = np.ones(PATCH, bool)
            outside[inside] = False
            if outside.any():
                # Padding is the scan's background intensity: its normalised lower clip value, i.e. its minimum.
                np.testing.assert_allclose(crop[0][outside], volume.min(), rtol=1e-5, atol=1e-5)
    assert len(pairs) == 6  # every ordered pair of the three scans occurs


def test_paper_boxes_within_scaled_ranges(pool):
    cfg = _cfg()
    # 32^3 from the 128 x 128 x 64 reference: X, Y sides 8..80 -> 2..20, Z (depth) 8..40 -> 4..20.
    assert cfg.box_range() == ((2, 2, 4), (20, 20, 20))
    assert scale_range((8, 8, 8), (80, 80, 40), (128, 128, 64), (128, 128, 64)) == ((8, 8, 8), (80, 80, 40))
    ds = VolumeFusionDataset(pool, cfg)
    counts = []
    for i in range(30):
        s = ds.synthesize(i)
        counts.append(len(s.boxes))
        assert 10 <= len(s.boxes) <= 40
        painted = np.zeros(PATCH, np.uint8)
        for box in s.boxes:
            assert all(lo <= v <= hi for v, lo, hi in zip(box.size, (2, 2, 4), (20, 20, 20)))
            assert 1 <= box.value <= cfg.k
            for a, b, c, n, dim in zip(box.start, box.stop, box.centre, box.size, PATCH):
                assert 0 <= a <= c < b <= dim and b - a <= n
                assert a == max(c - n // 2, 0) and b == min(c - n // 2 + n, dim)  # clipped only at the edges
            painted[tuple(slice(a, b) for a, b in zip(box.start, box.stop))] = box.value
        np.testing.assert_array_equal(painted, s.label)  # later boxes overwrite earlier ones
    assert len(set(counts)) > 5


def test_grid_variant_blocks_and_samesmooth_scan(pool):
    cfg = _cfg(variant="grid")
    ds = VolumeFusionDataset(pool, cfg)
    lo, hi = cfg.grid_block_range()
    assert (lo, hi) == ((2, 2, 4), (8, 8, 16))
    for i in range(12):
        s = ds.synthesize(i)
        g = s.grid
        assert s.background_case == s.foreground_case and not s.boxes
        n = math.prod(g.counts)
        assert g.foreground_blocks == math.floor(0.7 * n + 0.5) and abs(g.foreground_blocks / n - 0.7) <= 0.5 / n + 1e-9
        assert all(a <= b <= c for a, b, c in zip(lo, g.block, hi))
        # The label map is the block grid at its offset, 0 outside.
        expected = np.zeros(PATCH, np.uint8)
        ends = [o + c * b for o, c, b in zip(g.offset, g.counts, g.block)]
        assert all(e <= p for e, p in zip(ends, PATCH))
        region = np.repeat(np.repeat(np.repeat(g.block_labels, g.block[0], 0), g.block[1], 1), g.block[2], 2)
        expected[g.offset[0]:ends[0], g.offset[1]:ends[1], g.offset[2]:ends[2]] = region
        np.testing.assert_array_equal(s.label, expected)
        alpha = s.label.astype(np.float32) / cfg.k
        np.testing.assert_array_equal(s.image, alpha * s.foreground + (1 - alpha) * s.background)
        for role in ("foreground", "background"):
            assert all(0.7 * p - 0.5 <= r <= 1.5 * p + 0.5 for r, p in zip(s.crops[role]["size"], PATCH))
        # Intensity changes map each crop into [0, 1].
        assert s.foreground.min() >= 0 and s.foreground.max() <= 1 and s.image.min() >= 0 and s.image.max() <= 1
    # Exactly 70% of the blocks of a 10 x 10 x 10 grid.
    label, grid = grid_fusion_map((30, 30, 30), np.random.default_rng(0), 4, (3, 3, 3), (3, 3, 3), 0.7)
    assert grid.counts == (10, 10, 10) and grid.foreground_blocks == 700
    assert np.count_nonzero(label) == 700 * 27


def test_grid_variant_needs_one_scan_paper_two(pool, tmp_path):
    one = prepare(pool=[pool.manifest["cases"]["scan_0"]["source_image"][0]], out=tmp_path / "one",
                  cfg=PreprocessConfig(spacing=(1.0, 1.0, 1.0), crop_foreground=False), progress=False)
    with pytest.raises(CacheError, match="at least 2 scans.*variant: grid"):
        VolumeFusionDataset(one, _cfg())
    s = VolumeFusionDataset(one, _cfg(variant="grid")).synthesize(0)
    assert s.foreground_case == s.background_case == "scan_0"
    with pytest.raises(ConfigError, match="set in_channels: 1"):
        VolumeFusionDataset(pool, _cfg(in_channels=2))


@pytest.mark.parametrize("variant", ["paper", "grid"])
def test_sample_is_a_function_of_seed_and_index(pool, variant):
    a = VolumeFusionDataset(pool, _cfg(variant=variant, seed=3))
    b = VolumeFusionDataset(PreparedData(pool.root), _cfg(variant=variant, seed=3))
    for i in (0, 7, 2**40 + 5):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["image"], VolumeFusionDataset(pool, _cfg(variant=variant, seed=4))[0]["image"])


def test_config_presets_and_schedule():
    paper = pretrain_config("volume-fusion", preset="paper")
    assert paper.patch == (128, 128, 64) and paper.batch == 4 and paper.model == "pctnet"
    assert paper.model_options == {"deep_supervision": True} and paper.optimizer == "adam"
    assert paper.schedule == "step" and paper.steps == 100000 and paper.box_range() == ((8, 8, 8), (80, 80, 40))
    assert [step_factor(s, paper) for s in (0, 19999, 20000, 99999)] == [1.0, 1.0, 0.5, 0.0625]
    cpu = pretrain_config("volume-fusion", preset="cpu")
    assert cpu.model == "unet" and cpu.variant == "paper" and cpu.k == 4 and cpu.boxes == (10, 40)
    with pytest.raises(ConfigError, match="boxes"):
        pretrain_config("volume-fusion", overrides={"boxes": (40, 10)})
    with pytest.raises(ConfigError, match="variant"):
        pretrain_config("volume-fusion", overrides={"variant": "mixup"})
    with pytest.raises(ConfigError, match="two schedules; keep one"):
        pretrain_config("volume-fusion", preset="paper", overrides={"lr_schedule": "warmup-constant"})


# ---------------------------------------------------------------------------------------- deep supervision


class _Recorder(torch.nn.Module):
    """A loss that records its targets and returns a different value per call: 1, 10, 100, ..."""

    def __init__(self):
        super().__init__()
        self.targets = []

    def forward(self, logits, target):
        self.targets.append(target)
        return logits.sum() * 0 + 10.0 ** (len(self.targets) - 1)


def test_deep_supervision_weights_and_pooled_targets():
    assert deep_supervision_weights(4) == [8 / 15, 4 / 15, 2 / 15, 1 / 15]
    assert deep_supervision_weights(1) == [1.0]
    label = torch.randint(0, 3, (2, 1, 8, 8, 4))
    # Full resolution, then in-plane halved (anisotropic, as PCT-Net's 2D level), then halved again.
    outputs = (torch.randn(2, 3, 8, 8, 4), torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 2, 2, 2))
    rec = _Recorder()
    value = DeepSupervisionLoss(rec)(outputs, label)
    assert value.item() == pytest.approx((4 * 1 + 2 * 10 + 1 * 100) / 7)
    one_hot = torch.stack([(label[:, 0] == c).float() for c in range(3)], 1)
    assert torch.equal(rec.targets[0], one_hot)
    # Block means, written out: 1 x 2 x 2 blocks for level 1, 4 x 4 x 2 blocks for level 2.
    level1 = one_hot.reshape(2, 3, 4, 2, 4, 2, 4, 1).mean(dim=(3, 5, 7))
    level2 = one_hot.reshape(2, 3, 2, 4, 2, 4, 2, 2).mean(dim=(3, 5, 7))
    torch.testing.assert_close(rec.targets[1], level1, rtol=0, atol=1e-7)
    torch.testing.assert_close(rec.targets[2], level2, rtol=0, atol=1e-7)
    assert torch.allclose(rec.targets[2].sum(1), torch.ones(2, 2, 2, 2))  # class shares sum to 1
    assert pooled_targets(one_hot, [(8, 8, 4)])[0] is one_hot


def test_deep_supervision_with_monai_loss_and_segmentation_module():
    base = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5)
    logits = torch.randn(2, 5, 8, 8, 8)
    label = torch.randint(0, 5, (2, 1, 8, 8, 8))
    ds = DeepSupervisionLoss(base)
    assert base.dice.to_onehot_y  # the caller's loss is left as it was
    torch.testing.assert_close(ds((logits,), label), base(logits, label))
    half = F.avg_pool3d(logits, 2)
    soft = F.avg_pool3d(F.one_hot(label[:, 0], 5).permute(0, 4, 1, 2, 3).float(), 2)
    expected = (2 * base(logits, label) + DiceCELoss(softmax=True, lambda_dice=0.5, lambda_ce=0.5)(half, soft)) / 3
    torch.testing.assert_close(ds((logits, half), label), expected)

    class TwoScales(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            full = self.net(x)
            return (full, F.avg_pool3d(full, 2)) if self.training else full

    module = SegmentationModule(_cfg(), 1, 5, base)
    module.model = TwoScales(module.model)
    x = torch.randn(1, 1, *PATCH)
    y = torch.randint(0, 5, (1, 1, *PATCH))
    module.train()
    torch.manual_seed(0)
    loss = module.compute_loss(x, y)
    torch.manual_seed(0)
    full, half = module.model(x)
    torch.testing.assert_close(loss, DeepSupervisionLoss(base)((full, half), y))
    assert module(x).shape == (1, 5, *PATCH)  # forward gives the full-resolution logits
    module.eval()
    assert module(x).shape == (1, 5, *PATCH)
    assert not any("_ds_loss" in k for k in module.state_dict())


# ---------------------------------------------------------------------------------------- end to end


def _labelled(root):
    """A 2-class nnU-Net raw dataset of three cases."""
    for i in range(3):
        image, label = blob_case((36, 32, 20), seed=i, classes=1)
        save_nifti(root / "imagesTr" / f"c{i}_0000.nii.gz", image, ras_affine())
        save_nifti(root / "labelsTr" / f"c{i}.nii.gz", label, ras_affine())
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "blob": 1}, "numTraining": 3,
        "file_ending": ".nii.gz"}), encoding="utf-8")
    return root


def test_pretrain_then_finetune_loads_all_but_the_head(pool, tmp_path):
    cfg = pretrain_config("volume-fusion", overrides={
        "steps": 3, "patch": PATCH, "batch": 1, "checkpoint_every": 2, "num_workers": 0, "precision": "32-true"})
    run = pretrain("volume-fusion", pool.root, tmp_path / "vf", cfg)
    saved = torch.load(run / "model.pt", weights_only=False)
    assert saved["kind"] == "pretrain:volume-fusion" and saved["global_step"] == 3
    assert saved["out_channels"] == 5 and saved["labels"][4] == "alpha=4/4"
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert info["method"] == "volume-fusion" and info["config"]["variant"] == "paper"

    data = prepare_dataset(_labelled(tmp_path / "raw"), tmp_path / "prepared", PreprocessConfig(modality="MR"),
                           progress=False)
    assert data.num_classes == 2
    report = init_report_of_one_step_finetune(run / "model.pt", data.root, tmp_path / "ft")
    spec = get_spec("unet")
    # Encoder and decoder load; the 5-class fusion head is not (a pretext head never is), the 2-class one is new.
    assert set(report["not_requested"]) == {"final_conv.weight", "final_conv.bias"} and not report["shape_mismatch"]
    assert not report["missing"] and not report["unexpected"]
    assert {spec.part_of(n) for n in report["loaded"]} == {"encoder", "decoder"}
