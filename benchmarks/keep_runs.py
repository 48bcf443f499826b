"""Keep a benchmark folder's results in the repository, and put them back, so a benchmark can span sessions.

A session's work tree is laid anew at the next session: ``runs/`` (git-ignored: checkpoints, prepared arrays)
does not survive it. What the report needs is small: each job's metrics, learning-curve evaluations, training
loss CSVs, validation choices, the pretrainings' metadata (pretext fraction learnt, timing) and the folder's
``jobs.json`` (the exact command of every finished job, so a later session's jobs are checked against it).

    python benchmarks/keep_runs.py save runs/scaling-la2018-proxy docs/results/raw/scaling-la2018-proxy
    python benchmarks/keep_runs.py restore docs/results/raw/scaling-la2018-proxy runs/scaling-la2018-proxy

``save`` copies the small text files of FINISHED jobs only (a half-run training is not kept: it restarts next
time); ``restore`` copies them back without overwriting anything. The benchmark then finds those jobs done and,
since nothing unfinished needs them any more, does not re-run their pretrainings or preparations
(``medpretrain.benchmark.unneeded_jobs``). Checkpoints (``*.pt``, ``*.ckpt``), arrays, images and TensorBoard
files are never kept; ``--models`` also keeps, for pretrainings that an unfinished job still needs, the exported
``model.pt`` and snapshots (about 16 MB for a small SwinUNETR, 6 MB for the CPU U-Net) or, while the
pretraining itself is unfinished, its ``checkpoints/last.ckpt`` (weights and optimizer, ~3x that), so the next
session resumes it instead of starting again (a pretraining re-run from step 0 would hand later fine-tunings a
different network than the earlier ones got). Neither is committed (``.gitignore``: weights stay out of git), so
they carry a pretraining over only where the folder itself survives; otherwise it is re-run with its seed, which on
the same kind of CPU gives the same network, and a pretraining is sized to end within its session.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

KEPT_SUFFIXES = {".json", ".csv", ".yaml", ".yml", ".md", ".txt"}
MAX_BYTES = 2_000_000  # a text file larger than this is a log or a dump, not a result
SKIPPED_TOP = {"prepared", "logs"}  # prepared arrays; the driver's per-job logs
SKIPPED_DIRS = {"checkpoints", "lightning_logs", "tensorboard", "predictions", "overlays"}


def _finished_run_dirs(bench: Path) -> tuple[set[Path], set[Path]]:
    """(run folders of finished jobs, model files an unfinished job still needs) from the benchmark's plan."""
    from medpretrain.benchmark import BenchmarkConfig, plan, unneeded_jobs

    cfg = BenchmarkConfig.model_validate(json.loads((bench / "benchmark.json").read_text(encoding="utf-8")))
    jobs = plan(cfg, bench)
    unneeded = unneeded_jobs(jobs)
    finished, needed_models = set(), set()
    by_name = {j.name: j for j in jobs}
    for j in jobs:
        run = j.info.get("run")
        if run and j.done and j.kind != "wait":  # a snapshot's "run" is its pretraining's, maybe unfinished
            finished.add(Path(run).resolve())
        if j.kind == "select" and j.done:
            finished.add(Path(j.done_marker).resolve())
            record = Path(j.done_marker).with_suffix(".json")  # with the runs beyond the grid (validation.extend)
            if record.is_file():  # only run folders inside the benchmark's validation/ (a path is data, not trust)
                validation = (bench / "validation").resolve()
                finished |= {p for r in json.loads(record.read_text(encoding="utf-8"))["runs"]
                             if validation in (p := Path(r["run"]).resolve()).parents}
        if not j.done and j.name not in unneeded:
            for need in j.needs:
                n = by_name[need]
                if n.kind in ("pretrain", "wait") and n.done:
                    needed_models.add(Path(n.done_marker).resolve())
                elif n.kind == "pretrain":  # unfinished: its newest checkpoint, so the next session resumes it
                    last = Path(n.info["run"]) / "checkpoints" / "last.ckpt"
                    needed_models.add(last.resolve())
    return finished, needed_models


def save(bench: Path, dest: Path, models: bool) -> None:
    bench = bench.resolve()
    if not (bench / "benchmark.json").exists():
        raise SystemExit(f"{bench}: no benchmark.json; give the folder a `medpretrain benchmark` run wrote")
    finished, needed_models = _finished_run_dirs(bench)
    count = size = 0
    for path in sorted(bench.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(bench)
        keep = (path.suffix in KEPT_SUFFIXES and path.stat().st_size <= MAX_BYTES
                and rel.parts[0] not in SKIPPED_TOP and not SKIPPED_DIRS & set(rel.parts[:-1])
                and (len(rel.parts) == 1 or rel.parts[0] == "configs"
                     or any(p == path or p in path.parents for p in finished)))
        keep |= models and path.resolve() in needed_models
        if keep:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            count += 1
            size += path.stat().st_size
    print(f"kept {count} file(s), {size / 1e6:.1f} MB, of {len(finished)} finished job folder(s) in {dest}")


def restore(src: Path, bench: Path) -> None:
    if not src.is_dir():
        print(f"{src}: nothing kept yet")
        return
    count = 0
    for path in sorted(src.rglob("*")):
        target = bench / path.relative_to(src)
        if path.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            count += 1
    print(f"restored {count} file(s) from {src} into {bench}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="copy the finished jobs' small result files of BENCH into DEST")
    s.add_argument("bench", type=Path)
    s.add_argument("dest", type=Path)
    s.add_argument("--models", action="store_true", help="also keep pretrained models unfinished jobs still need")
    r = sub.add_parser("restore", help="copy kept files from SRC back into BENCH (never overwrites)")
    r.add_argument("src", type=Path)
    r.add_argument("bench", type=Path)
    a = ap.parse_args()
    if a.cmd == "save":
        save(a.bench, a.dest, a.models)
    else:
        restore(a.src, a.bench)


if __name__ == "__main__":
    main()
