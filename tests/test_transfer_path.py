"""The transfer path pretraining -> export -> --init -> evaluation can show a gain: EMA teachers that follow the
run length, one padding value everywhere, pretraining seeds apart from fine-tuning seeds, the null and shuffled
controls, the pretext meter, learning curves and validation-chosen hyper-parameters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.losses import DiceCELoss

from _niftis import prepared_pool
from medpretrain.blocks.ema import auto_base_momentum, resolve_ema_momentum, teacher_init_share
from medpretrain.blocks.pretext import final_loss, fraction_learnt, segmentation_baseline
from medpretrain.config import AugmentConfig, EvaluateConfig, FinetuneConfig, InferenceConfig
from medpretrain.data.cache import PreparedData, prepare_dataset
from medpretrain.data.crops import background_fill
from medpretrain.data.preprocess import PreprocessConfig
from medpretrain.data.sampling import PatchDataset
from medpretrain.engine.pretrain import pretrain, pretrain_config
from medpretrain.errors import ConfigError
from medpretrain.evaluation.inference import TrainedModel, predict_probabilities
from medpretrain.synthetic.demo_data import make_demo_dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> PreparedData:
    root = tmp_path_factory.mktemp("transfer")
    raw = make_demo_dataset(root / "raw", n_cases=6, size=(40, 36, 16), seed=4)
    return prepare_dataset(raw, root / "prepared", PreprocessConfig(modality="MR", spacing=(1.5, 1.5, 2.0)),
                           workers=1, seed=0, progress=False)


# ---- 1. EMA teachers at any run length


@pytest.mark.parametrize("steps", [100, 600, 5000, 20000])
def test_auto_ema_leaves_at_most_one_percent_of_the_initial_weights(steps):
    base, final = resolve_ema_momentum("auto", steps, paper_base=0.999)
    assert final == 1.0 and 0.0 < base <= 0.999
    assert teacher_init_share(steps, base, final) <= 0.01
    # the bound is tight (the largest such base) unless the paper's value already satisfies it
    if base < 0.999:
        assert teacher_init_share(steps, base + 1e-4, final) > 0.01


def test_paper_momenta_are_kept_and_their_short_run_share_is_what_the_review_measured():
    assert resolve_ema_momentum((0.999, 1.0), 600, paper_base=0.999) == (0.999, 1.0)
    assert teacher_init_share(600, 0.999) == pytest.approx(0.740, abs=1e-3)  # ASA at 600 steps, before the fix
    assert teacher_init_share(300, 0.996) == pytest.approx(0.547, abs=1e-3)  # Alice at 300 steps
    assert auto_base_momentum(20000, cap=0.999) == 0.999
    asa_cpu, asa_paper = pretrain_config("asa", preset="cpu"), pretrain_config("asa", preset="paper")
    assert asa_cpu.ema_momentum == "auto" and teacher_init_share(600, *asa_cpu.ema_schedule()) <= 0.01
    assert tuple(asa_paper.ema_momentum) == (0.999, 1.0) and asa_paper.ema_schedule() == (0.999, 1.0)
    alice_cpu, alice_paper = pretrain_config("alice", preset="cpu"), pretrain_config("alice", preset="paper",
                                                                         overrides={"matcher": "registration"})
    assert alice_cpu.ema_momentum == "auto" and teacher_init_share(600, *alice_cpu.ema_schedule()) <= 0.01
    assert tuple(alice_paper.ema_momentum) == (0.996, 1.0)
    with pytest.raises(ConfigError, match="ema_momentum"):
        pretrain_config("asa", overrides={"ema_momentum": (1.0, 0.9)})


def test_asa_exports_teacher_or_student_as_asked():
    from medpretrain.methods.asa import ASAModule

    cfg = pretrain_config("asa", overrides={"model_options": {"feature_size": 12}})
    module = ASAModule(cfg)
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(1.0)  # the student has moved away from the teacher
    teacher = module.exported_state_dict()
    student = ASAModule(cfg.model_copy(update={"export": "student"}))
    student.load_state_dict(module.state_dict())
    out = student.exported_state_dict()
    name = "swinViT.patch_embed.proj.weight"
    assert torch.equal(teacher[name], module.teacher.state_dict()[name])
    assert torch.equal(out[name], module.student.state_dict()[name]) and not torch.equal(out[name], teacher[name])


def test_alice_teacher_export_puts_the_target_encoder_in_the_network():
    from medpretrain.methods.alice import AliceModule

    cfg = pretrain_config("alice", overrides={"export": "teacher"})
    module = AliceModule(cfg)
    with torch.no_grad():
        for p in module.target.parameters():
            p.add_(1.0)
    state = module.exported_state_dict()
    key = "vit.patch_embedding.position_embeddings"
    assert torch.equal(state[key], module.target.vit.state_dict()["patch_embedding.position_embeddings"])
    assert not torch.equal(state[key], module.model.state_dict()[key])
    assert set(state) == set(module.model.state_dict())


# ---- 2. one padding convention


class _RecordInput(torch.nn.Module):
    """Two-class "network" that records what it was given."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return torch.cat([x, -x], dim=1)


