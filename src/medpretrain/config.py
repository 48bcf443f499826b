"""Typed configuration of fine-tuning, inference and evaluation, loadable from YAML.

Every field has a default; a YAML file sets any subset; command-line options override the file.
Unknown keys are refused with the list of valid ones.
"""

from __future__ import annotations

import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from medpretrain.errors import ConfigError


MAX_SEED = 2**32 - 1
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16", "bf16-true", "16-true", "64-true", "64")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class AugmentConfig(_Strict):
    """Patch augmentation (MONAI transforms), applied per patch in the DataLoader workers or on the training
    device.

    Args:
        enabled: master switch.
        on: where it runs: ``workers`` (the DataLoader workers, on the CPU), ``device`` (the training device,
            once the batch is there: the workers only read patches; the same MONAI transforms with the same
            per-patch random draws), ``auto`` = ``device`` when training on CUDA GPUs, else ``workers``. On a GPU,
            rotations and scaling in the workers cost ~10x the patch read at 128^3
            (``docs/results/loader_throughput``).
        flip_prob: probability of a flip along each axis.
        rotate90_prob: probability of a 90-degree in-plane rotation (only when the patch's first two sides
            are equal, so the patch keeps its shape).
        affine_prob: probability of a small random affine (rotation up to ``rotate_deg``, scale up to
            ``scale``).
        intensity_prob: probability of each of a random intensity scale and shift (+-10%).
        noise_prob: probability of Gaussian noise (std 0.05).
    """

    enabled: bool = True
    on: Literal["auto", "workers", "device"] = "auto"
    flip_prob: float = 0.5
    rotate90_prob: float = 0.0
    affine_prob: float = 0.0
    rotate_deg: float = 15.0
    scale: float = 0.1
    intensity_prob: float = 0.0
    noise_prob: float = 0.0

    @field_validator("flip_prob", "rotate90_prob", "affine_prob", "intensity_prob", "noise_prob")
    @classmethod
    def _probability(cls, v: float) -> float:
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError("must be a probability within [0, 1]")
        return v


class InferenceConfig(_Strict):
    """Sliding-window inference (MONAI ``sliding_window_inference``).

    Args:
        overlap: fraction of overlap between windows.
        mode: blending of overlapping windows, ``gaussian`` or ``constant``.
        sw_batch_size: windows per forward pass.
        roi: window size; None uses the training patch.
        volume_device: where the whole volume and the stitched output live (the windows always run on the
            network's device): ``auto`` keeps them on the network's GPU when they take at most half of its free
            memory, else in CPU memory (large CTs: a 512x512x600 scan with 14 classes needs ~20 GB); ``model``
            always on the network's device; ``cpu`` always in CPU memory.
    """

    overlap: float = 0.5
    mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = 2
    roi: tuple[int, int, int] | None = None
    volume_device: Literal["auto", "model", "cpu"] = "auto"

    @field_validator("overlap")
    @classmethod
    def _overlap(cls, v: float) -> float:
        # 1 would never advance the window; MONAI refuses it deep inside inference.
        if not (math.isfinite(v) and 0.0 <= v < 1.0):
            raise ValueError("must be within [0, 1), e.g. 0.5")
        return v

    @field_validator("sw_batch_size")
    @classmethod
    def _sw_batch(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("roi")
    @classmethod
    def _roi(cls, v):
        if v is not None and any(s < 1 for s in v):
            raise ValueError("every side must be >= 1 voxel")
        return v


class TrainingConfig(_Strict):
    """What every training job (fine-tuning and each pretraining method) shares: network, optimiser,
    schedule, checkpoints and the Lightning hardware settings.

    Args:
        model: registered network name (``medpretrain models``).
        model_options: overrides of the preset's options.
        steps: optimizer steps (per process under DDP).
        patch: training patch (X, Y, Z) in voxels.
        batch: patches per step per process.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_fraction: share of steps spent warming up (one-cycle: cosine warm-up from lr/25, then cosine
            decay to lr/1e4).
        lr_schedule: ``one-cycle`` (warm-up, then cosine decay over ``steps``) or ``warmup-constant`` (the same
            warm-up, then the peak lr to the end): a long pretraining whose ``export_steps`` snapshots are
            compared along the run, none of them mid-decay, and which can be extended to more steps.
        export_steps: optimizer steps at which the network that goes downstream is also written, as
            ``snapshots/model-step<N>.pt`` (same format as ``model.pt``): budget points of one long run.
        seed: seeds model initialisation and every sample.
        checkpoint_every: steps between checkpoints (also the length of a data "epoch").
        precision: ``auto`` = bf16 autocast where the hardware supports it (CUDA with bf16; CPUs with
            AVX-512 BF16/AMX), else fp32; or a Lightning precision string.
        accelerator, devices, num_nodes, strategy: passed to Lightning (DDP: ``--devices 2 --strategy ddp``).
        num_workers: DataLoader workers (sample reading/synthesis and augmentation).
        deterministic: Lightning's deterministic mode (bitwise reproducible resume on CPU).
    """

    model: str = "unet"
    model_options: dict[str, Any] = {}
    steps: int = 600
    patch: tuple[int, int, int] = (64, 64, 48)
    batch: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.3
    lr_schedule: Literal["one-cycle", "warmup-constant"] = "one-cycle"
    export_steps: list[int] = []
    seed: int = 0
    checkpoint_every: int = 100
    precision: str = "auto"
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    num_workers: int = 2
    deterministic: bool = False

    @field_validator("steps", "batch", "checkpoint_every", "num_nodes")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("export_steps")
    @classmethod
    def _export_steps(cls, v: list[int]) -> list[int]:
        if any(s < 1 for s in v):
            raise ValueError(f"must be optimizer steps >= 1, got {v}")
        return sorted(set(v))

    @field_validator("warmup_fraction")
    @classmethod
    def _unit(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be within [0, 1]")
        return v

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, v: float) -> float:
        # lr 0 would train "successfully" without learning anything.
        if not (math.isfinite(v) and v > 0):
            raise ValueError("must be a positive number, e.g. 1e-3")
        return v

    @field_validator("weight_decay")
    @classmethod
    def _non_negative_decay(cls, v: float) -> float:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError("must be a number >= 0, e.g. 1e-5")
        return v

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v: int) -> int:
        # Lightning's seed_everything replaces a seed outside this range with a random one, silently.
        if not 0 <= v <= MAX_SEED:
            raise ValueError(f"must be within 0..{MAX_SEED}")
        return v

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0 (0 = read samples in the training process)")
        return v

    @field_validator("precision")
    @classmethod
    def _precision(cls, v: str) -> str:
        if str(v) not in PRECISIONS:
            raise ValueError(f"must be one of {', '.join(PRECISIONS)}")
        return str(v)

    @field_validator("accelerator")
    @classmethod
    def _accelerator(cls, v: str) -> str:
        if v not in ACCELERATORS:
            raise ValueError(f"must be one of {', '.join(ACCELERATORS)}")
        return v

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: int | str) -> int | str:
        if isinstance(v, int):
            ok = v >= 1 or v == -1
        else:
            ok = v == "auto" or bool(re.fullmatch(r"-1|\d+|\d+(,\d+)+,?", v.replace(" ", "")))
            if ok and v.strip().isdigit():
                ok = int(v) >= 1
        if not ok:
            raise ValueError("must be a count >= 1, -1 (all), 'auto' or a list of device ids like '0,1'")
        return v

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a Lightning strategy name, e.g. auto or ddp")
        return v


