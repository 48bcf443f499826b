"""Samples per second of ONE DataLoader worker for every training dataset, and the worker cores one H200 needs.

Full measurement (a quiet machine; ~5-7 minutes; prepares la2018 and the shared pool under runs/loader/ first):

    python benchmarks/loader_throughput.py --seconds 8 --out docs/results/loader_throughput

Each measurement runs in this one process with ``torch.set_num_threads(1)`` (what a DataLoader worker gets) and
does what a worker does for the training job: ``dataset[i]`` for the indices of one batch (the StepSampler's
order from step 0), then ``default_collate``, repeated for ``--seconds``; the first batch (page cache, lazily
built transforms) is not counted. Rows: fine-tuning patches (``data/sampling.PatchDataset``) with the default
augmentation (flips) and a heavy one (nnU-Net's probabilities: flips, 90-degree turns, rotation/scaling 0.2,
intensity 0.15, noise 0.1), with the augmentation in the workers (``augment.on: workers``) and on the device
(``augment.on: device``: workers only read patches); Volume Fusion, AVS-DB, ASA and Alice at their ``paper``
and ``cpu`` presets. Work some methods do on the training device (ASA's shuffling and phase-2 crops, Alice's
target-view augmentation, fine-tuning augmentation in ``device`` placement) is timed on the CPU (one thread,
one batch) and reported beside, never counted in the worker rate. Alice's match table is built once per
dataset (the registration matcher, SimpleITK); it is timed on its own, and the per-sample rows read crops from
a table of identity matches (what a sample costs does not depend on which points were matched).

GPU demand: the training step's FLOPs and saved activations per sample are counted for each row's network and
method (the real loss and backward pass, ``torch.utils.flop_counter`` and saved-tensor hooks: on meta tensors
at the row's patch where the network allows, else on the CPU at a smaller patch scaled linearly by voxels; cached
in ``gpu_cost.json``). The step time on an H200 is the larger of FLOPs / (``--gpu-efficiency`` x 989 TFLOP/s
bf16 dense) and activation traffic / (``--bandwidth-efficiency`` x 4.8 TB/s), the traffic being each saved
activation written, read, and its gradient written and read once, in bf16. Workers needed = the step's samples
per second / one worker's. These are estimates, not timings (``benchmarks/gpu`` measures real steps).

``--quick``: tiny volumes and patches, 0.3 s per row: checks that every row runs (``tests/test_loader_throughput.py``),
measures nothing. ``--synthetic``: generated volumes instead of ../shared (the test, machines without it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COST_FILE = "gpu_cost.json"
H200_BF16_FLOPS = 989e12   # dense bf16 peak (planning.GPU_PEAK_FLOPS["h200"])
H200_BANDWIDTH = 4.8e12    # HBM3e bytes/s
HEAVY = {"flip_prob": 0.5, "rotate90_prob": 0.5, "affine_prob": 0.2, "intensity_prob": 0.15, "noise_prob": 0.1}


@dataclass
class Row:
    """One measurement: a dataset at one size, and the network/batch whose step it feeds."""

    name: str
    what: str
    model: str
    patch: tuple[int, int, int]
    batch: int
    build: Callable[[], Any]                       # -> Dataset
    cost_key: str                                  # gpu_cost.json entry (network + method + patch)
    count: Callable[[], dict] | None = None        # counts the step's FLOPs (when not cached)
    device_work: Callable[[dict], None] | None = None
    compare: str | None = None                     # name of the row this one replaces (before -> after)
    measured_patch: tuple[int, int, int] | None = None  # --quick measures at tiny sizes; None = ``patch``
    measured_batch: int | None = None


# ---------------------------------------------------------------------------------------------- data


def ensure_data(args) -> tuple[Path, Path]:
    """(labelled cache, pool cache): prepared with the package's own `medpretrain prepare` when missing."""
    work = Path(args.work)
    if args.synthetic:
        from medpretrain.data.cache import PreparedData, prepare
        from medpretrain.synthetic.demo_data import make_demo_dataset

        size = (48, 48, 32) if args.quick else (192, 160, 112)
        n = 4 if args.quick else 12
        out = work / f"synthetic-{'x'.join(map(str, size))}"
        if not (out / "manifest.json").is_file():
            raw = make_demo_dataset(work / f"synthetic-raw-{'x'.join(map(str, size))}", n_cases=n, size=size, seed=0)
            prepare(dataset=raw, out=out, progress=False)
        PreparedData(out)
        return out, out  # the pool methods read a labelled cache's train split
    exe = [sys.executable, "-m", "medpretrain"]
    labelled, pool = Path(args.data), Path(args.pool)
    if not (labelled / "manifest.json").is_file():
        subprocess.run(exe + ["prepare", "--dataset", str(Path(args.shared) / "data" / "la2018"), "--out",
                              str(labelled), "--spacing", "1.25", "1.25", "1.25", "--workers", "2"], check=True)
    if not (pool / "manifest.json").is_file():
        subprocess.run(exe + ["prepare", "--pool", str(Path(args.shared) / "data" / "pool" / "pool.json"), "--out",
                              str(pool), "--spacing", "1.25", "1.25", "1.25", "--workers", "2"], check=True)
    return labelled, pool


