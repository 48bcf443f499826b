"""The pretraining-method contract (docs/adding-a-method.md), checked for EVERY registered method: a method that
lands as one new module in ``medpretrain/methods/`` is tested here without editing this file."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from _niftis import prepared_pool
from medpretrain.config import TrainingConfig
from medpretrain.engine.pretrain import pretrain, pretrain_config
from medpretrain.errors import ConfigError
from medpretrain.methods import REQUIRED_PRESETS, PretrainMethod, PretrainModule, get_method, list_methods, register_method
from medpretrain.models import build_model, get_spec, list_models, load_weights

METHODS = [m.name for m in list_methods()]
FAMILIES = {s.family for s in list_models()}


def _anatomy(shape, seed):
    """A smooth body (ellipsoid with inner blobs) over air, different per seed: every method finds body points,
    matches and structure in it."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = (g[0] / 0.8) ** 2 + (g[1] / 0.75) ** 2 + (g[2] / 0.85) ** 2 < 1
    img = np.where(body, 200.0, 0.0)
    for _ in range(6):
        c, r = rng.uniform(-0.5, 0.5, 3), rng.uniform(0.1, 0.25)
        img += 150.0 * (sum((gi - ci) ** 2 for gi, ci in zip(g, c)) < r * r)
    return (img + rng.normal(0, 4, shape)).astype(np.float32)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract_pool")
    return prepared_pool(root, [_anatomy(s, i) for i, s in enumerate([(48, 44, 40), (52, 48, 40)])])


def test_the_registry_finds_every_module_in_the_package():
    import pkgutil

    import medpretrain.methods as pkg

    modules = {i.name for i in pkgutil.iter_modules(pkg.__path__) if not i.name.startswith("_")}
    from medpretrain.methods import _ORIGIN

    assert {_ORIGIN[m].rsplit(".", 1)[-1] for m in METHODS} == modules  # each module registers, none is missed
    assert {"avsdb", "volume-fusion", "asa", "alice"} <= set(METHODS)
    with pytest.raises(ConfigError, match="unknown method 'nope'.*register_method.*adding-a-method"):
        get_method("nope")


@pytest.mark.parametrize("name", METHODS)
def test_record_keeps_the_contract(name):
    m = get_method(name)
    assert m.description and issubclass(m.config_cls, TrainingConfig)
    assert set(REQUIRED_PRESETS) <= set(m.presets)
    for preset, values in m.presets.items():
        unknown = set(values) - set(m.config_cls.model_fields)
        assert not unknown, f"preset '{preset}' of {name} sets unknown fields {unknown}"
    assert m.pretext_baselines is not None, "state the pretext task's trivial and perfect losses (blocks.pretext)"
    registered = {s.name for s in list_models()}
    assert all(x in registered or x in FAMILIES for x in m.models), f"{name}.models names {m.models}"
    assert any(m.supports(s.name) for s in list_models())
    tags = [get_method(n).tag for n in METHODS]
    assert len(set(tags)) == len(tags)
    a, b = m.sample_rng(0, 5).random(), m.sample_rng(0, 6).random()
    assert a != b and m.sample_rng(0, 5).random() == a


def test_model_matching_is_exact_not_by_prefix():
    cnn_only = PretrainMethod("x-test", "x", TrainingConfig, False, None, None, None, models=("unet",))
    assert cnn_only.supports("unet") and not cnn_only.supports("unetr") and not cnn_only.supports("unet-large")
    family = PretrainMethod("y-test", "y", TrainingConfig, False, None, None, None, models=("vit",))
    assert family.supports("unetr") and family.supports("unetr-small") and not family.supports("unet")
    assert not family.supports("no-such-network")
    assert get_method("asa").supports("swinunetr-small") and not get_method("asa").supports("unetr-small")


def test_registration_refuses_a_record_that_breaks_the_contract():
    base = dict(description="x", config_cls=TrainingConfig, needs_data=False, build_dataset=None, build_module=None,
                model_meta=None)
    with pytest.raises(ConfigError, match="no preset.*'paper'.*smoke"):
        register_method(PretrainMethod(name="x-test", presets={"cpu": {}}, **base))
    with pytest.raises(ConfigError, match="lower case"):
        register_method(PretrainMethod(name="My_Method", presets=dict.fromkeys(REQUIRED_PRESETS, {}), **base))
    with pytest.raises(ConfigError, match="sample_tag.*also method 'asa'"):
        register_method(PretrainMethod(name="x-test", presets=dict.fromkeys(REQUIRED_PRESETS, {}),
                                       sample_tag=get_method("asa").tag, **base))
    with pytest.raises(ConfigError, match="registered twice"):
        register_method(PretrainMethod(name="asa", presets=dict.fromkeys(REQUIRED_PRESETS, {}), **base))
    assert "x-test" not in METHODS and get_method("asa").config_cls is not TrainingConfig


