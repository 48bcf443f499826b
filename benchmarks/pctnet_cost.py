"""Training cost of PCT-Net against the U-Net baseline: seconds per step and peak memory at one patch size.

Reproduce (on an otherwise idle machine; the paper's 64x128x128 DxHxW patch is 128 128 64 in our X, Y, Z order):

    python benchmarks/pctnet_cost.py --patch 128 128 64 --batch 1 --steps 3 --threads 2 \\
        --out docs/results/volume-fusion/model_cost.json

Each model runs in its own process (so its peak resident memory is its own): build it, then training steps
of forward, loss, backward and AdamW step, fp32, on random data. The first ``--warmup`` steps are not timed.
The loss is the paper's deep-supervision recipe for the PCT-Nets (soft cross-entropy per output against the
one-hot label average-pooled to that output's size, weights 1, 1/2, 1/4, 1/8 normalised) and the same cross
entropy at full resolution for the U-Net. Reported per model: parameters (all, and those the forward pass
uses), seconds per timed step (mean and each), peak RSS of the process in GB, RSS after building the model,
and the CUDA peak when ``--device cuda``. The authors' PCT-Net (45.3 M parameters, 44.2 M used per forward
pass) was measured on the 2-core development machine at 1x1x64x128x128: about 50 s and 10.8 GB per step.

A quick check that the script runs: ``python benchmarks/pctnet_cost.py --patch 32 32 16 --steps 1 --warmup 0
--out /tmp/model_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_model

DEFAULT_MODELS = ("pctnet", "pctnet-small", "unet")
AUTHORS_PCTNET = {
    "patch_dhw": [64, 128, 128], "batch": 1, "threads": 2, "seconds_per_step": 50.0, "peak_rss_gb": 10.8,
    "parameters": 45.3e6, "parameters_used": 44.2e6,
    "note": "the authors' PCTNet (rebuilt for this input size), measured on the development machine",
}




def _rss_gb() -> float:
    """Current resident memory of this process."""
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def _loss(outputs, label, n_classes):
    import torch
    import torch.nn.functional as F

    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    onehot = F.one_hot(label, n_classes).movedim(-1, 1).float()
    weights = [0.5 ** i for i in range(len(outputs))]
    total = 0.0
    for w, out in zip(weights, outputs):
        target = onehot if out.shape[2:] == onehot.shape[2:] else F.adaptive_avg_pool3d(onehot, out.shape[2:])
        total = total + w * -(target * torch.log_softmax(out, dim=1)).sum(1).mean()
    return total / sum(weights)


def run_one(name: str, patch, batch: int, steps: int, warmup: int, device: str, classes: int) -> dict:
    """Measure one model in this process."""
    import torch

    from medpretrain.models import build_model

    torch.manual_seed(0)
    model = build_model(name, 1, classes, patch).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    used = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(batch, 1, *patch, device=device)
    y = torch.randint(0, classes, (batch, *patch), device=device)
    rss_built = _rss_gb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = _loss(model(x), y, classes)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    result = {
        "model": name, "parameters": params, "parameters_used": used,
        "seconds_per_step": sum(times) / len(times), "step_seconds": times,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "rss_after_build_gb": rss_built, "loss": float(loss.detach()),
    }
    if device.startswith("cuda"):
        result["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=int, nargs=3, default=[128, 128, 64], metavar=("X", "Y", "Z"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--out", type=Path, default=Path("docs/results/volume-fusion/model_cost.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: at least 1 timed step is needed")

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        res = run_one(args.worker, tuple(args.patch), args.batch, args.steps, args.warmup, args.device,
                      args.classes)
        print(json.dumps(res))
        return

    from medpretrain.atomic import atomic_write_json
    from medpretrain.models import get_spec

    for name in args.models:
        get_spec(name).check_patch(args.patch)  # refuse a bad patch before spending minutes on a model
    results = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--worker", name, "--patch", *map(str, args.patch),
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--classes", str(args.classes), "--device", args.device]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:14s} {res['parameters'] / 1e6:6.2f} M params ({res['parameters_used'] / 1e6:.2f} M used), "
              f"{res['seconds_per_step']:7.2f} s/step, peak RSS {res['peak_rss_gb']:.2f} GB", flush=True)
        results.append(res)

    import torch

    report = {
        "command": "python benchmarks/pctnet_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "patch_xyz": args.patch, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
        "threads": args.threads, "device": args.device, "precision": "fp32", "optimizer": "AdamW",
        "cpu": cpu_model(), "torch": torch.__version__, "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "results": results, "authors_pctnet_reference": AUTHORS_PCTNET,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
