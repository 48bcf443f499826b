"""Adopt finished validation runs of one benchmark folder into another whose jobs would repeat them exactly.

A calibration profile (``btcv-calibration-4mm``) and the profile it calibrates (``btcv-cpu``) share their scratch
lr grid when the calibration's winning backbone becomes the profile's: the same prepared data (dataset and
preprocessing), the same fine-tuning settings, labelled cases, validation cases, seed and lr. Re-running those
runs would cost ~45 min each on the 2-core CPU and give the same networks, so this script copies them, after
checking, job by job, that the target's command equals the source's up to output paths and settings that only add
outputs (learning-curve exports and their evaluations):

    python benchmarks/adopt_runs.py --source runs/btcv-calibration-4mm --target runs/btcv-cpu \
        --target-config benchmarks/btcv-cpu.yaml

A second use: a profile that re-fine-tunes an existing pretraining with another fine-tuning budget
(``scaling-la2018-proxy-ft4x``: 4x the fine-tuning steps) adopts the finished pretraining (and the null control's
export) instead of re-running 16,000 steps: the pretraining command, its config (snapshot exports aside) and the
pool it read (the pool list and its preprocessing) must be the same.

Adopted: the validation grids (``val-*`` jobs and the runs ``validation.extend`` added beyond them), only when the
source's selection for that grid is finished (so every run beyond the grid is done too), and finished
pretrainings. Nothing in the target is overwritten; each adopted folder gets ``adopted_from.json`` (the source
folder and what was compared).
A source backbone whose settings differ from every target backbone adopts nothing, and the script says why: run
it unconditionally before the target's benchmark.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

# Fine-tuning settings that change what a run writes beside its network, never the network: learning-curve
# exports (curve_fractions, export_steps) are extra checkpoints taken on the way.
OUTPUT_ONLY_KEYS = {"curve_fractions", "export_steps"}
# Not copied: checkpoints (resuming a finished run is never needed), curve exports' weights, TensorBoard files.
SKIPPED = shutil.ignore_patterns("checkpoints", "*.ckpt", "model_step*.pt", ".lock", "tensorboard")


def _option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def _command_key(cmd: list[str], files: dict[Path, str]) -> str:
    """What decides a fine-tuning's (or pretraining's) network, as a comparable string: its options (output and
    data paths excepted: the data is compared separately) and the settings of its --config file (output-only keys
    excepted)."""
    options: dict[str, str] = {}
    i = 1
    while i < len(cmd):
        key = cmd[i]
        value = cmd[i + 1] if i + 1 < len(cmd) and not cmd[i + 1].startswith("--") else ""
        options[key] = value
        i += 2 if value != "" else 1
    settings = yaml.safe_load(files[Path(options.pop("--config"))]) if "--config" in options else {}
    options.pop("--out", None)
    options.pop("--data", None)
    ignored = OUTPUT_ONLY_KEYS | ({"lr"} if "--lr" in options else set())  # --lr overrides the file's
    config = {k: v for k, v in settings.items() if k not in ignored}
    return json.dumps({"options": options, "config": config}, sort_keys=True)


def _prepare_signature(jobs, files: dict[Path, str], name: str = "prepare-downstream") -> list | None:
    """What a preparation reads: the dataset folder (or the pool list's content) and the preprocessing."""
    prep = next((j for j in jobs if j.name == name), None)
    if prep is None:
        return None
    cmd = prep.commands[0]
    source = (str(Path(_option(cmd, "--dataset")).resolve()) if "--dataset" in cmd
              else json.loads(files[Path(_option(cmd, "--pool"))]))
    return [source, yaml.safe_load(files[Path(_option(cmd, "--config"))])]


def _copy(src: Path, dst: Path, note: dict) -> None:
    tmp = dst.with_name(dst.name + ".adopting")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=SKIPPED)
    (tmp / "adopted_from.json").write_text(json.dumps({"source": str(src), **note}, indent=1) + "\n",
                                           encoding="utf-8")
    tmp.rename(dst)


def _adopt_pretrainings(src_jobs, dst_jobs, src_files, dst_files, dry_run: bool) -> list[tuple[Path, Path]]:
    """Finished pretrainings of the source that the target would repeat (same command up to paths, same config up
    to snapshot exports, and a pool prepared from the same list with the same preprocessing)."""
    if _prepare_signature(src_jobs, src_files, "prepare-pool") != _prepare_signature(dst_jobs, dst_files,
                                                                                       "prepare-pool"):
        return []
    by_key = {_command_key(j.commands[0], src_files): j for j in src_jobs if j.kind == "pretrain"}
    adopted = []
    for j in dst_jobs:
        match = by_key.get(_command_key(j.commands[0], dst_files)) if j.kind == "pretrain" else None
        if match is None or not match.done or Path(j.done_marker).parent.exists():
            continue
        src, dst = Path(match.done_marker).parent, Path(j.done_marker).parent
        adopted.append((src, dst))
        if not dry_run:
            dst.parent.mkdir(parents=True, exist_ok=True)
            _copy(src, dst, {"source_job": match.name, "target_job": j.name,
                             "compared": "the pretraining command (output/data paths aside), its config (snapshot "
                                         "exports aside), and the pool list and preprocessing it was prepared from"})
    return adopted


