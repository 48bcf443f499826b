"""The label-efficiency benchmark: planning, fairness, caching and resume, report statistics."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medpretrain.benchmark import BenchmarkConfig, load_benchmark_config, plan, run_benchmark
from medpretrain.errors import ConfigError, MedpretrainError
from medpretrain.evaluation.benchmark_report import summarize_runs
from medpretrain.synthetic.demo_data import make_demo_dataset

REPO = Path(__file__).resolve().parents[1]
TINY_AVSDB = {"patch": [32, 32, 32], "batch": 1, "num_workers": 0, "precision": "32-true",
              "generator": {"size": [32, 32, 32], "n_shapes": 4}}


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(dataset: Path, **kw) -> BenchmarkConfig:
    values = {
        "name": "tiny", "dataset": str(dataset), "preprocess": {"modality": "MR", "spacing": [1.5, 1.5, 2.0]},
        "backbones": {"unet": {"model": "unet", "steps": 2, "patch": [32, 32, 16], "batch": 1,
                               "precision": "32-true",
                               "finetune": {"num_workers": 0, "checkpoint_every": 1, "augment": {"enabled": False}}}},
        "methods": {"avsdb": {"preset": None, "steps": 2, "config": TINY_AVSDB}},
        "only": ["avsdb"],
        "n_labeled": [2], "seeds": [0, 1], "parallel": 2, "overlays": 2, "workers": 1, "curve_fractions": [],
    }
    values.update(kw)
    return BenchmarkConfig.model_validate(values)


def test_plan_is_fair_and_every_registered_method_joins(tmp_path):
    cfg = _config(tmp_path / "ds", methods={}, only=None, n_labeled=[2, "all"], pool=[str(tmp_path / "pool")])
    jobs = plan(cfg, tmp_path / "out")
    from medpretrain.methods import list_methods

    registered = {m.name for m in list_methods() if m.supports("unet")}
    pretrained = {j.info["method"] for j in jobs if j.kind == "pretrain"}
    assert pretrained == registered and {"avsdb", "volume-fusion"} <= pretrained
    finetunes = [j for j in jobs if j.kind == "finetune"]
    assert len(finetunes) == (len(registered) + 1) * 2 * 2
    # one fine-tuning config file per backbone: the same budget for every method, scratch included
    configs = {c[c.index("--config") + 1] for j in finetunes for c in j.commands[:1]}
    assert configs == {str(tmp_path / "out" / "configs" / "finetune-unet.yaml")}
    for j in finetunes:
        ft = j.commands[0]
        assert ("--init" in ft) == (j.info["method"] != "scratch")
        assert ft[ft.index("--seed") + 1] == str(j.info["seed"])
    # a method that needs a pool waits for it; pretrained fine-tunes wait for their checkpoint
    vf = next(j for j in jobs if j.name == "pretrain-volume-fusion-unet")
    assert "prepare-pool" in vf.needs
    assert all(f"pretrain-{j.info['method']}-unet" in j.needs for j in finetunes if j.info["method"] != "scratch")


def test_a_variant_runs_beside_its_method_with_its_own_config(tmp_path):
    from medpretrain.benchmark import _methods, job_files

    cfg = _config(tmp_path / "ds", only=["volume-fusion"], pool_add_downstream_train=False, methods={
        "volume-fusion-k1": {"method": "volume-fusion", "steps": 3, "config": {"k": 1}}})
    out = tmp_path / "out"
    jobs = {j.name: j for j in plan(cfg, out)}
    assert {"pretrain-volume-fusion-unet", "pretrain-volume-fusion-k1-unet"} <= set(jobs)
    variant = jobs["pretrain-volume-fusion-k1-unet"].commands[0]
    assert variant[variant.index("--method") + 1] == "volume-fusion"
    files = job_files(cfg, out.resolve(), _methods(cfg))
    written = yaml.safe_load(files[Path(variant[variant.index("--config") + 1])])
    assert written == {"k": 1, "steps": 3}
    base = jobs["pretrain-volume-fusion-unet"].commands[0]
    assert "k" not in yaml.safe_load(files[Path(base[base.index("--config") + 1])])
    for seed in cfg.seeds:  # the variant's fine-tunes use its own checkpoint, with the shared budget
        ft = jobs[f"volume-fusion-k1-unet-n2-s{seed}"].commands[0]
        assert ft[ft.index("--init") + 1] == str(out.resolve() / "pretrain" / "volume-fusion-k1-unet" / "model.pt")
        assert ft[ft.index("--config") + 1] == jobs[f"scratch-unet-n2-s{seed}"].commands[0][
            ft.index("--config") + 1]


def test_a_method_may_run_at_some_labelled_set_sizes_only(tmp_path):
    """``methods.<name>.n_labeled``: a costly pretrained arm (and its snapshot arms) runs at the sizes given,
    scratch at every size of the profile; sizes outside the profile's are refused when the config is read."""
    methods = {"avsdb": {"preset": None, "steps": 4, "snapshots": [2], "config": TINY_AVSDB, "n_labeled": [4]}}
    jobs = {j.name for j in plan(_config(tmp_path / "ds", methods=methods, n_labeled=[2, 4], seeds=[0]),
                                 tmp_path / "out") if j.kind == "finetune"}
    assert jobs == {"scratch-unet-n2-s0", "scratch-unet-n4-s0", "avsdb-unet-n4-s0", "avsdb@2-unet-n4-s0"}
    with pytest.raises(ValueError, match=r"methods.avsdb.n_labeled \[8\].*some of the profile's"):
        _config(tmp_path / "ds", methods={"avsdb": {**methods["avsdb"], "n_labeled": [8]}}, n_labeled=[2, 4])


def test_a_linear_probing_twin_shares_the_pretraining(tmp_path):
    unet = _config(tmp_path).backbones["unet"].model_dump()
    probe = {**unet, "init_part": "encoder", "finetune": {**unet["finetune"], "freeze_encoder": True}}
    cfg = _config(tmp_path / "ds", backbones={"unet": unet, "unet-probe": probe})
    jobs = plan(cfg, tmp_path / "out")
    assert [j.name for j in jobs if j.kind == "pretrain"] == ["pretrain-avsdb-unet"]
    for seed in cfg.seeds:
        full = next(j for j in jobs if j.name == f"avsdb-unet-n2-s{seed}").commands[0]
        frozen = next(j for j in jobs if j.name == f"avsdb-unet-probe-n2-s{seed}").commands[0]
        assert full[full.index("--init") + 1] == frozen[frozen.index("--init") + 1]
        assert frozen[frozen.index("--init-part") + 1] == "encoder"
        assert "pretrain-avsdb-unet" in next(j for j in jobs if j.name == f"avsdb-unet-probe-n2-s{seed}").needs