def test_finetuning_patches_pretraining_crops_and_inference_pad_with_the_same_value(prepared):
    from medpretrain.data.crops import read_crop

    cid = prepared.split("train")[0]
    fill = background_fill(prepared.case(cid), prepared.in_channels)
    assert fill[0] < -0.1  # z-scored MR: "nothing" is well below 0
    shape = prepared.case(cid)["shape"][-3:]
    patch = (32, 32, 32)  # deeper than the volume: every patch is part padding
    ds = PatchDataset(prepared, [cid], patch, foreground_fraction=0.0, seed=0)
    _, start, _, _ = ds.locate(0)
    image = ds[0]["image"].numpy()
    valid = [(s + np.arange(n) >= 0) & (s + np.arange(n) < d) for s, n, d in zip(start, patch, shape)]
    outside = ~(valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :])
    assert outside.any() and np.all(image[0][outside] == np.float32(fill[0]))
    # the self-supervised crops (Volume Fusion, ASA, Alice) pad the same case with the same value
    crop = read_crop(prepared.image(cid), start, patch, fill)
    np.testing.assert_array_equal(crop, image)

    # sliding-window inference on a volume thinner than the window pads with it too, and crops back
    net = _RecordInput()
    model = TrainedModel(net, {"patch": list(patch), "labels": {0: "bg", 1: "fg"}}, torch.device("cpu"), "32-true")
    vol = np.asarray(prepared.image(cid), np.float32)
    probs = predict_probabilities(model, vol, InferenceConfig(overlap=0.0), fill)
    assert probs.shape == (2, *vol.shape[1:])
    seen = torch.cat(net.seen)
    assert (seen == np.float32(fill[0])).sum() > 0 and not (seen == 0).any()


def test_augmentation_keeps_the_padding_value(prepared):
    cid = prepared.split("train")[0]
    fill = np.float32(background_fill(prepared.case(cid), 1)[0])
    ds = PatchDataset(prepared, [cid], (32, 32, 32), foreground_fraction=0.0, seed=1,
                      augment=AugmentConfig(flip_prob=1.0, affine_prob=1.0, rotate_deg=10))
    image = ds[0]["image"].numpy()
    assert np.isclose(image, fill, atol=1e-5).sum() > 0.1 * image.size  # padding, rotated in, is still "nothing"
    assert not np.isclose(image, 0.0, atol=1e-6).sum() > 0.1 * image.size


# ---- 3. pretraining seeds apart; 5. controls


def test_null_control_is_the_pretraining_start_and_differs_from_scratch(tmp_path):
    cfg = pretrain_config("avsdb", overrides={"patch": (32, 32, 32), "batch": 1, "num_workers": 0, "steps": 1,
                                              "precision": "32-true", "seed": 1000,
                                              "generator": {"size": (32, 32, 32), "n_shapes": 3}})
    run = pretrain("avsdb", None, tmp_path / "null", cfg, untrained=True)
    saved = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert saved["global_step"] == 0 and saved["untrained"] and info["untrained"] and info["config"]["seed"] == 1000
    from lightning.pytorch import seed_everything

    from medpretrain.methods import get_method

    seed_everything(1000, verbose=False)
    fresh = get_method("avsdb").build_module(cfg).model.state_dict()
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in fresh.items())
    seed_everything(0, verbose=False)
    scratch = get_method("avsdb").build_module(cfg).model.state_dict()
    assert not all(torch.equal(saved["state_dict"][k], v) for k, v in scratch.items())
    with pytest.raises(Exception, match="already holds"):
        pretrain("avsdb", None, tmp_path / "null", cfg, untrained=True)


