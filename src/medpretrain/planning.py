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
* network topology, for networks whose per-stage kernels and strides are options (``ModelSpec.layout``:
  DynUNet): nnU-Net's ``get_pool_and_conv_props`` on the prepared spacing and the patch. At each stage an axis
  is pooled (stride 2) only while its spacing is under twice the finest current spacing and its size is at
  least twice the smallest feature map (4 voxels; an axis pooled alone needs 3 times); a kernel is 3 along an
  axis once its spacing is within twice the finest, 1 before (thick slices: 3x3x1 at the top), and 3x3x3 at
  the bottleneck; at most as many stages as the preset has. The patch is then rounded down, per axis, to the
  product of that axis's strides (and the rule re-applied until it holds), so it never grows past the data; a
  shrink for the budget re-derives the topology, as nnU-Net does. ``plan.json`` holds the ``strides`` and
  ``kernels``, which ``finetune`` and ``pretrain --plan`` pass to the network as ``model_options``.

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
MIN_FEATURE_MAP = 4  # nnU-Net's UNet_featuremap_min_edge_length: the smallest side a pooled axis reaches


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
def model_cost(model: str, in_channels: int = 1, out_channels: int = 2,
               layout: tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]] | None = None) -> ModelCost:
    """Measure a registered network's forward FLOPs and saved activations per voxel on its smallest comfortable
    patch (each side 2 x its multiple, at least its minimum input), on the CPU, once per process and layout.

    Args:
        layout: ``(kernels, strides)`` per stage for a network that takes them as options (``ModelSpec.layout``);
            None = the preset's.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medpretrain.models import build_model, get_spec

    spec = get_spec(model)
    options = {} if layout is None else {"kernels": [list(k) for k in layout[0]],
                                         "strides": [list(s) for s in layout[1]]}
    divisors = spec.divisors(3, options)
    patch = tuple(max(2 * d, -(-spec.min_size // d) * d) for d in divisors)
    while math.prod(p // d for p, d in zip(patch, divisors)) < spec.min_bottleneck_voxels:
        patch = (patch[0] * 2, *patch[1:])
    net = build_model(model, in_channels, out_channels, patch, **options)
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


# ---------------------------------------------------------------------------------------------- topology


def pool_and_conv_props(spacing: Sequence[float], patch: Sequence[int], max_stages: int,
                        min_feature_map: int = MIN_FEATURE_MAP) -> tuple[list[list[int]], list[list[int]]]:
    """nnU-Net's ``get_pool_and_conv_props``: per-stage strides and kernels for a patch at a spacing.

    At each stage, the axes that may be pooled (stride 2) are those at least ``2 * min_feature_map`` voxels long
    whose current spacing is under twice the finest current spacing among them; a lone such axis is pooled only
    when at least ``3 * min_feature_map`` long. A kernel is 3 along an axis from the stage where its spacing is
    within twice the finest current spacing (and stays 3), 1 before; the last stage (the bottleneck) is 3x3x3.
    Stops when no axis can be pooled or at ``max_stages`` stages.

    Returns:
        ``(strides, kernels)``, one ``[X, Y, Z]`` per stage; the first stage's stride is 1.
    """
    dim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [int(p) for p in patch]
    strides = [[1] * dim]
    kernels: list[list[int]] = []
    kernel = [1] * dim
    while len(strides) < max_stages:
        valid = [a for a in range(dim) if current_size[a] >= 2 * min_feature_map]
        if not valid:
            break
        finest = min(current_spacing[a] for a in valid)
        valid = [a for a in valid if current_spacing[a] / finest < 2]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_feature_map:
            break
        if not valid:
            break
        for a in range(dim):
            if kernel[a] != 3 and current_spacing[a] / min(current_spacing) < 2:
                kernel[a] = 3
        stride = [1] * dim
        for a in valid:
            stride[a] = 2
            current_spacing[a] *= 2
            current_size[a] = math.ceil(current_size[a] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)
    return strides, kernels


def fit_topology(spacing: Sequence[float], patch: Sequence[int], max_stages: int
                 ) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """``(patch, strides, kernels)``: the patch rounded down, per axis, to the product of the strides
    :func:`pool_and_conv_props` gives for it, repeated until the topology of the rounded patch is the one it was
    rounded for (rounding down can cost an axis a pooling; nnU-Net pads up instead, which would grow a patch
    past the data)."""
    patch = [max(1, int(p)) for p in patch]
    while True:
        strides, kernels = pool_and_conv_props(spacing, patch, max_stages)
        divisors = [math.prod(s[a] for s in strides) for a in range(len(patch))]
        fitted = [max(d, p // d * d) for p, d in zip(patch, divisors)]
        if fitted == patch:
            return patch, strides, kernels
        patch = fitted


def _stages(rows: Sequence[Sequence[int]]) -> str:
    return " ".join("x".join(map(str, r)) for r in rows)


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
        strides, kernels: for a network that takes them (``ModelSpec.layout``: DynUNet), one ``[X, Y, Z]`` per
            stage from nnU-Net's rule (the first stage's stride is 1); None for the others.
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
    strides: list[list[int]] | None = None
    kernels: list[list[int]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def model_options(self) -> dict[str, Any]:
        """The ``model_options`` that build the planned network: its kernels and strides, or {}."""
        return plan_model_options(asdict(self))

    def table(self) -> str:
        """A short human-readable summary."""
        rows = [("network", self.model), ("device", self._device()), ("patch (voxels)", "x".join(map(str, self.patch))),
                ("patch (mm)", "x".join(f"{p * s:.0f}" for p, s in zip(self.patch, self.spacing))),
                ("batch", str(self.batch)), ("median shape", "x".join(f"{s:.0f}" for s in self.median_shape)),
                ("padding", f"{100 * self.padding_fraction:.0f}% of a patch"),
                ("est. step", f"{self.step_seconds:.2f} s"), ("est. memory", f"{self.memory_gb:.1f} GB"),
                ("spacing", f"{self._fmt(self.spacing)} mm (recommended {self._fmt(self.target_spacing)})")]
        if self.strides is not None:
            down = [math.prod(s[a] for s in self.strides) for a in range(3)]
            rows += [("stages", f"{len(self.strides)}, down-sampling {'x'.join(map(str, down))}"),
                     ("strides", _stages(self.strides)), ("kernels", _stages(self.kernels or []))]
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
    """Choose patch and batch (and, for a network that takes them, per-stage strides and kernels) for ``model``
    on ``budget`` from a dataset fingerprint (see the module's documentation). Deterministic: the same
    fingerprint, network and budget give the same plan."""
    from medpretrain.models import get_spec

    spec = get_spec(model)
    spacing = [float(s) for s in fingerprint["prepared_spacing"]]
    median = [float(s) for s in fingerprint["prepared_shape"]["median"]]
    shapes = fingerprint["shapes"]
    strides = kernels = None
    if spec.layout is not None:
        # nnU-Net's topology for the median shape (never longer than the data), the patch rounded down to it.
        max_stages = len(spec.layout(dict(spec.defaults))[1])
        lows = [min(2 * MIN_FEATURE_MAP, max(1, int(m))) for m in median]
        patch, strides, kernels = fit_topology(spacing, [int(m) for m in median], max_stages)
    else:
        divisors = spec.divisors(3)
        lows = [-(-spec.min_size // d) * d for d in divisors]
        # As large as the data: the median shape, rounded to the nearest multiple (never below the smallest input).
        patch = [max(lo, int(round(m / d)) * d) for m, d, lo in zip(median, divisors, lows)]
        patch = [min(p, max(lo, int(m // d) * d)) if p > m else p for p, m, d, lo in zip(patch, median, divisors, lows)]
    notes = []

    def layout() -> tuple | None:
        return None if strides is None else (tuple(map(tuple, kernels)), tuple(map(tuple, strides)))

    def current_divisors() -> list[int]:
        return list(spec.divisors(3)) if strides is None else [math.prod(s[a] for s in strides) for a in range(3)]

    def fits(p: list[int], batch: int) -> bool:
        cost = model_cost(model, in_channels, out_channels, layout())
        if budget.device == "cpu":
            return budget.step_time(cost, p, batch) <= budget.step_seconds
        return Budget.memory_gb(cost, p, batch) <= budget.gpu_memory_gb - GPU_MEMORY_RESERVE_GB

    shrunk = []
    while not fits(patch, 2):
        # Shrink the axis of largest physical extent that can still shrink.
        divisors = current_divisors()
        order = sorted(range(3), key=lambda a: (-(patch[a] * spacing[a]), a))
        axis = next((a for a in order if patch[a] - divisors[a] >= lows[a]), None)
        if axis is None:
            notes.append("the smallest valid patch exceeds the budget; it is used anyway")
            break
        patch[axis] -= divisors[axis]
        shrunk.append("XYZ"[axis])
        if strides is not None:  # a smaller patch may pool less: nnU-Net re-derives the topology at every step
            patch, strides, kernels = fit_topology(spacing, patch, max_stages)
    if shrunk:
        notes.append(f"shrunk to fit the budget along {', '.join(sorted(set(shrunk)))}")
    divisors = current_divisors()
    while strides is None and math.prod(p // d for p, d in zip(patch, divisors)) < spec.min_bottleneck_voxels:
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
    if strides is not None and len(set(divisors)) > 1:
        notes.append(f"per-axis down-sampling {'x'.join(map(str, divisors))} from the spacing (nnU-Net's rule)")
    target = target_spacing(fingerprint)
    if any(abs(t - s) > 0.05 * t for t, s in zip(target, spacing)):
        notes.append(f"prepared at {Plan._fmt(spacing)} mm; nnU-Net's rule recommends {Plan._fmt(target)} mm "
                     "(re-prepare with --spacing to follow it; a coarser spacing is cheaper on a CPU)")
    cost = model_cost(model, in_channels, out_channels, layout())
    return Plan(model=model, budget=asdict(budget), patch=patch, batch=batch, spacing=spacing,
                target_spacing=[float(t) for t in target], padding_fraction=pad,
                step_seconds=budget.step_time(cost, patch, batch), memory_gb=Budget.memory_gb(cost, patch, batch),
                median_shape=median, strides=strides, kernels=kernels, notes=notes)


def write_plan(data, model: str, budget: Budget) -> Plan:
    """Plan ``model`` on ``budget`` for a prepared cache and write ``plan.json`` beside its manifest."""
    fp = read_fingerprint(data)
    plan = plan_training(fp, model, budget, data.in_channels, max(2, data.num_classes))
    atomic_write_json(Path(data.root) / PLAN_FILE, asdict(plan))
    return plan


def plan_model_options(plan: dict[str, Any] | None) -> dict[str, Any]:
    """The ``model_options`` a plan (``plan.json`` as a mapping) builds its network with: ``kernels`` and
    ``strides`` where it has them, else {}."""
    if not plan or plan.get("strides") is None:
        return {}
    return {"kernels": [list(k) for k in plan["kernels"]], "strides": [list(s) for s in plan["strides"]]}


def with_plan_model_options(plan: dict[str, Any] | None, model: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` (a config's ``model_options``) with the plan's kernels and strides added when the plan is for
    ``model`` and ``options`` set neither; ``options`` itself otherwise. What is set always wins over the plan."""
    planned = plan_model_options(plan) if plan and plan.get("model") == model else {}
    if not planned or any(k in (options or {}) for k in planned):
        return dict(options or {})
    return {**planned, **(options or {})}


def read_plan(data_root: str | Path) -> dict[str, Any] | None:
    """``plan.json`` of a prepared cache, or None."""
    path = Path(data_root) / PLAN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def plan_overrides(data_dir: str | Path | None, config_file: str | Path | None, overrides: dict[str, Any],
                   default_model: str) -> dict[str, Any]:
    """The patch and batch a command takes from ``DATA/plan.json`` (``medpretrain plan``) when neither its
    options nor its YAML set them and the plan is for the same network, and the planned network's kernels and
    strides (``model_options``, merged into the YAML's) when the plan has them and neither sets them; {}
    otherwise. Options and YAML always win over the plan."""
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
    chosen: dict[str, Any] = {}
    if overrides.get("patch") is None and "patch" not in from_file:
        chosen["patch"] = tuple(plan["patch"])
    if overrides.get("batch") is None and "batch" not in from_file:
        chosen["batch"] = int(plan["batch"])
    # The planned network (DynUNet's per-axis strides and kernels), merged into the YAML's model_options.
    given = overrides.get("model_options") or from_file.get("model_options") or {}
    options = with_plan_model_options(plan, model, given)
    if options != given:
        chosen["model_options"] = options
    if chosen:
        log.info("using %s/plan.json: %s", data_dir, ", ".join(f"{k} {v}" for k, v in chosen.items()))
    return chosen
