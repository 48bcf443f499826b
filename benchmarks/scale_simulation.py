"""What a 1,000-scan pretraining pool costs to prepare, store and read: measured on a sample, extrapolated.

Full measurement (run on a quiet machine; about 10 minutes on 2 cores):

    python benchmarks/scale_simulation.py --out docs/results/scale

Test (under 30 s): ``--quick --out DIR --work DIR``.

What it does, all through the code ``medpretrain prepare`` and the training datasets run:

1. Writes ``--n`` synthetic abdominal CT scans as int16 NIfTI (``.nii.gz``) at a typical acquisition grid
   (512 x 512 in-plane at 0.75 mm, 2.5 mm slices, 60-180 slices: 150-450 mm along z), so that resampling to
   1.5 mm gives volumes of about 256 x 256 x (100-300), the size of abdominal CT in a pretraining pool. The
   content is CT-like, because compression depends on it (noise does not compress, a constant compresses
   absurdly): air at -1000 HU around an elliptic body whose outline changes along z, subcutaneous fat, soft
   tissue, organ-like ellipsoids (liver, spleen, kidneys with contrast, aorta, vertebrae, lungs in the upper
   slices, bowel gas), a patient table, a smooth low-frequency texture and white noise of 15 HU.
2. Prepares them with ``prepare_pool`` in one process (one core) as ``npy`` and as ``blosc2``: scans/s and MB/s
   of prepared float32 per core, and the seconds of reading the sources alone.
3. Cache bytes per scan for both formats (the compression ratio), and, with ``--real``, the same on real scans:
   ``../shared/data/btcv`` (abdominal CT, labelled) and ``../shared/data/pool`` (CT and MR), prepared at 1.5 mm
   into ``--work`` (the sources are only read).
4. Random-crop throughput per core (one process, one decoding thread) for 64^3 and 128^3 crops through
   ``PreparedData.image`` + ``read_crop``, as every self-supervised dataset reads: warm (the files in the page
   cache) and cold (each crop's file evicted from the page cache first with ``posix_fadvise(DONTNEED)``: only
   this script's files, nothing system-wide), and the full-volume decode rate.
5. Extrapolates linearly to ``--pool-size`` scans (default 1,000): disk GB and prepare core-hours per format.

Writes ``results.json`` and ``README.md`` to ``--out``. The machine's load average is recorded at the start and
the end: numbers taken beside other work are slower than on a quiet machine (``--note`` says so in the README).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

from medpretrain.data.cache import PreparedData, prepare_dataset, prepare_pool  # noqa: E402
from medpretrain.data.crops import background_fill, read_crop  # noqa: E402
from medpretrain.data.io import read_image, write_nifti  # noqa: E402
from medpretrain.data.preprocess import PreprocessConfig  # noqa: E402
from medpretrain.data.sampling import choose_patch_start, crop_with_padding  # noqa: E402

FORMATS = ("npy", "blosc2")
SPACING = (1.5, 1.5, 1.5)
SOURCE_SPACING = (0.75, 0.75, 2.5)
MB = 1e6
FULL_COMMAND = "python benchmarks/scale_simulation.py --out docs/results/scale"


# --------------------------------------------------------------------------- synthetic CT


def _ellipsoid(vol: np.ndarray, grid_mm, centre, semi, value: float) -> None:
    """Set ``vol`` to ``value`` inside an axis-aligned ellipsoid (mm) and inside the body, touching only the
    ellipsoid's bounding box."""
    xs, ys, zs = grid_mm
    sl = []
    for axis, (c, s) in zip((xs, ys, zs), zip(centre, semi)):
        idx = np.flatnonzero(np.abs(axis - c) <= s)
        if idx.size == 0:
            return
        sl.append(slice(idx[0], idx[-1] + 1))
    x = ((xs[sl[0]] - centre[0]) / semi[0])[:, None, None]
    y = ((ys[sl[1]] - centre[1]) / semi[1])[None, :, None]
    z = ((zs[sl[2]] - centre[2]) / semi[2])[None, None, :]
    box = vol[tuple(sl)]
    box[(x * x + y * y + z * z <= 1) & (box > -500)] = value


