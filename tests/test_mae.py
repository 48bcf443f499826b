"""MAE for CNN U-Nets: the block mask, the masked reconstruction loss on hand-built inputs, the dataset's
determinism, the configuration's checks, what is exported, and a 2-step pretraining through the real job.

Every test that reads data reads a real pool: small NIfTI scans written to a tmp folder and prepared with
``prepare(pool=...)``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from _niftis import prepared_pool, smooth_scan
from medpretrain.engine.pretrain import pretrain, pretrain_config
from medpretrain.errors import ConfigError
from medpretrain.methods import get_method
from medpretrain.methods.mae import (MAEDataset, MAEModule, block_mask, mask_input, poly_factor,
                                     reconstruction_loss, voxel_mask)
from medpretrain.models import build_model

# The last scan is thinner than the 32^3 smoke patch along Z, so its crops are padded.
SHAPES = [(40, 36, 34), (36, 44, 40), (44, 40, 20)]


def _mae_scan(shape, seed):
    return smooth_scan(shape, seed, amplitude=30.0)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return prepared_pool(tmp_path_factory.mktemp("mae"), [_mae_scan(s, i) for i, s in enumerate(SHAPES)])


def _cfg(**kw):
    return pretrain_config("mae", preset="smoke", overrides=kw or None)


# --------------------------------------------------------------------------------------------------
# Mask


@pytest.mark.parametrize("grid, masked", [((8, 8, 6), 288), ((10, 10, 10), 750), ((4, 4, 4), 48)])
def test_block_mask_hides_exactly_the_ratio(grid, masked):
    for seed in range(3):
        m = block_mask(grid, 0.75, np.random.default_rng(seed))
        assert m.shape == grid and m.dtype == bool and int(m.sum()) == masked


def test_voxel_mask_is_block_aligned_and_masking_zeroes_only_masked_blocks():
    block, grid = 4, (3, 2, 4)
    m = torch.from_numpy(np.stack([block_mask(grid, 0.75, np.random.default_rng(s)) for s in range(2)]))
    vm = voxel_mask(m, block)
    assert vm.shape == (2, 1, 12, 8, 16)
    assert vm.float().mean().item() == 18 / 24  # 24 blocks, 18 masked, whole blocks only
    for b in range(2):
        for i, j, k in np.ndindex(*grid):
            cube = vm[b, 0, i * block:(i + 1) * block, j * block:(j + 1) * block, k * block:(k + 1) * block]
            assert bool(cube.all()) == bool(m[b, i, j, k]) and bool(cube.any()) == bool(m[b, i, j, k])
    image = torch.randn(2, 2, 12, 8, 16) + 5.0  # two channels, no voxel is 0 by chance
    x = mask_input(image, m, block)
    hidden = vm.expand_as(image)
    assert torch.all(x[hidden] == 0) and torch.equal(x[~hidden], image[~hidden])


# --------------------------------------------------------------------------------------------------
# Loss


def test_masked_mse_equals_the_hand_computed_value_and_ignores_visible_voxels():
    # One sample, two channels, a 4 x 4 x 2 volume of 2^3 blocks: grid (2, 2, 1), blocks 0 and 3 masked.
    image = torch.arange(64, dtype=torch.float32).reshape(1, 2, 4, 4, 2)
    mask = torch.tensor([[[[True], [False]], [[False], [True]]]])  # (1, 2, 2, 1)
    pred = image.clone()
    pred[0, 0, 0:2, 0:2, :] += 1.0   # masked block 0, channel 0: 8 voxels off by 1
    pred[0, 1, 2, 3, 1] += 2.0       # masked block 3, channel 1: 1 voxel off by 2
    pred[0, :, 0:2, 2:4, :] += 100.0  # visible block 1: ignored
    pred[0, :, 2:4, 0:2, :] -= 50.0   # visible block 2: ignored
    # Masked voxels: 2 blocks x 8 voxels x 2 channels = 32 values; squared errors 8 * 1 + 1 * 4 = 12.
    assert reconstruction_loss(pred, image, mask, 2).item() == pytest.approx(12 / 32, abs=1e-7)

    # A batch pools its masked voxels (equal counts per sample): the mean of the per-sample losses.
    other = torch.zeros_like(image)
    other_mask = torch.tensor([[[[False], [True]], [[True], [False]]]])
    other_pred = other.clone()
    other_pred[0, :, 0:2, 2:4, :] = 3.0  # masked block 1 off by 3 everywhere: 9
    batch = reconstruction_loss(torch.cat([pred, other_pred]), torch.cat([image, other]),
                                torch.cat([mask, other_mask]), 2)
    assert batch.item() == pytest.approx((12 / 32 + 16 * 9 / 32) / 2, abs=1e-6)
    assert reconstruction_loss(image, image, mask, 2).item() == 0.0


# --------------------------------------------------------------------------------------------------
# Data


def test_dataset_is_a_pure_function_of_seed_and_index(pool):
    cfg = _cfg()
    a, b = MAEDataset(pool, cfg), MAEDataset(pool, cfg)
    for i in (0, 5, 10**12):
        s, t = a.sample(i), b.sample(i)
        assert np.array_equal(s.image, t.image) and np.array_equal(s.mask, t.mask)
        assert (s.case, s.start, s.flips) == (t.case, t.start, t.flips)
        item = a[i]
        assert item["image"].shape == (1, 32, 32, 32) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (4, 4, 4) and item["mask"].dtype == torch.bool and int(item["mask"].sum()) == 48
    samples = [a.sample(i) for i in range(8)]
    assert len({s.image.tobytes() for s in samples}) == 8 and len({s.mask.tobytes() for s in samples}) == 8
    assert {s.case for s in samples} == {"scan_0", "scan_1", "scan_2"}
    other_seed = MAEDataset(pool, _cfg(seed=1)).sample(0)
    assert not np.array_equal(other_seed.image, samples[0].image)
    assert get_method("mae").sample_rng(0, 0).random() != np.random.default_rng([0, 0]).random()  # own stream


def test_sample_is_the_mirrored_crop_of_its_scan_padded_with_the_background(pool):
    cfg = _cfg()
    plain = MAEDataset(pool, _cfg(mirror=False))
    ds = MAEDataset(pool, cfg)
    seen_flip = seen_pad = False
    for i in range(12):
        s, p = ds.sample(i), plain.sample(i)
        # The switch changes only the flips: same scan, crop and mask (the stream stays aligned).
        assert (s.case, s.start) == (p.case, p.start) and np.array_equal(s.mask, p.mask) and not any(p.flips)
        axes = tuple(a + 1 for a, f in enumerate(s.flips) if f)
        assert np.array_equal(np.flip(s.image, axes) if axes else s.image, p.image)
        seen_flip |= bool(axes)
        volume = np.asarray(pool.image(p.case))
        start = np.asarray(p.start)
        lo, hi = np.maximum(start, 0), np.minimum(start + 32, volume.shape[1:])
        inside = tuple(slice(x - s0, y - s0) for x, s0, y in zip(lo, start, hi))
        region = tuple(slice(x, y) for x, y in zip(lo, hi))
        assert np.array_equal(p.image[(slice(None), *inside)], volume[(slice(None), *region)])
        outside = np.ones((32, 32, 32), bool)
        outside[inside] = False
        if outside.any():
            seen_pad = True
            assert np.allclose(p.image[0][outside], volume.min(), atol=1e-5)
    assert seen_flip and seen_pad


# --------------------------------------------------------------------------------------------------
# Configuration, module, export


def test_config_refuses_a_patch_that_is_not_whole_blocks_and_names_the_fix():
    with pytest.raises(ConfigError, match=r"patch \(64, 64, 50\) is not a whole number of 8\^3 mask blocks.*use "
                                          r"patch \(64, 64, 48\) or a mask_block that divides every side \(e.g. 2\)"):
        pretrain_config("mae", overrides={"patch": (64, 64, 50)})
    with pytest.raises(ConfigError, match=r"single 32\^3 mask block.*smaller mask_block"):
        _cfg(mask_block=32)
    with pytest.raises(ConfigError, match="mask_ratio.*within \\(0, 1\\)"):
        _cfg(mask_ratio=1.0)
    with pytest.raises(ConfigError, match="deep supervision.*deep_supervision: false"):
        pretrain_config("mae", overrides={"model": "dynunet-small", "model_options": {"deep_supervision": True}})
    cpu, paper = pretrain_config("mae"), pretrain_config("mae", preset="paper")
    assert cpu.grid == (8, 8, 6) and paper.grid == (10, 10, 10) and paper.mask_block == 16


def test_module_exports_the_registered_network_and_uses_the_nnssl_optimiser():
    cfg = _cfg()
    module = MAEModule(cfg)
    net = build_model(cfg.model, 1, 1, cfg.patch, **cfg.model_options)
    exported = module.exported_state_dict()
    assert list(exported) == list(net.state_dict())
    assert all(exported[k].shape == v.shape for k, v in net.state_dict().items())
    meta = get_method("mae").model_meta(cfg)
    assert meta["in_channels"] == meta["out_channels"] == 1
    x = torch.randn(1, 1, *cfg.patch)
    assert module(x).shape == x.shape  # the head reconstructs the image
    assert get_method("mae").supports("unet") and get_method("mae").supports("dynunet")
    assert not get_method("mae").supports("unetr-small")

    opt = module.configure_optimizers()
    sgd = opt["optimizer"]
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.99
    assert sgd.defaults["weight_decay"] == 3e-5 and sgd.defaults["lr"] == 1e-2
    assert [poly_factor(s, 10, 0.0, 0.9) for s in (0, 5)] == [1.0, pytest.approx(0.5 ** 0.9)]
    assert poly_factor(9, 10, 0.0, 0.9) == pytest.approx(0.1 ** 0.9) and poly_factor(0, 10, 0.2, 0.9) == 0.5
    adamw = MAEModule(_cfg(optimizer="adamw", schedule="one-cycle")).configure_optimizers()["optimizer"]
    assert isinstance(adamw, torch.optim.AdamW)


def test_gradients_are_clipped_to_the_configured_norm():
    module = MAEModule(_cfg(grad_clip=1e-3))
    for p in module.model.parameters():
        p.grad = torch.full_like(p, 1.0)
    opt = module.configure_optimizers()["optimizer"]
    module.clip_gradients = lambda o, gradient_clip_val, gradient_clip_algorithm: torch.nn.utils.clip_grad_norm_(
        module.model.parameters(), gradient_clip_val)  # Lightning's wiring needs a Trainer; the norm is the point
    module.configure_gradient_clipping(opt)
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in module.model.parameters()))
    assert norm.item() == pytest.approx(1e-3, rel=1e-4)


# --------------------------------------------------------------------------------------------------
# The job


def test_two_step_pretraining_writes_the_model_and_the_fraction_learnt(pool, tmp_path):
    cfg = _cfg()
    run = pretrain("mae", pool.root, tmp_path / "run", cfg)
    exported = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    assert exported["kind"] == "pretrain:mae" and exported["global_step"] == 2
    net = build_model(cfg.model, 1, 1, cfg.patch, **cfg.model_options)
    assert set(exported["state_dict"]) == set(net.state_dict())
    report = json.loads((run / "pretext.json").read_text())
    r = report["recon"]
    assert r["perfect"] == 0.0 and r["trivial"] > 0 and r["samples"] == 16
    assert r["final"] is not None and math.isfinite(r["fraction_learnt"])
    assert r["fraction_learnt"] == pytest.approx((r["trivial"] - r["final"]) / r["trivial"])
    rows = (run / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [dict(zip(header, row.split(","))) for row in rows[1:]]
    pairs = [(x["train/loss"], x["train/recon"]) for x in logged if x.get("train/loss")]
    assert len(pairs) == 2 and all(a == b for a, b in pairs)