def test_config_errors_name_the_key_and_valid_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "dataset": "d", "backbones": {"u": {"model": "unet"}},
                                   "seedz": [0]}), encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown key 'seedz'"):
        load_benchmark_config(bad)
    with pytest.raises(ConfigError, match="'simclr' is not a registered method.*method: <registered name>"):
        plan(_config(tmp_path, methods={"simclr": {}}), tmp_path / "out")
    with pytest.raises(ConfigError, match="registered methods"):
        plan(_config(tmp_path, methods={"simclr-v2": {"method": "simclr"}}), tmp_path / "out")
    with pytest.raises(ConfigError, match="give the variant a name of its own"):
        plan(_config(tmp_path, methods={"avsdb": {"method": "volume-fusion"}}), tmp_path / "out")
    with pytest.raises(ConfigError, match="no preset 'gpu'"):
        plan(_config(tmp_path, methods={"avsdb": {"preset": "gpu"}}), tmp_path / "out")
    with pytest.raises(ConfigError, match="cannot pretrain 'unet'"):
        plan(_config(tmp_path, methods={"asa": {"backbones": ["unet"]}}, only=None), tmp_path / "out")
    twice = tmp_path / "twice.yaml"
    twice.write_text(yaml.safe_dump({"name": "x", "dataset": "d", "backbones": {"u": {"model": "unet"}},
                                     "n_labeled": [2, 2]}), encoding="utf-8")
    with pytest.raises(ConfigError, match="n_labeled lists a size twice"):
        load_benchmark_config(twice)
    # nested settings are checked before any job starts
    from medpretrain.benchmark import _methods, _validate_job_settings

    bad = _config(tmp_path)
    bad.backbones["unet"].finetune["stepz"] = 3
    with pytest.raises(ConfigError, match="stepz"):
        _validate_job_settings(bad, _methods(bad))


def test_summary_pairs_by_seed_and_case():
    def row(method, seed, dice, cases):
        return {"method": method, "backbone": "unet", "n_labeled": 4, "n_cases": 4, "seed": seed, "dice": dice,
                "nsd": dice, "assd": 1.0, "hd95": 2.0, "classes": {"organ": {m: dice for m in
                                                                           ("dice", "nsd", "assd", "hd95")}},
                "wall_s": 10.0, "case_dice": cases}

    rows = [row("scratch", 0, 0.70, {f"c{i}": 0.70 for i in range(8)}),
            row("scratch", 1, 0.60, {f"c{i}": 0.60 for i in range(8)}),
            row("avsdb", 0, 0.75, {f"c{i}": 0.70 + 0.01 * (i + 1) for i in range(8)}),
            row("avsdb", 1, 0.55, {f"c{i}": 0.555 for i in range(8)})]
    groups = {g["method"]: g for g in summarize_runs(rows)["groups"]}
    assert groups["scratch"]["dice"]["mean"] == pytest.approx(0.65)
    assert groups["scratch"]["dice"]["std"] == pytest.approx(math.sqrt(0.005))  # ddof 1
    gain = groups["avsdb"]["gain_vs_scratch"]
    assert gain["dice_mean"] == pytest.approx(0.0) and gain["seeds_improved"] == 1 and gain["seeds_paired"] == 2
    # per-case gains averaged over seeds: (0.01 * (i + 1) - 0.045) / 2 > 0 for i >= 4
    assert gain["cases_improved"] == 4 and gain["cases"] == 8
    assert 0.0 < gain["wilcoxon_p"] <= 1.0


