"""Export a run's network as nnU-Net v2 pretrained weights (``medpretrain export --format nnunet``).

The checkpoint holds ``{"network_weights": state_dict}``, the layout nnU-Net v2's
``nnunetv2.run.load_pretrained_weights.load_pretrained_weights`` reads when ``nnUNetv2_train ... -pretrained_weights
FILE`` starts: every key of the nnU-Net network except those containing ``.seg_layers.`` must be in the file with
the same shape, and the segmentation layers are left as nnU-Net initialised them. Only networks nnU-Net can build
(``dynamic-network-architectures``: ``resenc-l``, ``resenc-l-cpu``, ``plainconv-unet``, ``plainconv-unet-cpu``)
can satisfy that; any other is refused.

Beside the checkpoint goes ``FILE.json`` (the extension replaced), the "adaptation description" (in the spirit of
nnssl's released checkpoints): the plans ``architecture`` entry that makes nnU-Net build exactly this network, a
ready-made plans configuration, the state-dict keys of the encoder and stem, and how the network was pretrained
(method, steps, patch, spacing, intensity normalisation). ``docs/nnunet.md`` says how to use it.

Axes: our networks see arrays ``(X, Y, Z)`` of RAS-oriented scans; nnU-Net reads images as ``(Z, Y, X)``
(SimpleITK's order, which its NiBabel readers reproduce). The default ``axes="zyx"`` therefore reverses the three
kernel axes of every convolution weight, so that a kernel's axis meets the same anatomical axis in nnU-Net's arrays
as in pretraining: nnU-Net's forward on the ``(Z, Y, X)`` array equals ours on the ``(X, Y, Z)`` array.
``axes="xyz"`` writes the kernels as trained. Sizes in the description (per-stage kernel sizes and strides, patch,
spacing) are always in nnU-Net's order, as its plans file wants them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from medpretrain.atomic import atomic_torch_save, atomic_write_json, check_writable_folder
from medpretrain.errors import CheckpointError, ConfigError
from medpretrain.models import get_spec
from medpretrain.models import nnunet_nets as nets

log = logging.getLogger("medpretrain")

FORMATS = ("nnunet",)
EXPORT_FORMAT = "medpretrain-nnunet-pretrained"
EXPORT_FORMAT_VERSION = 1
SKIPPED_BY_NNUNET = ".seg_layers."  # load_pretrained_weights never transfers keys containing this
Axes = Literal["zyx", "xyz"]


def description_path(checkpoint: str | Path) -> Path:
    """Where the adaptation description of ``checkpoint`` goes: the same name with ``.json`` as extension."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_suffix(".json") if checkpoint.suffix else checkpoint.with_name(checkpoint.name + ".json")


def _read_export(run: Path) -> tuple[dict, Path]:
    """The contents of a run's ``model.pt`` (``run`` a run folder or the model file itself)."""
    path = run / "model.pt" if run.is_dir() else run
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass a finished run folder (pretrain or finetune --out) or its "
                              "model.pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}; the file is truncated or not a "
                              "medpretrain model export (re-run the job that wrote it)") from None
    if not (isinstance(obj, dict) and obj.get("format") == "medpretrain-model" and isinstance(obj.get("state_dict"), dict)):
        raise CheckpointError(f"{path} is not a medpretrain model export (RUN/model.pt of a pretrain or finetune run)")
    return obj, path


def _run_info(model_file: Path) -> tuple[dict, Path]:
    """The ``run.json`` of the run a model file belongs to (``RUN/model.pt`` or ``RUN/curve/model_stepN.pt``) and the
    run folder; ``{}`` when there is none."""
    for folder in (model_file.parent, model_file.parent.parent):
        run_file = folder / "run.json"
        if run_file.is_file():
            try:
                return json.loads(run_file.read_text(encoding="utf-8")), folder
            except (OSError, ValueError):
                break
    return {}, model_file.parent