def ct_like_volume(rng: np.random.Generator, shape, spacing) -> np.ndarray:
    """An abdominal-CT-like int16 volume in HU, ``(X, Y, Z)``, X left-right, Y posterior-anterior, Z upwards."""
    from scipy import ndimage

    nx, ny, nz = shape
    xs = (np.arange(nx) - nx / 2) * spacing[0]
    ys = (np.arange(ny) - ny / 2) * spacing[1]
    zs = np.arange(nz) * spacing[2]
    length = zs[-1]
    vol = np.full(shape, -1000.0, np.float32)
    # body outline: an ellipse whose half-axes breathe slowly along z; fat shell 12-20 mm, soft tissue inside
    phase = rng.uniform(0, 2 * np.pi)
    a0, b0 = rng.uniform(130, 170), rng.uniform(95, 125)
    x2 = xs[:, None] ** 2
    # patient table: a 10 mm slab 20-30 mm below the back
    table = np.ix_(np.abs(xs) < 200, (ys > -b0 - 20) & (ys < -b0 - 10))
    fat0 = rng.uniform(12, 20)
    for k, z in enumerate(zs):
        wave = 1 + 0.06 * np.sin(2 * np.pi * z / 300 + phase)
        a, b = a0 * wave, b0 * wave
        r = x2 / a**2 + (ys[None, :] - 10) ** 2 / b**2
        fat = fat0 * (1 + 0.2 * np.sin(2 * np.pi * z / 170 + 2 * phase))
        inner = x2 / (a - fat) ** 2 + (ys[None, :] - 10) ** 2 / (b - fat) ** 2
        sl = vol[:, :, k]
        sl[r <= 1] = -100.0
        sl[inner <= 1] = 40.0
        sl[table] = 150.0
    grid = (xs, ys, zs)
    j = lambda s: s * rng.uniform(0.85, 1.15)  # noqa: E731 - organ-size jitter
    _ellipsoid(vol, grid, (-55, 25, length * 0.62), (j(85), j(70), j(95)), 60.0)  # liver
    _ellipsoid(vol, grid, (75, -15, length * 0.62), (j(40), j(35), j(55)), 50.0)  # spleen
    for side in (-1, 1):
        _ellipsoid(vol, grid, (side * 60, -45, length * 0.45), (j(28), j(28), j(55)), 160.0)  # kidneys
        _ellipsoid(vol, grid, (side * 65, 20, length * 0.95), (j(55), j(60), j(100)), -850.0)  # lung bases
    _ellipsoid(vol, grid, (5, -35, length / 2), (12, 12, length), 200.0)  # aorta
    _ellipsoid(vol, grid, (0, -75, length / 2), (22, 20, length), 700.0)  # spine
    _ellipsoid(vol, grid, (0, -75, length / 2), (15, 13, length), 250.0)  # cancellous bone inside
    for _ in range(int(rng.integers(4, 10))):  # bowel gas
        _ellipsoid(vol, grid, (rng.uniform(-70, 70), rng.uniform(0, 60), rng.uniform(0.1, 0.5) * length),
                   (rng.uniform(8, 25),) * 2 + (rng.uniform(8, 30),), -950.0)
    # smooth texture (+-10 HU at a ~2 cm scale, interpolated to a 4x coarser in-plane grid, then repeated), then
    # white noise of 15 HU
    coarse = rng.normal(0, 10, (max(2, nx // 24), max(2, ny // 24), max(2, nz // 8))).astype(np.float32)
    texture = ndimage.zoom(coarse, [-(-nx // 4) / coarse.shape[0], -(-ny // 4) / coarse.shape[1],
                                    nz / coarse.shape[2]], order=1)
    vol += np.repeat(np.repeat(texture, 4, 0), 4, 1)[:nx, :ny, :nz]
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= 15
    vol += noise
    np.rint(vol, out=vol)
    np.clip(vol, -1024, 3071, out=vol)
    return vol.astype(np.int16)


def write_sources(folder: Path, n: int, quick: bool) -> list[Path]:
    """Scan ``i`` is a function of ``i`` alone, so files left by an earlier run are reused as they are."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng([int(quick), i])
        path = folder / f"synth_{i:04d}{'_quick' if quick else ''}.nii.gz"
        if quick:
            shape = (128, 128, int(rng.integers(15, 25)))
        else:
            shape = (512, 512, int(rng.integers(60, 181)))
        if not path.exists():
            vol = ct_like_volume(rng, shape, SOURCE_SPACING)
            write_nifti(vol, np.diag([*SOURCE_SPACING, 1.0]), path, dtype=np.int16)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- measurements


def _files(data: PreparedData, cid: str) -> list[Path]:
    suffix = ".npy" if data.array_format == "npy" else ".b2nd"
    return [p for p in (data.root / f"{cid}{suffix}", data.root / f"{cid}_seg{suffix}") if p.exists()]


def bytes_per_scan(data: PreparedData) -> list[int]:
    return [sum(p.stat().st_size for p in _files(data, cid)) for cid in data.case_ids]


def evict(paths) -> None:
    """Drop these files' pages from the page cache (clean pages only; nothing else is touched)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def crop_rate(data: PreparedData, size: int, n: int, cold: bool, seed: int = 0, labels: bool = False) -> dict:
    """Crops/s of ``size``^3 image crops (and the label crop with ``labels``) at random positions of random
    scans, opening the array per crop as the datasets do."""
    ids = data.case_ids
    rng = np.random.default_rng(seed)
    fills = {c: background_fill(data.case(c), data.in_channels) for c in ids}
    if not cold:
        warm([p for c in ids for p in _files(data, c)])
    total = cpu = 0.0
    voxels = 0
    for _ in range(n):
        cid = ids[int(rng.integers(len(ids)))]
        shape = data.case(cid)["shape"][-3:]
        start = choose_patch_start(shape, (size,) * 3, rng, None)
        if cold:
            evict(_files(data, cid))
        t, c = time.perf_counter(), time.process_time()
        crop = read_crop(data.image(cid), start, (size,) * 3, fills[cid])
        if labels:
            crop_with_padding(data.label(cid), start, (size,) * 3)
        total += time.perf_counter() - t
        cpu += time.process_time() - c
        voxels += crop.size
    # Per core: crops per CPU-second of this process (robust to other load on the machine; it leaves out the
    # time spent waiting for the disk, which the wall-clock rate includes).
    return {"crops_per_cpu_s": round(n / cpu, 1), "cpu_ms_per_crop": round(1e3 * cpu / n, 2),
            "crops_per_s": round(n / total, 1), "ms_per_crop": round(1e3 * total / n, 2),
            "MB_per_cpu_s": round(voxels * 4 / MB / cpu, 1), "crops": n}


def decode_rate(data: PreparedData, n: int) -> dict:
    """Whole-volume read into memory (warm page cache): MB/s of float32 delivered."""
    ids = data.case_ids[:n]
    warm([p for c in ids for p in _files(data, c)])
    t, c = time.perf_counter(), time.process_time()
    nbytes = sum(np.asarray(data.image(c, mmap=False)).nbytes for c in ids)
    return {"MB_per_cpu_s": round(nbytes / MB / (time.process_time() - c), 1),
            "MB_per_s": round(nbytes / MB / (time.perf_counter() - t), 1), "volumes": len(ids)}


def time_reads(paths: list[Path]) -> float:
    """CPU seconds per source scan of reading it alone (decompressing the .nii.gz)."""
    c = time.process_time()
    for p in paths:
        read_image(p)
    return (time.process_time() - c) / len(paths)


def prepare_both(prepare_fn, out: Path, label: str) -> dict[str, dict]:
    """Prepare with each format in one process; returns per format the cache, seconds, and sizes."""
    res = {}
    for fmt in FORMATS:
        folder = out / f"{label}-{fmt}"
        shutil.rmtree(folder, ignore_errors=True)
        t, c = time.perf_counter(), time.process_time()
        data = prepare_fn(folder, fmt)  # workers=1: in this process, so its CPU time is the prepare's
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
        sizes = bytes_per_scan(data)
        voxels = [int(np.prod(data.case(c)["shape"])) for c in data.case_ids]
        res[fmt] = {"data": data, "seconds": seconds, "cpu_seconds": cpu, "scans": len(data), "bytes": sizes,
                    "voxels": voxels}
        print(f"  {label} {fmt}: {len(data)} scans in {seconds:.1f} s ({cpu:.1f} CPU s), "
              f"{np.mean(sizes) / MB:.1f} MB/scan", flush=True)
    return res


def _span(values) -> str:
    lo, hi = int(np.min(values)), int(np.max(values))
    return str(lo) if lo == hi else f"{lo}-{hi}"


def summarise_sizes(res: dict) -> dict:
    npy, b2 = np.array(res["npy"]["bytes"], float), np.array(res["blosc2"]["bytes"], float)
    ratios = npy / b2
    return {"scans": len(npy), "npy_MB_per_scan": round(npy.mean() / MB, 2),
            "blosc2_MB_per_scan": round(b2.mean() / MB, 2),
            "ratio_total": round(npy.sum() / b2.sum(), 2),
            "ratio_per_scan_min_median_max": [round(float(np.min(ratios)), 2), round(float(np.median(ratios)), 2),
                                              round(float(np.max(ratios)), 2)]}


# --------------------------------------------------------------------------- report


def write_readme(out: Path, r: dict, command: str, note: str) -> None:
    s, pool = r["synthetic"], r["extrapolation"]
    lines = [
        "# Scale simulation: a 1,000-scan pool, measured on a sample",
        "",
        "Full measurement (about 10 minutes on 2 quiet cores; `benchmarks/scale_simulation.py` says what it does):",
        "",
        "```bash",
        FULL_COMMAND,
        "```",
        "",
        *([] if command == FULL_COMMAND else ["The numbers below are from this run instead:", "", "```bash", command,
                                             "```", ""]),
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; load average at start "
        f"{r['machine']['load_start']}, at end {r['machine']['load_end']}. {note}".rstrip(),
        "",
        f"**Assumption.** Pool scans are abdominal CT: {s['source']}, resampled to {SPACING} mm, i.e. prepared "
        f"volumes (after the crop to the body box) of {s['prepared_shape_note']}. Measured on {s['scans']} "
        "synthetic CT-like scans, extrapolated "
        f"linearly to {pool['pool_size']} scans (mean per scan x {pool['pool_size']}).",
        "",
        "## 1,000 scans",
        "",
        "| | npy | blosc2 |",
        "| --- | ---: | ---: |",
        f"| disk (GB) | {pool['disk_GB']['npy']} | {pool['disk_GB']['blosc2']} |",
        f"| prepare (core-hours, CPU time) | {pool['prepare_core_hours']['npy']} | "
        f"{pool['prepare_core_hours']['blosc2']} |",
        f"| prepare (hours in one process, wall clock) | {pool['prepare_wall_hours_one_process']['npy']} | "
        f"{pool['prepare_wall_hours_one_process']['blosc2']} |",
        f"| prepare per core (scans per CPU-second) | {s['prepare']['npy']['scans_per_cpu_s']} | "
        f"{s['prepare']['blosc2']['scans_per_cpu_s']} |",
        f"| prepare per core (MB of float32 per CPU-second) | {s['prepare']['npy']['MB_per_cpu_s']} | "
        f"{s['prepare']['blosc2']['MB_per_cpu_s']} |",
        f"| sources (GB, int16 .nii.gz) | {pool['source_GB']} | |",
        "",
        f"Reading a source scan alone (nii.gz) takes {s['read_source_s']} CPU s of the "
        f"{s['prepare']['npy']['cpu_s_per_scan']} CPU s per scan. Compression on the synthetic sample: "
        f"{s['sizes']['ratio_total']}x ({s['sizes']['npy_MB_per_scan']} MB -> {s['sizes']['blosc2_MB_per_scan']} MB "
        "per scan).",
        "",
        "## Compression on real scans",
        "",
    ]
    if r.get("real"):
        lines += ["| data | scans | npy MB/scan | blosc2 MB/scan | ratio (total) | ratio per scan min / median / max |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for name, v in r["real"].items():
            sz = v["sizes"]
            lines.append(f"| {name} | {sz['scans']} | {sz['npy_MB_per_scan']} | {sz['blosc2_MB_per_scan']} | "
                         f"{sz['ratio_total']} | {' / '.join(map(str, sz['ratio_per_scan_min_median_max']))} |")
        lines += ["", r["real_note"], ""]
    else:
        lines += ["Not measured in this run (`--real`).", ""]
    lines += ["## Random crops per core (one process, one decoding thread)", "",
              "Crops per CPU-second (CPU ms per crop) and, in brackets, per wall-clock second (ms per crop).", "",
              "| crop | page cache | npy | blosc2 | npy (wall) | blosc2 (wall) |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]

    def row(label, cache, v):
        n, b = v["npy"], v["blosc2"]
        return (f"| {label} | {cache} | {n['crops_per_cpu_s']} ({n['cpu_ms_per_crop']} ms) | {b['crops_per_cpu_s']} "
                f"({b['cpu_ms_per_crop']} ms) | {n['crops_per_s']} ({n['ms_per_crop']} ms) | {b['crops_per_s']} "
                f"({b['ms_per_crop']} ms) |")

    for key, v in s["crops"].items():
        size, cache = key.split("_")
        lines.append(row(f"{size}^3 image", cache, v))
    for key, v in (r.get("real_crops") or {}).items():
        size, cache = key.split("_")
        lines.append(row(f"{size}^3 image + label, BTCV", cache, v))
    d = s["decode"]
    lines += [
        "",
        f"Whole-volume read into memory (warm): npy {d['npy']['MB_per_cpu_s']} MB, blosc2 "
        f"{d['blosc2']['MB_per_cpu_s']} MB of float32 per CPU-second (the blosc2 figure is its decode rate).",
        "",
        "A blosc2 crop costs about (blocks touched x 128 KiB) / decode rate: a 64^3 crop touches up to 27 blocks "
        "(3.5 MB), a 128^3 crop up to 125 (16 MB). "
        "CPU time is this process's own (robust to other load on the machine); the cold rows' CPU time leaves out "
        "the wait for the disk, which their wall-clock figures include. "
        "Cold: each crop's file is evicted from the page cache (`posix_fadvise(DONTNEED)`) before the crop, so the "
        "crop reads from the disk; warm: every file was read once before. A crop decodes only the blosc2 blocks it "
        "touches (32^3 voxels each; chunks of ~4 MiB), so its cost does not depend on the volume size.",
        "",
        "## How to read it",
        "",
        "- Disk: npy stores 4 bytes per prepared voxel; blosc2 (zstd level 1, byte shuffle) stores what the content "
        "leaves. Air outside the body is cropped away by `prepare` (body box) and clipped to the window minimum "
        "inside the box, where it compresses well; soft tissue with noise compresses least.",
        "- Prepare is one process per core: `--workers N` scales it until the disk or memory is the limit; "
        "core-hours divide by the cores used.",
        "- Training reads one crop per sample in DataLoader workers; a GPU step of batch B needs B crops per "
        "step from the workers of its rank, so `crops/s per core x workers` must exceed `B / step time`.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results/scale"), help="results.json and README.md")
    ap.add_argument("--work", type=Path, default=Path("runs/scale/sim"), help="sources and prepared caches (large)")
    ap.add_argument("--n", type=int, default=24, help="synthetic scans measured")
    ap.add_argument("--pool-size", type=int, default=1000, help="scans to extrapolate to")
    ap.add_argument("--crops", type=int, default=60, help="crops per (size, format, cache state)")
    ap.add_argument("--real", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure compression on ../shared/data/btcv and ../shared/data/pool")
    ap.add_argument("--btcv-cases", type=int, default=10, help="BTCV cases prepared for the real ratio")
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--quick", action="store_true", help="tiny volumes, no real data: a test (< 30 s)")
    ap.add_argument("--note", default="", help="a sentence for the README (e.g. that the machine was busy)")
    ap.add_argument("--keep", action="store_true", help="keep the prepared caches in --work")
    args = ap.parse_args()
    if args.quick:
        args.n, args.crops, args.real = min(args.n, 2), min(args.crops, 8), False
    sizes = (24, 32) if args.quick else (64, 128)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    load_start = [round(v, 2) for v in os.getloadavg()]
    t0 = time.perf_counter()

    print(f"writing {args.n} synthetic CT scans to {args.work / 'sources'}", flush=True)
    sources = write_sources(args.work / "sources", args.n, args.quick)
    src_bytes = [p.stat().st_size for p in sources]
    read_s = time_reads(sources[: min(3, len(sources))])
    cfg = PreprocessConfig(spacing=SPACING, modality="CT")

    print("preparing (one process)", flush=True)
    res = prepare_both(lambda folder, fmt: prepare_pool([str(p) for p in sources], folder, cfg,
                                                        progress=False, cache_format=fmt), args.work, "synthetic")
    shapes = [res["npy"]["data"].case(c)["shape"][1:] for c in res["npy"]["data"].case_ids]
    prepare = {}
    for fmt in FORMATS:
        v = res[fmt]
        prepare[fmt] = {"cpu_s_per_scan": round(v["cpu_seconds"] / v["scans"], 2),
                        "scans_per_cpu_s": round(v["scans"] / v["cpu_seconds"], 3),
                        "MB_per_cpu_s": round(sum(v["voxels"]) * 4 / MB / v["cpu_seconds"], 1),
                        "wall_s_per_scan": round(v["seconds"] / v["scans"], 2),
                        "wall_MB_per_s": round(sum(v["voxels"]) * 4 / MB / v["seconds"], 1)}
    print("crops", flush=True)
    crops = {}
    for size in sizes:
        for cache in ("warm", "cold"):
            crops[f"{size}_{cache}"] = {fmt: crop_rate(res[fmt]["data"], size, args.crops, cache == "cold")
                                        for fmt in FORMATS}
            print(f"  {size}^3 {cache}: " + ", ".join(f"{f} {crops[f'{size}_{cache}'][f]['crops_per_s']}/s"
                                                       for f in FORMATS), flush=True)
    decode = {fmt: decode_rate(res[fmt]["data"], min(4, args.n)) for fmt in FORMATS}
    synthetic = {
        "scans": args.n,
        "source": (f"int16 NIfTI (.nii.gz), 512 x 512 x 60-180 voxels at {SOURCE_SPACING} mm" if not args.quick
                   else f"int16 NIfTI, 128 x 128 x 15-25 voxels at {SOURCE_SPACING} mm (--quick)"),
        "source_MB_per_scan": round(float(np.mean(src_bytes)) / MB, 2),
        "prepared_shapes": shapes,
        "prepared_shape_note": ("about " + " x ".join(_span(a) for a in np.array(shapes).T)
                                + f" voxels (mean {np.mean(res['npy']['voxels']) / 1e6:.1f} M voxels, "
                                f"{np.mean(res['npy']['voxels']) * 4 / MB:.0f} MB as float32)"),
        "read_source_s": round(read_s, 2),
        "prepare": prepare,
        "sizes": summarise_sizes(res),
        "crops": crops,
        "decode": decode,
    }
    pool = args.pool_size
    extrapolation = {
        "pool_size": pool,
        "method": "linear: mean per scan of the sample x pool size",
        "disk_GB": {fmt: round(float(np.mean(res[fmt]["bytes"])) * pool / 1e9, 1) for fmt in FORMATS},
        "prepare_core_hours": {fmt: round(prepare[fmt]["cpu_s_per_scan"] * pool / 3600, 2) for fmt in FORMATS},
        "prepare_wall_hours_one_process": {fmt: round(prepare[fmt]["wall_s_per_scan"] * pool / 3600, 2)
                                           for fmt in FORMATS},
        "source_GB": round(float(np.mean(src_bytes)) * pool / 1e9, 1),
    }
    result = {"synthetic": synthetic, "extrapolation": extrapolation}

    if args.real:
        real = {}
        btcv = args.shared / "btcv"
        if btcv.is_dir():
            ids = sorted(p.name[: -len("_0000.nii.gz")] for p in (btcv / "imagesTr").glob("*_0000.nii.gz"))
            ids = ids[: args.btcv_cases]
            print(f"real: BTCV ({len(ids)} cases)", flush=True)
            rb = prepare_both(lambda folder, fmt: prepare_dataset(btcv, folder, PreprocessConfig(spacing=SPACING),
                                                                  progress=False, case_ids=ids, cache_format=fmt),
                              args.work, "btcv")
            real["BTCV abdominal CT (image + label)"] = {"sizes": summarise_sizes(rb)}
            result["real_crops"] = {f"{size}_warm": {fmt: crop_rate(rb[fmt]["data"], size, args.crops, False,
                                                                    labels=True) for fmt in FORMATS}
                                    for size in sizes}
        listing = args.shared / "pool" / "pool.json"
        if listing.is_file():
            entries = json.loads(listing.read_text(encoding="utf-8"))
            for modality in ("CT", "MR"):
                chosen = [{"image": str((listing.parent / e["file"]).resolve()), "modality": modality}
                          for e in entries if e.get("modality") == modality]
                if not chosen:
                    continue
                sub = args.work / f"pool-{modality}.json"
                sub.write_text(json.dumps(chosen), encoding="utf-8")
                print(f"real: pool {modality} ({len(chosen)} scans)", flush=True)
                rp = prepare_both(lambda folder, fmt: prepare_pool(sub, folder, PreprocessConfig(spacing=SPACING),
                                                                   progress=False, cache_format=fmt),
                                  args.work, f"pool-{modality}")
                real[f"shared pool, {modality}"] = {"sizes": summarise_sizes(rp)}
        result["real"] = real
        result["real_note"] = (
            "BTCV here is the SSL-ALPNet rebuild: intensities were windowed to [-125, 275] HU and stored as uint8 "
            "(256 levels) before we resample them, which makes it more compressible than original 12-bit CT; the "
            "shared pool's CT scans are full-range HU (and small: 4 scans); MR scans are z-scored floats.")

    if not args.keep:
        for folder in args.work.glob("*-npy"):
            shutil.rmtree(folder, ignore_errors=True)
        for folder in args.work.glob("*-blosc2"):
            shutil.rmtree(folder, ignore_errors=True)
    result["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                         "load_start": load_start, "load_end": [round(v, 2) for v in os.getloadavg()]}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["settings"] = {"n": args.n, "crops": args.crops, "crop_sizes": sizes, "quick": args.quick,
                          "spacing": SPACING, "note": args.note}
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    command = shlex.join(["python", "benchmarks/scale_simulation.py", *sys.argv[1:]])
    write_readme(args.out, result, command, args.note)
    print(f"wrote {args.out / 'results.json'} and README.md in {result['wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
