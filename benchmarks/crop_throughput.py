"""Crops/s from the prepared cache (memory-mapped .npy) vs loading the NIfTI files and cropping, in one run.

Reproduce:

    python benchmarks/crop_throughput.py --prepared runs/bench/la2018-prepared --shared ../shared \
        --out docs/results/la2018-scratch/crop_throughput.json

Both paths draw the same patches (64x64x48, one third foreground-centred) from the same train cases,
single process; the cache path is PatchDataset without augmentation, the NIfTI path decodes the image and
label with nibabel each time (what a loader without a cache does).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medpretrain.data.cache import PreparedData
from medpretrain.data.sampling import PatchDataset, choose_patch_start, crop_with_padding


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    patch = (64, 64, 48)
    data = PreparedData(args.prepared)
    ids = data.split("train")[:20]

    ds = PatchDataset(data, ids, patch, foreground_fraction=1 / 3, seed=0)
    ds.sample(0)  # warm the page cache like the NIfTI path below
    t = time.perf_counter()
    for i in range(args.n):
        ds.sample(i)
    cache_rate = args.n / (time.perf_counter() - t)

    root = args.shared / "data" / "la2018"
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(args.n):
        cid = ids[int(rng.integers(len(ids)))]
        img = np.asarray(nib.load(root / "imagesTr" / f"{cid}_0000.nii.gz").get_fdata(dtype=np.float32))
        lab = np.asarray(nib.load(root / "labelsTr" / f"{cid}.nii.gz").dataobj).astype(np.uint8)
        start = choose_patch_start(img.shape, patch, rng, None)
        crop_with_padding(img, start, patch)
        crop_with_padding(lab, start, patch)
    nifti_rate = args.n / (time.perf_counter() - t)

    result = {
        "patch": patch, "crops": args.n, "cases": len(ids),
        "cache_crops_per_s": round(cache_rate, 1), "nifti_crops_per_s": round(nifti_rate, 1),
        "speedup": round(cache_rate / nifti_rate, 1),
        "note": "single process; la2018 volumes are small (~95x71x44) so the NIfTI path is a best case",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
