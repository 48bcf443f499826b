"""Anatomical matcher accuracy in mm, both matchers (``sam`` and ``registration``).

Reproduce (prepared pool and la2018 at 1.25 mm; trains the ``sam`` matcher first unless --matcher-run is given):

    medpretrain prepare --pool ../shared/data/pool/pool.json --out runs/pool20 --spacing 1.25 1.25 1.25
    medpretrain prepare --dataset ../shared/data/la2018 --out runs/bench/la2018-prepared --spacing 1.25 1.25 1.25 --modality MR
    python benchmarks/alice_matcher.py --pool runs/pool20 --la2018 runs/bench/la2018-prepared \\
        --work runs/alice-matcher --out docs/results/alice/matcher_accuracy.json

What is measured:

* affine: for ``--volumes`` pool volumes (one per body part/modality group), ``--transforms`` random affine
  copies of each (rotation <= 10 deg per axis, scale 0.9-1.1, shift <= 8 voxels) and ``--points`` random body
  points: distance (mm) between the matched point in the copy and the point's true image under the transform;
* la2018 centroid: for ``--pairs`` random ordered pairs of different la2018 TEST subjects, the query's atrium
  centroid is matched into the key: distance (mm) to the key's own atrium centroid (a body part appears at
  different places in different subjects; this is the error Alice's crops inherit).

The matcher for ``sam`` is trained on the la2018 TRAIN images (labels unused); the test subjects are unseen.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

from medpretrain.data.cache import PreparedData  # noqa: E402
from medpretrain.matching import MatchVolume, build_matcher  # noqa: E402
from medpretrain.matching.accuracy import affine_errors, centroid_errors, summarise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=Path, required=True, help="prepared pool (prepare --pool)")
    ap.add_argument("--la2018", type=Path, required=True, help="prepared la2018 (prepare --dataset)")
    ap.add_argument("--work", type=Path, default=Path("runs/alice-matcher"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/alice/matcher_accuracy.json"))
    ap.add_argument("--matcher-run", type=Path, default=None, help="a trained sam matcher (else trained here)")
    ap.add_argument("--matcher-steps", type=int, default=400)
    ap.add_argument("--volumes", nargs="+", default=["ct_abdomen_totalseg_example", "mr_brain_t1_itk",
                                                      "mr_prostate_t2_monai"])
    ap.add_argument("--transforms", type=int, default=2)
    ap.add_argument("--points", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=20)
    args = ap.parse_args()

    pool, la = PreparedData(args.pool), PreparedData(args.la2018)
    matcher_run = args.matcher_run
    train_s = None
    if matcher_run is None:
        matcher_run = args.work / "matcher"
        if not (matcher_run / "model.pt").is_file():
            # train-matcher reads one prepared folder; the la2018 train images (labels unused) are the bulk of
            # the benchmark's Alice pool, and a matcher that never saw the test subjects is the honest one.
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "medpretrain", "train-matcher", "--data", str(args.la2018),
                            "--out", str(matcher_run), "--steps", str(args.matcher_steps)], check=True)
            train_s = round(time.perf_counter() - t0, 1)
    matchers = {"registration": build_matcher("registration"), "sam": build_matcher("sam", matcher_run)}

    spacing_pool = tuple(float(s) for s in pool.spacing)
    spacing_la = tuple(float(s) for s in la.spacing)
    test_cases = la.split("test")
    la_cases = [(MatchVolume(c, np.asarray(la.image(c)), spacing_la), np.asarray(la.label(c))) for c in test_cases]
    result = {"machine": cpu_model(), "matcher_run": str(matcher_run), "matcher_train_s": train_s,
              "matcher_data": str(args.la2018) + " (train split, labels unused)", "affine": {}, "la2018_centroid": {}}
    for name, matcher in matchers.items():
        rows, t0 = [], time.perf_counter()
        for i, v in enumerate(args.volumes):
            vol = MatchVolume(v, np.asarray(pool.image(v)), spacing_pool)
            rows += affine_errors(matcher, vol, args.transforms, args.points, seed=i)
        result["affine"][name] = {**summarise(rows), "seconds": round(time.perf_counter() - t0, 1),
                                  "per_volume": {v: summarise([r for r in rows if r["volume"] == v])
                                                 for v in args.volumes}}
        t0 = time.perf_counter()
        rows = centroid_errors(matcher, la_cases, args.pairs, seed=0)
        result["la2018_centroid"][name] = {**summarise(rows), "seconds": round(time.perf_counter() - t0, 1)}
        print(name, json.dumps(result["affine"][name]), json.dumps(result["la2018_centroid"][name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print("written", args.out)


if __name__ == "__main__":
    main()