def test_benchmark_pretrains_with_its_own_seed_and_refuses_a_shared_one(tmp_path):
    from medpretrain.benchmark import BenchmarkConfig, plan

    values = {"name": "t", "dataset": str(tmp_path), "backbones": {"unet": {"model": "unet"}},
              "only": ["avsdb"], "seeds": [0, 1, 2],
              "methods": {"null": {"method": "avsdb", "untrained": True}}}
    jobs = plan(BenchmarkConfig.model_validate(values), tmp_path / "out")
    pre = [j.commands[0] for j in jobs if j.kind == "pretrain"]
    assert len(pre) == 2 and all(c[c.index("--seed") + 1] == "1000" for c in pre)
    assert sum("--untrained" in c for c in pre) == 1
    with pytest.raises(Exception, match="pretrain_seed"):
        BenchmarkConfig.model_validate({**values, "pretrain_seed": 2})


def test_shuffled_volume_fusion_keeps_the_image_and_draws_an_unrelated_target(tmp_path):
    from medpretrain.methods.volume_fusion import VolumeFusionDataset

    rng = np.random.default_rng(0)
    pool = prepared_pool(tmp_path, [rng.normal(size=(40, 40, 40)).astype(np.float32) for _ in range(3)])
    real_cfg = pretrain_config("volume-fusion", overrides={"patch": (32, 32, 16)})
    real = VolumeFusionDataset(pool, real_cfg)
    shuffled = VolumeFusionDataset(pool, real_cfg.model_copy(update={"target": "shuffled"}))
    agree = []
    for i in range(6):
        a, b = real.synthesize(i), shuffled.synthesize(i)
        np.testing.assert_array_equal(a.image, b.image)  # the very same inputs
        assert b.label.max() <= real_cfg.k and not np.array_equal(a.label, b.label)
        agree.append(np.mean(a.label == b.label))
    # the target is independent of the image: agreement is chance level, far from 1
    assert np.mean(agree) < 0.6


# ---- 6. was the pretext task learnt?


def test_segmentation_baselines_bracket_the_loss():
    rng = np.random.default_rng(0)
    labels = [torch.from_numpy(rng.choice(3, size=(1, 8, 8, 8), p=[0.6, 0.3, 0.1])).long() for _ in range(4)]
    loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=True, lambda_dice=0.5, lambda_ce=0.5)
    b = segmentation_baseline([{"label": lab} for lab in labels], loss, 3, batch=2)
    assert b.perfect < 0.01 < b.trivial
    # the prior is the best constant: any other constant prediction scores worse on the CE part
    uniform = np.mean([float(loss(torch.zeros(2, 3, 8, 8, 8), torch.stack(labels[i:i + 2]))) for i in (0, 2)])
    assert b.trivial < uniform
    assert fraction_learnt(1.0, 0.0, 0.25) == 0.75 and fraction_learnt(1.0, 0.0, None) is None
    assert fraction_learnt(1.0, 0.0, 1.2) < 0


def test_pretraining_writes_its_pretext_fraction_learnt(tmp_path):
    rng = np.random.default_rng(1)
    pool = prepared_pool(tmp_path, [rng.normal(size=(40, 40, 40)).astype(np.float32) for _ in range(3)])
    cfg = pretrain_config("volume-fusion", overrides={"patch": (32, 32, 16), "batch": 1, "steps": 6,
                                                      "num_workers": 0, "precision": "32-true",
                                                      "checkpoint_every": 3})
    run = pretrain("volume-fusion", pool.root, tmp_path / "vf", cfg)
    report = json.loads((run / "pretext.json").read_text(encoding="utf-8"))["loss"]
    assert report["perfect"] < report["trivial"]
    assert report["final"] == pytest.approx(final_loss(run / "logs" / "csv" / "metrics.csv", "loss"))
    assert report["fraction_learnt"] == pytest.approx(
        (report["trivial"] - report["final"]) / (report["trivial"] - report["perfect"]))
    assert json.loads((run / "run.json").read_text(encoding="utf-8"))["pretext"]["loss"] == report


# ---- 7. learning curves; 8. validation cases


