"""Configuration layering: defaults < preset < YAML < options, with nested settings merged key by key."""

from __future__ import annotations

import pytest

from medpretrain.config import FinetuneConfig, load_config
from medpretrain.engine.pretrain import pretrain_config
from medpretrain.errors import ConfigError


def test_partial_nested_yaml_keeps_the_other_nested_defaults(tmp_path):
    cfg_file = tmp_path / "ablation.yaml"
    cfg_file.write_text("generator:\n  classes: xy4-z2\nsteps: 7\n", encoding="utf-8")
    cfg = pretrain_config("avsdb", cfg_file, "cpu", {"batch": 3})
    # the cpu preset's 64^3 volumes survive a YAML that only changes the class set
    assert cfg.generator.size == (64, 64, 64) and cfg.generator.classes == "xy4-z2"
    assert (cfg.steps, cfg.batch) == (7, 3)


def test_preset_nested_values_then_yaml_override(tmp_path):
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text("generator:\n  render: filled\n", encoding="utf-8")
    cfg = pretrain_config("avsdb", cfg_file, "paper", {})
    assert cfg.generator.size == (96, 96, 96) and cfg.generator.render == "filled"
    assert cfg.generator.n_shapes == 20


def test_unknown_nested_key_is_named(tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("generator:\n  shapes: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="generator.shapes"):
        pretrain_config("avsdb", cfg_file, None, {})


def test_options_override_yaml(tmp_path):
    cfg_file = tmp_path / "f.yaml"
    cfg_file.write_text("steps: 5\nlr: 0.01\n", encoding="utf-8")
    cfg = load_config(FinetuneConfig, cfg_file, {"steps": 9, "lr": None})
    assert (cfg.steps, cfg.lr) == (9, 0.01)
