"""nnU-Net's networks (``dynamic-network-architectures``) in the model registry.

The networks are the classes nnU-Net v2 itself builds from a plans file, built from the same description a plans
file holds (the ``architecture`` entry: class name, ``arch_kwargs`` and the keys that name classes), so a network
trained here has exactly the parameter names and shapes of the nnU-Net network built from that entry, and
``medpretrain export --format nnunet`` (``medpretrain.interop.nnunet``) can hand its weights to
``nnUNetv2_train -pretrained_weights``.

Registering costs nothing: ``dynamic_network_architectures`` (the optional extra ``medpretrain[nnunet]``) is
imported when a network is built, not when this module is imported.

Presets (3x3x3 kernels, stride 2 from the second stage on, instance normalisation with affine parameters, leaky
ReLU, convolution biases: nnU-Net's plans for isotropic data):
- ``resenc-l``: ``ResidualEncoderUNet`` as nnU-Net's ResEnc-L planner builds it for a 3D patch of 128-192 voxels
  per side (and as nnssl pretrains it): 6 stages, features 32..320, residual blocks (1, 3, 4, 6, 6, 6), one
  convolution per decoder stage.
- ``resenc-l-cpu``: the same topology over 5 stages, half the width (16..160), for CPU work.
- ``plainconv-unet``: ``PlainConvUNet`` as nnU-Net's default planner builds ``3d_fullres`` for such a patch:
  6 stages, features 32..320, two convolutions per stage in encoder and decoder.
- ``plainconv-unet-cpu``: the same over 5 stages, 16..160.

Axes: like every network here these take ``(N, C, X, Y, Z)``; the architectures are isotropic, so only the export
needs to know that nnU-Net reads arrays as ``(Z, Y, X)`` (see ``interop.nnunet``).

Deep supervision (option ``deep_supervision``, off in every preset): in training the network returns one output
per decoder stage, full resolution first, which ``SegmentationModule`` trains with ``DeepSupervisionLoss``; in
evaluation it returns the full-resolution tensor. Without it the segmentation layers of the coarser decoder stages
exist (nnU-Net always builds them, so that weights load either way) but are unused, and are created frozen so that
DDP does not wait for their gradients.
"""

from __future__ import annotations

import importlib
from typing import Any, Sequence

import torch.nn as nn

from medpretrain.errors import ConfigError
from medpretrain.models.registry import ModelSpec, register_model

DNA = "dynamic_network_architectures"
INSTALL_HINT = "pip install 'medpretrain[nnunet]' (or: pip install dynamic-network-architectures)"

RESENC_CLASS = f"{DNA}.architectures.unet.ResidualEncoderUNet"
PLAIN_CLASS = f"{DNA}.architectures.unet.PlainConvUNet"
# The arch_kwargs that name a class (nnU-Net's plans file: ``_kw_requires_import``).
KW_REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")

# State-dict keys: the decoder holds the encoder as a submodule, so its tensors appear twice, once under
# ``encoder.`` and once under ``decoder.encoder.`` (the same tensors). The head is the 1x1x1 segmentation layers.
ENCODER_PREFIXES = ("encoder.", "decoder.encoder.")
HEAD_PREFIXES = ("decoder.seg_layers.",)


def import_dna():
    """The ``dynamic_network_architectures`` package; ConfigError with the install command when it is missing."""
    try:
        return importlib.import_module(DNA)
    except ImportError:
        raise ConfigError(f"nnU-Net's networks need the optional package dynamic-network-architectures: "
                          f"{INSTALL_HINT}") from None


