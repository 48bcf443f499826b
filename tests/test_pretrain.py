"""Pretraining through the shared job: AVS-DB end to end into fine-tuning, registry errors, resume."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from _niftis import init_report_of_one_step_finetune
from medpretrain.data.cache import prepare_dataset
from medpretrain.data.preprocess import PreprocessConfig
from medpretrain.engine.pretrain import pretrain, pretrain_config
from medpretrain.errors import ConfigError, TrainingError
from medpretrain.methods import get_method, list_methods
from medpretrain.models import get_spec
from medpretrain.synthetic.demo_data import make_demo_dataset

TINY = {"steps": 3, "patch": (32, 32, 32), "batch": 1, "checkpoint_every": 2, "num_workers": 0,
        "precision": "32-true", "deterministic": True, "generator": {"size": (32, 32, 32), "n_shapes": 6}}


def test_registry_lists_and_refuses():
    assert "avsdb" in {m.name for m in list_methods()}
    with pytest.raises(ConfigError, match="registered methods: .*avsdb"):
        get_method("simclr")
    with pytest.raises(ConfigError, match="presets: cpu, smoke, paper"):
        pretrain_config("avsdb", preset="huge")
    with pytest.raises(ConfigError, match="unknown key 'stpes'"):
        pretrain_config("avsdb", overrides={"stpes": 3})
    paper = pretrain_config("avsdb", preset="paper")
    assert paper.batch == 8 and paper.lr == 1e-4 and paper.generator.size == (96, 96, 96)


def test_avsdb_pretrain_then_finetune_init(tmp_path):
    cfg = pretrain_config("avsdb", overrides=TINY)
    run = pretrain("avsdb", None, tmp_path / "avsdb", cfg)
    saved = torch.load(run / "model.pt", weights_only=False)
    assert saved["kind"] == "pretrain:avsdb" and saved["global_step"] == 3
    assert saved["out_channels"] == cfg.generator.num_classes == 17
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert info["training"]["steps_done"] == 3 and info["method"] == "avsdb"
    with pytest.raises(TrainingError, match="--resume"):
        pretrain("avsdb", None, run, cfg)

    raw = make_demo_dataset(tmp_path / "raw", n_cases=3, size=(40, 36, 20), seed=1)
    data = prepare_dataset(raw, tmp_path / "prepared", PreprocessConfig(modality="MR"), progress=False)
    report = init_report_of_one_step_finetune(run / "model.pt", data.root, tmp_path / "ft")
    spec = get_spec("unet")
    # Everything but the 17-class head loads into the 3-class network (a pretext head is never loaded).
    assert set(report["not_requested"]) == {"final_conv.weight", "final_conv.bias"} and not report["shape_mismatch"]
    assert not report["missing"] and all(spec.part_of(n) != "head" for n in report["loaded"])


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from lightning.pytorch.callbacks import Callback
    from medpretrain.engine.pretrain import pretrain, pretrain_config

    class KillAfter(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == int(sys.argv[3]):
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = pretrain_config("avsdb", overrides=json.loads(sys.argv[2]))
    pretrain("avsdb", None, sys.argv[1], cfg, callbacks=[KillAfter()])
""").replace("import os,", "import json, os,")


@pytest.mark.slow
def test_pretraining_killed_then_resumed_equals_uninterrupted(tmp_path):
    overrides = {**TINY, "steps": 5, "checkpoint_every": 2}
    cfg = pretrain_config("avsdb", overrides=overrides)
    reference = pretrain("avsdb", None, tmp_path / "reference", cfg)

    run, script = tmp_path / "killed", tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script), str(run), json.dumps(overrides), "3"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2

    pretrain("avsdb", None, run, cfg, resume=True)
    assert json.loads((run / "run.json").read_text(encoding="utf-8"))["training"]["steps_done"] == 5
    ref = torch.load(reference / "model.pt", weights_only=False)["state_dict"]
    res = torch.load(run / "model.pt", weights_only=False)["state_dict"]
    for name in ref:
        torch.testing.assert_close(res[name], ref[name], rtol=0, atol=0, msg=name)