class FinetuneConfig(TrainingConfig):
    """Supervised fine-tuning (or from-scratch training) of a segmentation network; the shared training
    settings are those of ``TrainingConfig``.

    Args:
        foreground_fraction: share of patches centred on a labelled voxel (nnU-Net uses 1/3).
        n_labeled: use this many labelled training cases (drawn from ``seed``); None = all.
        fraction: or this fraction of them.
        freeze_encoder: train the decoder and head only (linear probing).
        init: checkpoint to initialise from.
        init_part: ``encoder`` or ``all`` (everything whose name and shape match).
        loss_lambda_dice, loss_lambda_ce: weights of MONAI DiceCELoss terms.
        augment: patch augmentation.
        inference: sliding-window settings stored with the model for evaluate/predict.
        validation_cases: set aside this many training cases as a validation set (the first of a permutation
            drawn from ``validation_seed``): never labelled, never test; ``evaluate --split validation`` scores
            them, so hyper-parameters are chosen without touching the test split. Labelled subsets are drawn
            from the remaining training cases.
        validation_seed: seed of the validation draw (independent of ``seed``, so every run of a benchmark
            sets aside the same cases).
        allow_padding: train even when the patches are on average more than three quarters padding and the
            network takes a smaller patch (refused otherwise, with the numbers and a patch that fits;
            ``medpretrain plan`` chooses one from the data).
        curve_fractions: also export the model at these fractions of ``steps`` (``RUN/curve/model_stepN.pt``)
            for learning curves (``evaluate --model-file``); the final model is ``RUN/model.pt``.
    """

    foreground_fraction: float = 1.0 / 3.0
    n_labeled: int | None = None
    fraction: float | None = None
    freeze_encoder: bool = False
    init: Path | None = None
    init_part: Literal["encoder", "all"] = "encoder"
    loss_lambda_dice: float = 1.0
    loss_lambda_ce: float = 1.0
    augment: AugmentConfig = AugmentConfig()
    inference: InferenceConfig = InferenceConfig()
    validation_cases: int = 0
    validation_seed: int = 0
    curve_fractions: list[float] = []
    allow_padding: bool = False

    @field_validator("foreground_fraction")
    @classmethod
    def _unit_fg(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be within [0, 1]")
        return v

    @field_validator("validation_cases", "validation_seed")
    @classmethod
    def _non_negative_val(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("loss_lambda_dice", "loss_lambda_ce")
    @classmethod
    def _loss_weight(cls, v: float) -> float:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError("must be a number >= 0")
        return v

    @field_validator("curve_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < f < 1.0 for f in v):
            raise ValueError("every fraction must lie within (0, 1) (the final model is RUN/model.pt), e.g. [0.25, 0.5]")
        return sorted(set(v))

    def curve_steps(self) -> list[int]:
        """The steps at which the learning-curve exports are written (distinct, within 1..steps-1)."""
        return sorted({min(max(1, int(round(f * self.steps))), self.steps - 1) for f in self.curve_fractions}
                      - {0}) if self.steps > 1 else []

    @model_validator(mode="after")
    def _subset(self):
        if self.n_labeled is not None and self.fraction is not None:
            raise ValueError("give either n_labeled or fraction, not both")
        if self.n_labeled is not None and self.n_labeled < 1:
            raise ValueError("n_labeled must be >= 1")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError("fraction must be within (0, 1]")
        return self


def curve_file_name(step: int) -> str:
    """File name of a fine-tuning run's learning-curve export at ``step`` (in ``RUN/curve/``)."""
    return f"model_step{step:07d}.pt"


class EvaluateConfig(_Strict):
    """Evaluation of a run on a split of prepared data.

    Args:
        split: split name in the prepared manifest, or ``validation``: the training cases the run set aside
            (``FinetuneConfig.validation_cases``).
        nsd_tolerance_mm: tolerance of the normalised surface Dice.
        overlays: number of overlay PNGs (half best, half worst cases by Dice); 0 = none, -1 = all.
        inference: overrides of the run's inference settings.
        original_space: also score every case in its source file's geometry, in ``OUT/original/``: the predicted
            probabilities mapped back onto the source image's grid as ``predict`` writes them, against the label
            file as distributed (the manifest's ``source_label``), distances at the source spacing. The main
            metrics stay on the prepared grid. For data prepared coarser than distributed (BTCV at 4 mm), where
            small structures are a few prepared voxels wide: the numbers a user of the predictions would get.
    """

    split: str = "test"
    nsd_tolerance_mm: float = 2.0
    overlays: int = 4
    inference: InferenceConfig | None = None
    original_space: bool = False

    @field_validator("nsd_tolerance_mm")
    @classmethod
    def _tolerance(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError("must be a positive distance in mm, e.g. 2")
        return v

    @field_validator("overlays")
    @classmethod
    def _overlays(cls, v: int) -> int:
        if v < -1:
            raise ValueError("must be >= 0, or -1 for all cases")
        return v


def _format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if not loc:  # a check across fields
            lines.append(err["msg"].removeprefix("Value error, "))
        elif err["type"] == "extra_forbidden":
            # A typo in a nested section lists that section's keys, not the top level's.
            section = [str(p) for p in err["loc"][:-1] if not isinstance(p, int)]
            owner = _section_model(model, section) or model
            where = f" of '{'.'.join(section)}'" if section and owner is not model else ""
            lines.append(f"unknown key '{loc}'; valid keys{where}: {', '.join(owner.model_fields)}")
        else:
            lines.append(f"'{loc}' = {err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}")
    return f"invalid configuration in {source}: " + "; ".join(lines)


def _section_model(model: type[BaseModel], section: list[str]) -> type[BaseModel] | None:
    """The settings class of a nested section (``augment`` -> AugmentConfig), or None when not one."""
    for name in section:
        field = model.model_fields.get(name)
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            return None
        model = nested
    return model


def make_config(model: type[_Strict], values: dict[str, Any], source: str = "options"):
    """Validate ``values`` into ``model``; ConfigError naming the key, value and valid keys otherwise."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, model, source)) from None


def _merge_nested(model: type[BaseModel], base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``; a partial mapping given for a nested settings object (e.g. ``generator:``)
    changes only the keys it names and keeps the rest from ``base`` or from the field's default."""
    merged = dict(base)
    for key, value in update.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        sub = getattr(field, "annotation", None) if field is not None else None
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            start = merged.get(key, field.default)
            if isinstance(start, BaseModel):
                start = start.model_dump()
            merged[key] = _merge_nested(sub, start if isinstance(start, dict) else {}, value)
        else:
            merged[key] = value
    return merged


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping a YAML file holds; ConfigError naming the file when it is missing, unparsable or no mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse YAML {what} {path}: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys to values, got {type(loaded).__name__}")
    return loaded


def load_config(model: type[_Strict], path: str | Path | None, overrides: dict[str, Any] | None = None,
                base: dict[str, Any] | None = None):
    """``base`` values (e.g. a preset), then a YAML file (optional), then ``overrides`` (None values are
    ignored), validated into ``model``. Nested settings merge key by key (see ``_merge_nested``)."""
    values: dict[str, Any] = _merge_nested(model, {}, dict(base or {}))
    source = "options"
    if path is not None:
        values = _merge_nested(model, values, read_yaml_mapping(path))
        source = str(path)
    values = _merge_nested(model, values, {k: v for k, v in (overrides or {}).items() if v is not None})
    return make_config(model, values, source)
