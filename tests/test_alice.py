"""Alice pretraining and the anatomical matchers: masking (ratio, masked patches never reach the encoder),
patchify, CASA, the EMA target, the matchers on a known shift, the match table and one full Alice run.

Data tests write small NIfTI scans to tmp_path and prepare them as a real pool; the real-volume matcher test
reads ../shared/data/pool and skips without it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from _niftis import prepared_pool
from medpretrain.blocks.contrastive import DINOLoss, info_nce
from medpretrain.blocks.ema import cosine_momentum
from medpretrain.blocks.masking import (gather_tokens, mask_counts, masked_mse, normalized_pixels, patchify,
                                        random_token_mask, scatter_tokens, unpatchify, visible_indices)
from medpretrain.data.cache import PreparedData
from medpretrain.engine.pretrain import ddp_allowing_unused_parameters, pretrain, pretrain_config
from medpretrain.methods import get_method
from medpretrain.errors import ConfigError
from medpretrain.matching import MatchVolume, build_matcher
from medpretrain.matching.accuracy import body_points, random_affine, warp, warped_point
from medpretrain.matching.registration import RegistrationMatcher
from medpretrain.matching.sam import (FINE_STRIDE, AnatomicalEmbeddingNet, MatcherConfig,
                                      MatcherDataset, SamMatcher, sample_at, train_matcher)
from medpretrain.methods.alice import (CASA, AlignmentWatch, AliceConfig, AliceDataset, AliceModule, SwinEncoder, ViTEncoder,
                                       PositionCentre, augment_views, build_match_table, content_share,
                                       embedding_spread)
from medpretrain.models import build_model, get_spec, load_weights

SHARED_POOL = Path(__file__).resolve().parents[2] / "shared" / "data" / "pool"


def _anatomy(shape, seed):
    """A smooth 'body' (an ellipsoid with inner structures) over air, different per seed."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = (g[0] / 0.8) ** 2 + (g[1] / 0.75) ** 2 + (g[2] / 0.85) ** 2 < 1
    img = np.where(body, 200.0, 0.0)
    for _ in range(6):
        c, r = rng.uniform(-0.5, 0.5, 3), rng.uniform(0.1, 0.25)
        img += 150.0 * (sum((gi - ci) ** 2 for gi, ci in zip(g, c)) < r * r)
    return (img + rng.normal(0, 4, shape)).astype(np.float32)


def _pool(root, shapes) -> PreparedData:
    return prepared_pool(root, [_anatomy(shape, i) for i, shape in enumerate(shapes)])


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> PreparedData:
    return _pool(tmp_path_factory.mktemp("alice"), [(72, 72, 56), (76, 70, 60), (70, 74, 58)])


# ---------------------------------------------------------------------------------------- masking


def test_mask_ratio_tube_masks_and_visible_indices():
    rng = np.random.default_rng(0)
    for grid, ratio, masked in [((4, 4, 3), 0.75, 36), ((8, 8, 8), 0.6, 308), ((4, 4, 4), 0.0, 0)]:
        mask = random_token_mask(grid, ratio, rng)
        n = int(np.prod(grid))
        assert mask.shape == (n,) and mask.sum() == masked == mask_counts(n, ratio)[0]
    tube = random_token_mask((4, 4, 3), 0.75, rng, "tube").reshape(4, 4, 3)
    assert np.all(tube == tube[:, :, :1]) and tube[:, :, 0].sum() == 12  # whole z-columns, 75% of 16
    masks = torch.from_numpy(np.stack([random_token_mask((4, 4, 3), 0.75, rng) for _ in range(3)]))
    vis = visible_indices(masks)
    assert vis.shape == (3, 12)
    for row, m in zip(vis, masks):
        assert torch.equal(row, torch.nonzero(~m).flatten())  # sorted, exactly the unmasked patches
    tokens = torch.randn(3, 48, 5)
    full = scatter_tokens(gather_tokens(tokens, vis), vis, torch.zeros(5), 48)
    assert torch.equal(full[~masks], tokens[~masks]) and torch.all(full[masks] == 0)


