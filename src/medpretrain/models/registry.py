"""Model registry: every network is built by name and knows which of its parameters are encoder,
decoder and output head, so checkpoints can be loaded encoder-only or whole and heads replaced."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch.nn as nn

from medpretrain.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered network and how its parameters divide into parts.

    Args:
        name: registry name used on the command line (``--model NAME``).
        description: one line shown by ``medpretrain models``.
        factory: ``factory(in_channels, out_channels, patch, **options) -> nn.Module``. ``patch`` is the
            training patch size; networks with a fixed input size (UNETR) need it.
        encoder_prefixes: parameter-name prefixes that form the encoder (what ``--init-part encoder`` loads
            and ``--freeze-encoder`` freezes).
        head_prefixes: parameter-name prefixes of the output layer(s), replaced when the class count changes.
        divisor: every patch/input side must be a multiple of this (total down-sampling); one number for
            all sides, or one per side in patch order (X, Y, Z) for networks that down-sample anisotropically.
        min_size: smallest input side the network accepts.
        min_bottleneck_voxels: fewest voxels the deepest feature map (``patch / divisor``) may have; 2 for
            networks with instance normalisation there, which fails on a single voxel.
        bottleneck_norm: the normalisation named when the bottleneck is too small.
        defaults: the preset's options, shown by ``medpretrain models`` and overridable.
        family: the architecture family a pretraining method can name instead of every network
            (``PretrainMethod.models``): ``cnn`` (convolutional U-Nets), ``vit`` (UNETR), ``swin`` (Swin UNETR),
            ``pctnet`` (PCT-Net's convolution-transformer hybrid).
        layout: for a network whose per-stage kernels and strides are options (``kernels``, ``strides``: one
            ``[X, Y, Z]`` per stage, the first stage's stride 1): ``layout(options) -> (kernels, strides)`` that the
            merged options build. The planner then derives both from the data (nnU-Net's rule), and the patch
            divisors follow the strides (their per-axis product) instead of ``divisor``; the preset's number of
            stages is the most a plan gives.
    """

    name: str
    description: str
    factory: Callable[..., nn.Module]
    encoder_prefixes: tuple[str, ...]
    head_prefixes: tuple[str, ...]
    divisor: int | tuple[int, int, int] = 16
    min_size: int = 16
    min_bottleneck_voxels: int = 1
    defaults: dict[str, Any] = field(default_factory=dict)
    bottleneck_norm: str = "instance normalisation"
    family: str = "cnn"
    layout: Callable[[dict[str, Any]], tuple[list[list[int]], list[list[int]]]] | None = None

    def divisors(self, ndim: int = 3, options: dict[str, Any] | None = None) -> tuple[int, ...]:
        """The divisor of each of ``ndim`` patch sides, for the network the preset with ``options`` builds (for a
        network with a ``layout``: the per-axis product of its strides)."""
        if self.layout is not None:
            _, strides = self.layout({**self.defaults, **(options or {})})
            return tuple(math.prod(int(s[a]) for s in strides) for a in range(ndim))
        return (self.divisor,) * ndim if isinstance(self.divisor, int) else tuple(self.divisor)

    def part_of(self, parameter_name: str) -> str:
        """'encoder', 'head' or 'decoder' for a parameter (or buffer) name of this network."""
        if parameter_name.startswith(self.encoder_prefixes):
            return "encoder"
        if parameter_name.startswith(self.head_prefixes):
            return "head"
        return "decoder"

    def check_patch(self, patch: Sequence[int], options: dict[str, Any] | None = None) -> None:
        """Raise ConfigError naming the nearest valid sizes if ``patch`` does not fit the network the preset with
        ``options`` (``model_options``) builds."""
        divisors = self.divisors(len(patch), options)
        if len(divisors) != len(patch):
            raise ConfigError(f"patch {tuple(patch)} for model '{self.name}' must have {len(divisors)} sides")
        least = f" and at least {self.min_size}" if self.min_size > 1 else ""
        if len(set(divisors)) == 1 and (isinstance(self.divisor, int) or self.layout is not None):
            rule = f"every side must be a multiple of {divisors[0]}{least}"
        else:
            rule = f"the sides (X, Y, Z) must be multiples of {tuple(divisors)} respectively{least}"
        if self.layout is not None:
            rule += " (the per-axis product of its strides)"
        bad = [p for p, d in zip(patch, divisors) if p % d or p < self.min_size]
        if bad:
            # The smallest multiple of each side's divisor that is at least min_size.
            lows = [-(-self.min_size // d) * d for d in divisors]
            valid = [max(lo, int(round(p / d)) * d) for p, d, lo in zip(patch, divisors, lows)]
            while math.prod(v // d for v, d in zip(valid, divisors)) < self.min_bottleneck_voxels:
                valid[0] *= 2  # suggest a patch that passes the bottleneck check below too
            raise ConfigError(
                f"patch {tuple(patch)} does not fit model '{self.name}': {rule}; nearest valid patch: {tuple(valid)}"
            )
        bottleneck = [p // d for p, d in zip(patch, divisors)]
        if math.prod(bottleneck) < self.min_bottleneck_voxels:
            valid = [2 * patch[0], *patch[1:]]
            raise ConfigError(
                f"patch {tuple(patch)} leaves model '{self.name}' a {'x'.join(map(str, bottleneck))} voxel "
                f"bottleneck; its {self.bottleneck_norm} needs at least {self.min_bottleneck_voxels} voxels there: "
                f"make a side at least {2 * divisors[0]}, e.g. patch {tuple(valid)}"
            )


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a network to the registry (later issues register PCT-Net this way)."""
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[ModelSpec]:
    """All registered networks, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered network; ConfigError listing the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model '{name}'; registered models: {', '.join(sorted(_REGISTRY))}") from None


def build_model(
    name: str, in_channels: int, out_channels: int, patch: Sequence[int] = (96, 96, 96), **options: Any
) -> nn.Module:
    """Build a registered network.

    Args:
        name: registry name (see ``medpretrain models``).
        in_channels: image channels.
        out_channels: classes including background.
        patch: training patch size (only fixed-size networks such as UNETR use it).
        options: override the preset's defaults (e.g. ``features=(32, 32, 64, 128, 256, 32)``).
    """
    spec = get_spec(name)
    unknown = set(options) - set(spec.defaults)
    if unknown:
        raise ConfigError(
            f"model '{name}' has no option(s) {sorted(unknown)}; its options: {sorted(spec.defaults)}"
        )
    merged = {**spec.defaults, **options}
    return spec.factory(in_channels, out_channels, tuple(patch), **merged)


def network_layout(name: str, options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The per-stage ``kernels`` and ``strides`` (and the per-axis ``divisors`` they make) a network with a
    ``layout`` (DynUNet) is built with from ``options``; None for the others, and for networks outside the
    registry (a method's own, e.g. Alice's SAM matcher). ``run.json`` records it."""
    spec = _REGISTRY.get(name)
    if spec is None or spec.layout is None:
        return None
    kernels, strides = spec.layout({**spec.defaults, **(options or {})})
    return {"kernels": kernels, "strides": strides, "divisors": list(spec.divisors(3, options))}


def check_model_options(name: str, in_channels: int, out_channels: int, patch: Sequence[int],
                        options: dict[str, Any]) -> None:
    """Build the network once without memory (on torch's ``meta`` device) so that an option value it cannot
    take (``features: [8]``, ``dropout: "x"``) is refused in one line before a run starts, not as a traceback
    from inside MONAI after the run folder was written.

    Raises:
        ConfigError: naming the model, the options given and the network's complaint.
    """
    import torch

    if not options:
        return  # every preset builds with its own defaults
    try:
        try:
            with torch.device("meta"):
                build_model(name, in_channels, out_channels, patch, **options)
        except RuntimeError as exc:
            if "meta" not in str(exc):
                raise
            build_model(name, in_channels, out_channels, patch, **options)  # a network that reads its own tensors
    except ConfigError:
        raise
    except Exception as exc:  # the network's own ValueError, TypeError, AssertionError, IndexError...
        reason = (" ".join(str(exc).split()) or type(exc).__name__).rstrip(".")
        spec = get_spec(name)
        raise ConfigError(
            f"model_options {options} do not build model '{name}': {type(exc).__name__}: {reason}; fix the values "
            f"(its options and defaults: {', '.join(f'{k}={v}' for k, v in spec.defaults.items())})"
        ) from None


# --- MONAI networks ---------------------------------------------------------------------------------


def _basic_unet(in_channels, out_channels, patch, **options):
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **options)


def dynunet_layout(options: dict[str, Any]) -> tuple[list[list[int]], list[list[int]]]:
    """``(kernels, strides)`` per stage that DynUNet options build: the ``kernels`` and ``strides`` options (one
    ``[X, Y, Z]`` per stage, as ``medpretrain plan`` writes them) when given, and then they set the number of
    stages; otherwise ``levels`` stages of 3x3x3 kernels with stride 2 from the second stage on (nnU-Net's
    isotropic layout, the presets' default)."""
    kernels, strides = options.get("kernels"), options.get("strides")
    if kernels is None and strides is None:
        levels = int(options.get("levels", 5))
        return [[3, 3, 3] for _ in range(levels)], [[1, 1, 1]] + [[2, 2, 2] for _ in range(levels - 1)]
    stages = len(strides if strides is not None else kernels)
    if kernels is None:
        kernels = [[3, 3, 3]] * stages
    if strides is None:
        strides = [[1, 1, 1]] + [[2, 2, 2]] * (stages - 1)

    def per_stage(name, values, allowed):
        try:
            rows = [[int(v) for v in row] for row in values]
        except (TypeError, ValueError):
            rows = []
        if not rows or any(len(r) != 3 or any(v not in allowed for v in r) for r in rows):
            raise ConfigError(f"DynUNet option {name}={values!r}: one [X, Y, Z] per stage, each value one of "
                              f"{sorted(allowed)}")
        return rows

    kernels = per_stage("kernels", kernels, {1, 3, 5, 7})
    strides = per_stage("strides", strides, {1, 2})
    if len(kernels) != len(strides):
        raise ConfigError(f"DynUNet options: {len(kernels)} kernels but {len(strides)} strides; one of each per stage")
    if len(strides) < 3:  # MONAI's DynUNet builds an input block, at least one down-sampling and a bottleneck
        raise ConfigError(f"DynUNet options: {len(strides)} stage(s) (strides={strides}); DynUNet needs at least 3. "
                          "A plan gives fewer when the patch is too small to pool twice: give a larger --patch")
    return kernels, strides


def _dynunet(in_channels, out_channels, patch, filters, levels, deep_supervision, kernels=None, strides=None):
    from monai.networks.nets import DynUNet

    # nnU-Net-like: 3x3x3 kernels and stride 2 at every level after the first, unless a plan (or the options)
    # gives per-stage, per-axis kernels and strides (thick slices: 3x3x1 kernels and no pooling along Z at the top).
    kernels, strides = dynunet_layout({"levels": levels, "kernels": kernels, "strides": strides})
    stages = len(strides)
    if len(filters) < stages:
        raise ConfigError(f"DynUNet with {stages} stages needs {stages} filters, got {list(filters)}")
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(filters)[:stages],
        res_block=True,
        deep_supervision=deep_supervision,
        deep_supr_num=max(1, stages - 3) if deep_supervision else 1,
    )


def _unetr(in_channels, out_channels, patch, **options):
    from monai.networks.nets import UNETR

    return UNETR(in_channels=in_channels, out_channels=out_channels, img_size=patch, **options)


def _swinunetr(in_channels, out_channels, patch, **options):
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, **options)


_UNET_ENCODER = ("conv_0.", "down_1.", "down_2.", "down_3.", "down_4.")
_DYNUNET_ENCODER = ("input_block.", "downsamples.", "bottleneck.")
_DYNUNET_HEAD = ("output_block.", "deep_supervision_heads.")

register_model(ModelSpec(
    name="unet",
    description="MONAI BasicUNet, features 16..128 (CPU preset; the spine's calibrated baseline)",
    factory=_basic_unet, encoder_prefixes=_UNET_ENCODER, head_prefixes=("final_conv.",),
    divisor=16, min_size=16, min_bottleneck_voxels=2,
    defaults={"features": (16, 16, 32, 64, 128, 16), "dropout": 0.0},
))
register_model(ModelSpec(
    name="unet-large",
    description="MONAI BasicUNet, features 32..256 (MONAI's default width, GPU)",
    factory=_basic_unet, encoder_prefixes=_UNET_ENCODER, head_prefixes=("final_conv.",),
    divisor=16, min_size=16, min_bottleneck_voxels=2,
    defaults={"features": (32, 32, 64, 128, 256, 32), "dropout": 0.0},
))
register_model(ModelSpec(
    name="dynunet",
    description="MONAI DynUNet, nnU-Net-like residual U-Net, 5 levels, filters 32..320, per-axis kernels and strides "
                "from a plan (GPU)",
    factory=_dynunet, encoder_prefixes=_DYNUNET_ENCODER, head_prefixes=_DYNUNET_HEAD,
    divisor=16, min_size=1, min_bottleneck_voxels=2, layout=dynunet_layout,
    defaults={"filters": (32, 64, 128, 256, 320), "levels": 5, "deep_supervision": False, "kernels": None,
              "strides": None},
))
register_model(ModelSpec(
    name="dynunet-small",
    description="MONAI DynUNet, 5 levels, filters 16..256, per-axis kernels and strides from a plan (CPU preset)",
    factory=_dynunet, encoder_prefixes=_DYNUNET_ENCODER, head_prefixes=_DYNUNET_HEAD,
    divisor=16, min_size=1, min_bottleneck_voxels=2, layout=dynunet_layout,
    defaults={"filters": (16, 32, 64, 128, 256), "levels": 5, "deep_supervision": False, "kernels": None,
              "strides": None},
))
register_model(ModelSpec(
    name="unetr", family="vit",
    description="MONAI UNETR, ViT-B/16 encoder (hidden 768, 12 heads; the papers' preset, GPU)",
    factory=_unetr, encoder_prefixes=("vit.",), head_prefixes=("out.",),
    divisor=16, min_size=16,
    defaults={"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12},
))
register_model(ModelSpec(
    name="unetr-small", family="vit",
    description="MONAI UNETR with a narrow ViT (hidden 192, 3 heads; CPU preset)",
    factory=_unetr, encoder_prefixes=("vit.",), head_prefixes=("out.",),
    divisor=16, min_size=16,
    defaults={"feature_size": 8, "hidden_size": 192, "mlp_dim": 768, "num_heads": 3},
))
register_model(ModelSpec(
    name="swinunetr", family="swin",
    description="MONAI SwinUNETR v2, feature size 48 (the papers' preset, GPU)",
    factory=_swinunetr, encoder_prefixes=("swinViT.",), head_prefixes=("out.",),
    divisor=32, min_size=64,
    defaults={"feature_size": 48, "use_v2": True, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)},
))
register_model(ModelSpec(
    name="swinunetr-small", family="swin",
    description="MONAI SwinUNETR v2, feature size 12 (CPU preset)",
    factory=_swinunetr, encoder_prefixes=("swinViT.",), head_prefixes=("out.",),
    divisor=32, min_size=64,
    defaults={"feature_size": 12, "use_v2": True, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)},
))


# --- PCT-Net (MIS-FM) -----------------------------------------------------------------------------------


def _pctnet(in_channels, out_channels, patch, **options):
    from medpretrain.models.pctnet import PCTNet

    # Any valid size runs through one built model, so the training patch is not needed.
    return PCTNet(in_channels, out_channels, **options)


# Embedding modules and the encoder half of the pyramid; the head is the four 1x1x1 output convolutions.
_PCTNET_ENCODER = ("embeddings.", "pyramid_ct.down3.", "pyramid_ct.down4.", "pyramid_ct.convtrans_e2.",
                   "pyramid_ct.convtrans_e3.", "pyramid_ct.convtrans_e4.")
_PCTNET_HEAD = tuple(f"pred_heads.{m}.out_conv{i}." for m in range(3) for i in range(2)) + (
    "pyramid_ct.out_conv2.", "pyramid_ct.out_conv3.")
# Patch order (X, Y, Z): in-plane X, Y are down-sampled 16 times, the slice axis Z 8 times (resolution mode
# 1; a model built with another resolution_mode checks its own sizes at forward time). Batch normalisation
# in training needs more than one value per channel, hence two bottleneck voxels for batch size 1.
_PCTNET_SIZES = dict(divisor=(16, 16, 8), min_size=8, min_bottleneck_voxels=2,
                     bottleneck_norm="batch normalisation (with batch size 1)")

register_model(ModelSpec(
    name="pctnet", family="pctnet",
    description="PCT-Net of MIS-FM, channels 24..512, the authors' parameter names (released weights load; GPU)",
    factory=_pctnet, encoder_prefixes=_PCTNET_ENCODER, head_prefixes=_PCTNET_HEAD, **_PCTNET_SIZES,
    defaults={"features": (24, 48, 128, 256, 512), "num_heads": (4, 8, 16), "window_size": 6, "mlp_ratio": 4.0,
              "dropout": 0.2, "drop_path": 0.2, "resolution_mode": 1, "deep_supervision": True},
))
register_model(ModelSpec(
    name="pctnet-small", family="pctnet",
    description="PCT-Net with half the channels (12..256; heads 2/4/8, 32 channels each; CPU preset)",
    factory=_pctnet, encoder_prefixes=_PCTNET_ENCODER, head_prefixes=_PCTNET_HEAD, **_PCTNET_SIZES,
    defaults={"features": (12, 24, 64, 128, 256), "num_heads": (2, 4, 8), "window_size": 6, "mlp_ratio": 4.0,
              "dropout": 0.2, "drop_path": 0.2, "resolution_mode": 1, "deep_supervision": True},
))