@pytest.mark.slow
def test_tiny_benchmark_runs_caches_and_resumes(tmp_path):
    raw = make_demo_dataset(tmp_path / "raw", n_cases=5, size=(40, 36, 20), seed=2)
    cfg_file = tmp_path / "tiny.yaml"
    # original_space: every test evaluation also scores the source geometry, and the report has its tables
    cfg_file.write_text(yaml.safe_dump(json.loads(_config(raw, original_space=True).model_dump_json())),
                        encoding="utf-8")
    out = tmp_path / "bench"
    # --time-limit: with one fine-tuning timed, the others (as long) do not fit in 3 s and are left for the next
    # run; the pretraining, of a kind not timed yet, starts and is stopped at the limit
    run_benchmark(cfg_file, out, select=["scratch-unet-n2-s0"])
    run_benchmark(cfg_file, out, time_limit=3)
    assert sorted(p.parent.parent.name for p in (out / "runs").glob("*/eval/metrics.json")) == ["scratch-unet-n2-s0"]
    assert not (out / "pretrain" / "avsdb-unet" / "model.pt").exists()
    assert "$ medpretrain pretrain" in (out / "logs" / "pretrain-avsdb-unet.log").read_text(encoding="utf-8")
    assert not (out / "logs" / "scratch-unet-n2-s1.log").exists()
    proc = subprocess.run([sys.executable, "-m", "medpretrain", "benchmark", "--config", str(cfg_file), "--out",
                           str(out)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[6/6]" in proc.stderr  # the progress view counts every job
    # once a job of each kind has finished, every progress line carries an ETA
    assert re.search(r"\[5/6\] \S+ done in \S+; ETA \d+m\d\ds", proc.stderr), proc.stderr[-2000:]
    assert not (out / ".lock").read_text(encoding="utf-8") == ""  # the driver held the folder

    with open(out / "results.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["method"], r["seed"]) for r in rows) == [("avsdb", "0"), ("avsdb", "1"), ("scratch", "0"),
                                                              ("scratch", "1")]
    assert all(r["steps"] == "2" and 0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    # identical labelled cases across methods for a seed
    labeled = {(r["method"], r["seed"]): json.loads((out / "runs" / f"{r['method']}-unet-n2-s{r['seed']}" /
                                                     "run.json").read_text(encoding="utf-8"))["labeled_cases"]
               for r in rows}
    assert labeled[("avsdb", "0")] == labeled[("scratch", "0")] != labeled[("scratch", "1")]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["runs_finished"] == 4 and not summary["failed"]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "Gain over scratch" in report and "label_efficiency.png" in report
    for title in ("Dice", "NSD", "HD95, mm"):  # per-organ tables of every reported metric but ASSD
        table = report.split(f"## Per class ({title})")[1].split("##")[0]
        assert len(re.findall(r"^\| unet \| 2 \| (scratch|avsdb) \| [0-9.]+ ± [0-9.]+ \|", table, re.M)) == 2, table
    assert (out / "label_efficiency.png").stat().st_size > 1000
    assert list((out / "overlays").glob("*.png"))
    original = report.split("## In the source files' geometry")[1]
    assert len(re.findall(r"^\| unet \| 2 \(2\) \| (scratch|avsdb) \| 2 \| [0-9.]+ ± [0-9.]+ \|", original, re.M)) == 2
    assert "### Per class in the source geometry (HD95, mm)" in original
    assert all(g["original"]["seeds"] == 2 for g in summary["groups"])

    # re-running runs nothing; a lost evaluation is redone alone, without training again
    model = out / "runs" / "scratch-unet-n2-s1" / "model.pt"
    mtime = model.stat().st_mtime_ns
    (out / "runs" / "scratch-unet-n2-s1" / "eval" / "metrics.json").unlink()
    run_benchmark(cfg_file, out)
    assert model.stat().st_mtime_ns == mtime
    assert (out / "runs" / "scratch-unet-n2-s1" / "eval" / "metrics.json").exists()
    log = (out / "logs" / "scratch-unet-n2-s1.log").read_text(encoding="utf-8")
    assert log.count("$ medpretrain finetune") == 1 and log.count("$ medpretrain evaluate") == 2

    # --report-only rewrites the report from the finished runs and runs nothing
    (out / "report.md").unlink()
    run_benchmark(cfg_file, out, report_only=True)
    assert "Finished runs: 4 of 4 planned" in (out / "report.md").read_text(encoding="utf-8")
    assert model.stat().st_mtime_ns == mtime

    # other settings for the same folder are refused, not mixed in
    changed = _config(raw)
    changed.backbones["unet"].steps = 3
    with pytest.raises(ConfigError, match="other settings"):
        run_benchmark(changed, out)


def test_committed_profiles_validate(tmp_path):
    from medpretrain.benchmark import _methods, _validate_job_settings

    profiles = sorted((REPO / "benchmarks").glob("*.yaml"))
    assert {p.stem for p in profiles} >= {"la2018-cpu-small", "paper"}
    for path in profiles:
        cfg = load_benchmark_config(path)
        _validate_job_settings(cfg, _methods(cfg))
        jobs = plan(cfg, tmp_path / path.stem)
        assert any(j.info.get("method") == "scratch" for j in jobs)
        # Every profile pretrains, except those that compare scratch recipes with one another (only: []).
        assert any(j.kind == "pretrain" for j in jobs) or cfg.only == [], path.name


def test_snapshot_arms_fine_tune_from_points_of_one_long_pretraining(tmp_path):
    """``snapshots`` (a pretraining-budget curve): one pretraining writes the network at the listed steps; each
    point is an arm of its own, fine-tuned from its snapshot with the same subsets and seeds as scratch."""
    from medpretrain.benchmark import _methods, job_files
    from medpretrain.engine.snapshots import snapshot_path

    cfg = _config(tmp_path / "ds", pool_add_downstream_train=False,
                  methods={"avsdb": {"preset": None, "steps": 8, "snapshots": [2, 4], "config": TINY_AVSDB}})
    out = (tmp_path / "out").resolve()
    jobs = plan(cfg, out)
    assert [j.name for j in jobs if j.kind == "pretrain"] == ["pretrain-avsdb-unet"]
    arms = {j.info["method"] for j in jobs if j.kind == "finetune"}
    assert arms == {"scratch", "avsdb", "avsdb@2", "avsdb@4"}
    run = jobs[[j.name for j in jobs].index("pretrain-avsdb-unet")].info["run"]
    for j in jobs:
        if j.kind == "finetune" and "@" in j.info["method"]:
            cmd = j.commands[0]
            step = int(j.info["method"].split("@")[1])
            assert cmd[cmd.index("--init") + 1] == str(snapshot_path(run, step))
            # it waits for its snapshot file, which the still-running pretraining writes, not for the pretraining
            (wait,) = [jobs[[x.name for x in jobs].index(n)] for n in j.needs if n.startswith("snapshot-")]
            assert wait.kind == "wait" and not wait.commands and wait.done_marker == snapshot_path(run, step)
            assert wait.needs == ["pretrain-avsdb-unet"] and "pretrain-avsdb-unet" not in j.needs
    files = job_files(cfg, out, _methods(cfg))
    written = yaml.safe_load(files[out / "configs" / "pretrain-avsdb-unet.yaml"])
    assert written["export_steps"] == [2, 4] and written["steps"] == 8
    with pytest.raises(ConfigError, match="snapshot arms"):
        plan(_config(tmp_path / "ds", methods={"a@1": {"method": "avsdb"}}), tmp_path / "o2")


def test_validation_grid_for_snapshot_arms_and_calibration_only(tmp_path):
    """``validation.snapshots: method``: a budget curve's snapshot arms use the lr their method's final network
    chose (no grid of their own); ``validation.only``: the grid and nothing else, for calibrating a recipe on
    validation cases without a single test run."""
    methods = {"avsdb": {"preset": None, "steps": 8, "snapshots": [2, 4], "config": TINY_AVSDB}}
    grid = {"cases": 2, "lr": [0.001, 0.003]}
    own = plan(_config(tmp_path / "ds", methods=methods, validation=grid), tmp_path / "own")
    assert sorted(j.name for j in own if j.kind == "select") == [
        "select-avsdb-unet", "select-avsdb@2-unet", "select-avsdb@4-unet", "select-scratch-unet"]
    out = (tmp_path / "method").resolve()
    jobs = {j.name: j for j in plan(_config(tmp_path / "ds", methods=methods,
                                            validation={**grid, "snapshots": "method"}), out)}
    assert sorted(n for n, j in jobs.items() if j.kind == "select") == ["select-avsdb-unet", "select-scratch-unet"]
    assert not [n for n in jobs if n.startswith("val-avsdb@")]
    for seed in (0, 1):
        ft = jobs[f"avsdb@2-unet-n2-s{seed}"]
        assert "select-avsdb-unet" in ft.needs
        assert ft.commands[0][ft.commands[0].index("--config") + 1] == str(out / "configs" / "finetune-unet-avsdb.yaml")
    calibration = plan(_config(tmp_path / "ds", only=[], methods={}, validation={**grid, "only": True},
                               backbones={"short": {"model": "unet", "steps": 2, "patch": [32, 32, 16]},
                                          "long": {"model": "unet", "steps": 4, "patch": [32, 32, 16]}}),
                       tmp_path / "cal")
    assert sorted(j.name for j in calibration if j.kind == "finetune") == [
        "val-scratch-long-lr0.001", "val-scratch-long-lr0.003", "val-scratch-short-lr0.001", "val-scratch-short-lr0.003"]
    assert all(j.info.get("validation") for j in calibration if j.kind == "finetune")
    # validation.controls: scratch: the null control takes scratch's lr, no grid of its own
    ctl = {j.name: j for j in plan(_config(tmp_path / "ds", only=["avsdb"], methods={
        "avsdb": methods["avsdb"], "null": {"method": "avsdb", "untrained": True, "config": TINY_AVSDB}},
        validation={**grid, "controls": "scratch"}), tmp_path / "ctl")}
    assert not [n for n in ctl if n.startswith("val-null-")] and "select-null-unet" not in ctl
    assert "select-scratch-unet" in ctl["null-unet-n2-s0"].needs and "select-avsdb-unet" in ctl["avsdb-unet-n2-s0"].needs
    cmd = ctl["null-unet-n2-s0"].commands[0]
    assert cmd[cmd.index("--config") + 1].endswith("finetune-unet-scratch.yaml")
    # lr_from: a longer run of the curve (and its snapshots) fine-tunes with the shorter run's choice, no grid
    longer = {**methods, "avsdb-long": {"method": "avsdb", "preset": None, "steps": 16, "snapshots": [12],
                                        "config": TINY_AVSDB, "lr_from": "avsdb"}}
    borrowed = {j.name: j for j in plan(_config(tmp_path / "ds", methods=longer,
                                                validation={**grid, "snapshots": "method"}), out)}
    assert not [n for n in borrowed if n.startswith("val-avsdb-long")] and "select-avsdb-long-unet" not in borrowed
    for arm in ("avsdb-long", "avsdb-long@12"):
        ft = borrowed[f"{arm}-unet-n2-s0"]
        assert "select-avsdb-unet" in ft.needs and [n for n in ft.needs if "avsdb-long-unet" in n]
        assert ft.commands[0][ft.commands[0].index("--config") + 1] == str(out / "configs" / "finetune-unet-avsdb.yaml")
    for bad in ("mae", "avsdb-long", "avsdb-chain"):  # not in the profile, itself, an entry without a grid
        chained = {**longer, "avsdb-chain": {**longer["avsdb-long"], "lr_from": "avsdb"},
                   "avsdb-long": {**longer["avsdb-long"], "lr_from": bad}}
        with pytest.raises(ConfigError, match=f"lr_from '{bad}' is not an entry with a validation grid of its own "
                                              r"on backbone 'unet' \(those: avsdb, avsdb@2, avsdb@4, scratch\)"):
            plan(_config(tmp_path / "ds", methods=chained, validation=grid), tmp_path / "bad")
    with pytest.raises(ConfigError, match="no validation grid; add 'validation:'"):
        plan(_config(tmp_path / "ds", methods=longer), tmp_path / "bad")
    # validation.curves: each grid run also scores its learning-curve exports on the validation cases
    curved = {j.name: j for j in plan(_config(tmp_path / "ds", only=[], methods={}, curve_fractions=[0.5],
                                              validation={**grid, "only": True, "curves": True}), tmp_path / "cv")}
    run = (tmp_path / "cv").resolve() / "validation" / "scratch-unet-lr0.001"
    cmds = curved["val-scratch-unet-lr0.001"].commands
    assert [c[0] for c in cmds] == ["finetune", "evaluate", "evaluate"]
    assert cmds[1][cmds[1].index("--split") + 1] == "validation"
    assert cmds[1][-4:] == ["--model-file", str(run / "curve" / "model_step0000001.pt"),
                            "--out", str(run / "curve" / "eval-step0000001")]
    # while the grid runs (no selection yet), the report shows the finished runs' scores and validation curves
    from medpretrain.benchmark import _methods, _write_report

    for path, dice in ((run / "curve" / "eval-step0000001" / "metrics.json", 0.25), (run / "eval" / "metrics.json", 0.5)):
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"overall": {"dice": {"mean": dice}}, "classes": {}}), encoding="utf-8")
    (run / "run.json").write_text(json.dumps({"training": {"steps_done": 2}}), encoding="utf-8")
    cv_cfg = _config(tmp_path / "ds", only=[], methods={}, curve_fractions=[0.5],
                     validation={**grid, "only": True, "curves": True})
    report = _write_report(cv_cfg, (tmp_path / "cv").resolve(), list(curved.values()), _methods(cv_cfg), {}).read_text()
    assert "- unet-scratch: validation Dice per lr 0.001: 0.500" in report
    assert "| unet-scratch | 0.001 | 0.250 | 0.500 |" in report and "## Results" not in report
    # validation.extend: the selection may step beyond the grid with the grid's own command (minus --out, --lr);
    # without it the selection's command is what it was, so folders run before it are not "other settings"
    p = (tmp_path / "p").resolve()
    plain = {j.name: j for j in plan(_config(tmp_path / "ds", methods=methods, validation=grid), p)}
    assert plain["select-avsdb-unet"].commands == [[
        "select-hparams", "--base", str(p / "configs" / "finetune-unet.yaml"),
        "--out", str(p / "configs" / "finetune-unet-avsdb.yaml"),
        "--runs", str(p / "validation" / "avsdb-unet-lr0.001"), "--runs", str(p / "validation" / "avsdb-unet-lr0.003")]]
    ext = {j.name: j for j in plan(_config(tmp_path / "ds", methods=methods, validation={**grid, "extend": 2}),
                                   tmp_path / "e")}
    for arm in ("scratch", "avsdb"):
        cmd = ext[f"select-{arm}-unet"].commands[0]
        assert cmd[cmd.index("--extend") + 1] == "2"
        args = json.loads(cmd[cmd.index("--finetune-args") + 1])
        grid_cmd = ext[f"val-{arm}-unet-lr0.001"].commands[0]
        assert "--out" not in args and "--lr" not in args
        out_at, lr_at = grid_cmd.index("--out"), grid_cmd.index("--lr")
        assert args == [a for i, a in enumerate(grid_cmd) if i not in (0, out_at, out_at + 1, lr_at, lr_at + 1)]
        assert args[:2] == ["--data", str((tmp_path / "e").resolve() / "prepared" / "downstream")]
        assert ("--init" in args) == (arm == "avsdb")
    # validation.all_includes_validation: the `all` runs (only they) train on the validation cases too
    for flag in (False, True):
        jobs = {j.name: j for j in plan(_config(tmp_path / "ds", methods=methods, n_labeled=[2, "all"],
                                                validation={**grid, "all_includes_validation": flag}),
                                        tmp_path / f"all-{flag}")}
        for arm in ("scratch", "avsdb"):
            assert ("--validation-cases" in jobs[f"{arm}-unet-all-s0"].commands[0]) == flag
            assert "--validation-cases" not in jobs[f"{arm}-unet-n2-s0"].commands[0]
    assert jobs["scratch-unet-all-s0"].commands[0][-2:] == ["--validation-cases", "0"]
    with pytest.raises(ValueError, match="at least 2"):  # refused when the config is read, before any run
        _config(tmp_path / "ds", methods=methods, validation={**grid, "lr": [0.001], "extend": 1})


