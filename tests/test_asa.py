"""ASA pretraining: sub-volume shuffling and order targets, phase-2 views and their matched tokens, the EMA
teacher and projection-head blocks, the dataset, and one phase-1 + phase-2 run exporting the teacher.

Every data test reads a real pool: small NIfTI volumes written to tmp_path and prepared with ``prepare(pool=...)``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from _niftis import prepared_pool, smooth_scan
from medpretrain.blocks import ProjectionHead, cosine_momentum, ema_update, make_teacher
from medpretrain.data.cache import PreparedData
from medpretrain.engine.pretrain import ddp_allowing_unused_parameters, pretrain, pretrain_config
from medpretrain.methods import get_method
from medpretrain.errors import ConfigError
from medpretrain.methods.asa import (
    ASAConfig, ASADataset, ASAModule, crop_views, decode, encode, order_targets, overlap_token_pairs, phase_of_step,
    shuffle_subvolumes, to_subvolumes, token_stage, unshuffle_subvolumes,
)
from medpretrain.data.crops import read_crop
from medpretrain.models import build_model, get_spec, load_weights

SHAPES = [(40, 36, 30), (44, 40, 36)]


def _pool(root, shapes) -> PreparedData:
    return prepared_pool(root, [smooth_scan(shape, i) for i, shape in enumerate(shapes)])


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> PreparedData:
    return _pool(tmp_path_factory.mktemp("asa"), SHAPES)


# ---------------------------------------------------------------------------------------- sub-volumes


def test_shuffle_then_inverse_restores_exactly():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 32, 32, 32, generator=gen)
    perm = torch.stack([torch.randperm(64, generator=gen) for _ in range(2)])
    shuffled = shuffle_subvolumes(x, perm, 8)
    assert not torch.equal(shuffled, x)
    assert torch.equal(unshuffle_subvolumes(shuffled, perm, 8), x)
    # Slot j of the shuffled volume holds sub-volume perm[j] of the original, at row-major grid positions.
    for b in range(2):
        for j in (0, 5, 63):
            src = np.unravel_index(int(perm[b, j]), (4, 4, 4))
            dst = np.unravel_index(j, (4, 4, 4))
            a = x[b, :, src[0] * 8:src[0] * 8 + 8, src[1] * 8:src[1] * 8 + 8, src[2] * 8:src[2] * 8 + 8]
            s = shuffled[b, :, dst[0] * 8:dst[0] * 8 + 8, dst[1] * 8:dst[1] * 8 + 8, dst[2] * 8:dst[2] * 8 + 8]
            assert torch.equal(a, s)
    with pytest.raises(ValueError, match="sub-volumes"):
        shuffle_subvolumes(torch.zeros(1, 1, 30, 32, 32), perm[:1], 8)


def test_order_targets_match_the_permutation():
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))[None]
    coords = order_targets(perm, (4, 4, 4), "coords")
    assert coords.shape == (1, 64, 3) and coords.min() == 0 and coords.max() == 1
    expected = np.stack(np.unravel_index(perm[0].numpy(), (4, 4, 4)), -1) / 3.0
    np.testing.assert_allclose(coords[0].numpy(), expected, rtol=0, atol=1e-7)
    index = order_targets(perm, (4, 4, 4), "index")
    assert index.shape == (1, 64, 1)
    np.testing.assert_allclose(index[0, :, 0].numpy(), perm[0].numpy() / 63.0, rtol=0, atol=1e-7)
    # The target of slot j names where that slot's content sits in the original: the volume's coordinates.
    x = torch.arange(32**3, dtype=torch.float32).reshape(1, 1, 32, 32, 32)
    tiles, _ = to_subvolumes(shuffle_subvolumes(x, perm, 8), 8)
    corner = tiles[0, :, 0, 0, 0, 0].long()  # first voxel of each slot = its source's origin
    source = np.stack(np.unravel_index(corner.numpy(), (32, 32, 32)), -1) // 8
    np.testing.assert_allclose(source / 3.0, coords[0].numpy(), atol=1e-7)


# ---------------------------------------------------------------------------------------- phase-2 views


def test_phase2_crops_overlap_on_whole_subvolumes_and_pairs_cover_exactly_the_overlap(pool):
    cfg = ASAConfig(crop=None)  # (None is a YAML value; command-line overrides of None mean "not given")
    v, s, u = cfg.patch[0], cfg.sub_volume, cfg.upsampled  # 64, 16, 80
    ds = ASADataset(pool, cfg)
    # Every voxel of the up-sampled cube has its own value: equal values mean the same position.
    up = torch.arange(u**3, dtype=torch.float32).reshape(1, 1, u, u, u)
    seen = set()
    for i in range(40):
        o1, o2 = ds.sample(i).offsets
        assert (o1 % s == 0).all() and (o2 % s == 0).all() and (o1 >= 0).all() and (o2 + v <= u).all()
        assert (o1 != o2).any()  # the two views always differ
        seen.add((tuple(o1), tuple(o2)))
        v1 = crop_views(up, torch.from_numpy(o1[None]), v)[0]
        v2 = crop_views(up, torch.from_numpy(o2[None]), v)[0]
        idx1, idx2 = overlap_token_pairs(o1, o2, v, s)
        overlap = v - np.abs(o1 - o2)
        assert len(idx1) == len(idx2) == int(np.prod(overlap // s))
        t1, _ = to_subvolumes(v1[None], s)
        t2, _ = to_subvolumes(v2[None], s)
        assert torch.equal(t1[0, idx1], t2[0, idx2])  # matched tokens are the same sub-volume
        # The matched sub-volumes of crop 1 are exactly the overlap box, nothing more, nothing less.
        covered = np.zeros((u, u, u), bool)
        for p in idx1:
            gx, gy, gz = np.unravel_index(p, (v // s,) * 3)
            a = o1 + np.array([gx, gy, gz]) * s
            covered[a[0]:a[0] + s, a[1]:a[1] + s, a[2]:a[2] + s] = True
        box = np.zeros((u, u, u), bool)
        lo, hi = np.maximum(o1, o2), np.minimum(o1, o2) + v
        box[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
        assert np.array_equal(covered, box)
    assert len(seen) > 20  # 8 positions per view at 80 -> 64: many different pairs
    # Crops that do not overlap share no token; offsets off the grid are refused.
    assert overlap_token_pairs((0, 0, 0), (64, 0, 0), 64, 16)[0].size == 0
    with pytest.raises(ValueError, match="multiples"):
        overlap_token_pairs((0, 0, 8), (0, 0, 0), 64, 16)


# ---------------------------------------------------------------------------------------- shared blocks


def test_ema_update_arithmetic_and_cosine_schedule():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()(torch.randn(8, 4))  # moves the running statistics (buffers)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = 0.9
    ema_update(teacher, student, m)
    for name, s in student.named_parameters():
        torch.testing.assert_close(dict(teacher.named_parameters())[name], m * t0[name] + (1 - m) * s.detach())
    for name, b in student.named_buffers():
        assert torch.equal(dict(teacher.named_buffers())[name], b)  # buffers are copied by default
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 1.0, buffers="keep")
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(dict(student.named_parameters())[k], p) for k, p in teacher.named_parameters())
    with pytest.raises(ValueError, match="make_teacher"):
        ema_update(nn.Linear(4, 2), student, 0.5)
    with pytest.raises(ValueError, match="within"):
        ema_update(teacher, student, 1.5)

    assert cosine_momentum(0, 100) == 0.999 and cosine_momentum(100, 100) == 1.0
    assert cosine_momentum(250, 100) == 1.0
    assert math.isclose(cosine_momentum(50, 100), (0.999 + 1.0) / 2)
    values = [cosine_momentum(s, 10, 0.99, 1.0) for s in range(11)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_projection_heads():
    head = ProjectionHead(12, 5, hidden_dim=7)
    assert [tuple(layer.weight.shape) for layer in head.layers] == [(7, 12), (5, 7)]
    assert head(torch.randn(3, 12)).shape == (3, 5) and head(torch.randn(2, 9, 12)).shape == (2, 9, 5)
    dino = ProjectionHead(12, 40, hidden_dim=16, n_layers=3, bottleneck_dim=8, normalize_bottleneck=True,
                          weight_norm_last=True, norm="batch")
    assert len(dino.layers) == 3 and dino.layers[-1].out_features == 8
    assert dino(torch.randn(2, 6, 12)).shape == (2, 6, 40)
    g = dino.last.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    with pytest.raises(ValueError, match="bottleneck_dim"):
        ProjectionHead(4, 4, normalize_bottleneck=True)
    with pytest.raises(ValueError, match="last axis"):
        head(torch.randn(2, 11))


# ---------------------------------------------------------------------------------------- config, data


def test_config_presets_and_refusals():
    cpu = pretrain_config("asa", preset="cpu")
    assert cpu.model == "swinunetr-small" and cpu.patch == (64, 64, 64) and cpu.sub_volume == 16
    assert cpu.grid == 4 and cpu.upsampled == 80
    paper = pretrain_config("asa", preset="paper")
    assert (paper.model, paper.patch, paper.sub_volume, paper.upsampled, paper.crop) == (
        "swinunetr", (128, 128, 128), 16, 160, None)
    assert paper.grid**3 == 512 and paper.optimizer == "adamw" and not paper.teacher_sees_shuffled
    authors = pretrain_config("asa", preset="authors")
    assert authors.teacher_sees_shuffled and not authors.normalize_local
    assert (authors.optimizer, authors.lr, authors.sgd_momentum) == ("sgd", 1e-3, 0.9)
    assert (authors.consistency_distance, authors.global_stage) == ("mse", "tokens")
    assert (paper.consistency_distance, paper.global_stage) == ("squared_l2", "deepest")
    # The engine runs every DDP flavour, and "auto" on several devices (which Lightning makes DDP), tolerates the parameters
    # each phase leaves without gradient; one device stays as it is.
    for overrides, strategy in [({"strategy": "ddp"}, "ddp_find_unused_parameters_true"),
                                ({"strategy": "ddp_spawn"}, "ddp_spawn_find_unused_parameters_true"),
                                ({"devices": 2}, "ddp_find_unused_parameters_true"),
                                ({"num_nodes": 2}, "ddp_find_unused_parameters_true"), ({}, "auto")]:
        assert ddp_allowing_unused_parameters(pretrain_config("asa", overrides=overrides)).strategy == strategy
    assert get_method("asa").unused_parameters
    for bad, match in [({"patch": (64, 64, 32)}, "cube"), ({"upsampled": 70}, "upsampled >= 80"),
                       ({"upsampled": 128}, "upsampled < 128"),
                       ({"sub_volume": 12}, "power|2, 4, 8"), ({"patch": (80, 80, 80), "sub_volume": 32}, "multiple"),
                       ({"lambda_global": 0, "lambda_local": 0}, "phase 2"), ({"ema_momentum": (1.0, 0.9)}, "base")]:
        with pytest.raises(ConfigError, match=match):
            pretrain_config("asa", overrides=bad)
    # Phase 2 alone needs no phase-1 weight, and the other way round.
    pretrain_config("asa", overrides={"phase_steps": (0, 1), "lambda_vop": 0, "lambda_var": 0, "lambda_global": 0})
    assert [phase_of_step(s, (2, 1)) for s in range(6)] == [1, 1, 2, 1, 1, 2]
    with pytest.raises(ConfigError, match="Swin UNETR"):
        ASAModule(pretrain_config("asa", overrides={"model": "unet"}))


def test_consistency_distance_mse_is_the_squared_l2_distance_averaged_over_the_width():
    a, b = torch.randn(3, 256), torch.randn(3, 256)
    paper = ASAModule(pretrain_config("asa", preset="cpu"))
    authors = ASAModule(pretrain_config("asa", overrides={"consistency_distance": "mse"}))
    unit = F.normalize(a, dim=-1) - F.normalize(b, dim=-1)
    assert torch.allclose(paper.consistency_loss(a, b), unit.pow(2).sum(-1).mean())
    assert torch.allclose(authors.consistency_loss(a, b), F.mse_loss(F.normalize(a, dim=-1), F.normalize(b, dim=-1)))
    # Without normalisation both are the plain MSE.
    assert torch.allclose(authors.consistency_loss(a, b, False), F.mse_loss(a, b))
    assert torch.allclose(paper.consistency_loss(a, b, False), F.mse_loss(a, b))


def test_dataset_samples_are_pure_and_read_the_pool(pool):
    cfg = pretrain_config("asa")  # crop (64, 64, 64) = the cube: native resolution, padded scans
    ds = ASADataset(pool, cfg)
    assert ds.cases_per_pass == 2
    # Every pass visits each case once.
    for p in range(3):
        assert sorted(ds.case_of(2 * p + k) for k in range(2)) == ["scan_0", "scan_1"]
    fresh = ASADataset(PreparedData(pool.root), cfg)
    for i in (0, 3, 11):
        a, b = ds.sample(i), fresh.sample(i)
        assert a.case == b.case and np.array_equal(a.image, b.image) and np.array_equal(a.perm, b.perm)
        assert np.array_equal(a.offsets, b.offsets)
        assert a.image.shape == (1, 64, 64, 64) and sorted(a.perm) == list(range(64))
        volume = np.asarray(pool.image(a.case))
        fill = float(volume.min())  # the MR background: the lower clip after z-scoring
        np.testing.assert_array_equal(a.image, read_crop(volume, a.start, a.region, [fill]))
    item = ds[0]
    assert item["image"].dtype == torch.float32 and item["perm"].dtype == item["offsets"].dtype == torch.int64
    whole = ASADataset(pool, ASAConfig(crop=None)).sample(0)
    assert whole.region == tuple(pool.case(whole.case)["shape"][1:]) and whole.image.shape == (1, 64, 64, 64)
    with pytest.raises(ConfigError, match="in_channels: 1"):
        ASADataset(pool, pretrain_config("asa", overrides={"in_channels": 2}))


# ---------------------------------------------------------------------------------------- network


def test_decoder_from_hidden_states_equals_forward_and_tokens_tile_the_subvolumes():
    torch.manual_seed(0)
    net = build_model("swinunetr-small", 1, 1, (64, 64, 64), depths=(1, 1, 1, 1)).eval()
    assert token_stage(net, 16) == 3 and token_stage(net, 8) == 2
    with pytest.raises(ConfigError, match="strides"):
        token_stage(net, 64)
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        hidden = encode(net, x)
        torch.testing.assert_close(decode(net, x, hidden), net(x))
    assert hidden[3].shape[2:] == (4, 4, 4)  # one stride-16 token per 16^3 sub-volume of the 64^3 cube


def test_teacher_update_moves_network_and_heads():
    module = ASAModule(pretrain_config("asa", overrides={"model_options": {"depths": (1, 1, 1, 1)}}))
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert {id(p) for p in module.student_parameters()}.isdisjoint({id(p) for p in module.teacher.parameters()})
    module.train()
    assert not module.teacher.training and module.student.training
    with torch.no_grad():
        for p in module.student_parameters():
            p.add_(1.0)
    t0 = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    h0 = {k: v.clone() for k, v in module.teacher_proj.state_dict().items()}
    m = module.update_teacher(0)
    assert m == module.cfg.ema_schedule()[0] < 0.999  # auto: the base that suits a 600-step run
    for name, p in module.teacher.named_parameters():
        torch.testing.assert_close(p, m * t0[name] + (1 - m) * dict(module.student.named_parameters())[name])
    for name, p in module.teacher_proj.named_parameters():
        torch.testing.assert_close(p, m * h0[name] + (1 - m) * dict(module.student_proj.named_parameters())[name])
    module.set_pass_length(5)  # batch 2: ceil(5 / 2) steps per phase
    assert module.phase_steps == (3, 3) and [module.phase(s) for s in (0, 2, 3, 5, 6)] == [1, 1, 2, 2, 1]


# ---------------------------------------------------------------------------------------- end to end


class _Record(Callback):
    """Keeps each step's logged values and checks the teacher's EMA step on one weight of the real run."""

    def __init__(self):
        self.logged = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.step = trainer.global_step
        self.teacher_before = module.teacher.swinViT.patch_embed.proj.weight.detach().clone()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.logged.append(dict(trainer.logged_metrics))
        m = cosine_momentum(self.step, module.cfg.steps, *module.cfg.ema_schedule())
        student = module.student.swinViT.patch_embed.proj.weight.detach()
        torch.testing.assert_close(module.teacher.swinViT.patch_embed.proj.weight,
                                   m * self.teacher_before + (1 - m) * student)
        assert not torch.equal(module.teacher.swinViT.patch_embed.proj.weight, self.teacher_before)


def test_one_phase1_and_one_phase2_step_export_the_teacher(tmp_path):
    """The CPU preset (swinunetr-small, 64^3 cube, 16^3 sub-volumes, 80^3 phase 2), whole scans resized; a
    one-scan pool at batch 1 makes the default alternation (one pass per phase) one step of each."""
    data = _pool(tmp_path / "one", SHAPES[:1])
    cfg = ASAConfig(steps=2, batch=1, crop=None, checkpoint_every=2, num_workers=0, precision="32-true")
    assert cfg.model_dump(exclude={"steps", "batch", "crop", "checkpoint_every", "num_workers", "precision"}) == \
        pretrain_config("asa", preset="cpu").model_dump(exclude={"steps", "batch", "crop", "checkpoint_every",
                                                                 "num_workers", "precision"})
    record = _Record()
    run = pretrain("asa", data.root, tmp_path / "run", cfg, callbacks=[record])
    first, second = record.logged
    p1 = {"train/p1_order", "train/p1_appearance", "train/p1_global"}
    p2 = {"train/p2_global", "train/p2_local"}
    assert first["train/phase"] == 1 and second["train/phase"] == 2
    # Each row measures its own phase's losses; the other phase's are NaN, not a stale repeat.
    assert all(math.isfinite(float(first[k])) for k in p1) and all(math.isfinite(float(second[k])) for k in p2)
    assert all(math.isnan(float(second[k])) for k in p1) and all(math.isnan(float(first[k])) for k in p2)
    assert all(math.isfinite(float(v)) for log in record.logged for k, v in log.items() if k not in p1 | p2)

    saved = torch.load(run / "model.pt", weights_only=False)
    assert saved["kind"] == "pretrain:asa" and saved["global_step"] == 2 and saved["network"] == "teacher"
    assert saved["model"] == "swinunetr-small" and saved["in_channels"] == saved["out_channels"] == 1
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    teacher = {k[len("teacher."):]: v for k, v in ckpt.items() if k.startswith("teacher.")}
    student = {k[len("student."):]: v for k, v in ckpt.items() if k.startswith("student.")}
    assert teacher.keys() == saved["state_dict"].keys() == student.keys()
    assert all(torch.equal(saved["state_dict"][k], teacher[k]) for k in teacher)  # model.pt is the teacher
    changed = [k for k in student if student[k].is_floating_point() and not torch.equal(student[k], teacher[k])]
    assert changed  # ... not the student, which the optimiser moved further
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert info["method"] == "asa" and info["config"]["sub_volume"] == 16

    # Downstream: everything but the intensity head loads into a Swin UNETR, even one whose head has the
    # intensity head's shape (one output channel).
    for classes in (3, 1):
        target = build_model("swinunetr-small", 1, classes, (64, 64, 64))
        report = load_weights(target, get_spec("swinunetr-small"), run / "model.pt", part="all")
        assert set(report.not_requested) == {"out.conv.conv.weight", "out.conv.conv.bias"}
        assert not report.missing and not report.shape_mismatch and not report.unexpected


def test_a_checkpoint_from_before_the_teacher_rename_resumes():
    """Older ASA checkpoints hold the teacher under ``model.``: loading renames it, so their runs resume."""
    module = ASAModule(pretrain_config("asa", preset="smoke"))
    state = {("model." + k[len("teacher."):] if k.startswith("teacher.") else k): v.clone() + 1
             for k, v in module.state_dict().items()}
    ckpt = {"state_dict": dict(state)}
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])
    key = "swinViT.patch_embed.proj.weight"
    assert torch.equal(module.teacher.state_dict()[key], state["model." + key])
