"""Planning like nnU-Net: a dataset fingerprint, then the patch, batch and spacing a network should train with on
a given device, chosen from the data instead of a fixed default.

Fingerprint (``fingerprint.json`` beside a prepared cache's manifest): the original and prepared spacings, the
shapes after resampling, the intensity statistics per channel, the voxel fraction of every class and the sizes
of its connected objects, and the anisotropy.

Plan (``plan.json``), for one registered network and one compute budget:

* target spacing: the median of the original spacings; for anisotropic data (the coarsest median spacing more
  than 3 times the finest, nnU-Net's threshold) the coarse axis takes the 10th percentile of its spacings
  instead, as nnU-Net does, so that thin-slice cases are not thrown away. The prepared cache's spacing is
  compared with it (preparation is what resamples; the plan says when to re-prepare).
* patch: as large as the data (never longer along an axis than the median shape rounded to the network's
  multiple, so a patch is mostly data), then shrunk, always along the axis of largest physical extent, until
  it fits the budget: an estimated step time on a CPU, or the estimated training memory on a GPU. Sides stay
  multiples of the network's down-sampling and at least its smallest input.
* batch: 2 on a CPU (the step time is the limit); on a GPU the largest batch that fits beside the patch,
  capped at 5% of the dataset's voxels per step (nnU-Net's cap), at least 2.

Costs are estimated, not timed: forward FLOPs per input voxel and the bytes saved for the backward pass per
input voxel are measured once per network on a small patch (``torch.utils.flop_counter`` and
``saved_tensors_hooks``, on the CPU) and scaled linearly with the patch; a step is 3 forward passes of FLOPs.
The CPU rate is calibrated on this project's 2-core development machine (``CPU_FLOPS_PER_THREAD``, per network
family where timed); the GPU's
on an assumed share of its bf16 peak (``GPU_EFFICIENCY``). They rank patches and size budgets; they are not
promises of wall time.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from medpretrain.atomic import atomic_write_json
from medpretrain.errors import ConfigError

log = logging.getLogger("medpretrain")

FINGERPRINT_FILE = "fingerprint.json"
PLAN_FILE = "plan.json"
ANISOTROPY_THRESHOLD = 3.0  # nnU-Net: a spacing ratio above 3 makes a dataset anisotropic
# Effective fp32 training throughput of one thread of the 2-core AMD EPYC (AVX2) development machine, from the
# committed step timings (2 threads, tcmalloc) and the FLOPs `model_cost` counts: BasicUNet 2.07 s per step at
# 64^3 batch 2 and 4.03 s at 128x128x64 batch 1, PCT-Net-small 11.65 s at 128x128x64 batch 1 (26-28 GFLOP/s per
# thread; docs/results/asa/model_cost.json, docs/results/volume-fusion/model_cost.json); Swin UNETR-small
# 5.56 s at 64^3 batch 2 (8 GFLOP/s: window attention and its reshapes run far below the convolutions' rate).
# Networks without a timing use the default.
CPU_FLOPS_PER_THREAD = 27e9
CPU_FLOPS_PER_THREAD_BY_PREFIX = {"swinunetr": 8e9}
# bf16 dense peak of the GPUs a plan can be computed for, and the share of it 3D convolution training reaches.
GPU_PEAK_FLOPS = {"h200": 989e12, "h100": 989e12, "a100": 312e12}
GPU_EFFICIENCY = 0.25
GPU_MEMORY_RESERVE_GB = 4.0  # CUDA context, allocator fragmentation, cuDNN workspaces
DATASET_BATCH_CAP = 0.05  # nnU-Net: a batch covers at most 5% of the dataset's voxels


# ---------------------------------------------------------------------------------------------- fingerprint


def _original_spacing(geometry: dict) -> list[float]:
    affine = np.asarray(geometry["original_affine"], dtype=float)
    return [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]


def dataset_fingerprint(data, max_cases: int | None = None) -> dict[str, Any]:
    """The fingerprint of a prepared labelled cache (``PreparedData``), from its manifest and label arrays.

    Args:
        data: the prepared cache.
        max_cases: read the label arrays of at most this many cases (object sizes and class fractions); None = all.
    """
    from scipy import ndimage

    cases = list(data.case_ids)
    if not cases:
        raise ConfigError(f"{data.root}: no prepared case to fingerprint; run `medpretrain prepare` first")
    entries = [data.case(c) for c in cases]
    original = np.array([_original_spacing(e["geometry"]) for e in entries])
    shapes = np.array([e["shape"][-3:] for e in entries])
    median_spacing = np.median(original, axis=0)
    channels = len(entries[0]["stats"].get("channels", [])) or data.in_channels
    intensity = []
    for ch in range(channels):
        values = [e["stats"]["channels"][ch] for e in entries if len(e["stats"].get("channels", [])) > ch]
        intensity.append({k: float(np.median([v[k] for v in values])) for k in values[0]} if values else {})
    labelled = data.kind == "labelled"
    fractions: dict[str, float] = {}
    objects: dict[str, dict[str, float]] = {}
    if labelled:
        voxel_mm3 = float(np.prod(data.spacing))
        counts = np.zeros(max(data.labels) + 1 if data.labels else 2, dtype=np.float64)
        sizes: dict[int, list[int]] = {}
        for cid in cases[:max_cases] if max_cases else cases:
            lab = np.asarray(data.label(cid))
            counts += np.bincount(lab.ravel(), minlength=len(counts))[:len(counts)]
            for c in range(1, len(counts)):
                comp, n = ndimage.label(lab == c)
                if n:
                    sizes.setdefault(c, []).extend(np.bincount(comp.ravel())[1:].tolist())
        total = counts.sum()
        names = {int(k): v for k, v in data.labels.items()}
        for c in range(len(counts)):
            fractions[names.get(c, str(c))] = float(counts[c] / total) if total else 0.0
        for c, s in sizes.items():
            s = np.asarray(s, dtype=float)
            objects[names.get(c, str(c))] = {"objects_per_case": len(s) / len(cases[:max_cases] if max_cases else cases),
                                             "median_mm3": float(np.median(s) * voxel_mm3),
                                             "min_mm3": float(s.min() * voxel_mm3),
                                             "max_mm3": float(s.max() * voxel_mm3)}
    return {
        "cases": len(cases),
        "original_spacing": {"median": median_spacing.tolist(), "p10": np.percentile(original, 10, axis=0).tolist(),
                             "p90": np.percentile(original, 90, axis=0).tolist()},
        "anisotropy": float(median_spacing.max() / median_spacing.min()),
        "prepared_spacing": [float(s) for s in data.spacing],
        "prepared_shape": {"median": np.median(shapes, axis=0).tolist(), "min": shapes.min(axis=0).tolist(),
                           "max": shapes.max(axis=0).tolist()},
        "shapes": shapes.tolist(),
        "voxels_total": int(np.prod(shapes, axis=1).sum()),
        "intensity": intensity,
        "class_voxel_fraction": fractions,
        "objects": objects,
    }


def write_fingerprint(data, max_cases: int | None = None) -> dict[str, Any]:
    """Compute the fingerprint and write ``fingerprint.json`` beside the cache's manifest."""
    fp = dataset_fingerprint(data, max_cases)
    atomic_write_json(Path(data.root) / FINGERPRINT_FILE, fp)
    return fp