@pytest.mark.parametrize("name", METHODS)
def test_warmup_constant_schedule_is_honoured(name):
    """``lr_schedule: warmup-constant`` (snapshots of one long pretraining, issue 20): after the warm-up every
    method trains at its peak lr to the end, whatever its own default schedule (MAE's poly decay, Models Genesis'
    one-cycle), so that no snapshot is taken mid-decay and the run can be extended."""
    m = get_method(name)
    cfg = pretrain_config(name, preset="smoke", overrides={"steps": 100, "lr_schedule": "warmup-constant",
                                                           "warmup_fraction": 0.1})
    module = m.build_module(cfg)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    peaks = [g["initial_lr"] for g in opt.param_groups]
    lrs = []
    for step in range(100):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0][0] < peaks[0]  # warming up
    for step in (10, 50, 99):
        assert lrs[step] == pytest.approx(peaks), f"step {step}: lr {lrs[step]} != peak {peaks}"


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_method_trains_exports_and_loads_into_fine_tuning(name, pool, tmp_path):
    """The smoke preset: 2 steps through the real job, ``model.pt`` with the registered network's keys, the
    pretext report, the null control, and the weights loading into a fine-tuning network of another class
    count."""
    m = get_method(name)
    cfg = pretrain_config(name, preset="smoke")
    module = m.build_module(cfg)
    assert isinstance(module, PretrainModule)
    data_dir = pool.root if m.needs_data else None
    run = pretrain(name, data_dir, tmp_path / "run", cfg)
    exported = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    assert exported["kind"] == f"pretrain:{name}" and exported["global_step"] == cfg.steps
    meta = m.model_meta(cfg)
    net = build_model(cfg.model, meta["in_channels"], meta["out_channels"], cfg.patch, **cfg.model_options)
    assert set(exported["state_dict"]) == set(net.state_dict()), "exported keys must be the registered network's"
    assert all(torch.isfinite(v).all() for v in exported["state_dict"].values() if v.is_floating_point())
    report = json.loads((run / "pretext.json").read_text())
    assert report and all(r["trivial"] > r["perfect"] for r in report.values())

    spec = get_spec(cfg.model)
    downstream = build_model(cfg.model, 1, 3, cfg.patch, **cfg.model_options)
    before = {k: v.clone() for k, v in downstream.state_dict().items()}
    loaded = load_weights(downstream, spec, run / "model.pt", "encoder")
    assert loaded.loaded, loaded.summary()
    after = downstream.state_dict()
    for key in loaded.loaded:
        assert spec.part_of(key) == "encoder" and torch.equal(after[key], exported["state_dict"][key].to(after[key]))
    assert any(not torch.equal(before[k], after[k]) for k in loaded.loaded)

    null = pretrain(name, data_dir, tmp_path / "null", cfg, untrained=True)
    assert torch.load(null / "model.pt", map_location="cpu", weights_only=False)["untrained"] is True


CNN_METHODS = [m.name for m in list_methods() if m.supports("resenc-l-cpu")]


@pytest.mark.slow
@pytest.mark.parametrize("name", CNN_METHODS)
def test_every_cnn_method_pretrains_resenc_l_that_fine_tuning_loads(name, pool, tmp_path):
    """nnU-Net users' network (issue 24): every method that pretrains a CNN pretrains ResEnc-L (CPU preset, narrow
    here) through the real job, and the whole exported network (encoder and decoder) loads into the fine-tuning
    network of another class count."""
    pytest.importorskip("dynamic_network_architectures", reason="needs the optional extra: pip install -e '.[nnunet]'")
    m = get_method(name)
    options = {"features_per_stage": (4, 4, 8, 8, 8)}
    cfg = pretrain_config(name, preset="smoke", overrides={"model": "resenc-l-cpu", "model_options": options})
    run = pretrain(name, pool.root if m.needs_data else None, tmp_path / "run", cfg)
    exported = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    assert exported["global_step"] == cfg.steps and exported["model"] == "resenc-l-cpu"
    downstream = build_model("resenc-l-cpu", 1, 3, cfg.patch, **options)
    loaded = load_weights(downstream, get_spec("resenc-l-cpu"), run / "model.pt", "all")
    parts = {get_spec("resenc-l-cpu").part_of(k) for k in loaded.loaded}
    assert {"encoder", "decoder"} <= parts, loaded.summary()
    assert not [k for k, _, _ in loaded.shape_mismatch if get_spec("resenc-l-cpu").part_of(k) != "head"]


def test_a_new_module_registers_by_being_there(tmp_path, monkeypatch):
    """Discovery: a module dropped into the methods package joins the registry (here: a copy of the package's
    path with one extra module, imported in a subprocess so this session's registry stays as it is)."""
    import subprocess
    import sys

    import medpretrain.methods as pkg

    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "toy_method.py").write_text(textwrap.dedent('''
        from medpretrain.methods import PretrainMethod, register_method
        from medpretrain.methods.avsdb import AVSDBPretrainConfig, _build_dataset, _build_module, _model_meta
        register_method(PretrainMethod(name="toy", description="toy", config_cls=AVSDBPretrainConfig,
                                       needs_data=False, build_dataset=_build_dataset, build_module=_build_module,
                                       model_meta=_model_meta, presets={"cpu": {}, "paper": {}, "smoke": {}}))
    '''))
    code = (f"import medpretrain.methods as m; m.__path__.append({str(extra)!r}); "
            "print(sorted(x.name for x in m.list_methods()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "'toy'" in out.stdout and "'asa'" in out.stdout
    assert Path(pkg.__file__).parent.is_dir()