def test_patchify_roundtrip_normalised_targets_and_masked_mse():
    x = torch.randn(2, 2, 32, 32, 16)
    p = patchify(x, 16)
    assert p.shape == (2, 4, 16**3 * 2)
    assert torch.equal(unpatchify(p, 16, (2, 2, 1), 2), x)
    assert torch.equal(p[0, 1, :2], x[0, :, 0, 16, 0])  # patch 1 = grid (0, 1, 0); first voxel, both channels
    t = normalized_pixels(p)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    mask = torch.tensor([[True, False, False, False], [True, True, False, False]])
    pred = t.clone()
    pred[0, 0] += 1.0  # error 1 on sample 0's only masked patch; the unmasked error below must not count
    pred[1, 3] += 5.0
    assert masked_mse(pred, t, mask).item() == pytest.approx(0.5)  # (1 + 0) / 2 samples
    assert masked_mse(pred, t, None).item() == pytest.approx((1 + 25) / 8)


def test_masked_patches_never_reach_the_encoder():
    """Changing the voxels of masked patches changes nothing the online encoder returns (ViT drops them, Swin
    replaces them by the mask token); changing a visible patch does."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    for model, patch in [("unetr-small", (64, 64, 48)), ("swinunetr-small", (64, 64, 64))]:
        net = build_model(model, 1, 1, patch).eval()
        enc = ViTEncoder(net.vit) if model.startswith("unetr") else SwinEncoder(net.swinViT, 16)
        grid = tuple(p // 16 for p in patch)
        mask = torch.from_numpy(random_token_mask(grid, 0.75, rng))[None]
        vis = visible_indices(mask)
        x = torch.randn(1, 1, *patch)
        noise = unpatchify(patchify(torch.randn_like(x), 16) * mask[..., None], 16, grid, 1)
        kwargs = {"mask": mask} if isinstance(enc, SwinEncoder) else {}
        with torch.no_grad():
            a = enc(x, vis, **kwargs)
            b = enc(x + noise, vis, **kwargs)  # only masked patches differ
            visible_noise = unpatchify(patchify(torch.randn_like(x), 16) * (~mask)[..., None], 16, grid, 1)
            c = enc(x + visible_noise, vis, **kwargs)
        assert a.shape == (1, int((~mask).sum()), enc.width)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a, c)


def test_casa_shapes_and_attention_rows_sum_to_one():
    casa = CASA(query_dim=48, key_dim=64, dim=32)
    q, k = torch.randn(2, 7, 48), torch.randn(2, 20, 64)
    att = casa.attention(q, k)
    assert att.shape == (2, 7, 20) and torch.all(att >= 0)
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 7))
    assert casa(q, k).shape == (2, 7, 32)


def test_position_centre_removes_what_every_sample_shares_at_a_position_and_keeps_the_content():
    """CASA's ``casa_centre: position``: a positional code common to all samples goes, per-sample content stays
    (after the first batch the centre is that batch's mean; then an EMA)."""
    torch.manual_seed(0)
    centre = PositionCentre(n_tokens=6, dim=4, momentum=0.9).train()
    position_code = torch.randn(1, 6, 4) * 5
    for _ in range(3):
        content = torch.randn(8, 6, 4)
        content -= content.mean(0, keepdim=True)  # zero-mean content: the position code is the whole mean
        out = centre(position_code + content)
        torch.testing.assert_close(out, content, atol=1e-5, rtol=1e-5)
    centre.eval()
    frozen = centre.centre.clone()
    centre(torch.randn(8, 6, 4) + 100)  # evaluation leaves the centre alone
    torch.testing.assert_close(centre.centre, frozen)


def test_content_share_is_zero_for_a_position_code_and_high_for_per_sample_content():
    torch.manual_seed(0)
    position_only = torch.randn(1, 30, 16).expand(8, 30, 16) * torch.rand(8, 1, 1).add(0.5)  # scale is not content
    assert float(content_share(position_only)) == pytest.approx(0.0, abs=1e-6)
    assert float(content_share(torch.randn(8, 30, 16))) == pytest.approx(7 / 8, abs=0.05)  # var over 8 samples


def test_alignment_watch_reports_each_change_of_state_once():
    """The log warning of a run whose CASA alignment goes content-free or collapses, and its recovery."""
    watch = AlignmentWatch(window=10)

    def steps(start, own, other, spread):
        parts = {"st_own": torch.tensor(own), "st_other": torch.tensor(other), "st_spread": torch.tensor(spread)}
        return [m for s in range(start, start + 10) if (m := watch.update(s, parts))]

    assert steps(0, 0.2, 0.5, 0.6) == []                      # learning: other/own 2.5
    free = steps(10, 0.01, 0.0101, 0.6)                       # other/own 1.01: content-free
    assert len(free) == 1 and "no longer looks at the content" in free[0] and "steps 10-20" in free[0]
    assert steps(20, 0.01, 0.0094, 0.6) == []                 # closer to the other crop: content-free too, said once
    collapsed = steps(30, 0.01, 0.03, 0.01)
    assert len(collapsed) == 1 and "collapsed" in collapsed[0]
    again = steps(40, 0.1, 0.2, 0.5)
    assert len(again) == 1 and "carries content again" in again[0]


def test_embedding_spread_detects_collapse():
    same = torch.tensor([1.0, 2.0, -0.5]).expand(2, 9, 3) * torch.rand(2, 9, 1).add(0.5)  # one direction
    assert float(embedding_spread(same)) == pytest.approx(0.0, abs=1e-6)
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    assert float(embedding_spread(opposite)) == pytest.approx(1.0)
    assert 0.8 < float(embedding_spread(torch.randn(4, 64, 32))) <= 1.0


def test_contrastive_losses():
    a = torch.randn(6, 8)
    assert info_nce(a, a * 3, temperature=0.05) < info_nce(a, torch.randn(6, 8), temperature=0.05)
    hard = torch.randn(6, 4, 8)
    assert info_nce(a, a, hard).shape == ()
    dino = DINOLoss(8)
    logits = torch.randn(4, 8)
    assert dino(logits, logits) > 0
    dino.update_center(torch.ones(4, 8))
    torch.testing.assert_close(dino.center, torch.full((8,), 0.1))


def test_strong_augmentation_rotates_about_z():
    ramp = torch.arange(16.0).view(1, 1, 16, 1, 1).expand(1, 1, 16, 16, 4).contiguous()  # varies along X
    quarter = torch.tensor([[0, 0, 0, math.pi / 2, 1, 0]], dtype=torch.float32)
    out = augment_views(ramp, quarter)[0, 0]
    assert out[:, :, 0].std(dim=0).max() < 1e-3  # now constant along X ...
    assert out[0, :, 0].std() > 4  # ... and a ramp along Y
    assert torch.equal(out[..., 0], out[..., 3])  # Z untouched


def test_strong_augmentation_is_the_identity_at_zero_and_flips_exactly():
    x = torch.randn(2, 1, 16, 16, 8)
    ident = torch.tensor([[0, 0, 0, 0, 1, 0]] * 2, dtype=torch.float32)
    torch.testing.assert_close(augment_views(x, ident), x, atol=1e-5, rtol=0)
    flip = torch.tensor([[1, 0, 1, 0, 2, 0.5]] * 2, dtype=torch.float32)
    torch.testing.assert_close(augment_views(x, flip), x.flip(2, 4) * 2 + 0.5, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- matchers


def test_registration_matcher_finds_a_known_affine_on_a_synthetic_volume():
    vol = MatchVolume("a", _anatomy((64, 60, 48), 3)[None], (1.5, 1.5, 2.0))
    rng = np.random.default_rng(0)
    m, t = random_affine(rng, max_rotation_deg=6, scale=(0.95, 1.05), max_shift=4)
    key = warp(vol, m, t, "a@1")
    p = np.array([32.0, 30.0, 24.0])
    # The warp's convention: warped voxel o shows original voxel M o + t (about the centre).
    centre = (np.array(vol.image.shape[1:]) - 1) / 2
    o = warped_point(p, m, t, vol.image.shape[1:])
    np.testing.assert_allclose(m @ (o - centre) + centre + t, p)
    match = RegistrationMatcher(shrink=(2, 1)).match(vol, p, key)
    err = np.linalg.norm((np.array(match.point) - o) * np.array(vol.spacing))
    assert err < 2.0 and match.accepted  # mm


@pytest.mark.skipif(not SHARED_POOL.is_dir(), reason="../shared/data/pool is absent (real-volume matcher test)")
def test_registration_matcher_finds_a_known_shift_on_a_real_volume(tmp_path):
    from medpretrain.data.io import read_image

    path = next(iter(sorted(SHARED_POOL.rglob("*t1_itk*.nii*"))), None)
    if path is None:
        pytest.skip(f"no mr_brain_t1_itk scan under {SHARED_POOL}")
    img = read_image(path)
    arr = np.asarray(img.array, np.float32)[..., ::2, ::2, ::2]
    arr = arr[None] if arr.ndim == 3 else arr[:1]
    spacing = tuple(float(s) * 2 for s in img.spacing)
    vol = MatchVolume("t1", arr, spacing)
    shift = np.array([5.0, -4.0, 3.0])  # voxels
    key = warp(vol, np.eye(3), shift, "t1@shift")
    errors = []
    for p in body_points(vol, 5, np.random.default_rng(0), margin=12):
        match = RegistrationMatcher().match(vol, p, key)
        errors.append(np.linalg.norm((np.array(match.point) - (p - shift)) * np.array(spacing)))
    assert np.median(errors) < 2.0, errors  # mm, against a shift of ~14 mm


class _OneHotNet(torch.nn.Module):
    """Fine embedding = one-hot of the fine cell, coarse = constant: the only match of a cell is itself."""

    def forward(self, x):
        gx, gy, gz = (s // FINE_STRIDE for s in x.shape[2:])
        fine = torch.eye(gx * gy * gz).reshape(1, -1, gx, gy, gz).expand(x.shape[0], -1, -1, -1, -1)
        coarse = torch.ones(x.shape[0], 2, *(s // 16 for s in x.shape[2:]))
        return coarse, fine


def test_sam_matching_returns_the_exact_cell_for_an_unambiguous_embedding():
    vol = MatchVolume("v", np.zeros((1, 32, 32, 16), np.float32), (1.0, 1.0, 1.0))
    matcher = SamMatcher(_OneHotNet(), threshold=0.99, window=(32, 32, 16))
    for cell in [(5, 2, 1), (0, 7, 3)]:
        point = tuple((c + 0.5) * FINE_STRIDE - 0.5 for c in cell)  # the cell's centre voxel
        match = matcher.match(vol, point, vol)
        assert match.point == point and match.score == pytest.approx(1.0, abs=1e-3) and match.accepted


def test_sam_maps_sampling_and_a_trained_matcher_round_trip(pool, tmp_path):
    net = AnatomicalEmbeddingNet(1, 4, 8, 6)
    coarse, fine = net(torch.randn(1, 1, 32, 32, 16))
    assert coarse.shape == (1, 8, 2, 2, 1) and fine.shape == (1, 6, 8, 8, 4)
    torch.testing.assert_close(fine.norm(dim=1), torch.ones(1, 8, 8, 4))
    # sample_at at a cell centre returns that cell exactly.
    maps = torch.randn(1, 3, 4, 4, 2)
    centre = torch.tensor([[[2 * FINE_STRIDE + 1.5, 1 * FINE_STRIDE + 1.5, 0 * FINE_STRIDE + 1.5]]])
    torch.testing.assert_close(sample_at(maps, centre, FINE_STRIDE)[0, 0], maps[0, :, 2, 1, 0])

    cfg = MatcherConfig(steps=2, batch=1, patch=(32, 32, 32), width=4, anchors=8, coarse_negatives=8,
                        fine_negatives=4, checkpoint_every=2, num_workers=0, precision="32-true")
    ds = MatcherDataset(pool, cfg)
    item = ds[3]
    assert item["view1"].shape == (1, 32, 32, 32) and item["fine_negatives"].shape == (8, 4, 3)
    dist = (item["fine_negatives"] - item["positives"][:, None]).norm(dim=-1)
    assert torch.all(dist <= cfg.near + 1e-4)
    inner = torch.all((item["positives"] >= cfg.near) & (item["positives"] <= 31 - cfg.near), dim=1)
    assert torch.all(dist[inner] >= cfg.min_negative_distance - 1e-4)  # (border positives get clipped negatives)
    assert torch.equal(ds[3]["view1"], item["view1"])  # pure function of (seed, i)
    run = train_matcher(pool.root, tmp_path / "matcher", cfg)
    matcher = build_matcher("sam", run, threshold=-1.0)
    assert isinstance(matcher, SamMatcher)
    vol = MatchVolume("s0", np.asarray(pool.image(pool.case_ids[0])), pool.spacing)
    match = matcher.match(vol, (30.0, 30.0, 20.0), vol)
    assert match.accepted and all(0 <= c < s for c, s in zip(match.point, vol.image.shape[1:]))
    with pytest.raises(ConfigError, match="train-matcher"):
        build_matcher("sam", None)


# ---------------------------------------------------------------------------------------- Alice


def test_config_refusals_and_presets():
    with pytest.raises(Exception, match="whole number of 16"):
        AliceConfig(patch=(64, 64, 40))
    with pytest.raises(Exception, match="matcher_run"):
        AliceConfig(matcher="sam")
    assert pretrain_config("alice", preset="cpu").model == "unetr-small"
    # The decoder gets no gradient: the engine runs DDP with find_unused_parameters.
    assert ddp_allowing_unused_parameters(AliceConfig(strategy="ddp")).strategy == "ddp_find_unused_parameters_true"
    assert get_method("alice").unused_parameters
    with pytest.raises(ConfigError, match="Swin"):
        AliceModule(AliceConfig(model="unet", patch=(64, 64, 48)))


def test_match_table_pairs_different_volumes_and_dataset_is_pure(pool):
    cfg = AliceConfig(patch=(32, 32, 32), match_points=2, match_partners=2)
    matcher = RegistrationMatcher(threshold=-1.0, shrink=(2,), iterations=20)
    table = build_match_table(pool, pool.case_ids, cfg, matcher)
    assert len(table) == 2 * len(pool.case_ids)
    assert all(r["query"] != r["key"] for r in table)
    ds = AliceDataset(pool, cfg, matcher=matcher)
    item = ds[5]
    assert item["q"].shape == item["k"].shape == (1, 32, 32, 32)
    assert item["mask_q"].shape == (8,) and int(item["mask_q"].sum()) == 6
    again = ds[5]
    assert all(torch.equal(item[k], again[k]) for k in item)
    # The same-volume ablation (paper Table 4 "x") draws Q from the very points the match table queried, and K
    # from another of the query scan's points: only K's volume differs from the full method.
    same = AliceDataset(pool, cfg.model_copy(update={"inter_volume": False}))
    assert same.table == [] and same[0]["q"].shape == (1, 32, 32, 32)
    assert sorted((r["query"], r["q_point"]) for r in same.rows) == sorted((r["query"], r["q_point"]) for r in table)
    crops = {(q, i): torch.from_numpy(same._crop(q, p)) for q, pts in same.points.items() for i, p in enumerate(pts)}
    for i in range(8):
        item = same[i]
        q_at = [key for key, c in crops.items() if torch.equal(item["q"], c)]
        k_at = [key for key, c in crops.items() if torch.equal(item["k"], c)]
        assert q_at and k_at, "Q and K are crops around the scan's table points"
        assert any(qa[0] == ka[0] and qa[1] != ka[1] for qa in q_at for ka in k_at), "K: another point, same scan"
    # Nothing reaches an impossible threshold: every point tries every partner (the bounded retries), and each
    # case keeps only its best-scoring pair.
    strict = RegistrationMatcher(threshold=1.01, shrink=(2,), iterations=20)
    table = build_match_table(pool, pool.case_ids, cfg, strict)
    assert not any(r["accepted"] for r in table)
    strict_ds = AliceDataset(pool, cfg, matcher=strict)
    assert strict_ds.acceptance == 0 and len(strict_ds.rows) == len(pool.case_ids)
    for r in strict_ds.rows:
        assert r["score"] == max(t["score"] for t in strict_ds.table if t["query"] == r["query"])


class _CheckTarget(Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.step = trainer.global_step
        self.before = module.target.vit.patch_embedding.patch_embeddings.weight.detach().clone()
        self.logged = getattr(self, "logged", [])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.logged.append(dict(trainer.logged_metrics))
        m = cosine_momentum(self.step, module.cfg.steps, *module.cfg.ema_schedule())
        online = module.online.vit.patch_embedding.patch_embeddings.weight.detach()
        torch.testing.assert_close(module.target.vit.patch_embedding.patch_embeddings.weight,
                                   m * self.before + (1 - m) * online)


def test_one_full_alice_run_at_the_cpu_preset_exports_the_online_encoder(pool, tmp_path):
    cfg = pretrain_config("alice", preset="cpu", overrides={
        "steps": 2, "batch": 1, "checkpoint_every": 2, "num_workers": 0, "precision": "32-true",
        "match_points": 1, "match_partners": 1})
    assert cfg.patch == (64, 64, 48) and cfg.mask_ratio == 0.75 and cfg.matcher == "registration"
    record = _CheckTarget()
    run = pretrain("alice", pool.root, tmp_path / "run", cfg, callbacks=[record])
    assert len(record.logged) == 2
    assert {"train/recon", "train/dv", "train/st", "train/st_spread"} <= set(record.logged[0])
    assert all(math.isfinite(float(v)) for log in record.logged for v in log.values())
    saved = torch.load(run / "model.pt", weights_only=False)
    assert saved["kind"] == "pretrain:alice" and saved["model"] == "unetr-small"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    # model.pt's encoder is the ONLINE encoder (not the EMA target).
    key = "vit.patch_embedding.patch_embeddings.weight"
    assert torch.equal(saved["state_dict"][key], ckpt["model." + key])
    assert not torch.equal(saved["state_dict"][key], ckpt["target.vit.patch_embedding.patch_embeddings.weight"])
    target = build_model("unetr-small", 1, 2, (64, 64, 48))
    report = load_weights(target, get_spec("unetr-small"), run / "model.pt", part="encoder")
    assert report.loaded and all(k.startswith("vit.") for k in report.loaded)


class _RecordSpread(Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.logged_metrics.items()})


def _spread_run(pool, out, **overrides) -> dict[str, float]:
    """Mean spreads and embedding losses over the last 20 of 40 steps of a small Alice run."""
    cfg = pretrain_config("alice", preset="cpu", overrides={
        "steps": 40, "batch": 2, "checkpoint_every": 10**6, "num_workers": 0, "precision": "32-true",
        "match_points": 2, "match_partners": 1, "patch": (32, 32, 32), "warmup_fraction": 0.05,
        "lr_schedule": "warmup-constant", **overrides})
    record = _RecordSpread()
    pretrain("alice", pool.root, out, cfg, callbacks=[record])
    last = record.rows[-20:]
    return {k: float(np.mean([r[f"train/{k}"] for r in last])) for k in ("dv_spread", "st_spread", "dv", "st")}


def test_alice_embeddings_do_not_collapse_with_the_byol_heads_and_do_without_them(pool, tmp_path):
    """The cosine losses need BYOL/MoCo v3 heads (BatchNorm projector, online predictor): without them every
    embedding starts nearly the same (spread ~0.01) and l_st is solved trivially within tens of steps; with them the
    embeddings start spread and the losses stay away from 0 over these steps. (Longer runs on la2018 still lose spread
    or content-dependence within ~600-2,000 steps: docs/results/scaling/alice-collapse/.)"""
    heads = _spread_run(pool, tmp_path / "heads")
    bare = _spread_run(pool, tmp_path / "bare", predictor=False, head_norm=False)
    assert heads["dv_spread"] > 0.2 and heads["st_spread"] > 0.2, heads
    assert heads["dv"] > 0.2 and heads["st"] > 0.2, heads
    # without them: l_st solved trivially (every CASA output alike) and the pooled embeddings far less spread
    assert bare["st"] < 0.05 and heads["dv_spread"] - bare["dv_spread"] > 0.2, (bare, heads)


@pytest.mark.parametrize("contrast_loss,casa_options", [
    ("cosine", {}), ("infonce", {}), ("dino", {}), ("cosine", {"casa_centre": "position", "casa_teacher": "ema"}),
    ("cosine", {"casa_centre": "projector", "casa_teacher": "ema", "casa_kv_norm_bias": False})])
def test_every_contrast_loss_gives_finite_losses_and_the_monitors(contrast_loss, casa_options):
    """One forward of each contrast (smoke sizes, batch 2), and of the CASA probe options: finite losses; every
    variant logs the spreads and content shares, the cosine and InfoNCE ones the own/other monitor. InfoNCE cannot score 0 when CASA's teacher embeddings of the sample's own
    crop and another sample's are the same (the content-free solution the monitor watches for)."""
    torch.manual_seed(0)
    cfg = pretrain_config("alice", preset="smoke",
                          overrides={"contrast_loss": contrast_loss, "batch": 2, **casa_options})
    module = AliceModule(cfg)
    rng = np.random.default_rng(0)
    masks = [torch.from_numpy(np.stack([random_token_mask(cfg.grid, cfg.mask_ratio, rng) for _ in range(2)]))
             for _ in range(2)]
    aug = torch.tensor([[[0, 1, 0, 0.1, 1.05, 0.02]] * 2] * 2, dtype=torch.float32)
    batch = {"q": torch.randn(2, 1, *cfg.patch), "k": torch.randn(2, 1, *cfg.patch), "mask_q": masks[0],
             "mask_k": masks[1], "aug": aug}
    out = module.losses(batch)
    assert all(torch.isfinite(v) for v in out.values()), out
    assert {"recon", "dv", "st", "loss", "dv_spread", "st_spread", "h_content", "y_content"} <= set(out)
    assert (contrast_loss != "dino") == ({"st_own", "st_other"} <= set(out))
    assert (module.alignment_watch is None) == (contrast_loss == "dino")
    if casa_options:  # the teacher side's CASA is an EMA copy, frozen and updated with the other teachers
        assert any(t is module.target_casa for t, _ in module.teacher_pairs())
        assert not any(p.requires_grad for p in module.target_casa.parameters())
        assert float(module.centre_s.centre.abs().sum()) > 0  # the first training batch set the centre
        assert (module.casa.norm_kv.bias is None) == (casa_options.get("casa_kv_norm_bias") is False)
    if contrast_loss == "infonce":
        from medpretrain.blocks.contrastive import info_nce

        t = torch.randn(8, 16)
        assert info_nce(t, t, t[:, None], 0.2) >= math.log(2) - 1e-5  # a negative equal to the positive
