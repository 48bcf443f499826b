"""Models Genesis pretraining: each transformation on known inputs, the restoration pairs read from a real
prepared pool, the configuration, the exported network and a 2-step pretraining through the real job.

The pool is small NIfTI volumes written to a temporary folder and prepared with ``prepare(pool=...)``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _niftis import prepared_pool, smooth_scan
from medpretrain.data.cache import PreparedData
from medpretrain.engine.pretrain import pretrain, pretrain_config
from medpretrain.errors import ConfigError
from medpretrain.methods import get_method
from medpretrain.methods.models_genesis import (
    ModelsGenesisDataset, ModelsGenesisModule, apply_curve, apply_flips, cubic_bezier, in_paint, intensity_window,
    local_pixel_shuffle, nonlinear_transform, out_paint, random_flips, restoration_loss, step_factor,
)
from medpretrain.models import build_model

PATCH = (32, 32, 32)
# The last scan is thinner than the patch along Z: its cubes are padded.
SHAPES = [(40, 36, 34), (36, 44, 40), (44, 40, 20)]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> PreparedData:
    return prepared_pool(tmp_path_factory.mktemp("mg"), [smooth_scan(s, i) for i, s in enumerate(SHAPES)])


def _cfg(**kw):
    return pretrain_config("models-genesis", overrides={"patch": PATCH, **kw})


def _boxes_mask(dims, boxes):
    mask = np.zeros(dims, bool)
    for start, size in boxes:
        mask[tuple(slice(a, a + n) for a, n in zip(start, size))] = True
    return mask


# ---------------------------------------------------------------------------------------- transformations


def test_bezier_curve_known_values():
    # Control points on the diagonal at 1/3 and 2/3: B(t) = (t, t), the identity; decreasing: 1 - x.
    x = np.linspace(0, 1, 101, dtype=np.float32).reshape(1, 101, 1, 1)
    np.testing.assert_allclose(apply_curve(x, (1 / 3, 1 / 3), (2 / 3, 2 / 3), False), x, atol=1e-6)
    np.testing.assert_allclose(apply_curve(x, (1 / 3, 1 / 3), (2 / 3, 2 / 3), True), 1 - x, atol=1e-6)
    # P1 = (0, 1), P2 = (1, 1): at t = 1/2, x = 3/8 + 1/8 = 1/2 and y = 3/8 + 3/8 + 1/8 = 7/8.
    xs, ys = cubic_bezier((0, 1), (1, 1), 3)
    np.testing.assert_allclose(xs, [0, 0.5, 1])
    np.testing.assert_allclose(ys, [0, 0.875, 1])
    half = np.full((1, 1, 1, 1), 0.5, np.float32)
    assert apply_curve(half, (0, 1), (1, 1), False).item() == pytest.approx(0.875, abs=1e-5)
    # Decreasing pairs x(t) with y(1 - t): x = 1/2 is t = 1/2, whose mirror is t = 1/2 again.
    assert apply_curve(half, (0, 1), (1, 1), True).item() == pytest.approx(0.875, abs=1e-5)


def test_bezier_transform_is_monotone_on_the_unit_interval():
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, 4001, dtype=np.float32).reshape(1, -1, 1, 1)
    seen = set()
    for _ in range(12):
        y, info = nonlinear_transform(x, rng)
        seen.add(info["decreasing"])
        np.testing.assert_array_equal(y, apply_curve(x, info["p1"], info["p2"], info["decreasing"]))
        steps = np.diff(y.ravel())
        assert y.dtype == np.float32 and y.min() >= 0 and y.max() <= 1
        if info["decreasing"]:
            assert np.all(steps <= 1e-6) and y.ravel()[0] == pytest.approx(1) and y.ravel()[-1] == pytest.approx(0)
        else:
            assert np.all(steps >= -1e-6) and y.ravel()[0] == pytest.approx(0) and y.ravel()[-1] == pytest.approx(1)
    assert seen == {True, False}


def test_local_pixel_shuffling_permutes_each_block():
    dims = (20, 20, 10)
    base = np.random.default_rng(1).permutation(np.prod(dims)).reshape(dims).astype(np.float32)
    x = np.stack([base, 10_000 + base])  # unique values; channel 1 tells which voxel channel 0 came from
    for seed in range(5):  # one block: exactly a permutation of what it covers, the rest untouched
        out, starts, sizes = local_pixel_shuffle(x, np.random.default_rng(seed), n_blocks=1)
        region = (slice(None), *(slice(a, a + n) for a, n in zip(starts[0], sizes[0])))
        np.testing.assert_array_equal(np.sort(out[region].ravel()), np.sort(x[region].ravel()))
        outside = out.copy()
        outside[region] = -1
        assert np.array_equal(outside == -1, np.broadcast_to(_boxes_mask(dims, [(starts[0], sizes[0])]), x.shape))
        np.testing.assert_array_equal(outside[outside != -1], x[outside != -1])
    out, starts, sizes = local_pixel_shuffle(x, np.random.default_rng(7), n_blocks=300)
    # Block sides 1..side // 10 (2, 2, 1 here), inside the cube.
    assert sizes.min() >= 1 and np.all(sizes <= [2, 2, 1]) and np.all(starts + sizes <= dims) and starts.min() >= 0
    np.testing.assert_array_equal(out[1], out[0] + 10_000)  # one permutation for every channel
    covered = _boxes_mask(dims, zip(starts, sizes))
    np.testing.assert_array_equal(out[:, ~covered], x[:, ~covered])
    assert not np.array_equal(out, x)
    checked = 0
    for k, (a, n) in enumerate(zip(starts, sizes)):
        later = _boxes_mask(dims, zip(starts[k + 1:], sizes[k + 1:]))
        box = _boxes_mask(dims, [(a, n)])
        if (later & box).any():
            continue  # partly overwritten by a later block
        checked += 1
        np.testing.assert_array_equal(np.sort(out[0][box]), np.sort(x[0][box]))
    assert checked > 100


def test_in_painting_changes_only_inside_its_boxes():
    x = np.full((2, 64, 64, 32), 5.0, np.float32)  # outside the noise's [0, 1)
    counts = set()
    for seed in range(30):
        out, boxes = in_paint(x, np.random.default_rng(seed))
        counts.add(len(boxes))
        assert len(boxes) <= 5
        mask = _boxes_mask(x.shape[1:], boxes)
        np.testing.assert_array_equal(out[:, ~mask], x[:, ~mask])
        assert np.all(out[:, mask] < 1) and np.all(out[:, mask] >= 0)
        np.testing.assert_array_equal(out[0], out[1])  # one noise volume for every channel
        for start, size in boxes:
            assert all(d // 6 <= n <= d // 3 for n, d in zip(size, (64, 64, 32)))
            assert all(3 <= a and a + n <= d - 3 for a, n, d in zip(start, size, (64, 64, 32)))
    assert {1, 5} <= counts


def test_out_painting_keeps_only_inside_its_boxes():
    x = np.full((1, 64, 64, 32), 5.0, np.float32)
    counts = set()
    for seed in range(30):
        out, boxes = out_paint(x, np.random.default_rng(seed))
        counts.add(len(boxes))
        assert 1 <= len(boxes) <= 5
        mask = _boxes_mask(x.shape[1:], boxes)
        assert np.all(out[:, mask] == 5.0)
        assert np.all(out[:, ~mask] < 1) and np.all(out[:, ~mask] >= 0)
        for start, size in boxes:
            # 64: side 64 - (27..36) = 28..37; 32: side 32 - (13..18) = 14..19.
            assert all(d - 4 * d // 7 <= n <= d - 3 * d // 7 for n, d in zip(size, (64, 64, 32)))
            assert all(3 <= a and a + n <= d - 3 for a, n, d in zip(start, size, (64, 64, 32)))
    assert {1, 5} <= counts


def test_painting_fits_small_cubes():
    x = np.full((1, 16, 16, 8), 5.0, np.float32)
    for seed in range(20):
        for paint in (in_paint, out_paint):
            out, boxes = paint(x, np.random.default_rng(seed))
            assert out.shape == x.shape
            assert all(0 <= a and a + n <= d for b in boxes for a, n, d in zip(*b, x.shape[1:]))


def test_flips_as_the_official_code():
    draws = [random_flips(np.random.default_rng(s), 0.4) for s in range(300)]
    axes = {a for d in draws for a in d}
    assert axes == {None, 0, 1}  # the channel pick (no flip), X, Y; never Z
    assert max(len(d) for d in draws) == 3 and sum(not d for d in draws) > 100  # P(no flip) = 0.6
    assert {a for s in range(300) for a in random_flips(np.random.default_rng(s), 0.4, "xyz")} == {0, 1, 2}
    assert random_flips(np.random.default_rng(0), 0.0) == []
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(apply_flips(x, [0, None, 2]), x[:, ::-1, :, ::-1])
    assert apply_flips(x, [1]).flags.c_contiguous


# ---------------------------------------------------------------------------------------- dataset


def _expected_cube(pool, cid, start):
    """The cube of the prepared volume mapped to [0, 1] by the scan's MR clip window, written out."""
    norm = pool.case(cid)["stats"]["normalisation"]
    (lo, hi), mean, std = norm["clip"][0], norm["mean"][0], norm["std"][0]
    volume = np.asarray(pool.image(cid))[0] * std + mean  # back to the clipped intensities
    cube = np.zeros(PATCH, np.float32)  # the padding: the lower clip value, i.e. 0
    src = tuple(slice(max(a, 0), min(a + p, d)) for a, p, d in zip(start, PATCH, volume.shape))
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, start))
    cube[dst] = (volume[src] - lo) / (hi - lo)
    return np.clip(cube, 0, 1)[None]


