"""PCT-Net: the released parameter layout, any valid size through one model, deep supervision, resolution
modes, size errors and the shifted-window attention masks."""

import json
import math
from pathlib import Path

import pytest
import torch

from medpretrain.errors import ConfigError
from medpretrain.models import build_model, get_spec, load_weights
from medpretrain.models.pctnet import PCTBlock, SwinBlock, _windows_and_shifts, shifted_window_mask

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "pctnet_misfm_state_dict.json"


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # One intra-op thread: these small networks gain nothing from more, and on a loaded machine OpenMP
    # threads waiting for each other made the tests up to 30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def test_state_dict_equals_released_model():
    if not REFERENCE.is_file():
        pytest.skip(f"the released PCT-Net layout is not at {REFERENCE} (../shared/reference beside the repository)")
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    model = build_model("pctnet", 1, 5)
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == reference


def test_parameter_counts():
    """The paper's 45.3 M parameters, 44.2 M of them used by a forward pass (resolution mode 1)."""
    model = build_model("pctnet", 1, 5)
    assert sum(p.numel() for p in model.parameters()) == 45_289_554
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 44_198_206
    assert len(model.state_dict()) == 684
    small = build_model("pctnet-small", 1, 5)
    assert sum(p.numel() for p in small.parameters()) == 11_364_126


def _expected_shapes(size, mode, classes, batch=1):
    """Full resolution, level 1, 2, 3 in (X, Y, Z): X, Y halve at every level, Z only below level ``mode``."""
    x, y, z = size
    return [(batch, classes, x >> lvl, y >> lvl, z >> max(0, lvl - mode)) for lvl in range(4)]


def test_one_model_takes_every_valid_size():
    model = build_model("pctnet-small", 1, 3).eval()
    assert model.divisor == (16, 16, 8) and get_spec("pctnet-small").divisors() == (16, 16, 8)
    with torch.no_grad():
        for size in [(32, 32, 16), (16, 32, 24)]:
            out = model(torch.randn(1, 1, *size))
            assert isinstance(out, torch.Tensor) and out.shape == (1, 3, *size)


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_deep_supervision_and_resolution_modes(mode):
    model = build_model("pctnet-small", 1, 3, resolution_mode=mode).train()
    assert model.divisor == (16, 16, 2 ** (4 - mode))
    size = (16, 16, 2 ** (4 - mode))  # the smallest valid size: a 1x1x1 bottleneck, so batch 2 for BN
    outs = model(torch.randn(2, 1, *size))
    assert isinstance(outs, tuple) and [tuple(o.shape) for o in outs] == _expected_shapes(size, mode, 3, batch=2)
    sum(o.mean() for o in outs).backward()
    # Only the selected mode's embedding and head run; the other pairs get no gradient and are frozen.
    for i in range(3):
        for part in (model.embeddings[i], model.pred_heads[i]):
            grads = [p.grad is not None for p in part.parameters()]
            assert all(grads) if i == mode else not any(grads)
            assert all(p.requires_grad == (i == mode) for p in part.parameters())
    assert all(p.grad is not None for p in model.pyramid_ct.parameters() if p.requires_grad)
    # The released forward never applies the PCT blocks' final LayerNorm.
    assert all(not p.requires_grad and p.grad is None
               for m in model.modules() if isinstance(m, PCTBlock) for p in m.norm_layer.parameters())
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, *size)).shape == (1, 3, *size)


def test_without_deep_supervision_one_output_and_no_wasted_heads():
    model = build_model("pctnet-small", 1, 2, deep_supervision=False).train()
    out = model(torch.randn(1, 1, 32, 32, 8))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, 32, 32, 8)
    out.mean().backward()
    assert model.pyramid_ct.out_conv2.conv[2].weight.grad is None
    assert not model.pyramid_ct.out_conv3.conv[2].weight.requires_grad


def test_invalid_size_names_nearest_valid_sizes():
    model = build_model("pctnet-small", 1, 2).eval()
    with pytest.raises(ConfigError, match=r"nearest valid size: \(32, 32, 16\)"):
        model(torch.randn(1, 1, 30, 32, 16))
    with pytest.raises(ConfigError, match=r"nearest valid patch: \(32, 48, 16\)"):
        get_spec("pctnet").check_patch((30, 50, 12))
    with pytest.raises(ConfigError, match=r"batch normalisation"):
        get_spec("pctnet").check_patch((16, 16, 8))
    get_spec("pctnet").check_patch((128, 128, 64))  # the paper's 64x128x128 (D x H x W)
    with pytest.raises(ConfigError, match=r"multiple of 16 and at least 16; nearest valid patch: \(64, 64, 48\)"):
        get_spec("unet").check_patch((60, 64, 50))  # one-number divisors keep their message
    with pytest.raises(ConfigError, match="resolution_mode"):
        build_model("pctnet-small", 1, 2, resolution_mode=3)


