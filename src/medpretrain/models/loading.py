"""Loading pretrained weights into a registered network, with a report of what matched and what did not.

Readable layouts:
- our exported ``model.pt`` (``{"state_dict": ..., "model": name, ...}``);
- Lightning checkpoints of our engine (``state_dict`` keys prefixed ``model.``);
- a bare ``state_dict``;
- MONAI's SwinUNETR self-supervised checkpoint (``state_dict`` with ``module.``-prefixed swinViT keys,
  the layout ``SwinUNETR.load_from`` reads).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from medpretrain.errors import CheckpointError
from medpretrain.models.registry import ModelSpec

log = logging.getLogger("medpretrain")

InitPart = Literal["encoder", "all"]


@dataclass
class LoadReport:
    """What a weight load did. Every tensor of the model is in exactly one of the lists.

    Attributes:
        source: the checkpoint file.
        key_mapping: how checkpoint keys were renamed to model keys (e.g. ``strip 'model.'``).
        loaded: model tensors copied from the checkpoint.
        missing: model tensors (of the requested part) the checkpoint does not have.
        shape_mismatch: ``[name, checkpoint shape, model shape]`` for same-named tensors of other shape
            (typically the output head when the class count differs).
        not_requested: model tensors outside the requested part (decoder/head for ``encoder``; the head of a
            pretraining export).
        unexpected: checkpoint tensors with no counterpart in the model.
    """

    source: str
    part: str
    key_mapping: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shape_mismatch: list[list] = field(default_factory=list)
    not_requested: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"init from {self.source} ({self.part}, keys: {self.key_mapping}): "
            f"{len(self.loaded)} tensors loaded, {len(self.missing)} missing, "
            f"{len(self.shape_mismatch)} shape mismatches, {len(self.not_requested)} not requested, "
            f"{len(self.unexpected)} unexpected in checkpoint"
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file in any of the supported layouts.

    Raises CheckpointError naming the file when it is missing, truncated or holds no tensors.
    """
    return _read_checkpoint(path)[0]


def _read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a checkpoint and its ``kind`` ("pretrain:METHOD" for our pretraining exports, else "")."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, pickle errors, ...
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}; the file is truncated or not a "
            "PyTorch checkpoint (re-run the job that wrote it, or use an earlier checkpoint)"
        ) from exc
    state = obj
    for key in ("state_dict", "model_state_dict", "model", "network_weights"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds no state_dict (found {type(state).__name__})")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    kind = obj.get("kind", "") if isinstance(obj, dict) else ""
    return tensors, kind if isinstance(kind, str) else ""


def _key_mappings(model_keys: set[str]):
    """Candidate renamings from checkpoint keys to model keys, most specific last."""

    def strip(prefix):
        return lambda k: k[len(prefix):] if k.startswith(prefix) else None

    yield "as is", lambda k: k
    yield "strip 'model.'", strip("model.")
    yield "strip 'module.'", strip("module.")
    # MONAI SwinUNETR SSL layout (the published model_swinvit.pt): module.<swinViT key>, with the Swin blocks' MLP
    # layers under their timm names fc1/fc2 (MONAI's MLPBlock calls them linear1/linear2).
    yield "'module.' -> 'swinViT.', mlp.fc -> mlp.linear", lambda k: (
        "swinViT." + k[len("module."):].replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        if k.startswith("module.") else None)
    # Checkpoints of MONAI's SSL pretraining script itself (model_bestValRMSE.pt): module.swin_vit.<swinViT key>
    yield "'module.swin_vit.' -> 'swinViT.'", lambda k: (
        "swinViT." + k[len("module.swin_vit."):] if k.startswith("module.swin_vit.") else None)
    yield "strip 'model.module.'", strip("model.module.")


def load_weights(
    model: nn.Module, spec: ModelSpec, checkpoint: str | Path, part: InitPart = "encoder"
) -> LoadReport:
    """Copy matching tensors of ``checkpoint`` into ``model`` and report what happened.

    Args:
        model: a network built by ``build_model(spec.name, ...)``.
        spec: its registry entry (tells which tensors are encoder, decoder, head).
        checkpoint: file in any layout ``read_state_dict`` understands.
        part: ``encoder`` loads only encoder tensors; ``all`` loads everything whose name and shape match
            (the output head is skipped with a shape mismatch when the class count differs). The output head
            of a pretraining export (``kind: pretrain:*``) is never loaded: it answers the pretext task
            (intensities, fusion classes, synthetic shapes), not the downstream classes, even when its shape
            happens to match.

    Raises CheckpointError when nothing of the requested part loads (wrong architecture).
    """
    ckpt, kind = _read_checkpoint(checkpoint)
    pretext_head = kind.startswith("pretrain:")
    target = model.state_dict()
    # Pick the renaming that matches the most model tensors.
    best_name, best_map, best_hits = "as is", {}, -1
    for name, fn in _key_mappings(set(target)):
        mapped = {}
        for k, v in ckpt.items():
            new = fn(k)
            if new is not None and new in target:
                mapped[new] = (k, v)
        if len(mapped) > best_hits:
            best_name, best_map, best_hits = name, mapped, len(mapped)

    report = LoadReport(source=str(checkpoint), part=part, key_mapping=best_name)
    used_ckpt_keys = set()
    new_state = {}
    for name, tensor in target.items():
        if (part == "encoder" and spec.part_of(name) != "encoder") or (pretext_head and spec.part_of(name) == "head"):
            report.not_requested.append(name)
            if name in best_map:
                used_ckpt_keys.add(best_map[name][0])
            continue
        if name not in best_map:
            report.missing.append(name)
            continue
        ckpt_key, value = best_map[name]
        used_ckpt_keys.add(ckpt_key)
        if tuple(value.shape) != tuple(tensor.shape):
            report.shape_mismatch.append([name, list(value.shape), list(tensor.shape)])
            continue
        new_state[name] = value.to(dtype=tensor.dtype)
        report.loaded.append(name)
    report.unexpected = sorted(set(ckpt) - used_ckpt_keys)

    if not report.loaded:
        raise CheckpointError(
            f"nothing loaded from {checkpoint} into model '{spec.name}' ({part}): "
            f"{len(report.missing)} missing, {len(report.shape_mismatch)} shape mismatches, "
            f"{len(report.unexpected)} unexpected keys (e.g. {report.unexpected[:3]}); "
            "is it a checkpoint of another architecture? pass the matching --model"
        )
    kernels = [(n, a, b) for n, a, b in report.shape_mismatch
               if len(a) == len(b) == 5 and a[-3:] != b[-3:] and spec.part_of(n) != "head"]
    if kernels:
        # Convolutions whose kernel sizes differ: the checkpoint is another layout of the network (a DynUNet built
        # from a plan's per-axis kernels against the default 3x3x3, or two plans), and those layers would silently
        # stay random while the run reports a pretrained start.
        name, have, want = kernels[0]
        raise CheckpointError(
            f"{checkpoint}: {len(kernels)} convolution(s) have other kernel sizes than model '{spec.name}' builds "
            f"(e.g. {name}: {have} in the checkpoint, {want} here): it was pretrained with another network layout. "
            "Pretrain with the plan of this fine-tuning (`medpretrain pretrain --plan PREPARED/plan.json`), or give "
            "the fine-tuning the pretraining's model_options (kernels, strides)")
    model.load_state_dict(new_state, strict=False)
    log.info(report.summary())
    if report.shape_mismatch:
        log.info("shape mismatches (kept freshly initialised): %s", report.shape_mismatch[:5])
    return report