def test_target_is_the_uncorrupted_cube(pool):
    ds = ModelsGenesisDataset(pool, _cfg())
    kinds, padded = set(), False
    for i in range(12):
        s = ds.synthesize(i, keep_stages=True)
        assert s.image.shape == s.target.shape == (1, *PATCH) and s.image.dtype == s.target.dtype == np.float32
        assert not np.shares_memory(s.image, s.target)
        padded |= any(a < 0 for a in s.start)
        np.testing.assert_allclose(s.target, apply_flips(_expected_cube(pool, s.case, s.start), s.flips), atol=2e-5)
        # The input is the last stage that ran, each stage made from the one before.
        x = s.target
        if s.shuffle is not None:
            starts, sizes = s.shuffle
            assert len(starts) == 10_000 and np.all(sizes <= [3, 3, 3])
            x = s.stages["shuffle"]
        if s.curve is not None:
            np.testing.assert_array_equal(s.stages["curve"], apply_curve(x, s.curve["p1"], s.curve["p2"],
                                                                          s.curve["decreasing"]))
            x = s.stages["curve"]
        if s.paint is not None:
            kinds.add(s.paint)
            mask = _boxes_mask(PATCH, s.boxes)
            kept = ~mask if s.paint == "in" else mask
            np.testing.assert_array_equal(s.stages["paint"][:, kept], x[:, kept])
            x = s.stages["paint"]
        np.testing.assert_array_equal(s.image, x)
        item = ds[i]
        assert torch.equal(item["image"], torch.from_numpy(s.image))
        assert torch.equal(item["target"], torch.from_numpy(s.target))
    assert padded and kinds == {"in", "out"}