def test_parts_and_encoder_load(tmp_path):
    spec = get_spec("pctnet-small")
    source = build_model("pctnet-small", 1, 5)
    assert {spec.part_of(n) for n, _ in source.named_parameters()} == {"encoder", "decoder", "head"}
    target = build_model("pctnet-small", 1, 2)
    differing = {n for n, t in source.state_dict().items() if target.state_dict()[n].shape != t.shape}
    assert differing and all(spec.part_of(n) == "head" for n in differing)
    # The 4 output convolutions of the selected mode plus the 2 of each other head.
    assert len({n.rsplit(".conv.", 1)[0] for n in differing}) == 8
    ckpt = tmp_path / "model.pt"
    torch.save({"state_dict": source.state_dict(), "model": "pctnet-small"}, ckpt)
    report = load_weights(target, spec, ckpt, part="encoder")
    assert report.loaded and not report.missing and not report.shape_mismatch
    assert any(n.startswith("pyramid_ct.convtrans_e4.") for n in report.loaded)
    assert all(spec.part_of(n) == "encoder" for n in report.loaded)
    whole = load_weights(target, spec, ckpt, part="all")
    assert sorted(m[0] for m in whole.shape_mismatch) == sorted(differing)


# --- shifted windows ------------------------------------------------------------------------------------


def _reference_block(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """The block computed token by token over the whole map: a query sees exactly the real tokens that share
    its window after the roll and that the roll did not bring over from the other end of an axis."""
    b, d, h, w, c = x.shape
    sizes = (d, h, w)
    window, shift = _windows_and_shifts(sizes, block.window_size, block.shifted)
    padded = torch.tensor([s + (-s) % win for s, win in zip(sizes, window)])
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in sizes], indexing="ij"), -1).reshape(-1, 3)
    window_id = ((coords - torch.tensor(shift)) % padded) // torch.tensor(window)
    wrapped = coords < torch.tensor(shift)
    allowed = (window_id[:, None] == window_id[None]).all(-1) & (wrapped[:, None] == wrapped[None]).all(-1)

    attn = block.attn
    heads, full = attn.num_heads, attn.window_size
    tokens = block.norm1(x).reshape(b, -1, c)
    q, k, v = attn.qkv(tokens).view(b, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(c // heads)
    offset = (coords[:, None] - coords[None] + full - 1).clamp(0, 2 * full - 2)
    side = 2 * full - 1
    bias = attn.relative_position_bias_table[offset[..., 0] * side * side + offset[..., 1] * side + offset[..., 2]]
    scores = (scores + bias.permute(2, 0, 1)).masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, d, h, w, c)
    x = x + attn.proj(out)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("sizes", [(8, 7, 3), (12, 6, 13)])
def test_window_attention_equals_token_by_token_reference(shifted, sizes):
    """Padding (8, 7, 13 -> 12, 12, 18), shrunk windows (3, 6 -> one window, no shift along that axis) and
    the shift, against a direct computation; with gradients (the math kernel) and without (fused kernels)."""
    block = SwinBlock(16, 2, 6, shifted=shifted).eval()
    x = torch.randn(2, *sizes, 16)
    expected = _reference_block(block, x)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-4)


def test_shifted_window_cannot_see_across_the_shift_boundary():
    block = SwinBlock(8, 2, 6, shifted=True).eval()
    x = torch.randn(1, 12, 1, 1, 8)
    poked = x.clone()
    poked[0, 0] += 3 * torch.randn(8)  # first slice; the roll puts it in the last window, beside slices 9-11
    with torch.no_grad():
        changed = (block(poked) - block(x)).abs().amax(dim=(0, 2, 3, 4)) > 1e-6
    # Slice 0 shares a window with 1-2 (and itself) only: not with 9-11 although they share the rolled window.
    assert changed.tolist() == [True, True, True] + [False] * 9
    plain = SwinBlock(8, 2, 6, shifted=False).eval()
    with torch.no_grad():
        changed = (plain(poked) - plain(x)).abs().amax(dim=(0, 2, 3, 4)) > 1e-6
    assert changed.tolist() == [True] * 6 + [False] * 6


def test_padding_is_masked_and_unmasked_windows_need_no_mask():
    assert shifted_window_mask((12, 12, 12), (6, 6, 6), (0, 0, 0)) is None
    mask = shifted_window_mask((4, 1, 1), (6, 1, 1), (0, 0, 0))  # side 4 padded to 6 (not shrunk here)
    assert mask.shape == (1, 6, 6)
    assert not mask[0, :4, :4].any() and mask[0, :4, 4:].all()


def test_bias_of_a_shrunk_window_follows_a_loaded_index():
    """The released index maps offsets to table rows with another formula; a smaller window must use the
    rows that formula gives to its offsets."""
    block = SwinBlock(8, 2, 6, shifted=False)
    coords = torch.stack(torch.meshgrid(*[torch.arange(6)] * 3, indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + 5
    released = rel[0] * 17 + rel[1] * 11 + rel[2]  # the authors' buffer
    block.attn.relative_position_index.copy_(released)
    bias = block.attn.position_bias((4, 2, 3))
    sub = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(2), torch.arange(3), indexing="ij")).flatten(1)
    rel = sub[:, :, None] - sub[:, None, :] + 5
    rows = rel[0] * 17 + rel[1] * 11 + rel[2]
    torch.testing.assert_close(bias, block.attn.relative_position_bias_table[rows].permute(2, 0, 1))
