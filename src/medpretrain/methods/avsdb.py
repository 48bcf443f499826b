"""AVS-DB formula-driven supervised pretraining (../shared/papers/avs-db.md).

Pretext task: segment the C + 1 classes of procedurally generated volumetric shapes (synthetic/avsdb.py)
with a Dice loss. No real image is read. The network (encoder and decoder) goes downstream; the head is
replaced for the downstream class count.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from medpretrain.config import TrainingConfig
from medpretrain.methods import PretrainMethod, register_method
from medpretrain.synthetic.avsdb import _TAG as AVSDB_TAG
from medpretrain.synthetic.avsdb import AVSDBConfig, AVSDBDataset, class_names


class AVSDBPretrainConfig(TrainingConfig):
    """AVS-DB pretraining. Shared training settings as in ``TrainingConfig``; the defaults are the CPU
    preset (64^3 volumes, batch 2), ``--preset paper`` gives the paper's (96^3, batch 8, AdamW 1e-4).

    Args:
        generator: the shape generator (classes, shapes per volume, overlap, rendering).
        samples: size of the synthetic database (the paper uses 5,000 fixed volumes; sample ``i`` is volume
            ``i mod samples``); None = a new volume for every sample.
        loss: ``dice`` (the paper) or ``dicece``.
    """

    model: str = "unet"
    steps: int = 600
    patch: tuple[int, int, int] = (64, 64, 64)
    batch: int = 2
    lr: float = 1e-3
    warmup_fraction: float = 0.1
    generator: AVSDBConfig = AVSDBConfig(size=(64, 64, 64))
    samples: int | None = 5000
    loss: Literal["dice", "dicece"] = "dice"

    @model_validator(mode="after")
    def _patch_fits_volume(self):
        if any(p > g for p, g in zip(self.patch, self.generator.size)):
            raise ValueError(f"patch {tuple(self.patch)} is larger than the generated volumes "
                             f"{tuple(self.generator.size)}; set generator.size at least as large as the patch")
        return self


def _loss(cfg: AVSDBPretrainConfig):
    from monai.losses import DiceCELoss, DiceLoss

    if cfg.loss == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True)
    return DiceCELoss(to_onehot_y=True, softmax=True)


def _build_module(cfg: AVSDBPretrainConfig):
    from medpretrain.engine.module import SegmentationModule

    return SegmentationModule(cfg, 1, cfg.generator.num_classes, _loss(cfg))


def _build_dataset(cfg: AVSDBPretrainConfig, data):
    return AVSDBDataset(cfg.generator, seed=cfg.seed, length=cfg.samples, patch=cfg.patch)


def _model_meta(cfg: AVSDBPretrainConfig) -> dict:
    return {"in_channels": 1, "out_channels": cfg.generator.num_classes,
            "labels": {int(k): v for k, v in class_names(cfg.generator).items()}}


def _pretext_baselines(cfg: AVSDBPretrainConfig, dataset, samples: int):
    from medpretrain.blocks.pretext import baseline_samples, segmentation_baseline

    return [segmentation_baseline(baseline_samples(dataset, samples), _loss(cfg), cfg.generator.num_classes,
                                  batch=cfg.batch)]


register_method(PretrainMethod(
    name="avsdb",
    description="AVS-DB: supervised segmentation of formula-driven volumetric shapes (no real data)",
    config_cls=AVSDBPretrainConfig,
    needs_data=False,
    build_dataset=_build_dataset,
    build_module=_build_module,
    model_meta=_model_meta,
    pretext_baselines=_pretext_baselines,
    sample_tag=AVSDB_TAG,
    presets={
        "cpu": {},
        # Seconds on a CPU: the method contract test and the GPU check's dry run.
        "smoke": {"model": "unet", "patch": (32, 32, 32), "model_options": {"features": (4, 4, 8, 8, 16, 4)},
                  "generator": {"size": (32, 32, 32), "n_shapes": 4}, "samples": 8, "steps": 2, "batch": 1, "num_workers": 0, "checkpoint_every": 1, "precision": "32-true"},
        # The paper gives no step count: 30,000 steps are 48 passes over its 5,000 volumes at batch 8.
        "paper": {"model": "swinunetr", "patch": (96, 96, 96), "batch": 8, "lr": 1e-4, "weight_decay": 1e-5,
                  "generator": {"size": (96, 96, 96)}, "samples": 5000, "steps": 30000},
    },
))