def _preprocess(meta: dict, run_info: dict) -> dict | None:
    """The preprocessing of the data the network was trained on: a fine-tuning export stores it; a pretraining run
    names its prepared pool, whose manifest holds it; None for generated data (AVS-DB)."""
    if isinstance(meta.get("preprocess"), dict):
        return meta["preprocess"]
    data = run_info.get("data")
    if not data:
        return None
    manifest = Path(data) / "manifest.json"
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("preprocess")
    except (OSError, ValueError):
        return None


def _normalisation(preprocess: dict | None) -> str:
    if preprocess is None:
        return "generated data (no scan; intensities as the method's generator makes them)"
    modality = preprocess.get("modality")
    ct = (f"CT: clipped to the HU window {list(preprocess.get('ct_window', []))} and scaled to [0, 1]")
    mr = (f"MR: clipped to the percentiles {list(preprocess.get('mr_percentiles', []))} of the scan, then z-scored "
          "per scan")
    return {"CT": ct, "MR": mr}.get(modality, f"by each scan's modality; {ct}; {mr}")


def _reverse(values):
    return None if values is None else list(values)[::-1]


def export_nnunet(run: str | Path, out: str | Path, axes: Axes = "zyx") -> Path:
    """Write ``out`` (nnU-Net v2 ``-pretrained_weights`` checkpoint) and ``out`` with ``.json`` (the adaptation
    description) from a finished run's ``model.pt``.

    Args:
        run: a pretraining or fine-tuning run folder, or its ``model.pt`` (or a learning-curve export).
        out: the checkpoint file to write (e.g. ``pretrained.pth``).
        axes: ``zyx`` (default): kernels reordered to nnU-Net's ``(Z, Y, X)`` arrays; ``xyz``: as trained.

    Returns:
        The checkpoint path.

    Raises:
        ConfigError: the run's network is not one nnU-Net can build, or a bad ``out``/``axes``.
        CheckpointError: the run has no readable ``model.pt``, or its tensors do not fit the network.
    """
    if axes not in ("zyx", "xyz"):
        raise ConfigError(f"--axes {axes!r}: choose zyx (nnU-Net's array order, the default) or xyz (as trained)")
    run, out = Path(run), Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; pass the checkpoint file to write, e.g. {out / 'pretrained.pth'}")
    meta, model_file = _read_export(run)
    name = meta.get("model")
    spec = get_spec(name)
    if not nets.is_dna_model(spec):
        raise ConfigError(
            f"{run}: model '{name}' is not one of nnU-Net's networks, so nnU-Net cannot load its weights; export takes "
            f"{', '.join(nets.NNUNET_MODELS)}: pretrain with --model resenc-l (GPU) or resenc-l-cpu and export that run"
        )
    check_writable_folder(out.parent, "--out")
    options = {**spec.defaults, **(meta.get("model_options") or {})}
    arch = nets.architecture(nets.network_class(spec), options)
    in_channels, out_channels = int(meta["in_channels"]), int(meta["out_channels"])
    nets.import_dna()
    with torch.device("meta"):
        skeleton = nets.build_from_architecture(arch, in_channels, out_channels)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    state = {k: v for k, v in meta["state_dict"].items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(expected) - set(state))
    bad_shape = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or bad_shape:
        raise CheckpointError(
            f"{model_file} does not hold the network of model '{name}' with options {meta.get('model_options') or {}}: "
            f"{len(missing)} missing tensors (e.g. {missing[:2]}), {len(bad_shape)} of other shape (e.g. {bad_shape[:2]})"
        )
    weights, converted = {}, {}
    for key in expected:  # the network's own keys, in its order (nothing else travels)
        source = state[key]
        # dynamic-network-architectures names many tensors twice (the decoder holds the encoder; a convolution block
        # holds its convolution as `conv` and in `all_modules`): keep them one tensor, as in the network, so the file
        # is not several times the model's size.
        shared = (source.data_ptr(), tuple(source.shape), source.stride(), source.dtype)
        if shared not in converted:
            tensor = source.detach().to("cpu", torch.float32).clone()
            if axes == "zyx" and tensor.dim() == 5:  # convolution and transposed-convolution kernels (O, I, X, Y, Z)
                tensor = tensor.permute(0, 1, 4, 3, 2).contiguous()
            converted[shared] = tensor
        weights[key] = converted[shared]

    # Sizes in nnU-Net's plans are in its array order (Z, Y, X), whatever the kernels' order.
    for key in ("kernel_sizes", "strides"):
        arch["arch_kwargs"][key] = [_reverse(k) for k in arch["arch_kwargs"][key]]
    order = _reverse
    run_info, run_dir = _run_info(model_file)
    config = run_info.get("config", {})
    preprocess = _preprocess(meta, run_info)
    spacing = preprocess.get("spacing") if preprocess else None
    patch = order(meta.get("patch"))
    encoder_keys = [k for k in expected if spec.part_of(k) == "encoder"]
    # The plans the configuration goes into: ResEnc-L's for the residual networks, the default ones otherwise.
    planner, plans = ((" -pl nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans") if arch["network_class_name"] ==
                      nets.RESENC_CLASS else ("", "nnUNetPlans"))
    description: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "checkpoint": out.name,
        "model": name,
        "architecture": arch,
        "num_input_channels": in_channels,
        "axis_order": axes,
        "axis_note": "kernel_sizes, strides, patch and spacing are in nnU-Net's array order (Z, Y, X); " + (
            "so are the convolution kernels (pretraining saw (X, Y, Z) arrays of RAS-oriented scans)" if axes == "zyx"
            else "the convolution kernels are as trained, in (X, Y, Z) order"),
        "plans_configuration": {"inherits_from": "3d_fullres", "patch_size": patch, "architecture": arch},
        "recommended_downstream_patch_size": patch,
        "key_to_encoder": getattr(skeleton, "key_to_encoder", "encoder"),
        "key_to_stem": getattr(skeleton, "key_to_stem", None),
        "keys_to_in_proj": list(getattr(skeleton, "keys_to_in_proj", ())),
        "encoder_prefixes": list(spec.encoder_prefixes),
        "encoder_keys": encoder_keys,
        "not_loaded_by_nnunet": [k for k in expected if SKIPPED_BY_NNUNET in k],
        "pretraining": {
            "run": str(run_dir.resolve()),
            "model_file": str(model_file.resolve().relative_to(run_dir.resolve())),
            "kind": meta.get("kind"),
            "method": meta.get("method"),
            "untrained": bool(meta.get("untrained", False)),
            "steps": meta.get("global_step"),
            "model_options": meta.get("model_options") or {},
            "patch_xyz": list(meta.get("patch") or []),
            "patch": patch,
            "batch": config.get("batch"),
            "lr": config.get("lr"),
            "seed": config.get("seed"),
            "precision": meta.get("precision"),
            "data": run_info.get("data"),
            "spacing_mm": order(spacing),
            "modality": preprocess.get("modality") if preprocess else None,
            "normalisation": _normalisation(preprocess),
            "preprocess": preprocess,
            "out_channels": out_channels,
        },
        "commands": {
            "plan_and_preprocess": f"nnUNetv2_plan_and_preprocess -d DATASET_ID{planner} -c 3d_fullres"
            + (f" -overwrite_target_spacing {' '.join(f'{s:g}' for s in order(spacing))}" if spacing else ""),
            "add_configuration": f"add 'plans_configuration' to the 'configurations' of {plans}.json (nnU-Net's "
                                 "preprocessed folder of the dataset) under the name '3d_medpretrain' (docs/nnunet.md)",
            "train": f"nnUNetv2_train DATASET_ID 3d_medpretrain FOLD -p {plans} -pretrained_weights {out.resolve()}",
        },
    }
    atomic_torch_save({"network_weights": weights, "medpretrain": {"format": EXPORT_FORMAT,
                                                                    "description": description_path(out).name}}, out)
    atomic_write_json(description_path(out), description)
    log.info("nnU-Net pretrained weights: %s (%d tensors, axes %s); adaptation description: %s", out, len(weights),
             axes, description_path(out))
    return out
