"""Swin UNETR SSL pretraining (Tang et al. 2022): rotation labels and targets, cutout, NT-Xent on known
embeddings, the dataset's purity, what the method exports, the MONAI published-encoder layout, and a 2-step run.

Every data test reads a real pool: small NIfTI volumes written to tmp_path and prepared with ``prepare(pool=...)``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from _niftis import prepared_pool
from medpretrain.engine.pretrain import pretrain, pretrain_config
from medpretrain.methods import get_method
from medpretrain.methods.swinunetr_ssl import (
    SwinSSLConfig, SwinSSLDataset, cutout_mask, draw_boxes, fill_noise, nt_xent, nt_xent_collapsed, nt_xent_floor,
    rotate, to_monai_ssl_checkpoint,
)
from medpretrain.models import build_model, get_spec, load_weights

NAME = "swinunetr-ssl"
PATCH = (64, 64, 64)
# The smoke preset's network: one block and one head per stage (fast), swinunetr-small's width.
TINY = {"depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}


def _scan(shape, seed):
    # Smooth structure plus noise: no symmetry, so a rotated crop differs from the crop.
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return (100.0 + 30.0 * (g[0] + 2 * g[1] ** 2 - g[2] ** 3) + rng.normal(0, 5.0, shape)).astype(np.float32)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return prepared_pool(tmp_path_factory.mktemp("swinssl"), [_scan(s, i) for i, s in
                                                              enumerate([(72, 70, 68), (66, 68, 64)])])


def _cfg(**kw) -> SwinSSLConfig:
    return SwinSSLConfig(**{"model_options": TINY, "patch": PATCH, "batch": 1, "crops": 2, "contrast_dim": 16,
                            **kw})


# ------------------------------------------------------------------------------------------- views


def test_rotate_matches_torch_and_four_turns_are_the_identity():
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 5)).astype(np.float32)
    for k in range(4):
        r = rotate(x, k, (1, 2))
        assert np.array_equal(r, torch.rot90(torch.from_numpy(x), k, (2, 3)).numpy())  # the reference's call
        assert np.array_equal(rotate(r, -k, (1, 2)), x)
    assert np.array_equal(rotate(x, 1, (1, 2))[:, :, 4, 0], x[:, :, 0, 0])  # from Y towards Z


def test_rotation_labels_and_targets_are_consistent(pool):
    cfg = _cfg(seed=3)
    ds = SwinSSLDataset(pool, cfg)
    seen = set()
    for index in range(4):
        s = ds.sample(index)
        item = ds[index]
        assert item["view"].shape == item["target"].shape == (cfg.crops, 2, 1, *PATCH)
        for c, pair in enumerate(s.views):
            for v, view in enumerate(pair):
                assert int(item["rot"][c, v]) == view.rotation
                assert np.array_equal(item["target"][c, v].numpy(), view.target)
                # Rotating the target back by its label recovers the crop exactly.
                assert np.array_equal(rotate(view.target, -view.rotation, cfg.rotation_plane), s.crops[c])
                if view.rotation:
                    assert not np.array_equal(view.target, s.crops[c])
                seen.add(view.rotation)
    assert seen == {0, 1, 2, 3}


def test_cutout_changes_only_inside_its_boxes(pool):
    cfg = _cfg(seed=1, donor_probability=1.0)
    ds = SwinSSLDataset(pool, cfg)
    checked = 0
    for index in range(3):
        sample = ds.sample(index)
        lo, hi = ds._range[sample.case][0]  # MR pool: the scan's z-scored clip range
        for pair in sample.views:
            for view in pair:
                boxes = view.noise_boxes + view.donor_boxes
                inside = cutout_mask(PATCH, boxes)[None]
                assert np.array_equal(view.view[~inside], view.target[~inside])
                if not boxes:
                    continue
                checked += 1
                assert not np.array_equal(view.view[inside], view.target[inside])
                donor = cutout_mask(PATCH, view.donor_boxes)[None]
                noise_only = inside & ~donor
                assert np.array_equal(view.view[donor], view.donor[donor])
                assert view.view[noise_only].min() >= lo - 1e-5 and view.view[noise_only].max() <= hi + 1e-5
    assert checked


def test_cutout_boxes_and_noise():
    rng = np.random.default_rng(0)
    shape = (64, 64, 64)
    covered = []
    for _ in range(50):
        boxes = draw_boxes(shape, rng, 0.3, 0.05, 0.25)
        total = 0
        for (a, b) in boxes:
            sides = [hi - lo for lo, hi in zip(a, b)]
            assert all(0 <= lo < hi <= 64 for lo, hi in zip(a, b)) and all(1 <= s < 16 for s in sides)
            total += math.prod(sides)
        covered.append(total / 64**3)
        # Boxes are added until their summed volume reaches a share drawn from [0, 0.3]: never one too many.
        if boxes:
            last = math.prod(h - l for l, h in zip(*boxes[-1]))
            assert (total - last) / 64**3 < 0.3
    assert 0.05 < np.mean(covered) < 0.3
    view = np.zeros((2, 8, 8, 8), np.float32)
    fill_noise(view, [((1, 1, 1), (5, 6, 7))], rng, [(0.0, 1.0), (-2.0, 3.0)])
    box = view[:, 1:5, 1:6, 1:7]
    # Noise min-max scaled to [0, 1] over the whole box (all channels, as the reference), then into each
    # channel's range: the unit values span exactly [0, 1] and every channel stays within its range.
    unit = np.concatenate([box[0].ravel(), (box[1].ravel() + 2.0) / 5.0])
    assert unit.min() == pytest.approx(0.0, abs=1e-6) and unit.max() == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= box[0].min() and box[0].max() <= 1.0 and -2.0 <= box[1].min() and box[1].max() <= 3.0
    assert (view[:, 0] == 0).all() and (view[:, 5:] == 0).all()


def test_donor_probability_defaults_to_the_reference_batch_rule():
    assert _cfg(batch=2, crops=2).donor_chance == pytest.approx(0.75)  # a batch index other than its own
    assert _cfg(batch=1, crops=2).donor_chance == pytest.approx(0.5)
    assert _cfg(donor_probability=0.0).donor_chance == 0.0


# ------------------------------------------------------------------------------------------- loss


def test_nt_xent_equals_the_hand_computed_value():
    t = 0.5
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # norms differ: the loss normalises
    b = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    # Normalised: a0 = (1, 0), a1 = (0, 1), b0 = (0.6, 0.8), b1 = (0, 1). Rows a0, a1, b0, b1; positives a_i-b_i.
    z = [(1.0, 0.0), (0.0, 1.0), (0.6, 0.8), (0.0, 1.0)]
    pos = {0: 2, 1: 3, 2: 0, 3: 1}
    total = 0.0
    for i in range(4):
        s = [z[i][0] * z[k][0] + z[i][1] * z[k][1] for k in range(4)]
        denom = sum(math.exp(s[k] / t) for k in range(4) if k != i)
        total += -math.log(math.exp(s[pos[i]] / t) / denom)
    assert nt_xent(a, b, t).item() == pytest.approx(total / 4, rel=1e-6)
    # The same by hand in closed form for orthogonal crops with identical views: ln(1 + 2 exp(-1 / t)).
    e = torch.eye(2)
    assert nt_xent(e, e, t).item() == pytest.approx(math.log(1 + 2 * math.exp(-2.0)), rel=1e-6)


def test_nt_xent_baselines_are_the_collapsed_and_the_best_embeddings():
    t = 0.5
    for n in (2, 3, 4):
        same = torch.ones(n, 5)
        assert nt_xent(same, same, t).item() == pytest.approx(nt_xent_collapsed(n), rel=1e-6)
        # The n crops at the vertices of a regular simplex, both views identical: the floor.
        simplex = torch.eye(n) - 1.0 / n
        assert nt_xent(simplex, simplex, t).item() == pytest.approx(nt_xent_floor(n, t), rel=1e-5)
        gen = torch.Generator().manual_seed(n)
        for _ in range(20):
            a, b = torch.randn(n, 5, generator=gen), torch.randn(n, 5, generator=gen)
            assert nt_xent(a, b, t).item() >= nt_xent_floor(n, t) - 1e-6
    assert nt_xent_collapsed(2) == pytest.approx(math.log(3)) and nt_xent_floor(2, t) < 0.04


def test_config_refuses_one_crop_per_step_and_unrotatable_patches():
    with pytest.raises(ValueError, match="NT-Xent needs at least two crops.*crops: 2"):
        SwinSSLConfig(batch=1, crops=1)
    SwinSSLConfig(batch=1, crops=1, lambda_contrast=0.0)  # no contrast, no constraint
    with pytest.raises(ValueError, match=r"equal sides.*set both to 96"):
        SwinSSLConfig(patch=(64, 64, 96))
    SwinSSLConfig(patch=(64, 64, 96), rotation_plane=(0, 1))
    with pytest.raises(ValueError, match="not all 0"):
        SwinSSLConfig(lambda_rot=0, lambda_contrast=0, lambda_recon=0)


# ------------------------------------------------------------------------------------------- data


def test_dataset_is_a_pure_function_of_seed_and_index(pool):
    cfg = _cfg(seed=7)
    a, b = SwinSSLDataset(pool, cfg), SwinSSLDataset(pool, cfg)
    first = {i: a[i] for i in (5, 2)}  # out of order, in another instance
    for i in (2, 5):
        again = b[i]
        assert all(torch.equal(first[i][k], again[k]) for k in again)
    assert not torch.equal(a[3]["view"], a[4]["view"])
    assert not torch.equal(SwinSSLDataset(pool, _cfg(seed=8))[2]["view"], first[2]["view"])
    # Every scan once per pass over the pool.
    assert sorted(a.case_of(i) for i in range(2)) == sorted(a.case_ids)


# ------------------------------------------------------------------------------------------- export


def test_exports_the_registered_network_and_its_encoder_loads(tmp_path):
    cfg = pretrain_config(NAME, preset="smoke")
    module = get_method(NAME).build_module(cfg)
    exported = module.exported_state_dict()
    fresh = build_model(cfg.model, 1, 1, cfg.patch, **cfg.model_options)
    assert set(exported) == set(fresh.state_dict())
    with torch.no_grad():
        for p in module.model.swinViT.parameters():
            p.add_(0.5)  # stands for training: make every encoder tensor differ from any initialisation
    path = tmp_path / "model.pt"
    torch.save({"state_dict": module.exported_state_dict(), "kind": f"pretrain:{NAME}"}, path)
    downstream = build_model(cfg.model, 1, 3, cfg.patch, **cfg.model_options)
    report = load_weights(downstream, get_spec(cfg.model), path, "encoder")
    encoder = {k for k in exported if k.startswith("swinViT.")}
    assert set(report.loaded) == encoder and not report.missing and not report.shape_mismatch
    state = downstream.state_dict()
    assert all(torch.equal(state[k], module.model.state_dict()[k]) for k in encoder)


def _monai_layout_checkpoint(tmp_path):
    """Our module's encoder (Swin UNETR v1, as MONAI's published one) renamed as ``model_swinvit.pt`` names it."""
    cfg = pretrain_config(NAME, preset="smoke").model_copy(update={"model_options": {**TINY, "use_v2": False}})
    module = get_method(NAME).build_module(cfg)
    ours = module.exported_state_dict()
    ckpt = to_monai_ssl_checkpoint(ours)
    assert all(k.startswith("module.") for k in ckpt["state_dict"])
    assert "module.patch_embed.proj.weight" in ckpt["state_dict"]
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in ckpt["state_dict"]  # the published MLP names
    path = tmp_path / "model_swinvit.pt"
    torch.save(ckpt, path)
    return ours, ckpt, path


def test_monai_layout_is_what_monai_reads(tmp_path):
    from monai.networks.nets import SwinUNETR

    ours, ckpt, _ = _monai_layout_checkpoint(tmp_path)
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, **TINY)
    net.load_from(ckpt)  # MONAI's own reader of model_swinvit.pt
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ours.items() if k.startswith("swinViT."))


def test_monai_layout_loads_through_load_weights(tmp_path):
    ours, ckpt, path = _monai_layout_checkpoint(tmp_path)
    net = build_model("swinunetr-small", 1, 3, PATCH, **TINY)  # registered: Swin UNETR v2
    report = load_weights(net, get_spec("swinunetr-small"), path, "encoder")
    assert report.key_mapping == "'module.' -> 'swinViT.', mlp.fc -> mlp.linear"
    state = net.state_dict()
    mlp = {k for k in ours if ".mlp." in k}
    assert report.loaded and set(report.loaded) <= set(ours)
    assert all(torch.equal(state[k], ours[k]) for k in report.loaded)
    # The v2 blocks (swinViT.layers<k>c) are not in a v1 encoder: missing, as with the published file.
    assert {k for k in report.missing if k not in mlp} == {k for k in state if ".layers1c." in k or ".layers2c."
                                                           in k or ".layers3c." in k or ".layers4c." in k}


def test_monai_layout_loads_the_mlp_weights_too(tmp_path):
    ours, ckpt, path = _monai_layout_checkpoint(tmp_path)
    net = build_model("swinunetr-small", 1, 3, PATCH, **TINY)
    report = load_weights(net, get_spec("swinunetr-small"), path, "encoder")
    assert {k for k in ours if ".mlp." in k} <= set(report.loaded)


# ------------------------------------------------------------------------------------------- a run


class InitialWeights(Callback):
    """Keeps the registered network's weights as training starts."""

    state: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


