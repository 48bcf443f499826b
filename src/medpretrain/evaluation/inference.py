"""Sliding-window inference with a trained run's exported model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from medpretrain.config import InferenceConfig
from medpretrain.engine.device import autocast_context, configure_cuda_math
from medpretrain.errors import CheckpointError
from medpretrain.models import build_model, read_state_dict


@dataclass
class TrainedModel:
    """A network ready for inference, with what it was trained on.

    Attributes:
        network: the model in eval mode on ``device``.
        meta: the contents of ``model.pt`` without the weights (model name, labels, preprocessing, patch...).
        device: where it runs (CUDA when available).
        precision: Lightning precision string used for autocast.
    """

    network: torch.nn.Module
    meta: dict
    device: torch.device
    precision: str

    @property
    def labels(self) -> dict[int, str]:
        return {int(k): v for k, v in self.meta["labels"].items()}

    @property
    def patch(self) -> tuple[int, int, int]:
        return tuple(self.meta["patch"])


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_trained_model(run_dir: str | Path, device: torch.device | None = None,
                       precision: str | None = None, model_file: str | Path | None = None) -> TrainedModel:
    """Load ``RUN/model.pt`` written at the end of a fine-tuning run (or ``model_file``, another export of it)."""
    path = Path(model_file) if model_file else Path(run_dir) / "model.pt"
    # "Not finished, use --resume" is only the answer for a run folder: a typo or another folder needs another fix.
    if model_file and not path.is_file():
        raise CheckpointError(f"--model-file {path} does not exist; pass a model export of the run "
                              f"(RUN/model.pt or RUN/curve/model_stepNNNNNNN.pt)")
    if not model_file and not Path(run_dir).is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist; pass the --out of a finished finetune run")
    if not model_file and not path.is_file() and not (Path(run_dir) / "run.json").is_file():
        raise CheckpointError(f"{run_dir} is not a medpretrain run (no run.json, no model.pt); pass the --out of a "
                              "finished finetune run")
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist: the run in {run_dir} has not finished; "
            "finish it with `medpretrain finetune ... --out RUN --resume`"
        )
    try:
        meta = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; re-export it by resuming the run") from exc
    state = read_state_dict(path)
    meta = {k: v for k, v in meta.items() if k != "state_dict"}
    network = build_model(meta["model"], meta["in_channels"], meta["out_channels"], meta["patch"],
                          **meta.get("model_options", {}))
    network.load_state_dict(state)
    device = device or default_device()
    if device.type == "cuda":
        configure_cuda_math("gpu", deterministic=False)  # TF32 and cuDNN autotuning: the windows have one size
    network.to(device).eval()
    if precision is None:
        # A network trained in fp32 is scored in fp32 (on a CPU with native bf16 too: arms trained in fp32 on
        # different CPUs are then scored with the same arithmetic); any other is scored with what `auto` gives
        # this device (a CPU-trained model may run on a GPU).
        from medpretrain.engine.device import resolve_precision

        precision = ("32-true" if meta.get("precision") == "32-true"
                     else resolve_precision("auto", "gpu" if device.type == "cuda" else "cpu"))
    return TrainedModel(network, meta, device, precision)


# Bytes per voxel of sliding-window inference held beside the windows when the volume stays on the device: the
# input channels, MONAI's stitched logits and its weight map, and the probabilities (float32).
def _volume_bytes(voxels: int, in_channels: int, out_channels: int) -> int:
    return 4 * voxels * (in_channels + 2 * out_channels + 1)


def volume_device(shape, in_channels: int, out_channels: int, device: torch.device, setting: str = "auto",
                  free_bytes: int | None = None, share: float = 0.5) -> torch.device:
    """Where the whole volume, the stitched logits and the probabilities of one case live during sliding-window
    inference; the windows always run on ``device`` (MONAI's ``sw_device``).

    Args:
        shape: the (padded) spatial shape.
        in_channels, out_channels: image channels and classes.
        device: the network's device.
        setting: ``auto``, ``model`` (always ``device``) or ``cpu`` (``InferenceConfig.volume_device``).
        free_bytes: free memory of ``device`` (None: asked from CUDA, counting what PyTorch's caching allocator
            holds unused as free).
        share: ``auto`` keeps the volume on a CUDA ``device`` when it needs at most this share of the free
            memory; the rest is left to the windows' activations.
    """
    if device.type != "cuda" or setting == "model":
        return device
    if setting == "cpu":
        return torch.device("cpu")
    if free_bytes is None:
        free, _ = torch.cuda.mem_get_info(device)
        free_bytes = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    needed = _volume_bytes(int(np.prod([int(s) for s in shape])), in_channels, out_channels)
    return device if needed <= share * free_bytes else torch.device("cpu")


def pad_to_window(image: np.ndarray, roi, fill) -> tuple[np.ndarray, tuple[slice, ...]]:
    """``image`` (C, X, Y, Z) padded, centred, to at least ``roi`` along each axis with ``fill`` (one value per
    channel), and the slices that cut the original back out of the padded array."""
    shape = image.shape[1:]
    size = [max(s, r) for s, r in zip(shape, roi)]
    before = [(n - s) // 2 for n, s in zip(size, shape)]
    out = np.empty((image.shape[0], *size), np.float32)
    out[...] = np.asarray(fill, np.float32).reshape(-1, 1, 1, 1)
    inside = tuple(slice(b, b + s) for b, s in zip(before, shape))
    out[(slice(None), *inside)] = image
    return out, inside


@torch.no_grad()
def predict_probabilities(model: TrainedModel, image: np.ndarray, cfg: InferenceConfig,
                          fill=None) -> np.ndarray:
    """Class probabilities (C, X, Y, Z) float32 for a prepared image (channels, X, Y, Z).

    MONAI sliding-window inference over windows of the training patch (or ``cfg.roi``), blended with
    Gaussian weights. A volume smaller than a window is padded with ``fill`` (one value per channel: the case's
    "nothing" intensity, ``data.crops.background_fill``, the value training patches are padded with; None = 0)
    and cropped back. Windows run on the network's device; the volume and the stitched output stay there too
    unless :func:`volume_device` sends them to CPU memory (a large CT on a GPU with little free memory).
    """
    roi = tuple(cfg.roi) if cfg.roi else model.patch
    fill = [0.0] * image.shape[0] if fill is None else list(fill)
    padded, inside = pad_to_window(np.asarray(image, dtype=np.float32), roi, fill)  # a copy: mmap is read-only
    where = volume_device(padded.shape[1:], padded.shape[0], int(model.meta.get("out_channels", 2)), model.device,
                          cfg.volume_device)
    x = torch.from_numpy(padded)[None].to(where)

    def forward(batch):
        out = model.network(batch)
        if out.dim() == batch.dim() + 1:  # deep-supervision stacks: keep the full-resolution output
            out = out[:, 0]
        return out.float()

    with autocast_context(model.precision, model.device):
        logits = sliding_window_inference(
            x, roi_size=roi, sw_batch_size=cfg.sw_batch_size, predictor=forward,
            overlap=cfg.overlap, mode=cfg.mode, sw_device=model.device, device=where,
        )
    return torch.softmax(logits.float(), dim=1)[0][(slice(None), *inside)].cpu().numpy()
