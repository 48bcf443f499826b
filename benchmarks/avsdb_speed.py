"""AVS-DB generation speed: volumes/s on one core at 96^3 with 20 shapes, outline and filled renders.

Reproduce (on an otherwise idle machine):

    python benchmarks/avsdb_speed.py --out docs/results/avsdb/generation_speed.json

One process, one thread (BLAS/OpenMP pools pinned to 1), default ``AVSDBConfig`` apart from ``render``;
volumes ``generate_volume(cfg, seed=0, index=i)`` for ``i`` in ``0..n-1`` after a few warm-up
volumes. The time is wall-clock per volume in memory (no file writing). The authors' public
generator is reported at about 0.5 s per such volume on one core (~2 volumes/s).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy
from _common import cpu_model

from medpretrain.atomic import atomic_write_json
from medpretrain.synthetic.avsdb import AVSDBConfig, _render_filled, _render_outline, _rng, place_shapes




def measure(cfg: AVSDBConfig, n: int, warmup: int = 3) -> dict:
    render = _render_outline if cfg.render == "outline" else _render_filled
    for i in range(warmup):
        label, placements, _ = place_shapes(cfg, 1, i)
        render(cfg, placements, _rng(1, i, 1))
    t_geom = t_render = 0.0
    placed = dropped = 0
    fg = 0.0
    t_all = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        label, placements, d = place_shapes(cfg, 0, i)
        t1 = time.perf_counter()
        render(cfg, placements, _rng(0, i, 1))  # exactly what generate_volume does after place_shapes
        t2 = time.perf_counter()
        t_geom += t1 - t0
        t_render += t2 - t1
        placed += len(placements)
        dropped += d
        fg += float(np.count_nonzero(label)) / label.size
    total = time.perf_counter() - t_all
    return {
        "render": cfg.render,
        "volumes": n,
        "seconds": round(total, 3),
        "volumes_per_s_per_core": round(n / total, 2),
        "ms_per_volume": round(1000 * total / n, 2),
        "ms_shapes_and_placement": round(1000 * t_geom / n, 2),
        "ms_render": round(1000 * t_render / n, 2),
        "mean_shapes_placed": round(placed / n, 2),
        "mean_shapes_dropped": round(dropped / n, 2),
        "mean_foreground_fraction": round(fg / n, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/results/avsdb/generation_speed.json"))
    ap.add_argument("--n", type=int, default=200, help="volumes per render mode")
    args = ap.parse_args()
    results = []
    for render in ("outline", "filled"):
        cfg = AVSDBConfig(render=render)
        r = measure(cfg, args.n)
        print(json.dumps(r), flush=True)
        results.append(r)
    report = {
        "command": "python benchmarks/avsdb_speed.py --out " + str(args.out) + (f" --n {args.n}" if args.n != 200 else ""),
        "config": AVSDBConfig().model_dump(mode="json") | {"render": "outline | filled"},
        "threads": 1,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "reference": "authors' public generator: ~0.5 s per 96^3 volume with 20 shapes on one core (~2 volumes/s)",
        "results": results,
    }
    atomic_write_json(args.out, report, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