@pytest.mark.slow
def test_two_step_pretrain_writes_the_model_and_the_pretext_report(pool, tmp_path):
    cfg = pretrain_config(NAME, preset="smoke")
    assert cfg.batch == 1 and cfg.crops == 2 and cfg.steps == 2
    initial = InitialWeights()
    run = pretrain(NAME, pool.root, tmp_path / "run", cfg, callbacks=[initial])
    saved = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    assert saved["kind"] == f"pretrain:{NAME}" and saved["global_step"] == 2
    assert saved["in_channels"] == saved["out_channels"] == 1
    fresh = build_model(cfg.model, 1, 1, cfg.patch, **cfg.model_options).state_dict()
    assert set(saved["state_dict"]) == set(fresh)
    # Only the encoder trains: the registered decoder and output layer are exported as initialised.
    encoder = {k for k in fresh if k.startswith("swinViT.")}
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in initial.state.items() if k not in encoder)
    assert any(not torch.equal(saved["state_dict"][k], initial.state[k]) for k in encoder)
    report = json.loads((run / "pretext.json").read_text(encoding="utf-8"))
    assert set(report) == {"rot", "contrast", "recon"}
    assert report["rot"]["trivial"] == pytest.approx(math.log(4))
    assert report["contrast"]["trivial"] == pytest.approx(math.log(3))  # 2 crops: 4 views
    assert report["contrast"]["perfect"] == pytest.approx(nt_xent_floor(2, 0.5))
    assert all(r["trivial"] > r["perfect"] and r["final"] is not None and math.isfinite(r["final"])
               for r in report.values())
