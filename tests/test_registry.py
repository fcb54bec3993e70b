"""Entry-point registry and typed config validation."""

import dataclasses
from typing import Optional

import pytest

from automodel import registry
from automodel.errors import UserError


def test_builtin_plugins_come_from_entry_points_of_the_automodel_distribution():
    for group, name in [("model", "hf"), ("parallel", "spmd"), ("parallel", "none"), ("data", "instruction"),
                        ("peft", "lora"), ("precision", "bf16"), ("checkpoint", "hf_export"), ("optim", "adamw")]:
        infos = {p.name: p for p in registry.plugins(group)}
        assert infos[name].dist == "automodel", (group, name)
        cls = registry.load(group, name)
        assert dataclasses.is_dataclass(cls.Config)


def test_unknown_plugin_names_the_choices():
    with pytest.raises(UserError) as e:
        registry.load("parallel", "fsdp3")
    assert str(e.value) == "parallel.plugin='fsdp3' is not an installed plugin; choose one of: none, spmd"


def test_unknown_group():
    with pytest.raises(UserError, match="unknown plugin group 'nope'"):
        registry.load("nope", "x")


@dataclasses.dataclass
class _Cfg:
    steps: int = 1
    name: str = "a"
    ratio: float = 0.5
    path: Optional[str] = None


def test_validate_returns_typed_instance():
    out = registry.validate(_Cfg, {"steps": "7", "ratio": 1}, "x")
    assert out == _Cfg(steps=7, ratio=1.0)


def test_validate_unknown_key_lists_valid_keys():
    with pytest.raises(UserError) as e:
        registry.validate(_Cfg, {"stepz": 3}, "train")
    assert str(e.value) == "train.stepz: unknown key; valid keys are: steps, name, ratio, path"


def test_validate_wrong_type_names_key_and_expected_type():
    with pytest.raises(UserError) as e:
        registry.validate(_Cfg, {"steps": "many"}, "train")
    assert str(e.value) == "train.steps='many': wrong type, expected int"


def test_allowlist_hides_other_distributions(monkeypatch):
    # automodel's own plugins are always allowed; everything else needs to be named
    monkeypatch.setenv("AUTOMODEL_PLUGINS", "some-other-dist")
    registry._entry_points.cache_clear()
    try:
        assert {p.dist for p in registry.plugins("optim")} == {"automodel"}
    finally:
        monkeypatch.delenv("AUTOMODEL_PLUGINS")
        registry._entry_points.cache_clear()