# ---------------------------------------------------------------------------------------------- GPU cost


def _saved_bytes_hooks(counter: list[int]):
    def pack(t):
        counter[0] += t.numel() * t.element_size()
        return t
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


HOST_KEYS = ("offsets", "mask_q", "mask_k")  # read on the host by the methods (.tolist(), counts)


def _to(batch: dict, device: str) -> dict:
    return {k: (v if k in HOST_KEYS else v.to(device)) for k, v in batch.items()}


def count_step(attempts: list[tuple[str, Callable[[], tuple[torch.nn.Module, dict, int]]]],
               loss: Callable[[Any, dict], torch.Tensor], steps: int = 1) -> dict:
    """FLOPs and saved-activation bytes of one training step (loss and backward) per sample and per voxel.

    ``attempts``: ``(device, make)`` tried in order, ``make() -> (module, batch, voxels per sample)``; meta tensors
    first (no arithmetic: seconds at any size), the CPU at a smaller patch for a network whose forward reads
    tensor values (PCT-Net's window masks). ``steps``: optimiser steps ``loss`` covers (ASA: one of each phase)."""
    from torch.utils.flop_counter import FlopCounterMode

    for i, (device, make) in enumerate(attempts):
        module, batch, voxels = make()
        module.train()
        module = module.to(device)
        n = next(iter(batch.values())).shape[0] * steps
        saved = [0]
        try:
            with FlopCounterMode(display=False) as counter, _saved_bytes_hooks(saved):
                loss(module, _to(batch, device)).backward()
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
            if i == len(attempts) - 1:
                raise
            print(f"    ({device} count failed: {str(exc).splitlines()[0][:90]}; next: {attempts[i + 1][0]})",
                  flush=True)
            continue
        flops = counter.get_total_flops() / n
        return {"flops_per_sample": flops, "flops_per_voxel": flops / voxels,
                "saved_bytes_per_voxel": saved[0] / n / voxels, "counted_on": device, "voxels": voxels}
    raise AssertionError("unreachable")


