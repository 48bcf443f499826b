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
        divisor: every patch/input side must be a multiple of this (total down-sampling).
        min_size: smallest input side the network accepts.
        min_bottleneck_voxels: fewest voxels the deepest feature map (``patch / divisor``) may have; 2 for
            networks with instance normalisation there, which fails on a single voxel.
        defaults: the preset's options, shown by ``medpretrain models`` and overridable.
    """

    name: str
    description: str
    factory: Callable[..., nn.Module]
    encoder_prefixes: tuple[str, ...]
    head_prefixes: tuple[str, ...]
    divisor: int = 16
    min_size: int = 16
    min_bottleneck_voxels: int = 1
    defaults: dict[str, Any] = field(default_factory=dict)

    def part_of(self, parameter_name: str) -> str:
        """'encoder', 'head' or 'decoder' for a parameter (or buffer) name of this network."""
        if parameter_name.startswith(self.encoder_prefixes):
            return "encoder"
        if parameter_name.startswith(self.head_prefixes):
            return "head"
        return "decoder"

    def check_patch(self, patch: Sequence[int]) -> None:
        """Raise ConfigError naming the nearest valid sizes if ``patch`` does not fit the network."""
        bad = [p for p in patch if p % self.divisor or p < self.min_size]
        if bad:
            valid = [max(self.min_size, int(round(p / self.divisor)) * self.divisor) for p in patch]
            raise ConfigError(
                f"patch {tuple(patch)} does not fit model '{self.name}': every side must be a multiple of "
                f"{self.divisor} and at least {self.min_size}; nearest valid patch: {tuple(valid)}"
            )
        bottleneck = [p // self.divisor for p in patch]
        if math.prod(bottleneck) < self.min_bottleneck_voxels:
            valid = [2 * patch[0], *patch[1:]]
            raise ConfigError(
                f"patch {tuple(patch)} leaves model '{self.name}' a {'x'.join(map(str, bottleneck))} voxel "
                f"bottleneck; its instance normalisation needs at least {self.min_bottleneck_voxels} voxels there: "
                f"make a side at least {2 * self.divisor}, e.g. patch {tuple(valid)}"
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


# --- MONAI networks ---------------------------------------------------------------------------------


def _basic_unet(in_channels, out_channels, patch, **options):
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **options)


def _dynunet(in_channels, out_channels, patch, filters, levels, deep_supervision):
    from monai.networks.nets import DynUNet

    # nnU-Net-like: 3x3x3 kernels, stride 2 at every level after the first.
    kernels = [[3, 3, 3]] * levels
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (levels - 1)
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(filters)[:levels],
        res_block=True,
        deep_supervision=deep_supervision,
        deep_supr_num=max(1, levels - 3) if deep_supervision else 1,
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
    description="MONAI DynUNet, nnU-Net-like residual U-Net, 5 levels, filters 32..320 (GPU)",
    factory=_dynunet, encoder_prefixes=_DYNUNET_ENCODER, head_prefixes=_DYNUNET_HEAD,
    divisor=16, min_size=16, min_bottleneck_voxels=2,
    defaults={"filters": (32, 64, 128, 256, 320), "levels": 5, "deep_supervision": False},
))
register_model(ModelSpec(
    name="dynunet-small",
    description="MONAI DynUNet, 5 levels, filters 16..256 (CPU preset)",
    factory=_dynunet, encoder_prefixes=_DYNUNET_ENCODER, head_prefixes=_DYNUNET_HEAD,
    divisor=16, min_size=16, min_bottleneck_voxels=2,
    defaults={"filters": (16, 32, 64, 128, 256), "levels": 5, "deep_supervision": False},
))
register_model(ModelSpec(
    name="unetr",
    description="MONAI UNETR, ViT-B/16 encoder (hidden 768, 12 heads; the papers' preset, GPU)",
    factory=_unetr, encoder_prefixes=("vit.",), head_prefixes=("out.",),
    divisor=16, min_size=16,
    defaults={"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12},
))
register_model(ModelSpec(
    name="unetr-small",
    description="MONAI UNETR with a narrow ViT (hidden 192, 3 heads; CPU preset)",
    factory=_unetr, encoder_prefixes=("vit.",), head_prefixes=("out.",),
    divisor=16, min_size=16,
    defaults={"feature_size": 8, "hidden_size": 192, "mlp_dim": 768, "num_heads": 3},
))
register_model(ModelSpec(
    name="swinunetr",
    description="MONAI SwinUNETR v2, feature size 48 (the papers' preset, GPU)",
    factory=_swinunetr, encoder_prefixes=("swinViT.",), head_prefixes=("out.",),
    divisor=32, min_size=64,
    defaults={"feature_size": 48, "use_v2": True, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)},
))
register_model(ModelSpec(
    name="swinunetr-small",
    description="MONAI SwinUNETR v2, feature size 12 (CPU preset)",
    factory=_swinunetr, encoder_prefixes=("swinViT.",), head_prefixes=("out.",),
    divisor=32, min_size=64,
    defaults={"feature_size": 12, "use_v2": True, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)},
))