def test_a_resumed_run_keeps_the_loss_curve_of_its_earlier_sessions(tmp_path):
    """Lightning's CSV logger deletes metrics.csv when a run resumes; ours keeps the rows logged before the
    checkpoint it resumes from and drops those the interrupted session logged after it (not the run's
    trajectory), so a long pretraining resumed across sessions has one loss curve without repeated steps."""
    import csv

    cfg = pretrain_config("avsdb", overrides={**TINY, "steps": 6, "checkpoint_every": 2})
    run = pretrain("avsdb", None, tmp_path / "run", cfg)
    metrics = run / "logs" / "csv" / "metrics.csv"
    first = [int(float(r["step"])) for r in csv.DictReader(open(metrics, encoding="utf-8"))]
    assert first and min(first) < 4 and max(first) >= 4
    # Interrupted after step 4's checkpoint: later checkpoints and the export never happened.
    for path in [run / "model.pt", run / "checkpoints" / "last.ckpt", *run.glob("checkpoints/step000000[5-9].ckpt")]:
        path.unlink(missing_ok=True)
    assert [torch.load(p, weights_only=False)["global_step"] for p in run.glob("checkpoints/*.ckpt")] == [4]
    pretrain("avsdb", None, run, cfg, resume=True)
    rows = list(csv.DictReader(open(metrics, encoding="utf-8")))
    steps = [int(float(r["step"])) for r in rows]
    assert [s for s in steps if s < 4] == [s for s in first if s < 4]  # the first session's rows before step 4
    assert steps == sorted(steps) and len(steps) == len(set(steps)) and max(steps) >= 4
    assert all(r["train/loss"] not in ("", None) for r in rows)


def test_snapshots_of_a_long_pretraining_load_like_model_pt(tmp_path):
    """``export_steps`` writes the downstream network at those steps (``snapshots/``), in model.pt's format,
    and ``warmup-constant`` keeps the peak lr after the warm-up."""
    import torch

    from medpretrain.blocks.optim import warmup_constant_factor
    from medpretrain.engine.snapshots import snapshot_path

    cfg = pretrain_config("avsdb", preset="smoke", overrides={"steps": 4, "export_steps": [1, 3, 9],
                                                              "lr_schedule": "warmup-constant",
                                                              "warmup_fraction": 0.5})
    run = pretrain("avsdb", None, tmp_path / "run", cfg)
    snaps = sorted((run / "snapshots").glob("*.pt"))
    assert [p.name for p in snaps] == [snapshot_path(run, 1).name, snapshot_path(run, 3).name]
    one, three = (torch.load(p, weights_only=False) for p in snaps)
    final = torch.load(run / "model.pt", weights_only=False)
    assert (one["global_step"], three["global_step"], final["global_step"]) == (1, 3, 4) and one["snapshot"]
    assert one["state_dict"].keys() == final["state_dict"].keys()
    changed = [k for k, v in one["state_dict"].items() if v.is_floating_point()
               and not torch.equal(v, three["state_dict"][k])]
    assert changed
    assert [warmup_constant_factor(s, 4, 0.5) for s in (2, 3, 100)] == [1.0, 1.0, 1.0]
    assert warmup_constant_factor(0, 4, 0.5) == pytest.approx(1 / 25)


def test_snapshot_from_a_kept_checkpoint_equals_the_exporters(tmp_path):
    """A snapshot step chosen after the run passed it is written from a kept checkpoint: the same weights and
    metadata as the run's own exporter wrote at that step, and the final checkpoint gives model.pt's weights."""
    import shutil

    import torch

    from medpretrain.engine.pretrain import export_snapshot_from_checkpoint
    from medpretrain.engine.snapshots import snapshot_path

    cfg = pretrain_config("avsdb", preset="smoke", overrides={"steps": 4, "export_steps": [2], "checkpoint_every": 2})
    run = pretrain("avsdb", None, tmp_path / "run", cfg)
    made = torch.load(snapshot_path(run, 2), weights_only=False)
    snapshot_path(run, 2).rename(tmp_path / "by-exporter.pt")
    written = export_snapshot_from_checkpoint(run, run / "checkpoints" / "step0000002.ckpt")
    again = torch.load(written, weights_only=False)
    assert written == snapshot_path(run, 2) and again["from_checkpoint"] == "step0000002.ckpt"
    # the same metadata (run.json, JSON, holds the preset's tuples as lists)
    assert json.dumps({k: v for k, v in again.items() if k not in ("state_dict", "from_checkpoint")}) == \
        json.dumps({k: v for k, v in made.items() if k != "state_dict"})
    assert again["state_dict"].keys() == made["state_dict"].keys()
    assert all(torch.equal(v, made["state_dict"][k]) for k, v in again["state_dict"].items())
    # the last checkpoint, copied elsewhere, gives the final network
    shutil.copy(run / "checkpoints" / "last.ckpt", tmp_path / "copy.ckpt")
    final = torch.load(export_snapshot_from_checkpoint(run, tmp_path / "copy.ckpt"), weights_only=False)
    model = torch.load(run / "model.pt", weights_only=False)
    assert final["global_step"] == model["global_step"] == 4
    assert all(torch.equal(v, model["state_dict"][k]) for k, v in final["state_dict"].items())
    with pytest.raises(ConfigError, match="exists already"):
        export_snapshot_from_checkpoint(run, tmp_path / "copy.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable Lightning checkpoint"):
        export_snapshot_from_checkpoint(run, tmp_path / "junk.ckpt")