def test_rates_switch_each_step(pool):
    off = ModelsGenesisDataset(pool, _cfg(flip_rate=0, local_rate=0, nonlinear_rate=0, paint_rate=0))
    on = ModelsGenesisDataset(pool, _cfg(local_rate=1, nonlinear_rate=1, paint_rate=1, inpaint_rate=1,
                                         shuffle_blocks=50))
    out = ModelsGenesisDataset(pool, _cfg(paint_rate=1, inpaint_rate=0))
    for i in range(4):
        s = off.synthesize(i)
        assert not s.flips and s.shuffle is None and s.curve is None and s.paint is None
        np.testing.assert_array_equal(s.image, s.target)
        t = on.synthesize(i)
        assert t.shuffle is not None and len(t.shuffle[0]) == 50 and t.curve is not None and t.paint == "in"
        assert out.synthesize(i).paint == "out"
        # The cube does not depend on the corruption settings (its own stream).
        np.testing.assert_array_equal(t.target, apply_flips(s.target, t.flips))


def test_intensity_windows(pool):
    assert intensity_window({"stats": {"normalisation": {"modality": "CT", "window": [-175, 250]}}}, 2) == [(0, 1)] * 2
    mr = {"stats": {"normalisation": {"modality": "MR", "clip": [[10.0, 110.0]], "mean": [60.0], "std": [25.0]}}}
    assert intensity_window(mr, 1) == [(-2.0, 2.0)]
    assert intensity_window({"stats": {}}, 1) is None
    ds = ModelsGenesisDataset(pool, _cfg(intensity="crop"))
    for i in range(4):
        _, _, cube = ds.cube(i)
        assert cube.min() == 0 and cube.max() == pytest.approx(1)


def test_sample_is_a_function_of_seed_and_index(pool):
    a = ModelsGenesisDataset(pool, _cfg(seed=3))
    b = ModelsGenesisDataset(PreparedData(pool.root), _cfg(seed=3))
    for i in (0, 7, 2**40 + 5):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["target"], ModelsGenesisDataset(pool, _cfg(seed=4))[0]["target"])


# ---------------------------------------------------------------------------------------- config, module, job


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"inpaint_rate.*within \[0, 1\].*inpaint_rate 0.2"):
        _cfg(inpaint_rate=1.5)
    with pytest.raises(ConfigError, match="unetr-small' is a vit network.*set model to one of.*unet-large"):
        _cfg(model="unetr-small")
    with pytest.raises(ConfigError, match="shuffle_blocks.*local_rate: 0"):
        _cfg(shuffle_blocks=-1)
    with pytest.raises(ConfigError, match=r"lr_step_factor.*\(0, 1\]"):
        _cfg(lr_step_factor=0)
    with pytest.raises(ConfigError, match="flip_axes"):
        _cfg(flip_axes="z")
    with pytest.raises(ConfigError, match="two schedules; keep one"):
        _cfg(schedule="step", lr_schedule="warmup-constant")