def test_validation_cases_curves_and_selection(prepared, tmp_path):
    from medpretrain.api import evaluate, finetune
    from medpretrain.benchmark import select_hyperparameters

    base = dict(model="unet", steps=4, patch=(32, 32, 16), batch=1, checkpoint_every=2, num_workers=0,
                precision="32-true", n_labeled=2, validation_cases=2, validation_seed=0, curve_fractions=[0.5])
    runs = []
    for lr in (1e-3, 3e-3):
        run = finetune(prepared.root, tmp_path / f"lr{lr:g}", FinetuneConfig(**base, lr=lr))
        info = json.loads((run / "run.json").read_text(encoding="utf-8"))
        val, labelled = info["validation_cases"], info["labeled_cases"]
        assert len(val) == 2 and not set(val) & set(labelled) and set(val) <= set(prepared.split("train"))
        assert (run / "curve" / "model_step0000002.pt").is_file()
        evaluate(run, prepared.root, EvaluateConfig(split="validation", overlays=0))
        runs.append(run)
    # every run sets aside the same validation cases, whatever its seed
    other = finetune(prepared.root, tmp_path / "seed1", FinetuneConfig(**{**base, "steps": 1, "curve_fractions": []},
                                                                     seed=1))
    assert json.loads((other / "run.json").read_text(encoding="utf-8"))["validation_cases"] == val
    # `--validation-cases 0` over a config that sets cases aside: the benchmark's `all` run with
    # validation.all_includes_validation trains on every training case (the command line, as the benchmark runs it)
    cfg_yaml = tmp_path / "with-validation.yaml"
    cfg_yaml.write_text(yaml.safe_dump({**base, "patch": list(base["patch"]), "n_labeled": None, "steps": 1,
                                        "curve_fractions": []}), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "medpretrain", "finetune", "--data", str(prepared.root), "--out",
                           str(tmp_path / "all"), "--config", str(cfg_yaml), "--fraction", "1.0",
                           "--validation-cases", "0"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((tmp_path / "all" / "run.json").read_text(encoding="utf-8"))
    assert info["validation_cases"] == [] and info["labeled_cases"] == sorted(prepared.split("train"))
    # a learning-curve point evaluates its own export
    curve = evaluate(runs[0], prepared.root, EvaluateConfig(overlays=0), out=runs[0] / "curve" / "eval-step0000002",
                     model_file=runs[0] / "curve" / "model_step0000002.pt")
    assert 0.0 <= curve["overall"]["dice"]["mean"] <= 1.0
    # selection writes the base config with the best run's lr
    base_yaml = tmp_path / "base.yaml"
    base_yaml.write_text(yaml.safe_dump({"model": "unet", "lr": 1e-3, "steps": 4}), encoding="utf-8")
    scores = [json.loads((r / "eval" / "metrics.json").read_text(encoding="utf-8"))["overall"]["dice"]["mean"]
              for r in runs]
    chosen = select_hyperparameters(base_yaml, runs, tmp_path / "chosen.yaml")
    best = (1e-3, 3e-3)[int(np.argmax(scores))]
    assert chosen["chosen"]["lr"] == best
    assert yaml.safe_load((tmp_path / "chosen.yaml").read_text(encoding="utf-8")) == {"model": "unet", "lr": best,
                                                                                     "steps": 4}
    with pytest.raises(ConfigError, match="validation"):
        evaluate(_run_without_validation(prepared, tmp_path), prepared.root, EvaluateConfig(split="validation",
                                                                                             overlays=0))


@pytest.mark.slow
def test_selection_extends_the_grid_while_the_best_lr_is_at_its_end(prepared, tmp_path):
    """``validation.extend``: a best lr at the grid's end is followed by one grid step beyond it (the grid's own
    fine-tuning command, a real child process), scored on the validation cases and chosen from again; re-running
    the selection reuses the extra run. The grid runs' scores are set here so that each end wins in turn. The grid
    scored its learning curve on the validation cases (``validation.curves``), so the extra run scores its own, and
    the report's validation learning-curve table has every run at every step."""
    from medpretrain.api import evaluate, finetune
    from medpretrain.benchmark import select_hyperparameters
    from medpretrain.evaluation.benchmark_report import validation_curve_lines

    values = dict(model="unet", steps=2, patch=[32, 32, 16], batch=1, num_workers=0, precision="32-true",
                  validation_cases=2, validation_seed=0, curve_fractions=[0.5], checkpoint_every=1)
    base_yaml = tmp_path / "finetune.yaml"
    base_yaml.write_text(yaml.safe_dump(values), encoding="utf-8")
    grid = tmp_path / "validation"
    runs = []
    for lr in (1e-3, 3e-3):
        run = finetune(prepared.root, grid / f"scratch-unet-lr{lr:g}", FinetuneConfig(**values, lr=lr, n_labeled=2))
        evaluate(run, prepared.root, EvaluateConfig(split="validation", overlays=0))
        evaluate(run, prepared.root, EvaluateConfig(split="validation", overlays=0), out=run / "curve" /
                 "eval-step0000001", model_file=run / "curve" / "model_step0000001.pt")
        runs.append(run)

    def set_dice(run, dice):
        path = run / "eval" / "metrics.json"
        metrics = json.loads(path.read_text(encoding="utf-8"))
        metrics["overall"]["dice"]["mean"] = dice
        path.write_text(json.dumps(metrics), encoding="utf-8")

    ft_args = ["--data", str(prepared.root), "--seed", "0", "--config", str(base_yaml), "--n-labeled", "2"]
    # the largest lr is best: one step up (3e-3 * 3e-3 / 1e-3 = 9e-3), a real run on the validation cases
    set_dice(runs[0], -1.0)
    set_dice(runs[1], -0.5)
    up = select_hyperparameters(base_yaml, runs, tmp_path / "up.yaml", extend=1, finetune_args=ft_args)
    extra = grid / "scratch-unet-lr0.009"
    assert [r["lr"] for r in up["runs"]] == [1e-3, 3e-3, 9e-3] and up["runs"][2]["extended"]
    assert (extra / "model.pt").is_file() and up["runs"][2]["run"] == str(extra)
    info = json.loads((extra / "run.json").read_text(encoding="utf-8"))
    assert info["config"]["lr"] == 9e-3 and info["validation_cases"] == up["runs"][0]["validation_cases"]
    dice = up["runs"][2]["validation_dice"]
    assert 0.0 <= dice <= 1.0 and up["chosen"]["lr"] == 9e-3  # any real Dice beats the scores set above
    assert up["extend"] == {"allowed": 1, "made": 1, "edge": True}
    assert yaml.safe_load((tmp_path / "up.yaml").read_text(encoding="utf-8"))["lr"] == 9e-3
    curve = json.loads((extra / "curve" / "eval-step0000001" / "metrics.json").read_text(encoding="utf-8"))
    assert curve["n_cases"] == 2  # the validation cases, scored with the export of step 1
    lines = validation_curve_lines({"scratch-unet": up})
    table = [line for line in lines if line.startswith("| scratch-unet | ")]
    assert lines[3] == "| arm | lr | step 1 | step 2 |" and len(table) == 4  # 3 runs, then the chosen run's classes
    assert table[2].startswith("| scratch-unet | 0.009 | ") and table[2].count("|") == 5
    assert validation_curve_lines({"scratch-unet": {**up, "runs": up["runs"][:0]}}) == []
    # a re-run selection reuses the finished extra run instead of training again
    mtime = (extra / "model.pt").stat().st_mtime_ns
    again = select_hyperparameters(base_yaml, runs, tmp_path / "up.yaml", extend=1, finetune_args=ft_args)
    assert again["runs"] == up["runs"] and (extra / "model.pt").stat().st_mtime_ns == mtime
    # the smallest lr is best: one step down (1e-3 * 1e-3 / 3e-3), stopping once the best is inside
    set_dice(runs[0], 2.0)
    down = select_hyperparameters(base_yaml, runs, tmp_path / "down.yaml", extend=3, finetune_args=ft_args)
    assert [r["lr"] for r in down["runs"]] == [1e-3, 3e-3, 0.000333]
    assert down["chosen"]["lr"] == 1e-3 and down["extend"] == {"allowed": 3, "made": 1, "edge": False}
    # the best inside the grid: nothing more is run
    set_dice(runs[0], 0.1)
    set_dice(runs[1], 0.2)
    set_dice(extra, 0.15)
    inside = select_hyperparameters(base_yaml, [runs[0], runs[1], extra], tmp_path / "in.yaml", extend=2,
                                    finetune_args=ft_args)
    assert len(inside["runs"]) == 3 and inside["chosen"]["lr"] == 3e-3
    assert inside["extend"] == {"allowed": 2, "made": 0, "edge": False}
    with pytest.raises(ConfigError, match="at least 2"):
        select_hyperparameters(base_yaml, runs[:1], tmp_path / "one.yaml", extend=1, finetune_args=ft_args)
    # an extra run that cannot train (here: more labelled cases than there are) is the worst score, recorded, not
    # chosen and not re-tried; the selection is written all the same
    import shutil

    runs2 = [tmp_path / "grid2" / r.name for r in runs]
    for src, dst in zip(runs, runs2):
        shutil.copytree(src, dst)
    set_dice(runs2[0], 0.1)
    set_dice(runs2[1], 0.2)
    bad_args = ["--data", str(prepared.root), "--seed", "0", "--config", str(base_yaml), "--n-labeled", "999"]
    failed = select_hyperparameters(base_yaml, runs2, tmp_path / "f.yaml", extend=2, finetune_args=bad_args)
    assert failed["chosen"]["lr"] == 3e-3 and failed["extend"]["made"] == 1
    assert failed["runs"][2]["lr"] == 9e-3 and failed["runs"][2]["validation_dice"] is None
    assert "exit" in failed["runs"][2]["failed"] and (tmp_path / "grid2" / "scratch-unet-lr0.009" /
                                                        "extra_run_failed.json").is_file()
    assert select_hyperparameters(base_yaml, runs2, tmp_path / "f.yaml", extend=2, finetune_args=bad_args) == failed


def _run_without_validation(prepared, tmp_path):
    from medpretrain.api import finetune

    return finetune(prepared.root, tmp_path / "noval", FinetuneConfig(
        model="unet", steps=1, patch=(32, 32, 16), batch=1, num_workers=0, precision="32-true", n_labeled=1))


def test_steps_to_reach():
    from medpretrain.evaluation.benchmark_report import steps_to_reach

    assert steps_to_reach({50: 0.5, 100: 0.7, 200: 0.8}, 0.6) == pytest.approx(75.0)
    assert steps_to_reach({50: 0.5, 100: 0.7}, 0.4) == 50.0
    assert steps_to_reach({50: 0.5, 100: 0.7}, 0.9) is None


@pytest.mark.slow
def test_benchmark_with_validation_null_control_and_curves(tmp_path):
    from medpretrain.benchmark import BenchmarkConfig

    raw = make_demo_dataset(tmp_path / "raw", n_cases=6, size=(40, 36, 20), seed=2)
    tiny_avsdb = {"patch": [32, 32, 32], "batch": 1, "num_workers": 0, "precision": "32-true",
                  "generator": {"size": [32, 32, 32], "n_shapes": 4}}
    cfg = BenchmarkConfig.model_validate({
        "name": "tiny-transfer", "dataset": str(raw), "preprocess": {"modality": "MR", "spacing": [1.5, 1.5, 2.0]},
        "backbones": {"unet": {"model": "unet", "steps": 4, "patch": [32, 32, 16], "batch": 1, "precision": "32-true",
                               "finetune": {"num_workers": 0, "checkpoint_every": 2, "augment": {"enabled": False}}}},
        "methods": {"null": {"method": "avsdb", "preset": None, "untrained": True, "config": tiny_avsdb}},
        "only": [], "n_labeled": [1], "seeds": [0], "parallel": 2,
        "workers": 1, "overlays": 0, "curve_fractions": [0.5],
        "validation": {"cases": 1, "n_labeled": 1, "run_seed": 0, "lr": [0.001, 0.003]},
    })
    cfg_file = tmp_path / "b.yaml"
    cfg_file.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())), encoding="utf-8")
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "medpretrain", "benchmark", "--config", str(cfg_file), "--out",
                           str(out)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["runs_finished"] == 2 and summary["pretrain_seed"] == 1000
    assert set(summary["validation_selection"]) == {"unet-scratch", "unet-null"}
    for arm in ("scratch", "null"):
        chosen = yaml.safe_load((out / "configs" / f"finetune-unet-{arm}.yaml").read_text(encoding="utf-8"))["lr"]
        run = json.loads((out / "runs" / f"{arm}-unet-n1-s0" / "run.json").read_text(encoding="utf-8"))
        assert run["config"]["lr"] == chosen and run["validation_cases"] and not (
            set(run["validation_cases"]) & set(run["labeled_cases"]))
    curves = {c["method"]: c for c in summary["curves"]}
    assert [p[0] for p in curves["scratch"]["points"]] == [2, 4]
    assert curves["null"]["reach_scratch_final"]["seeds"] == 1
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "chosen on validation" in report and "Learning curves" in report and "untrained (null control)" in report
    assert (out / "learning_curves.png").stat().st_size > 1000