def read_fingerprint(data) -> dict[str, Any]:
    """``fingerprint.json`` of a prepared cache, computed and written first if it is missing."""
    path = Path(data.root) / FINGERPRINT_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return write_fingerprint(data)


def target_spacing(fingerprint: dict[str, Any]) -> list[float]:
    """nnU-Net's rule: the median original spacing; on anisotropic data the coarse axis at its 10th percentile."""
    median = list(fingerprint["original_spacing"]["median"])
    if max(median) / min(median) > ANISOTROPY_THRESHOLD:
        axis = int(np.argmax(median))
        median[axis] = max(float(fingerprint["original_spacing"]["p10"][axis]), min(median))
    return median


# ---------------------------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class ModelCost:
    """What one training sample costs a network, per input voxel (linear in the patch for these networks).

    Attributes:
        model: the registered network.
        flops_per_voxel: forward FLOPs per input voxel.
        activation_bytes_per_voxel: bytes saved for the backward pass per input voxel, in fp32.
        parameters: trainable parameters.
        measured_at: the patch the two were measured on.
    """

    model: str
    flops_per_voxel: float
    activation_bytes_per_voxel: float
    parameters: int
    measured_at: tuple[int, int, int]


@functools.lru_cache(maxsize=None)
def model_cost(model: str, in_channels: int = 1, out_channels: int = 2) -> ModelCost:
    """Measure a registered network's forward FLOPs and saved activations per voxel on its smallest comfortable
    patch (each side 2 x its multiple, at least its minimum input), on the CPU, once per process."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medpretrain.models import build_model, get_spec

    spec = get_spec(model)
    patch = tuple(max(2 * d, -(-spec.min_size // d) * d) for d in spec.divisors(3))
    while math.prod(p // d for p, d in zip(patch, spec.divisors(3))) < spec.min_bottleneck_voxels:
        patch = (patch[0] * 2, *patch[1:])
    net = build_model(model, in_channels, out_channels, patch)
    net.train()
    x = torch.randn(1, in_channels, *patch)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
    del out
    voxels = math.prod(patch)
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return ModelCost(model, counter.get_total_flops() / voxels, saved[0] / voxels, params, patch)


@dataclass(frozen=True)
class Budget:
    """The compute a plan is sized for.

    Attributes:
        device: ``cpu`` or ``gpu``.
        threads: CPU threads per training process.
        step_seconds: CPU: the longest acceptable estimated step.
        gpu: GPU kind for the FLOP rate (``h200``, ``h100``, ``a100``).
        gpu_memory_gb: GPU memory available to training.
    """

    device: Literal["cpu", "gpu"] = "cpu"
    threads: int = 1
    step_seconds: float = 1.5
    gpu: str = "h200"
    gpu_memory_gb: float = 140.0

    def step_time(self, cost: ModelCost, patch: Sequence[int], batch: int) -> float:
        flops = 3.0 * cost.flops_per_voxel * math.prod(patch) * batch
        if self.device == "cpu":
            return flops / (cpu_rate(cost.model) * self.threads)
        return flops / (GPU_PEAK_FLOPS.get(self.gpu, GPU_PEAK_FLOPS["h200"]) * GPU_EFFICIENCY)

    @staticmethod
    def memory_gb(cost: ModelCost, patch: Sequence[int], batch: int, bf16: bool = True) -> float:
        # Activations at half width under bf16 autocast; weights, gradients and two AdamW moments in fp32.
        activations = cost.activation_bytes_per_voxel * math.prod(patch) * batch * (0.5 if bf16 else 1.0)
        return (activations + 16.0 * cost.parameters) / 1e9


def cpu_rate(model: str) -> float:
    """Effective training FLOP/s of one CPU thread for a network (see ``CPU_FLOPS_PER_THREAD``)."""
    return next((r for p, r in CPU_FLOPS_PER_THREAD_BY_PREFIX.items() if model.startswith(p)), CPU_FLOPS_PER_THREAD)


def padding_fraction(shapes: Sequence[Sequence[int]], patch: Sequence[int]) -> float:
    """Mean share of a patch that lies outside the volume, over the cases (a patch fits where the case is
    larger; along a shorter axis the rest is padding)."""
    fractions = [1.0 - math.prod(min(s, p) for s, p in zip(shape, patch)) / math.prod(patch) for shape in shapes]
    return float(np.mean(fractions)) if fractions else 0.0


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """A training plan: what ``plan.json`` holds.

    Attributes:
        model: the registered network.
        budget: the compute it is sized for.
        patch, batch: training patch (X, Y, Z) and batch.
        spacing: the prepared cache's spacing (what the patch is in); target_spacing: the spacing nnU-Net's
            rule recommends for preparing this dataset.
        padding_fraction: mean share of a patch outside the volumes.
        step_seconds, memory_gb: estimated step time and training memory.
        notes: decisions worth reading (shrunk axes, spacing to re-prepare at...).
    """

    model: str
    budget: dict[str, Any]
    patch: list[int]
    batch: int
    spacing: list[float]
    target_spacing: list[float]
    padding_fraction: float
    step_seconds: float
    memory_gb: float
    median_shape: list[float]
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """A short human-readable summary."""
        rows = [("network", self.model), ("device", self._device()), ("patch (voxels)", "x".join(map(str, self.patch))),
                ("patch (mm)", "x".join(f"{p * s:.0f}" for p, s in zip(self.patch, self.spacing))),
                ("batch", str(self.batch)), ("median shape", "x".join(f"{s:.0f}" for s in self.median_shape)),
                ("padding", f"{100 * self.padding_fraction:.0f}% of a patch"),
                ("est. step", f"{self.step_seconds:.2f} s"), ("est. memory", f"{self.memory_gb:.1f} GB"),
                ("spacing", f"{self._fmt(self.spacing)} mm (recommended {self._fmt(self.target_spacing)})")]
        width = max(len(k) for k, _ in rows)
        return "\n".join([f"{k:<{width}}  {v}" for k, v in rows] + [f"note: {n}" for n in self.notes])

    def _device(self) -> str:
        b = self.budget
        if b["device"] == "cpu":
            return f"cpu, {b['threads']} thread(s), step <= {b['step_seconds']} s"
        return f"gpu {b['gpu']}, {b['gpu_memory_gb']:.0f} GB"

    @staticmethod
    def _fmt(values) -> str:
        return "x".join(f"{v:g}" for v in values)


def plan_training(fingerprint: dict[str, Any], model: str, budget: Budget, in_channels: int = 1,
                  out_channels: int = 2) -> Plan:
    """Choose patch and batch for ``model`` on ``budget`` from a dataset fingerprint (see the module's
    documentation). Deterministic: the same fingerprint, network and budget give the same plan."""
    from medpretrain.models import get_spec

    spec = get_spec(model)
    divisors = spec.divisors(3)
    spacing = [float(s) for s in fingerprint["prepared_spacing"]]
    median = [float(s) for s in fingerprint["prepared_shape"]["median"]]
    shapes = fingerprint["shapes"]
    lows = [-(-spec.min_size // d) * d for d in divisors]
    # As large as the data: the median shape, rounded to the nearest multiple (never below the smallest input).
    patch = [max(lo, int(round(m / d)) * d) for m, d, lo in zip(median, divisors, lows)]
    patch = [min(p, max(lo, int(m // d) * d)) if p > m else p for p, m, d, lo in zip(patch, median, divisors, lows)]
    cost = model_cost(model, in_channels, out_channels)
    notes = []

    def fits(p: list[int], batch: int) -> bool:
        if budget.device == "cpu":
            return budget.step_time(cost, p, batch) <= budget.step_seconds
        return Budget.memory_gb(cost, p, batch) <= budget.gpu_memory_gb - GPU_MEMORY_RESERVE_GB

    shrunk = []
    while not fits(patch, 2):
        # Shrink the axis of largest physical extent that can still shrink.
        order = sorted(range(3), key=lambda a: (-(patch[a] * spacing[a]), a))
        axis = next((a for a in order if patch[a] - divisors[a] >= lows[a]), None)
        if axis is None:
            notes.append("the smallest valid patch exceeds the budget; it is used anyway")
            break
        patch[axis] -= divisors[axis]
        shrunk.append("XYZ"[axis])
    if shrunk:
        notes.append(f"shrunk to fit the budget along {', '.join(sorted(set(shrunk)))}")
    while math.prod((patch[0] // divisors[0], patch[1] // divisors[1], patch[2] // divisors[2])) \
            < spec.min_bottleneck_voxels:
        patch[0] += divisors[0]
    batch = 2
    if budget.device == "gpu":
        cap = max(2, int(DATASET_BATCH_CAP * fingerprint["voxels_total"] / math.prod(patch)))
        while batch < cap and fits(patch, batch + 1):
            batch += 1
    pad = padding_fraction(shapes, patch)
    if any(m < lo for m, lo in zip(median, lows)):
        axes = [("XYZ"[a], median[a], lows[a]) for a in range(3) if median[a] < lows[a]]
        notes.append("volumes are thinner than the network's smallest input along "
                     + ", ".join(f"{n} ({m:.0f} < {lo})" for n, m, lo in axes)
                     + ": that share is padding; a network that down-samples less along that axis avoids it")
    target = target_spacing(fingerprint)
    if any(abs(t - s) > 0.05 * t for t, s in zip(target, spacing)):
        notes.append(f"prepared at {Plan._fmt(spacing)} mm; nnU-Net's rule recommends {Plan._fmt(target)} mm "
                     "(re-prepare with --spacing to follow it; a coarser spacing is cheaper on a CPU)")
    return Plan(model=model, budget=asdict(budget), patch=patch, batch=batch, spacing=spacing,
                target_spacing=[float(t) for t in target], padding_fraction=pad,
                step_seconds=budget.step_time(cost, patch, batch), memory_gb=Budget.memory_gb(cost, patch, batch),
                median_shape=median, notes=notes)


def write_plan(data, model: str, budget: Budget) -> Plan:
    """Plan ``model`` on ``budget`` for a prepared cache and write ``plan.json`` beside its manifest."""
    fp = read_fingerprint(data)
    plan = plan_training(fp, model, budget, data.in_channels, max(2, data.num_classes))
    atomic_write_json(Path(data.root) / PLAN_FILE, asdict(plan))
    return plan


def read_plan(data_root: str | Path) -> dict[str, Any] | None:
    """``plan.json`` of a prepared cache, or None."""
    path = Path(data_root) / PLAN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def plan_overrides(data_dir: str | Path | None, config_file: str | Path | None, overrides: dict[str, Any],
                   default_model: str) -> dict[str, Any]:
    """The patch and batch a command takes from ``DATA/plan.json`` (``medpretrain plan``) when neither its
    options nor its YAML set them and the plan is for the same network; {} otherwise. Options and YAML always
    win over the plan."""
    from medpretrain.config import read_yaml_mapping

    plan = read_plan(data_dir) if data_dir is not None else None
    if plan is None:
        return {}
    from_file = read_yaml_mapping(config_file) if config_file else {}
    model = overrides.get("model") or from_file.get("model") or default_model
    if plan.get("model") != model:
        log.info("%s/plan.json is for %s, not %s: not used (run `medpretrain plan --model %s`)", data_dir,
                 plan.get("model"), model, model)
        return {}
    chosen = {}
    if overrides.get("patch") is None and "patch" not in from_file:
        chosen["patch"] = tuple(plan["patch"])
    if overrides.get("batch") is None and "batch" not in from_file:
        chosen["batch"] = int(plan["batch"])
    if chosen:
        log.info("using %s/plan.json: %s", data_dir, ", ".join(f"{k} {v}" for k, v in chosen.items()))
    return chosen
