"""The Lightning module of supervised segmentation training (fine-tuning and training from scratch)."""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import torch
from monai.losses import DiceCELoss

# The schedule lives with the other shared blocks; imported here for the modules that used it from here.
from medpretrain.blocks.optim import make_optimizer, scheduled_optimization
from medpretrain.blocks.optim import one_cycle_factor, one_cycle_scheduler  # noqa: F401
from medpretrain.config import TrainingConfig
from medpretrain.errors import TrainingError
from medpretrain.models import build_model, get_spec


class NonFiniteLossGuard:
    """Raise TrainingError naming the step when a loss is NaN or Inf (before it reaches the weights)."""

    @staticmethod
    def check(loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise TrainingError(
                f"loss is {loss.detach().float().item()} at step {step}: training stopped, the last good "
                "checkpoint is intact; lower --lr, check the data (prepare refuses NaN voxels), or use "
                "--precision 32"
            )


def float32_loss(device: torch.device):
    """Autocast off, for losses: under bf16/fp16 mixed precision the network runs in low precision, but a loss
    (softmax, sums over millions of voxels, logs) is computed in float32 from logits cast with ``.float()``.
    CUDA's autocast already keeps softmax and cross-entropy in float32; CPU autocast does not keep softmax, and
    Dice's sums would run in the logits' dtype."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast (meta tensors for FLOP counting): nothing to turn off
        return contextlib.nullcontext()


class SegmentationModule(pl.LightningModule):
    """Trains a registered network on labelled patches (real or synthetic) with a segmentation loss.

    Args:
        cfg: the training configuration (model, optimiser, schedule).
        in_channels: image channels.
        out_channels: classes including background.
        loss_fn: loss on (logits, integer label map); default MONAI DiceCELoss with softmax.
        freeze_encoder: train the decoder and head only (linear probing).

    Attributes:
        batch_transform: None, or a callable applied to every training batch once it is on the training device
            (``on_after_batch_transfer``): fine-tuning's patch augmentation when it runs on the GPU
            (``data.sampling.PatchAugmenter``).
    """

    batch_transform = None

    def __init__(self, cfg: TrainingConfig, in_channels: int, out_channels: int,
                 loss_fn: torch.nn.Module | None = None, freeze_encoder: bool = False):
        super().__init__()
        self.cfg = cfg
        self.freeze_encoder = freeze_encoder
        self.spec = get_spec(cfg.model)
        self.model = build_model(cfg.model, in_channels, out_channels, cfg.patch, **cfg.model_options)
        self.loss_fn = loss_fn if loss_fn is not None else DiceCELoss(to_onehot_y=True, softmax=True)
        if freeze_encoder:
            for name, p in self.model.named_parameters():
                if self.spec.part_of(name) == "encoder":
                    p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits, whatever the network returns in training."""
        return self._full_resolution(self.model(x), x)

    @staticmethod
    def _full_resolution(out, x: torch.Tensor) -> torch.Tensor:
        if isinstance(out, (tuple, list)):
            # Deep supervision (e.g. PCT-Net in training): outputs per scale, full resolution first.
            return out[0]
        # DynUNet with deep supervision returns stacked outputs in training; the first is full resolution.
        return out[:, 0] if out.dim() == x.dim() + 1 else out

    def compute_loss(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch: ``loss_fn`` on the logits, or, when the network returns a tuple of
        outputs per scale, ``DeepSupervisionLoss`` over all of them (weights 1, 1/2, 1/4 ... normalised)."""
        out = self.model(image)
        if not torch.is_floating_point(label):
            label = label.long()  # uint8 label maps travel to the device; the losses index with int64
        with float32_loss(image.device):
            if isinstance(out, (tuple, list)):
                return self._deep_supervision_loss()([o.float() for o in out], label)
            return self.loss_fn(self._full_resolution(out, image).float(), label)

    def _deep_supervision_loss(self):
        # Built on first use, on the device the loss already lives on, and kept out of the module's
        # registered children: it holds no learnable state, and registering it would add keys to every
        # checkpoint of a loss with class-weight buffers (breaking resumes of runs written before).
        ds = self.__dict__.get("_ds_loss")
        if ds is None:
            from medpretrain.blocks.deep_supervision import DeepSupervisionLoss

            ds = DeepSupervisionLoss(self.loss_fn)
            self.__dict__["_ds_loss"] = ds
        return ds

    def on_train_start(self) -> None:
        self.on_train_epoch_start()  # a resumed run restarts mid-epoch, where Lightning skips the epoch hook

    def on_train_epoch_start(self) -> None:
        if self.freeze_encoder:
            # Frozen encoder: keep its normalisation statistics and dropout fixed too (linear probing).
            for name, module in self.model.named_modules():
                if name and self.spec.part_of(name + ".") == "encoder":
                    module.eval()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.batch_transform is not None:
            batch = self.batch_transform(batch)
        return batch

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch["image"], batch["label"])
        NonFiniteLossGuard.check(loss, self.global_step)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=batch["image"].shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        return loss

    def exported_state_dict(self) -> dict[str, torch.Tensor]:
        """What ``model.pt`` holds: the network (the method contract's ``exported_state_dict``)."""
        return self.model.state_dict()

    def configure_optimizers(self):
        opt = make_optimizer(self.model.parameters(), "adamw", self.cfg.lr, self.cfg.weight_decay)
        return scheduled_optimization(opt, self.cfg)



def log_loss_parts(module: pl.LightningModule, parts: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
    """Stop on a non-finite total (``parts["loss"]``), log every part as ``train/<name>``; returns the total."""
    NonFiniteLossGuard.check(parts["loss"], module.global_step)
    for name, value in parts.items():
        module.log(f"train/{name}", value, on_step=True, prog_bar=name == "loss", batch_size=batch_size)
    return parts["loss"]
