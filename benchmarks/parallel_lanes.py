"""Throughput of one two-thread training job vs two one-thread jobs side by side on the same cores.

Reproduce (on an otherwise idle 2-core machine; tcmalloc as the training commands use it):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
        python benchmarks/parallel_lanes.py --out docs/results/benchmark/parallel_lanes.json

Each job: BasicUNet 16..128 (`unet`), 64x64x48 patches, batch 2, DiceCE, AdamW, fp32; `--steps` timed steps
after 2 warm-up steps; the median step time is reported. Throughput = jobs x 1 / median step time. This is
why `medpretrain benchmark` runs `parallel` one-thread jobs on a CPU machine instead of one job at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_model

JOB = """
import json, statistics, sys, time, torch
from monai.losses import DiceCELoss
from medpretrain.models import build_model
torch.manual_seed(0)
model = build_model("unet", 1, 2)
opt = torch.optim.AdamW(model.parameters(), 1e-3)
loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
x = torch.randn(2, 1, 64, 64, 48)
y = (torch.rand(2, 1, 64, 64, 48) > 0.7).long()
times = []
for i in range(int(sys.argv[1]) + 2):
    t = time.perf_counter()
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()
    times.append(time.perf_counter() - t)
print(json.dumps({"threads": torch.get_num_threads(), "median_step_s": statistics.median(times[2:])}))
"""


def run_jobs(n_jobs: int, threads: int, steps: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen([sys.executable, "-c", JOB, str(steps)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(n_jobs)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("docs/results/benchmark/parallel_lanes.json"))
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    results = []
    for n_jobs, threads in ((1, cores), (cores, 1)):
        t = time.perf_counter()
        jobs = run_jobs(n_jobs, threads, args.steps)
        results.append({"jobs": n_jobs, "threads_per_job": threads, "jobs_median_step_s": [j["median_step_s"] for j in jobs],
                        "steps_per_s": round(sum(1 / j["median_step_s"] for j in jobs), 3),
                        "wall_s": round(time.perf_counter() - t, 1)})
        print(results[-1], flush=True)
    speedup = results[1]["steps_per_s"] / results[0]["steps_per_s"]
    out = {"command": "python benchmarks/parallel_lanes.py --out " + str(args.out), "cpu": cpu_model(), "cores": cores,
           "ld_preload": os.environ.get("LD_PRELOAD", ""), "results": results,
           "throughput_gain_of_one_thread_jobs": round(speedup, 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"{cores} one-thread jobs do {speedup:.2f}x the steps per second of one {cores}-thread job")


if __name__ == "__main__":
    main()
