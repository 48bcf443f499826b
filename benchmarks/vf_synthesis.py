"""Volume Fusion synthesis cost: ms per sample on one core (paper and grid variants) vs a CPU-preset training step.

Reproduce (on an otherwise idle machine, with a prepared pool; tcmalloc as the training commands use it):

    medpretrain prepare --pool POOL.json --out prepared/vf-pool
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
        python benchmarks/vf_synthesis.py --data prepared/vf-pool --out docs/results/volume-fusion/synthesis.json

Without ``--data`` a pool of four random 160 x 160 x 96 volumes is written and prepared in a temporary folder
(the content does not change the cost: every sample reads two crops from memory-mapped ``.npy`` files and
does the same arithmetic). ``--smoke`` runs a few small samples and one step, only to check the script.

What is timed:

* synthesis: ``VolumeFusionDataset[i]`` for ``i = 0..n-1`` after a few warm-up samples, in this process with
  one thread (what a DataLoader worker does: crop reading, fusion map, fusion, conversion to tensors), at the
  paper's sub-volume (D x H x W 64 x 128 x 128 = patch 128 x 128 x 64 here) and at the CPU preset's patch;
* a training step of the CPU preset (forward, loss, backward, optimizer step of ``VolumeFusionModule`` on
  batches of real VF samples) with PyTorch's default thread count, as ``medpretrain pretrain`` runs it.

The synthesis share of a step is ``batch x ms per sample (CPU patch) / ms per step``; the requirement is
below 10%. Reference: the authors' paper-version code takes about 17 ms per 64 x 128 x 128 sample on one
core of this machine.
"""

from __future__ import annotations

import os

# Synthesis is timed on one thread; the training step with the threads a training run would get.
_USER_THREADS = os.environ.get("OMP_NUM_THREADS")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import cpu_model

REFERENCE_MS = 17.0
PAPER_PATCH = (128, 128, 64)




def _temporary_pool(root: Path, shape=(160, 160, 96), n=4):
    """Random smooth volumes written as NIfTI and prepared (spacing 1 mm, MR normalisation)."""
    import nibabel as nib
    from scipy.ndimage import uniform_filter

    from medpretrain.data.cache import prepare
    from medpretrain.data.preprocess import PreprocessConfig

    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        vol = uniform_filter(rng.normal(0, 1, shape).astype(np.float32), 5) * 50 + 100
        path = root / f"scan_{i}.nii.gz"
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
        paths.append(str(path))
    return prepare(pool=paths, out=root / "prepared",
                   cfg=PreprocessConfig(spacing=(1.0, 1.0, 1.0), crop_foreground=False), progress=False)


def time_synthesis(data, cfg, n: int, warmup: int = 3) -> dict:
    from medpretrain.methods.volume_fusion import VolumeFusionDataset

    ds = VolumeFusionDataset(data, cfg)
    for i in range(warmup):
        ds[10**9 + i]
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        ds[i]
        times.append(time.perf_counter() - t0)
    return {"variant": cfg.variant, "patch": list(cfg.patch), "samples": n,
            "ms_per_sample": round(1000 * statistics.fmean(times), 2),
            "ms_median": round(1000 * statistics.median(times), 2),
            "ms_max": round(1000 * max(times), 2)}


def time_step(data, cfg, steps: int, warmup: int = 2) -> dict:
    import torch

    from medpretrain.methods.volume_fusion import VolumeFusionDataset, VolumeFusionModule

    torch.manual_seed(cfg.seed)
    module = VolumeFusionModule(cfg)
    module.train()
    opt = module.configure_optimizers()["optimizer"]
    ds = VolumeFusionDataset(data, cfg)
    batches = []
    for s in range(warmup + steps):
        items = [ds[s * cfg.batch + b] for b in range(cfg.batch)]
        batches.append({k: torch.stack([it[k] for it in items]) for k in items[0]})
    times = []
    for s, batch in enumerate(batches):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = module.compute_loss(batch["image"], batch["label"])
        loss.backward()
        opt.step()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    return {"model": cfg.model, "patch": list(cfg.patch), "batch": cfg.batch, "steps": steps,
            "torch_threads": torch.get_num_threads(), "ms_per_step": round(1000 * statistics.fmean(times), 1),
            "ms_median": round(1000 * statistics.median(times), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="prepared pool (default: a temporary random pool)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/volume-fusion/synthesis.json"))
    ap.add_argument("--n", type=int, default=100, help="timed samples per variant and size")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps of the CPU preset")
    ap.add_argument("--step-threads", type=int, default=None,
                    help="PyTorch threads of the training step (default: OMP_NUM_THREADS if set, else all cores)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 3 samples, 1 step: checks the script only")
    args = ap.parse_args()

    import torch

    from medpretrain.data.cache import PreparedData
    from medpretrain.engine.pretrain import pretrain_config

    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="vf-bench-")
        data = _temporary_pool(Path(tmp.name), shape=(72, 72, 40) if args.smoke else (160, 160, 96))
    else:
        data = PreparedData(args.data)
    n, steps = (3, 1) if args.smoke else (args.n, args.steps)
    cpu = pretrain_config("volume-fusion", preset="cpu")
    paper_patch = (64, 64, 32) if args.smoke else PAPER_PATCH
    cpu_patch = (32, 32, 32) if args.smoke else tuple(cpu.patch)

    step_threads = args.step_threads or int(_USER_THREADS or 0) or os.cpu_count() or 1
    torch.set_num_threads(1)  # synthesis runs in a DataLoader worker: one thread
    synthesis = []
    for variant in ("paper", "grid"):
        for patch in (paper_patch, cpu_patch):
            r = time_synthesis(data, pretrain_config("volume-fusion", overrides={"variant": variant, "patch": patch}), n)
            print(json.dumps(r), flush=True)
            synthesis.append(r)
    torch.set_num_threads(step_threads)
    step = time_step(data, pretrain_config("volume-fusion", preset="cpu", overrides={"patch": cpu_patch}), steps)
    print(json.dumps(step), flush=True)

    share = {}
    for r in synthesis:
        if tuple(r["patch"]) == cpu_patch:
            share[r["variant"]] = round(step["batch"] * r["ms_per_sample"] / step["ms_per_step"], 4)
    report = {
        "command": " ".join(["python", "benchmarks/vf_synthesis.py", *sys.argv[1:]]),
        "smoke": args.smoke,
        "data": str(data.root) if tmp is None else "temporary random pool (4 volumes)",
        "cases": len(data.case_ids),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "tcmalloc": "tcmalloc" in os.environ.get("LD_PRELOAD", ""),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "torch": torch.__version__,
        "synthesis_threads": 1,
        "synthesis": synthesis,
        "cpu_preset_step": step,
        "synthesis_share_of_step": share,
        "below_10_percent": {k: v < 0.10 for k, v in share.items()},
        "reference": f"authors' paper-version code: ~{REFERENCE_MS:g} ms per 64x128x128 sample on one core here",
    }
    from medpretrain.atomic import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report, indent=2)
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