def adopt(source: Path, target: Path, target_config: Path, dry_run: bool = False) -> list[tuple[Path, Path]]:
    """Copy the source's finished pretrainings and validation runs that the target's plan would repeat; the
    (source, target) folders adopted (or, with ``dry_run``, that would be)."""
    from medpretrain.benchmark import BenchmarkConfig, _methods, job_files, load_benchmark_config, plan

    source, target = source.resolve(), target.resolve()
    src_cfg = BenchmarkConfig.model_validate(json.loads((source / "benchmark.json").read_text(encoding="utf-8")))
    dst_cfg = load_benchmark_config(target_config)
    src_jobs, dst_jobs = plan(src_cfg, source), plan(dst_cfg, target)
    src_files = job_files(src_cfg, source, _methods(src_cfg))
    dst_files = job_files(dst_cfg, target, _methods(dst_cfg))
    adopted = _adopt_pretrainings(src_jobs, dst_jobs, src_files, dst_files, dry_run)
    src_prepared, dst_prepared = _prepare_signature(src_jobs, src_files), _prepare_signature(dst_jobs, dst_files)
    if src_prepared != dst_prepared:
        print(f"adopt: no fine-tuning: {source} prepared its downstream data otherwise than {target_config} "
              f"would ({src_prepared} vs {dst_prepared})")
        return _report(adopted, source, target, dry_run)
    src_by_key = {}
    for j in src_jobs:
        if j.name.startswith("val-"):
            src_by_key.setdefault(_command_key(j.commands[0], src_files), j)
    src_select = {Path(j.done_marker).with_suffix(".json"): j for j in src_jobs if j.kind == "select"}
    for j in dst_jobs:
        if not j.name.startswith("val-"):
            continue
        dst_run = Path(_option(j.commands[0], "--out"))
        match = src_by_key.get(_command_key(j.commands[0], dst_files))
        if match is None:
            continue
        src_run = Path(_option(match.commands[0], "--out"))
        record = next((r for r, s in src_select.items() if match.name in s.needs), None)
        if record is None or not record.is_file():
            print(f"adopt: {j.name}: its source grid ({match.name}) has no finished selection yet; not adopted")
            continue
        # The grid's runs, and the runs validation.extend added beyond it (named after the grid's stem).
        pairs = [(src_run, dst_run)]
        stem_src, stem_dst = src_run.name.rsplit("-lr", 1)[0], dst_run.name.rsplit("-lr", 1)[0]
        for r in json.loads(record.read_text(encoding="utf-8"))["runs"]:
            extra = Path(r["run"])
            if r.get("extended") and extra.name.rsplit("-lr", 1)[0] == stem_src and extra != src_run:
                pairs.append((extra, dst_run.parent / f"{stem_dst}-lr{extra.name.rsplit('-lr', 1)[1]}"))
        for src, dst in pairs:
            if (src, dst) in adopted or not (src / "eval" / "metrics.json").is_file():
                continue
            if dst.exists():
                print(f"adopt: {dst} exists; left as it is")
                continue
            adopted.append((src, dst))
            if dry_run:
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            _copy(src, dst, {"source_job": match.name, "target_job": j.name,
                             "compared": "the fine-tuning command (output/data paths aside) and its config file "
                                         "(curve exports aside), and the prepare-downstream dataset and "
                                         "preprocessing"})
    return _report(adopted, source, target, dry_run)


def _report(adopted, source: Path, target: Path, dry_run: bool) -> list[tuple[Path, Path]]:
    for src, dst in adopted:
        print(f"adopt: {src} -> {dst}{' (dry run)' if dry_run else ''}")
    if not adopted:
        print(f"adopt: nothing to adopt from {source} into {target}")
    return adopted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="the benchmark folder that ran the runs")
    parser.add_argument("--target", type=Path, required=True, help="the benchmark folder to adopt them into")
    parser.add_argument("--target-config", type=Path, required=True, help="the target's benchmark profile (YAML)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be adopted; copy nothing")
    args = parser.parse_args(argv)
    if not (args.source / "benchmark.json").is_file():
        print(f"adopt: nothing: {args.source} has no benchmark.json (not a benchmark folder, or never run)")
        return 0
    adopt(args.source, args.target, args.target_config, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