def test_presets():
    cpu = pretrain_config("models-genesis", preset="cpu")
    assert (cpu.model, cpu.patch, cpu.batch, cpu.steps, cpu.optimizer) == ("unet", (64, 64, 32), 2, 600, "adamw")
    assert (cpu.flip_rate, cpu.local_rate, cpu.nonlinear_rate, cpu.paint_rate, cpu.inpaint_rate) == (0.4, 0.5, 0.9,
                                                                                                      0.9, 0.2)
    paper = pretrain_config("models-genesis", preset="paper")
    assert (paper.model, paper.patch, paper.batch, paper.optimizer, paper.lr) == ("unet-large", (64, 64, 32), 6,
                                                                                   "sgd", 1.0)
    assert paper.weight_decay == 0 and paper.schedule == "step" and paper.sgd_momentum == 0.9
    assert [step_factor(s, paper.lr_step_every, paper.lr_step_factor) for s in (0, 94_999, 95_000, 190_000)] == [
        1.0, 1.0, 0.5, 0.25]
    smoke = pretrain_config("models-genesis", preset="smoke")
    assert smoke.patch == PATCH and smoke.steps == 2 and smoke.num_workers == 0
    m = get_method("models-genesis")
    assert m.needs_data and m.models == ("cnn",) and m.supports("unet") and not m.supports("swinunetr")


def test_loss_and_exported_network():
    # sigmoid(0) = 1/2 everywhere: 0 against 1/2, (1/2 - 1)^2 = 1/4 against 1; linear: (0.2 - 0.5)^2 = 0.09.
    zeros = torch.zeros(2, 1, 4, 4, 4)
    assert restoration_loss(zeros, torch.full_like(zeros, 0.5)).item() == 0
    assert restoration_loss(zeros, torch.ones_like(zeros)).item() == pytest.approx(0.25)
    assert restoration_loss(zeros + 0.2, zeros + 0.5, "linear").item() == pytest.approx(0.09)
    cfg = pretrain_config("models-genesis", preset="smoke")
    module = ModelsGenesisModule(cfg)
    net = build_model(cfg.model, 1, 1, cfg.patch, **cfg.model_options)
    assert set(module.exported_state_dict()) == set(net.state_dict())
    x = torch.rand(1, 1, *cfg.patch)
    y = module(x)
    assert y.shape == x.shape and y.min() > 0 and y.max() < 1
    loss = module.losses({"image": x, "target": x})["loss"]
    assert loss.item() == pytest.approx(torch.mean((y - x) ** 2).item(), rel=1e-5)
    step = ModelsGenesisModule(pretrain_config("models-genesis", preset="paper", overrides={
        "model": "unet", "patch": PATCH, "lr_step_every": 3}))
    opt = step.configure_optimizers()
    assert isinstance(opt["optimizer"], torch.optim.SGD) and opt["optimizer"].param_groups[0]["momentum"] == 0.9
    assert [opt["lr_scheduler"]["scheduler"].lr_lambdas[0](s) for s in (0, 2, 3, 7)] == [1.0, 1.0, 0.5, 0.25]


def test_pretext_baselines_are_the_better_trivial_guess(pool):
    cfg = _cfg()
    ds = ModelsGenesisDataset(pool, cfg)
    [b] = get_method("models-genesis").pretext_baselines(cfg, ds, 4)
    items = [ds[10**12 + i] for i in range(4)]
    image = torch.stack([s["image"] for s in items])
    target = torch.stack([s["target"] for s in items])
    identity = torch.mean((image - target) ** 2).item()
    mean = torch.mean((target - target.mean()) ** 2).item()
    assert b.term == "loss" and b.perfect == 0 and b.samples == 4
    assert b.trivial == pytest.approx(min(identity, mean), rel=1e-5) and b.trivial > 0
    assert b.trivial_is.startswith("min(identity")


def test_pretrain_two_steps_writes_model_and_pretext(pool, tmp_path):
    cfg = pretrain_config("models-genesis", preset="smoke")
    run = pretrain("models-genesis", pool.root, tmp_path / "run", cfg)
    saved = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    assert saved["kind"] == "pretrain:models-genesis" and saved["global_step"] == 2
    assert saved["in_channels"] == saved["out_channels"] == 1
    net = build_model(cfg.model, 1, 1, cfg.patch, **cfg.model_options)
    assert set(saved["state_dict"]) == set(net.state_dict())
    report = json.loads((run / "pretext.json").read_text(encoding="utf-8"))
    assert set(report) == {"loss"} and report["loss"]["trivial"] > report["loss"]["perfect"] == 0
    assert report["loss"]["final"] is not None
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert info["method"] == "models-genesis"