def architecture(class_name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The nnU-Net plans ``architecture`` entry of a network with the registry ``options`` (in our axis order X, Y, Z;
    nnU-Net's plans list kernel sizes and strides per stage in its array order, which ``interop.nnunet`` writes).

    Args:
        class_name: ``RESENC_CLASS`` or ``PLAIN_CLASS``.
        options: the preset's options merged with the user's (``features_per_stage``, blocks or convolutions per
            stage, ``n_conv_per_stage_decoder``, ``deep_supervision``).
    """
    features = [int(f) for f in options["features_per_stage"]]
    n = len(features)
    per_stage = "n_blocks_per_stage" if class_name == RESENC_CLASS else "n_conv_per_stage"
    kwargs: dict[str, Any] = {
        "n_stages": n,
        "features_per_stage": features,
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3] for _ in range(n)],
        "strides": [[1, 1, 1]] + [[2, 2, 2] for _ in range(n - 1)],
        per_stage: [int(b) for b in options[per_stage]],
        "n_conv_per_stage_decoder": [int(c) for c in options["n_conv_per_stage_decoder"]],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    return {"network_class_name": class_name, "arch_kwargs": kwargs, "_kw_requires_import": list(KW_REQUIRES_IMPORT)}


def _locate(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def build_from_architecture(arch: dict[str, Any], in_channels: int, out_channels: int,
                            deep_supervision: bool = False) -> nn.Module:
    """Build the network of a plans ``architecture`` entry the way nnU-Net v2 does (its
    ``get_network_from_plans``): class and named classes resolved from their dotted names, ``input_channels`` and
    ``num_classes`` added, then the class's own ``initialize`` applied to every module (He initialisation; the last
    normalisation of each residual block zeroed)."""
    import_dna()
    kwargs = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(kwargs[key])
    network = _locate(arch["network_class_name"])(input_channels=in_channels, num_classes=out_channels,
                                                   deep_supervision=deep_supervision, **kwargs)
    if hasattr(network, "initialize"):
        network.apply(network.initialize)
    return network


def _outputs_per_mode(module: nn.Module, args) -> None:
    # Forward pre-hook: all decoder outputs in training (deep supervision), the full-resolution one in evaluation.
    module.decoder.deep_supervision = module.training


def _factory(class_name: str):
    def build(in_channels: int, out_channels: int, patch: Sequence[int], **options) -> nn.Module:
        arch = architecture(class_name, options)
        n = arch["arch_kwargs"]["n_stages"]
        per_stage = "n_blocks_per_stage" if class_name == RESENC_CLASS else "n_conv_per_stage"
        lengths = {"features_per_stage": n, per_stage: n, "n_conv_per_stage_decoder": n - 1}
        bad = {k: len(options[k]) for k, want in lengths.items() if len(options[k]) != want}
        if bad:
            raise ConfigError(f"a {n}-stage network needs {n} features_per_stage, {n} {per_stage} and {n - 1} "
                              f"n_conv_per_stage_decoder entries; got {bad}")
        divisor = 2 ** (n - 1)
        if any(int(p) % divisor for p in patch):
            raise ConfigError(f"patch {tuple(patch)} does not fit a {n}-stage network: every side must be a multiple "
                              f"of {divisor}")
        deep_supervision = bool(options["deep_supervision"])
        network = build_from_architecture(arch, in_channels, out_channels, deep_supervision)
        if deep_supervision:
            network.register_forward_pre_hook(_outputs_per_mode)
        else:
            for layer in network.decoder.seg_layers[:-1]:  # never used without deep supervision
                layer.requires_grad_(False)
        return network

    return build


def is_dna_model(spec: ModelSpec) -> bool:
    """Whether a registered network is one of nnU-Net's (built from dynamic-network-architectures)."""
    return spec.name in NNUNET_MODELS


def network_class(spec: ModelSpec) -> str:
    """The dotted class name of one of nnU-Net's registered networks."""
    return NNUNET_MODELS[spec.name]


# Divisor 2^(stages - 1); two bottleneck voxels for the instance normalisation there.
_RESENC_L = dict(features_per_stage=(32, 64, 128, 256, 320, 320), n_blocks_per_stage=(1, 3, 4, 6, 6, 6),
                 n_conv_per_stage_decoder=(1, 1, 1, 1, 1), deep_supervision=False)
_RESENC_L_CPU = dict(features_per_stage=(16, 32, 64, 128, 160), n_blocks_per_stage=(1, 3, 4, 6, 6),
                     n_conv_per_stage_decoder=(1, 1, 1, 1), deep_supervision=False)
_PLAIN = dict(features_per_stage=(32, 64, 128, 256, 320, 320), n_conv_per_stage=(2, 2, 2, 2, 2, 2),
              n_conv_per_stage_decoder=(2, 2, 2, 2, 2), deep_supervision=False)
_PLAIN_CPU = dict(features_per_stage=(16, 32, 64, 128, 160), n_conv_per_stage=(2, 2, 2, 2, 2),
                  n_conv_per_stage_decoder=(2, 2, 2, 2), deep_supervision=False)

NNUNET_MODELS = {"resenc-l": RESENC_CLASS, "resenc-l-cpu": RESENC_CLASS,
                 "plainconv-unet": PLAIN_CLASS, "plainconv-unet-cpu": PLAIN_CLASS}

_COMMON = dict(encoder_prefixes=ENCODER_PREFIXES, head_prefixes=HEAD_PREFIXES, min_bottleneck_voxels=2)

register_model(ModelSpec(
    name="resenc-l",
    description="nnU-Net ResEnc-L (ResidualEncoderUNet, 6 stages, 32..320, blocks 1-3-4-6-6-6; nnssl's CNN; GPU; "
                "needs medpretrain[nnunet])",
    factory=_factory(RESENC_CLASS), divisor=32, min_size=32, defaults=_RESENC_L, **_COMMON,
))
register_model(ModelSpec(
    name="resenc-l-cpu",
    description="ResEnc-L topology, 5 stages, 16..160 (CPU preset: ~5.6 s per step at 64x64x48, batch 2, "
                "1 thread, 1.6x unet; needs medpretrain[nnunet])",
    factory=_factory(RESENC_CLASS), divisor=16, min_size=16, defaults=_RESENC_L_CPU, **_COMMON,
))
register_model(ModelSpec(
    name="plainconv-unet",
    description="nnU-Net 3d_fullres default (PlainConvUNet, 6 stages, 32..320, 2 convs per stage; GPU; needs "
                "medpretrain[nnunet])",
    factory=_factory(PLAIN_CLASS), divisor=32, min_size=32, defaults=_PLAIN, **_COMMON,
))
register_model(ModelSpec(
    name="plainconv-unet-cpu",
    description="nnU-Net 3d_fullres topology, 5 stages, 16..160 (CPU preset: ~4.3 s per step at 64x64x48, "
                "batch 2, 1 thread, 1.25x unet; needs medpretrain[nnunet])",
    factory=_factory(PLAIN_CLASS), divisor=16, min_size=16, defaults=_PLAIN_CPU, **_COMMON,
))