@pytest.mark.slow
def test_snapshot_arms_wait_for_their_file_only_and_kept_results_resume_in_a_new_folder(tmp_path):
    """A snapshot's fine-tuning waits for its snapshot file, not for the end of the pretraining it comes from (so
    it runs beside a long pretraining). A finished folder kept by benchmarks/keep_runs.py (small result files, no
    checkpoints nor prepared arrays) and restored elsewhere gives the same report without re-running anything:
    the pretraining and preparations nobody needs any more are not re-run."""
    raw = make_demo_dataset(tmp_path / "raw", n_cases=4, size=(40, 36, 20), seed=2)
    tiny = {"model_options": {"features": [4, 4, 8, 8, 16, 4]}}
    cfg = _config(raw, seeds=[0], pool_add_downstream_train=False, curve_fractions=[], original_space=True,
                  backbones={"unet": {"model": "unet", "steps": 1, "patch": [32, 32, 16], "batch": 1,
                                      "precision": "32-true", "pretrain": tiny,
                                      "finetune": {**tiny, "num_workers": 0, "augment": {"enabled": False}}}},
                  methods={"avsdb": {"preset": None, "steps": 3, "snapshots": [1],
                                     "config": {**TINY_AVSDB, "checkpoint_every": 3}},
                           "null": {"method": "avsdb", "untrained": True, "preset": None, "config": TINY_AVSDB}})
    out = tmp_path / "bench"
    jobs = {j.name: j for j in plan(cfg, out)}
    snap = jobs["avsdb@1-unet-n2-s0"]
    assert "pretrain-avsdb-unet" not in snap.needs and "snapshot-avsdb-unet@1" in snap.needs
    assert jobs["snapshot-avsdb-unet@1"].kind == "wait"
    run_benchmark(cfg, out)
    assert (out / "runs" / "avsdb@1-unet-n2-s0" / "eval" / "metrics.json").is_file()
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["runs_finished"] == 4 and not summary["failed"]
    assert set(summary["pretraining"]) == {"pretrain-avsdb-unet", "pretrain-null-unet"}
    # the budget-curve report (issue 20): one row per budget point and reference, and the compute it took
    scaling = _load_script("scaling_report")
    assert scaling.main(["--bench", str(out), "--out", str(tmp_path / "scaling")]) == 0
    with open(tmp_path / "scaling" / "results.csv", encoding="utf-8") as fh:
        curve = list(csv.DictReader(fh))
    assert sorted((r["pretrain_steps"], r["reference"]) for r in curve if r["group"] == "all") == [
        ("1", "null"), ("1", "scratch"), ("3", "null"), ("3", "scratch")]
    # two organs in the demo data: each scored alone too, and tabled per organ in the report
    assert {r["group"] for r in curve} == {"all", "organ:organ_a", "organ:organ_b"}
    assert all(r["seeds"] == "1" and -1.0 <= float(r["gain_mean"]) <= 1.0 for r in curve)
    scaling_md = (tmp_path / "scaling" / "report.md").read_text(encoding="utf-8")
    assert "| pretraining | 1 |" in scaling_md and "| test fine-tuning | 4 |" in scaling_md
    assert "| backbone | method | steps | n | organ_a | organ_b |" in scaling_md
    assert re.search(r"\| unet \| avsdb \| 3 \| 2 \| [+-]\d\.\d{3} \(\d/1\) \| [+-]\d\.\d{3} \(\d/1\) \|", scaling_md)
    assert (tmp_path / "scaling" / "gain_vs_budget.png").stat().st_size > 1000
    # a longer run's points drawn on another method's line (--same-curve), its run kept in the table
    assert scaling.main(["--bench", str(out), "--out", str(tmp_path / "merged"), "--same-curve", "avsdb=avsdb-all"]) == 0
    with open(tmp_path / "merged" / "results.csv", encoding="utf-8") as fh:
        merged = list(csv.DictReader(fh))
    assert {(r["method"], r["pretraining_run"]) for r in merged} == {("avsdb-all", "avsdb")}
    assert [r["pretrain_steps"] for r in merged if r["group"] == "all" and r["reference"] == "scratch"] == ["1", "3"]
    with pytest.raises(SystemExit):
        scaling.main(["--bench", str(out), "--out", str(tmp_path / "merged"), "--same-curve", "mae=avsdb"])
    # the arithmetic and the CPU each timing was measured on (one precision here: no warning)
    training = json.loads((out / "runs" / "avsdb@1-unet-n2-s0" / "run.json").read_text(encoding="utf-8"))["training"]
    cpu = training["cpu"] + (" (native bf16)" if training["cpu_bf16"] else " (no native bf16)")
    assert f"| fine-tuning | 32-true | {cpu} | 4 |" in scaling_md and "Warning" not in scaling_md
    # the same curve scored in the source files' geometry (the profile's original_space)
    assert scaling.main(["--bench", str(out), "--out", str(tmp_path / "scaling-orig"), "--space", "original"]) == 0
    with open(tmp_path / "scaling-orig" / "results.csv", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == len(curve)
    assert "source files' geometry" in (tmp_path / "scaling-orig" / "report.md").read_text(encoding="utf-8")
    # where in the anatomy the gain sits (organ_gain.py): the "all" row is the curve's gain, each organ its own row
    organs = _load_script("organ_gain")
    assert organs.main(["--runs", str(out / "runs"), "--arms", "avsdb", "null", "--n", "2", "--seeds", "0",
                        "--out", str(tmp_path / "organ_gain.md")]) == 0
    organ_md = (tmp_path / "organ_gain.md").read_text(encoding="utf-8")
    final = next(r for r in curve if r["group"] == "all" and r["reference"] == "scratch" and r["pretrain_steps"] == "3")
    assert f"| all | avsdb | {float(final['gain_mean']):+.3f} | " in organ_md
    assert re.search(r"\| 1 organ_a \| \d\.\d\d \| \d\.\d\d \([+-]\d\.\d\d, \d/1\) \|", organ_md)
    assert "| 2 organ_b |" in organ_md and "| large |" not in organ_md  # BTCV's groups only for BTCV's labels

    keep = _load_script("keep_runs")
    kept, moved = tmp_path / "kept", tmp_path / "moved"
    keep.save(out, kept, models=False)
    # the compute ledger of kept folders: every trained run once (the null control's untrained export is free)
    ledger = _load_script("compute_ledger")
    keep.save(out, tmp_path / "raw-kept" / "bench", models=False)
    # a second folder that adopted the pretraining (benchmarks/adopt_runs.py marks it) and trained nothing itself
    adopted = tmp_path / "raw-kept" / "bench-ft2x" / "pretrain" / "avsdb-unet"
    shutil.copytree(tmp_path / "raw-kept" / "bench" / "pretrain" / "avsdb-unet", adopted)
    (adopted / "adopted_from.json").write_text("{}", encoding="utf-8")
    (adopted.parents[1] / "timings.json").write_text('{"prepare-downstream": 36.0}', encoding="utf-8")
    assert ledger.main(["--raw", str(tmp_path / "raw-kept"), "--out", str(tmp_path / "compute.md")]) == 0
    led = ledger.ledger(tmp_path / "raw-kept")
    assert {k: runs for k, (runs, _) in led["by_study"].items()} == {("bench", "pretraining"): 1,
                                                                     ("bench", "test fine-tuning"): 4}
    assert all(hours > 0 for _, hours in led["by_study"].values())
    assert led["job_hours"]["bench-ft2x"] == 0.01 and led["job_hours"]["bench"] > 0
    compute_md = (tmp_path / "compute.md").read_text(encoding="utf-8")
    assert "| **all** | | 5 |" in compute_md and "| bench-ft2x | (no run trained here) | 0 | 0.00 | 0.01 |" in compute_md
    # a folder that trained before timings.json existed and re-recorded only its preparation since: blank, not 0.00
    (tmp_path / "raw-kept" / "bench" / "timings.json").write_text('{"prepare-downstream": 2.0}', encoding="utf-8")
    assert "bench" not in ledger.ledger(tmp_path / "raw-kept")["job_hours"]
    assert not [p for p in kept.rglob("*") if p.suffix in (".pt", ".ckpt", ".npy", ".png")]
    assert (kept / "runs" / "avsdb@1-unet-n2-s0" / "eval" / "metrics.json").is_file()
    # the folder's absolute paths are part of the recorded commands: restore where it ran (a new session's
    # checkout of the same path); here the original is moved away first
    out.rename(moved)
    keep.restore(kept, out)
    restored = plan(cfg, out)
    from medpretrain.benchmark import unneeded_jobs

    assert unneeded_jobs(restored) == {"prepare-downstream", "pretrain-avsdb-unet", "snapshot-avsdb-unet@1",
                                       "pretrain-null-unet"}
    assert all(j.done for j in restored if j.kind in ("finetune", "select"))
    # a part of the profile selected again: its finished jobs need unneeded ones, and nothing is left to run
    run_benchmark(cfg, out, select=["avsdb*", "*null*"])
    run_benchmark(cfg, out)  # runs nothing (no prepared data, no checkpoint here) and rewrites the report
    assert not (out / "prepared").exists() and not (out / "pretrain" / "avsdb-unet" / "model.pt").exists()
    assert json.loads((out / "summary.json").read_text(encoding="utf-8")) == summary

    # --models: what an unfinished job needs travels too; a pretraining that is itself unfinished travels as its
    # last checkpoint, to be resumed rather than re-run with other weights
    (moved / "runs" / "avsdb-unet-n2-s0" / "eval" / "metrics.json").unlink()
    (moved / "pretrain" / "avsdb-unet" / "model.pt").unlink()
    keep.save(moved, tmp_path / "kept2", models=True)
    binaries = {str(p.relative_to(tmp_path / "kept2")) for p in (tmp_path / "kept2").rglob("*")
                if p.suffix in (".pt", ".ckpt")}
    assert binaries == {"pretrain/avsdb-unet/checkpoints/last.ckpt"}
    with pytest.raises(ConfigError, match=r"snapshots \[1500\].*not below.*1500"):
        run_benchmark(_config(raw, methods={"avsdb": {"preset": None, "steps": 1500, "snapshots": [1500],
                                                      "config": TINY_AVSDB}}), tmp_path / "b2")


def test_select_jobs_runs_one_part_of_a_profile_with_what_it_needs(tmp_path):
    from medpretrain.benchmark import select_jobs

    cfg = _config(tmp_path / "ds", methods={"avsdb": {"preset": None, "steps": 4, "snapshots": [2]}},
                  validation={"cases": 1, "lr": [0.001, 0.01]}, seeds=[0])
    jobs = plan(cfg, tmp_path / "out")
    chosen = [j.name for j in select_jobs(jobs, ["avsdb@2-*"])]
    assert chosen == ["prepare-downstream", "pretrain-avsdb-unet", "snapshot-avsdb-unet@2",  # AVS-DB: no pool
                      "val-avsdb@2-unet-lr0.001", "val-avsdb@2-unet-lr0.01", "select-avsdb@2-unet",
                      "avsdb@2-unet-n2-s0"]
    assert {j.name for j in select_jobs(jobs, ["scratch-*"])} == {
        "prepare-downstream", "val-scratch-unet-lr0.001", "val-scratch-unet-lr0.01", "select-scratch-unet",
        "scratch-unet-n2-s0"}
    with pytest.raises(ConfigError, match="--jobs nothing-\\*: matches none.*--dry-run"):
        select_jobs(jobs, ["nothing-*"])


def test_kept_results_are_not_ignored_by_git():
    """What benchmarks/keep_runs.py keeps under docs/results/raw/ (run folders included) must reach git, and the
    networks and checkpoints it may keep must not: a `runs/` pattern that matched at any depth once kept every run
    folder out."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the repository's ignore rules cannot be read")

    def ignored(path: str) -> bool:
        proc = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO)
        assert proc.returncode in (0, 1), f"git check-ignore failed on {path}"
        return proc.returncode == 0

    kept = "docs/results/raw/some-bench/runs/scratch-unet-n4-s0/"
    assert not any(ignored(kept + f) for f in ("run.json", "eval/metrics.json", "eval/per_case.csv",
                                               "curve/eval-step0000075/metrics.json", "logs/csv/metrics.csv"))
    assert ignored("docs/results/raw/some-bench/pretrain/vf-unet/snapshots/model-step0002000.pt")
    assert ignored("docs/results/raw/some-bench/pretrain/vf-unet/checkpoints/last.ckpt") and ignored("runs/x/run.json")


def test_benchmark_warns_when_tcmalloc_is_missing(tmp_path, monkeypatch, capfd):
    """Without tcmalloc every CPU training step is up to 2x slower (measured here): the benchmark driver says so
    once, with the package that fixes it; with it installed (or the opt-out set) it says nothing."""
    from typer.testing import CliRunner

    from medpretrain import cli

    args = ["benchmark", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out")]
    monkeypatch.delenv("MEDPRETRAIN_NO_TCMALLOC", raising=False)
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")  # stands for an installed library
    for paths, warned in (((), True), ((str(tmp_path / "libtcmalloc_minimal.so.4"),), False)):
        monkeypatch.setattr(cli, "TCMALLOC_PATHS", paths)
        result = CliRunner().invoke(cli.app, args)
        assert result.exit_code != 0  # the config does not exist: the run stops right after the check
        err = capfd.readouterr().err + result.output
        assert ("libtcmalloc-minimal4" in err) == warned, err


def test_a_calibration_grid_is_adopted_only_where_the_target_would_repeat_it(tmp_path):
    """benchmarks/adopt_runs.py: a finished validation grid (and its runs beyond the grid) moves into a benchmark
    whose jobs would repeat it exactly (same data, settings, cases, seed, lr): those jobs are then done there. A
    target with other settings (more steps) adopts nothing; an unfinished source selection adopts nothing."""
    adopt = _load_script("adopt_runs")
    raw = make_demo_dataset(tmp_path / "raw", n_cases=4, size=(40, 36, 20), seed=2)
    grid = {"cases": 1, "lr": [0.001, 0.003], "extend": 1}
    budget = _config(raw).backbones["unet"].model_dump()
    source = (tmp_path / "cal").resolve()
    src_cfg = _config(raw, backbones={"p32": budget}, only=[], methods={}, seeds=[0],
                      validation={**grid, "only": True, "curves": True}, curve_fractions=[0.5])
    source.mkdir()
    (source / "benchmark.json").write_text(src_cfg.model_dump_json(), encoding="utf-8")
    runs = {}
    for lr in ("0.001", "0.003", "0.009"):  # 0.009: the run validation.extend added beyond the grid's best
        run = source / "validation" / f"scratch-p32-lr{lr}"
        (run / "eval").mkdir(parents=True)
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
        (run / "eval" / "metrics.json").write_text(json.dumps({"overall": {"dice": {"mean": float(lr)}}}))
        runs[lr] = run
    target_yaml = tmp_path / "target.yaml"
    target_yaml.write_text(yaml.safe_dump(json.loads(_config(raw, seeds=[0], validation=grid).model_dump_json())))
    target = tmp_path / "bench"
    assert adopt.adopt(source, target, target_yaml) == []  # the source's selection is not finished
    record = {"chosen": {"lr": 0.009}, "runs": [{"run": str(runs["0.001"]), "lr": 0.001},
                                               {"run": str(runs["0.003"]), "lr": 0.003},
                                               {"run": str(runs["0.009"]), "lr": 0.009, "extended": True}]}
    (source / "configs").mkdir()
    (source / "configs" / "finetune-p32-scratch.json").write_text(json.dumps(record))

    other = tmp_path / "other.yaml"  # the same profile with more fine-tuning steps: a different network
    other.write_text(target_yaml.read_text().replace("steps: 2", "steps: 3"))
    assert "steps: 3" in other.read_text() and adopt.adopt(source, tmp_path / "b2", other) == []

    adopted = adopt.adopt(source, target, target_yaml)
    assert sorted(d.name for _, d in adopted) == ["scratch-unet-lr0.001", "scratch-unet-lr0.003",
                                                  "scratch-unet-lr0.009"]
    jobs = {j.name: j for j in plan(load_benchmark_config(target_yaml), target.resolve())}
    assert jobs["val-scratch-unet-lr0.001"].done and jobs["val-scratch-unet-lr0.003"].done
    moved = target / "validation" / "scratch-unet-lr0.009"
    assert json.loads((moved / "eval" / "metrics.json").read_text())["overall"]["dice"]["mean"] == 0.009
    assert json.loads((moved / "adopted_from.json").read_text())["source"] == str(runs["0.009"])
    assert not (moved / "checkpoints").exists()
    assert adopt.adopt(source, target, target_yaml) == []  # nothing is overwritten


def test_a_finished_pretraining_is_adopted_by_a_profile_that_only_fine_tunes_it_otherwise(tmp_path):
    """benchmarks/adopt_runs.py: a profile re-fine-tuning an existing pretraining with another budget (more
    fine-tuning steps) takes the finished network instead of re-running it, when the pretraining's command and
    config (snapshot exports aside) are the same; a pretraining with other settings is not taken."""
    adopt = _load_script("adopt_runs")
    raw = make_demo_dataset(tmp_path / "raw", n_cases=4, size=(40, 36, 20), seed=2)
    source = (tmp_path / "src").resolve()
    source.mkdir()
    src_cfg = _config(raw, methods={"avsdb": {"preset": None, "steps": 2, "snapshots": [1], "config": TINY_AVSDB}})
    (source / "benchmark.json").write_text(src_cfg.model_dump_json(), encoding="utf-8")
    pre = source / "pretrain" / "avsdb-unet"
    (pre / "checkpoints").mkdir(parents=True)
    (pre / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (pre / "model.pt").write_bytes(b"weights")
    (pre / "run.json").write_text("{}")

    def target(name: str, avsdb: dict) -> tuple[Path, Path]:
        values = json.loads(_config(raw, methods={"avsdb": avsdb}).model_dump_json())
        values["backbones"]["unet"]["steps"] = 8  # 4x the fine-tuning: not a pretraining setting
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path, tmp_path / name

    other_yaml, other = target("other", {"preset": None, "steps": 3, "config": TINY_AVSDB})
    assert adopt.adopt(source, other, other_yaml) == []
    long_yaml, long = target("long", {"preset": None, "steps": 2, "config": TINY_AVSDB})
    assert [d.name for _, d in adopt.adopt(source, long, long_yaml)] == ["avsdb-unet"]
    kept = long / "pretrain" / "avsdb-unet"
    assert (kept / "model.pt").read_bytes() == b"weights" and not (kept / "checkpoints").exists()
    jobs = {j.name: j for j in plan(load_benchmark_config(long_yaml), long.resolve())}
    assert jobs["pretrain-avsdb-unet"].done and not jobs["avsdb-unet-n2-s0"].done


def test_gain_trend_recovers_known_curves_and_checks_a_held_out_budget(tmp_path):
    """benchmarks/gain_trend.py on curves of known shape: each model recovers its own curve's parameters, predicts
    its held-out largest budget, and the two disagree beyond the measured range where the truth saturates."""
    trend = _load_script("gain_trend")
    steps = [500, 2000, 8000, 16000, 64000]
    fields = ["backbone", "method", "pretraining_run", "pretrain_steps", "n_labeled", "reference", "group", "seeds",
              "gain_mean", "gain_std"]
    rows = []
    for method, gain in {"lin": lambda s: -0.1 + 0.02 * math.log2(s),
                         "sat": lambda s: 0.12 * (1 - math.exp(-s / 6000))}.items():
        rows += [dict(zip(fields, ("unet", method, method, s, "4", "scratch", "all", 3, gain(s), 0.01))) for s in steps]
    # a budget with one seed finished (no spread): left out, not given the largest weight
    rows.append(dict(zip(fields, ("unet", "sat", "sat", 256000, "4", "scratch", "all", 1, 0.5, ""))))
    results = tmp_path / "results.csv"
    with open(results, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    pts = trend.load_points(results, "lin", "4", "scratch", "all")
    assert [p[0] for p in pts] == steps and pts[0][2] == pytest.approx(0.01 / math.sqrt(3))
    a, b = trend.fit("log-linear", [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts])
    assert (a, b) == (pytest.approx(-0.1, abs=1e-6), pytest.approx(0.02, abs=1e-6))
    sat = trend.load_points(results, "sat", "4", "scratch", "all")
    g_max, tau = trend.fit("saturating", *([p[i] for p in sat] for i in range(3)))
    assert g_max == pytest.approx(0.12, rel=1e-3) and tau == pytest.approx(6000, rel=1e-2)
    out = tmp_path / "trend"
    assert trend.main(["--csv", str(results), "--method", "sat", "--at", "400000", "--out", str(out)]) == 0
    md = (out / "trend.md").read_text(encoding="utf-8")
    # the saturating model, fitted on 500-16k, predicts the 64k point (0.120) exactly; the log-linear one over-shoots
    assert re.search(r"\| saturating \| gain = 0\.120 x .* \| \+0\.120 \(error [+-]0\.000, 0\.0 s\.e\.\) \| \+0\.120 \|", md)
    assert "| 256,000 |" not in md and "enough to tell them apart there" in md
    lin_row = next(line for line in md.splitlines() if line.startswith("| log-linear"))
    assert float(re.search(r"error ([+-]\d\.\d{3})", lin_row).group(1)) > 0.01
    assert (out / "trend.png").stat().st_size > 1000
    assert [p[0] for p in sat] == steps
    with pytest.raises(SystemExit, match="method=mae"):
        trend.main(["--csv", str(results), "--method", "mae", "--out", str(out)])


def test_a_snapshot_added_after_its_pretraining_ran_comes_from_a_kept_checkpoint(tmp_path):
    """A budget-curve point decided after the long pretraining passed it: the finished pretraining stays valid
    (export_steps only adds outputs), the new arm waits for its file and, the run over without it, fails naming
    `medpretrain snapshot`; written from the kept checkpoint, the arm runs."""
    from medpretrain.engine.pretrain import export_snapshot_from_checkpoint

    raw = make_demo_dataset(tmp_path / "raw", n_cases=4, size=(40, 36, 20), seed=2)
    tiny = {"model_options": {"features": [4, 4, 8, 8, 16, 4]}}

    def config(snapshots):
        return _config(raw, seeds=[0], n_labeled=[2], pool_add_downstream_train=False, curve_fractions=[],
                       backbones={"unet": {"model": "unet", "steps": 1, "patch": [32, 32, 16], "batch": 1,
                                           "precision": "32-true", "pretrain": tiny,
                                           "finetune": {**tiny, "num_workers": 0, "augment": {"enabled": False}}}},
                       methods={"avsdb": {"preset": None, "steps": 3, "snapshots": snapshots,
                                          "config": {**TINY_AVSDB, "checkpoint_every": 1}}})

    out = tmp_path / "bench"
    run_benchmark(config([1]), out, select=["pretrain-avsdb-unet"])
    run = out / "pretrain" / "avsdb-unet"
    assert (run / "model.pt").is_file() and (run / "checkpoints" / "step0000002.ckpt").is_file()
    later = config([1, 2])
    assert any(j.name == "avsdb@2-unet-n2-s0" for j in plan(later, out))  # not refused as "other settings"
    with pytest.raises(MedpretrainError, match="snapshot-avsdb-unet@2"):
        run_benchmark(later, out, select=["avsdb@2-*"])
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert "medpretrain snapshot" in summary["failed"]["snapshot-avsdb-unet@2"]
    export_snapshot_from_checkpoint(run, run / "checkpoints" / "step0000002.ckpt")
    run_benchmark(later, out, select=["avsdb@2-*"])
    assert (out / "runs" / "avsdb@2-unet-n2-s0" / "eval" / "metrics.json").is_file()
    assert not json.loads((out / "summary.json").read_text(encoding="utf-8"))["failed"]
    with pytest.raises(ConfigError, match="other settings"):  # a setting that changes the network still does
        run_benchmark(_config(raw, seeds=[0], n_labeled=[2], pool_add_downstream_train=False,
                              methods={"avsdb": {"preset": None, "steps": 4, "snapshots": [1],
                                                 "config": {**TINY_AVSDB, "checkpoint_every": 1}}}), out)