def load_costs(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def gpu_estimate(cost: dict, patch, batch: int, args) -> dict:
    voxels = math.prod(patch)
    flops = cost["flops_per_voxel"] * voxels * batch
    traffic = 2.0 * cost["saved_bytes_per_voxel"] * voxels * batch  # 4 passes over bf16 = 2 x the fp32 bytes
    t_flops = flops / (args.gpu_efficiency * H200_BF16_FLOPS)
    t_bytes = traffic / (args.bandwidth_efficiency * H200_BANDWIDTH)
    step = max(t_flops, t_bytes) + args.step_overhead_ms / 1e3
    return {"step_tflop": round(flops / 1e12, 3), "activation_traffic_gb": round(traffic / 1e9, 2),
            "step_ms_flops": round(t_flops * 1e3, 2), "step_ms_traffic": round(t_bytes * 1e3, 2),
            "step_ms": round(step * 1e3, 2),
            "bound": ("launch" if args.step_overhead_ms / 1e3 > max(t_flops, t_bytes)
                      else "compute" if t_flops >= t_bytes else "memory"),
            "samples_per_s": round(batch / step, 1)}


# ---------------------------------------------------------------------------------------------- rows


def build_rows(args, labelled: Path, pool: Path) -> list[Row]:
    from medpretrain.config import AugmentConfig, FinetuneConfig
    from medpretrain.data.cache import PreparedData
    from medpretrain.data.sampling import PatchAugmenter, PatchDataset
    from medpretrain.engine.module import SegmentationModule
    from medpretrain.engine.pretrain import pretrain_config
    from medpretrain.methods import get_method

    la, pl_ = PreparedData(labelled), PreparedData(pool)
    train = la.split("train")
    quick = args.quick
    rows: list[Row] = []

    def seg_loss(module, b):
        return module.compute_loss(b["image"], b["label"])

    # ---- fine-tuning patches
    ft_sizes = [("cpu", (64, 64, 48), (32, 32, 16), 2, "unet"), ("gpu", (128, 128, 128), (32, 32, 32), 2, "unet")]
    for size, patch, tiny, batch, model in ft_sizes:
        measured = tiny if quick else patch
        for aug_name, aug in (("default", AugmentConfig()), ("heavy", AugmentConfig(**HEAVY))):
            placements = ("workers", "device") if size == "gpu" else ("workers",)
            for on in placements:
                on_device = on == "device"

                def build(measured=measured, aug=aug, on_device=on_device):
                    return PatchDataset(la, train, measured, seed=0, augment=aug, augment_on_device=on_device)

                def count(patch=patch, model=model):
                    def make():
                        ds = PatchDataset(la, train, patch, seed=0)
                        module = SegmentationModule(FinetuneConfig(model=model, patch=patch), la.in_channels,
                                                    la.num_classes)
                        return module, default_collate([ds[0]]), math.prod(patch)
                    return count_step([("meta", make)], seg_loss)

                name = f"finetune/{size}/{aug_name}" + (f"/{on}" if size == "gpu" else "")
                rows.append(Row(
                    name, f"fine-tuning patches, {aug_name} augmentation"
                    + (f", augmentation on the {'device' if on_device else 'workers'}" if size == "gpu" else ""),
                    model, patch, batch, build, f"finetune/{model}", count,
                    PatchAugmenter(aug, measured) if on_device else None,
                    compare=f"finetune/{size}/{aug_name}/workers" if on_device else None,
                    measured_patch=measured, measured_batch=batch))

    # ---- pretraining methods
    def method_cfg(method, preset, **overrides):
        if method == "alice":
            # The paper's sam matcher needs a trained matcher run; the rows read crops from identity matches and
            # the table is timed with the registration matcher (time_alice_table).
            overrides = {"matcher": "registration", **overrides}
        return pretrain_config(method, preset=preset, overrides=overrides)

    def quick_overrides(method):
        if not quick:
            return {}
        return {"volume-fusion": {"patch": (32, 32, 16)},
                "avsdb": {"patch": (32, 32, 32), "generator": {"size": (32, 32, 32)}},
                "asa": {"patch": (32, 32, 32), "crop": (32, 32, 32), "upsampled": 48},
                "alice": {"patch": (32, 32, 32)}}[method]

    def pretrain_rows(method, preset, label, extra=None, count_patch=None):
        m = get_method(method)
        overrides = {**(extra or {}), **quick_overrides(method)}
        if method == "asa" and quick and preset == "paper":
            overrides["crop"] = None
        cfg = method_cfg(method, preset, **overrides)
        nominal = method_cfg(method, preset, **(extra or {}))
        data = pl_ if m.needs_data else None
        tag = "-".join(f"{k}={v}" for k, v in (extra or {}).items())
        key = f"{method}/{nominal.model}"  # FLOPs per voxel: the network and the method's passes, not the sizes

        if method == "alice":
            def build(cfg=cfg):
                from medpretrain.methods.alice import AliceDataset
                return AliceDataset(data, cfg, matcher=IdentityMatcher())
        else:
            def build(cfg=cfg, m=m):
                return m.build_dataset(cfg, data)

        def count(nominal=nominal, m=m):
            def maker(c):
                def make():
                    ds = AliceDatasetIdentity(data, c) if method == "alice" else m.build_dataset(c, data)
                    return m.build_module(c), default_collate([ds[0]]), math.prod(c.patch)
                return make
            attempts = [("meta", maker(nominal))]
            if count_patch:  # the CPU counts at a smaller patch (FLOPs per voxel scale linearly for these networks)
                attempts.append(("cpu", maker(method_cfg(method, preset, **(extra or {}), **count_patch))))
            return count_step(attempts, METHOD_LOSS[method], steps=2 if method == "asa" else 1)

        rows.append(Row(f"{method}/{preset}{'/' + tag if tag else ''}", label, nominal.model, tuple(nominal.patch),
                        nominal.batch, build, key, count, DEVICE_WORK.get(method, lambda c: None)(cfg),
                        measured_patch=tuple(cfg.patch), measured_batch=cfg.batch))

    pretrain_rows("volume-fusion", "cpu", "Volume Fusion synthesis (cpu preset)")
    pretrain_rows("volume-fusion", "paper", "Volume Fusion synthesis (paper preset)",
                  count_patch={"patch": (64, 64, 32)})
    pretrain_rows("volume-fusion", "paper", "Volume Fusion, grid variant (the authors' code), paper sizes",
                  extra={"variant": "grid"}, count_patch={"patch": (64, 64, 32)})
    pretrain_rows("avsdb", "cpu", "AVS-DB generation (cpu preset)")
    pretrain_rows("avsdb", "paper", "AVS-DB generation (paper preset)",
                  count_patch={"patch": (64, 64, 64), "generator": {"size": (64, 64, 64)}})
    pretrain_rows("asa", "cpu", "ASA samples (cpu preset)")
    pretrain_rows("asa", "paper", "ASA samples (paper preset: whole volume resized to 128^3)",
                  count_patch={"patch": (64, 64, 64), "upsampled": 80})
    pretrain_rows("alice", "cpu", "Alice matched crop pairs (cpu preset)", count_patch={"patch": (64, 64, 48)})
    pretrain_rows("alice", "paper", "Alice matched crop pairs (paper preset)", count_patch={"patch": (96, 96, 32)})
    return rows


class IdentityMatcher:
    """Matches every point to the same relative position of the key volume, accepted: instant, for measuring what
    a sample costs (reading two crops and drawing masks) apart from building the match table."""

    name = "identity"
    threshold = 0.0

    def match(self, query, point, key):
        from medpretrain.matching import Match

        q, k = np.asarray(query.image.shape[1:], float), np.asarray(key.image.shape[1:], float)
        return Match(point=tuple(float(v) for v in np.asarray(point) * k / q), score=1.0, accepted=True)


def AliceDatasetIdentity(data, cfg):
    from medpretrain.methods.alice import AliceDataset

    return AliceDataset(data, cfg, matcher=IdentityMatcher())


def _asa_loss(module, b):
    module.phase_steps = (1, 1)
    return module.phase1_losses(b)["loss"] + module.phase2_losses(b)["loss"]  # one step of each phase, summed


def _alice_loss(module, b):
    return module.losses(b)["loss"]


def _seg_method_loss(module, b):
    return module.compute_loss(b["image"], b["label"])


METHOD_LOSS = {"volume-fusion": _seg_method_loss, "avsdb": _seg_method_loss, "asa": _asa_loss, "alice": _alice_loss}


def _asa_device_work(cfg):
    import torch.nn.functional as F

    from medpretrain.methods.asa import crop_views, shuffle_subvolumes

    def work(b):
        x = b["image"]
        shuffle_subvolumes(x, b["perm"], cfg.sub_volume)                      # phase 1
        up = F.interpolate(x, size=(cfg.upsampled,) * 3, mode="trilinear", align_corners=False)
        crop_views(up, b["offsets"][:, 0], cfg.patch[0]), crop_views(up, b["offsets"][:, 1], cfg.patch[0])  # phase 2
    return work


def _alice_device_work(cfg):
    from medpretrain.blocks.masking import normalized_pixels, patchify
    from medpretrain.methods.alice import augment_views

    def work(b):
        x = torch.cat([b["q"], b["k"]])
        augment_views(x, torch.cat([b["aug"][:, 0], b["aug"][:, 1]]))
        normalized_pixels(patchify(x, cfg.mask_patch))
    return work


DEVICE_WORK = {"asa": _asa_device_work, "alice": _alice_device_work}


# ---------------------------------------------------------------------------------------------- measuring


def measure(row: Row, seconds: float) -> dict:
    t0 = time.perf_counter()
    ds = row.build()
    build_s = time.perf_counter() - t0
    b = row.measured_batch

    def one_batch(step: int) -> dict:
        return default_collate([ds[i] for i in range(step * b, (step + 1) * b)])

    t0 = time.perf_counter()
    first = one_batch(0)
    first_s = time.perf_counter() - t0
    steps, per_batch = 0, []
    t_start = time.perf_counter()
    while True:
        t = time.perf_counter()
        one_batch(steps + 1)
        per_batch.append(time.perf_counter() - t)
        steps += 1
        if time.perf_counter() - t_start >= seconds:
            break
    elapsed = time.perf_counter() - t_start
    out = {"samples": steps * b, "seconds": round(elapsed, 2), "samples_per_s": round(steps * b / elapsed, 2),
           "ms_per_sample": round(1e3 * elapsed / (steps * b), 2),
           "ms_per_sample_p90": round(1e3 * float(np.percentile(per_batch, 90)) / b, 2),
           "first_batch_s": round(first_s, 3), "dataset_build_s": round(build_s, 3)}
    if row.device_work is not None:
        row.device_work(first)  # warm
        t = time.perf_counter()
        row.device_work(first)
        out["device_work_cpu_ms_per_batch"] = round(1e3 * (time.perf_counter() - t), 1)
    return out


def time_alice_table(args, pool: Path) -> dict:
    """Building Alice's match table with the registration matcher, on its own (one-off per dataset)."""
    from medpretrain.data.cache import PreparedData
    from medpretrain.engine.pretrain import pretrain_config
    from medpretrain.matching import build_matcher
    from medpretrain.methods.alice import build_match_table
    from medpretrain.data.crops import PoolCases

    data = PreparedData(pool)
    cfg = pretrain_config("alice", preset="cpu", overrides={"patch": (32, 32, 32)} if args.quick else None)
    cases = PoolCases(data, cfg.in_channels).case_ids[: args.alice_table_cases]
    if args.quick:
        cfg = cfg.model_copy(update={"match_points": 1, "match_partners": 1})
    t = time.perf_counter()
    rows = build_match_table(data, cases, cfg, build_matcher("registration"))
    s = time.perf_counter() - t
    pairs = len({(r["query"], r["key"]) for r in rows})
    return {"cases": len(cases), "points": len(rows), "registered_pairs_at_least": pairs,
            "accepted": sum(r["accepted"] for r in rows), "seconds": round(s, 2),
            "seconds_per_case": round(s / max(len(cases), 1), 2),
            "match_points": cfg.match_points, "match_partners": cfg.match_partners}


# ---------------------------------------------------------------------------------------------- report


def write_report(out: Path, result: dict, args) -> None:
    lines = ["# Loader throughput: samples/s per worker and the worker cores one H200 needs", ""]
    lines += ["Full measurement (a quiet machine, ~5-7 minutes; `runs/loader/` gets la2018 and the shared pool prepared",
              "by `medpretrain prepare` on the first run):", "",
              "    python benchmarks/loader_throughput.py --seconds 8 --out docs/results/loader_throughput", ""]
    if result["quick"]:
        lines += ["**This file is from a `--quick` run: tiny volumes and patches, 0.3 s per row on a busy machine. "
                  "Its numbers measure nothing; run the command above.**", ""]
    m = result["machine"]
    lines += [f"Machine: {m['cpu']} ({m['cores']} cores), torch {m['torch']}, one thread per measurement. Data: "
              f"{result['data']['labelled']} (fine-tuning), {result['data']['pool']} (pool). "
              f"{result['seconds_per_row']} s per row.", ""]
    g = result["gpu_assumptions"]
    lines += [f"GPU step estimate (not a timing): H200 at {g['gpu_efficiency']:.0%} of its {g['bf16_peak_tflops']:.0f} "
              f"TFLOP/s bf16 peak, or at {g['bandwidth_efficiency']:.0%} of {g['bandwidth_tb_s']} TB/s for the "
              f"activation traffic, whichever is slower, plus {g['step_overhead_ms']:g} ms per step (kernel launches, "
              "optimizer); FLOPs and saved activations counted on each method's real training step (`gpu_cost.json`; "
              "Alice's ViT counted at 96x96x32 and scaled by voxels, so its attention, ~10% at 192x192x64, is "
              "undercounted). Workers = the step's samples/s / one worker's samples/s, "
              f"rounded up; `>{args.workers_available}` marks a dataset one H200 machine "
              f"({args.workers_available} worker cores) cannot feed.", ""]
    lines += ["| row | network, patch, batch | ms/sample (1 worker) | samples/s per worker | device work (CPU, ms/batch) "
              "| H200 step (est.) | samples/s the H200 takes | workers needed |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['model']} {'x'.join(map(str, r['patch']))} b{r['batch']} | error: "
                         f"{r['error']} | | | | | |")
            continue
        g = r.get("gpu") or {}
        need = r.get("workers_needed")
        need_s = "n/a" if need is None else (f"**{need}** (>{args.workers_available})" if need > args.workers_available
                                             else str(need))
        step = f"{g['step_ms']:.1f} ms ({g['bound']})" if g else "n/a"
        dev = r.get("device_work_cpu_ms_per_batch")
        lines.append(f"| {r['name']} | {r['model']} {'x'.join(map(str, r['patch']))} b{r['batch']} | "
                     f"{r['ms_per_sample']:.1f} | {r['samples_per_s']:.1f} | {'' if dev is None else dev} | {step} | "
                     f"{g.get('samples_per_s', 'n/a')} | {need_s} |")
    if result.get("compare"):
        lines += ["", "Before/after (same script, same run): one worker's samples/s with the augmentation in the "
                  "workers (before; still `augment.on: workers`) and on the device (after; the default on CUDA):", "",
                  "| rows | before samples/s | after samples/s | ratio |", "|---|---|---|---|"]
        for c in result["compare"]:
            lines.append(f"| {c['after']} vs {c['before']} | {c['before_samples_per_s']} | {c['after_samples_per_s']} | "
                         f"{c['ratio']}x |")
    t = result.get("alice_table")
    if t:
        lines += ["", f"Alice match table (registration matcher, one-off when the dataset is built): {t['cases']} pool "
                  f"cases, {t['points']} points ({t['match_points']} per case, up to {t['match_partners']} partners), "
                  f"{t['seconds']} s ({t['seconds_per_case']} s per case, grows linearly with the pool)."]
    lines += ["", "Notes:", "",
              "- Device work is what the method runs on the training device once the batch is there (fine-tuning "
              "augmentation in `device` placement; ASA's sub-volume shuffle and phase-2 up-sampling and crops; Alice's "
              "target-view rotation/flip/intensity and patch targets), timed here on one CPU thread for one batch: on "
              "the GPU these are a few elementwise and resampling kernels over the batch.",
              "- Per worker = one DataLoader worker process (torch uses one thread in workers). A DataLoader with N "
              "workers delivers ~N times this while the machine has N free cores; the main process (the training step, "
              "pinning, the host-to-device copy) needs its own core.",
              "- The H200 step is an estimate from counted FLOPs and activation bytes; small-channel networks (the "
              "U-Net) reach a smaller share of the peak than assumed, so their real steps are slower and need fewer "
              "workers than stated.", ""]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="measuring time per row")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 0.3 s per row: checks the rows run")
    ap.add_argument("--synthetic", action="store_true", help="generated volumes instead of ../shared data")
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--work", default=str(REPO / "runs" / "loader"), help="prepared caches go here")
    ap.add_argument("--data", default=None, help="prepared la2018 (default WORK/la2018)")
    ap.add_argument("--pool", default=None, help="prepared pool (default WORK/pool)")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "loader_throughput"))
    ap.add_argument("--costs", default=str(REPO / "docs" / "results" / "loader_throughput" / COST_FILE),
                    help="cached FLOP/activation counts (read; written when counts are added)")
    ap.add_argument("--recount", action="store_true", help="count every row's step FLOPs again")
    ap.add_argument("--count-only", action="store_true", help="only count the steps' FLOPs into --costs; no loader")
    ap.add_argument("--only", default=None, help="rows whose name contains this text")
    ap.add_argument("--gpu-efficiency", type=float, default=0.25, help="share of the bf16 peak a step reaches")
    ap.add_argument("--bandwidth-efficiency", type=float, default=0.5, help="share of HBM bandwidth reached")
    ap.add_argument("--step-overhead-ms", type=float, default=5.0,
                    help="fixed time per step: kernel launches, optimizer, Python (eager PyTorch)")
    ap.add_argument("--workers-available", type=int, default=14, help="worker cores of the GPU machine")
    ap.add_argument("--alice-table-cases", type=int, default=2,
                    help="pool cases the match-table timing uses (each registers with up to match_partners others)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 0.3)
        args.alice_table_cases = min(args.alice_table_cases, 3)
    args.data = args.data or str(Path(args.work) / "la2018")
    args.pool = args.pool or str(Path(args.work) / "pool")
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore")

    labelled, pool = ensure_data(args)
    rows = build_rows(args, labelled, pool)
    if args.only:
        rows = [r for r in rows if args.only in r.name]
    cost_path = Path(args.costs)
    costs = load_costs(cost_path)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.count_only:
        for row in rows:
            if (args.recount or row.cost_key not in costs) and row.count is not None:
                print(f"counting {row.cost_key} ...", flush=True)
                t = time.perf_counter()
                costs[row.cost_key] = {**row.count(), "seconds": round(time.perf_counter() - t, 1)}
                print(f"    {costs[row.cost_key]}", flush=True)
                cost_path.parent.mkdir(parents=True, exist_ok=True)
                cost_path.write_text(json.dumps(costs, indent=1, sort_keys=True), encoding="utf-8")
        return {"costs": costs}

    results = []
    for row in rows:
        print(f"{row.name}: {row.what} ...", flush=True)
        rec: dict[str, Any] = {"name": row.name, "what": row.what, "model": row.model, "patch": list(row.patch),
                               "batch": row.batch}
        if args.quick:
            rec["measured_patch"], rec["measured_batch"] = list(row.measured_patch), row.measured_batch
        try:
            rec.update(measure(row, args.seconds))
        except Exception as exc:  # a row that fails is reported, the others still run
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print("   ", rec["error"], flush=True)
            results.append(rec)
            continue
        if (args.recount or row.cost_key not in costs) and not args.quick and row.count is not None:
            t = time.perf_counter()
            costs[row.cost_key] = {**row.count(), "seconds": round(time.perf_counter() - t, 1)}
            cost_path.parent.mkdir(parents=True, exist_ok=True)
            cost_path.write_text(json.dumps(costs, indent=1, sort_keys=True), encoding="utf-8")
        if row.cost_key in costs:
            rec["gpu"] = gpu_estimate(costs[row.cost_key], row.patch, row.batch, args)
            rec["workers_needed"] = math.ceil(rec["gpu"]["samples_per_s"] / rec["samples_per_s"])
        print(f"    {rec['ms_per_sample']} ms/sample, {rec['samples_per_s']} samples/s"
              + (f", H200 {rec['gpu']['samples_per_s']} samples/s -> {rec['workers_needed']} workers" if "gpu" in rec
                 else ""), flush=True)
        results.append(rec)

    by_name = {r["name"]: r for r in results}
    compare = []
    for row in rows:
        if row.compare and row.compare in by_name and row.name in by_name and "error" not in by_name[row.name] \
                and "error" not in by_name[row.compare]:
            a, b = by_name[row.compare], by_name[row.name]
            compare.append({"before": row.compare, "after": row.name, "before_samples_per_s": a["samples_per_s"],
                            "after_samples_per_s": b["samples_per_s"],
                            "ratio": round(b["samples_per_s"] / a["samples_per_s"], 1)})
    alice_table = None
    if not args.only or "alice" in args.only:
        print("alice match table (registration) ...", flush=True)
        try:
            alice_table = time_alice_table(args, pool)
        except Exception as exc:
            alice_table = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    result = {
        "command": "python benchmarks/loader_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick, "seconds_per_row": args.seconds,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "data": {"labelled": str(labelled), "pool": str(pool), "synthetic": args.synthetic},
        "gpu_assumptions": {"gpu": "h200", "bf16_peak_tflops": H200_BF16_FLOPS / 1e12,
                            "gpu_efficiency": args.gpu_efficiency, "bandwidth_tb_s": H200_BANDWIDTH / 1e12,
                            "bandwidth_efficiency": args.bandwidth_efficiency,
                            "step_overhead_ms": args.step_overhead_ms,
                            "workers_available": args.workers_available},
        "heavy_augmentation": HEAVY,
        "rows": results, "compare": compare, "alice_table": alice_table,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    write_report(out, result, args)
    print(f"wrote {out / 'results.json'} and {out / 'README.md'}")
    return result


if __name__ == "__main__":
    main()
