"""Copy a subset of the la2018 raw dataset into the repository, so that it travels with the GPU check.

The GPU machine sees only the repository (``../shared`` stays behind), so the check's data must live in a
git-ignored folder inside it that the ``run`` call carries (``.gpu-data``). The copy keeps the nnU-Net v2 raw
layout that ``medpretrain prepare --dataset`` reads, with ``dataset.json`` and ``splits.json`` reduced to the
chosen cases, and adds ``pool.json`` (the training images, modality MR) for the pretraining methods.

    python benchmarks/gpu/make_data.py                      # 16 train + 4 test cases into .gpu-data/la2018
    python benchmarks/gpu/make_data.py --train 2 --test 1 --out /tmp/la-tiny

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "la2018"
DEFAULT_OUT = REPO / ".gpu-data" / "la2018"
# 16 labelled training cases cover --n-labeled 4 and a 16-scan pool; 4 test cases make evaluate a real mean.
DEFAULT_TRAIN = 16
DEFAULT_TEST = 4


def _read_json(path: Path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def plan_subset(source: Path, n_train: int, n_test: int) -> dict:
    """The cases and files a subset of ``source`` holds: the first ``n_train`` and ``n_test`` case ids (sorted)
    of its ``splits.json``.

    Returns:
        ``{"train": [ids], "test": [ids], "files": [(relative path, size in bytes)]}``.

    Raises:
        FileNotFoundError: ``source`` lacks ``splits.json``, ``dataset.json`` or a case's image or label.
        ValueError: fewer cases in a split than asked for.
    """
    source = Path(source)
    for name in ("dataset.json", "splits.json"):
        if not (source / name).is_file():
            raise FileNotFoundError(f"{source / name} is missing: pass --source, the la2018 folder in nnU-Net v2 "
                                    "raw layout (imagesTr/, labelsTr/, dataset.json, splits.json)")
    splits = _read_json(source / "splits.json")
    chosen = {}
    for split, n in (("train", n_train), ("test", n_test)):
        ids = sorted(splits.get(split, []))
        if len(ids) < n:
            raise ValueError(f"{source / 'splits.json'} has {len(ids)} '{split}' cases, fewer than the {n} asked "
                             f"for; lower --{split}")
        chosen[split] = ids[:n]
    files = ["dataset.json", "splits.json"]
    for cid in chosen["train"] + chosen["test"]:
        files += [f"imagesTr/{cid}_0000.nii.gz", f"labelsTr/{cid}.nii.gz"]
    missing = [f for f in files if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{source}: {len(missing)} file(s) of the chosen cases are missing, e.g. "
                                f"{missing[0]}; pass a complete copy of la2018")
    return {**chosen, "files": [(f, (source / f).stat().st_size) for f in files]}


def make_subset(source: Path = DEFAULT_SOURCE, out: Path = DEFAULT_OUT, n_train: int = DEFAULT_TRAIN,
                n_test: int = DEFAULT_TEST) -> Path:
    """Write the subset (see :func:`plan_subset`) to ``out``, replacing what was there; returns ``out``.

    ``dataset.json`` keeps every key of the source with ``training`` and ``numTraining`` reduced to the chosen
    cases; ``splits.json`` holds exactly the chosen ids; ``pool.json`` lists the training images (MR).
    """
    source, out = Path(source), Path(out)
    plan = plan_subset(source, n_train, n_test)
    if out.exists():
        shutil.rmtree(out)
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    ids = plan["train"] + plan["test"]
    for rel, _ in plan["files"]:
        if rel.endswith(".nii.gz"):
            shutil.copyfile(source / rel, out / rel)
    dataset = _read_json(source / "dataset.json")
    keep = set(ids)
    if "training" in dataset:
        dataset["training"] = [e for e in dataset["training"]
                               if Path(e["label"]).name.removesuffix(".nii.gz") in keep]
    dataset["numTraining"] = len(ids)
    (out / "dataset.json").write_text(json.dumps(dataset, indent=1), encoding="utf-8")
    (out / "splits.json").write_text(json.dumps({"train": plan["train"], "test": plan["test"]}, indent=1),
                                     encoding="utf-8")
    pool = [{"image": f"imagesTr/{cid}_0000.nii.gz", "modality": "MR"} for cid in plan["train"]]
    (out / "pool.json").write_text(json.dumps(pool, indent=1), encoding="utf-8")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                        help="la2018 raw folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the copy goes (default: %(default)s)")
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="training cases (default: %(default)s)")
    parser.add_argument("--test", type=int, default=DEFAULT_TEST, help="test cases (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        out = make_subset(args.source, args.out, args.train, args.test)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from travel import folder_bytes  # beside this file

    print(f"wrote {args.train} train + {args.test} test cases to {out} ({folder_bytes(out) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
