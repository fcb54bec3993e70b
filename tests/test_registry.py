"""Entry-point registry and typed config validation."""

import dataclasses
import sys
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


def _fake_distribution(root, dist: str, module: str, plugin: str) -> None:
    """An installed distribution as importlib.metadata finds it on sys.path: a dist-info folder naming an optim
    plugin and a conf package, and the module that holds them."""
    (root / f"{module}.py").write_text(
        "import dataclasses\n\n@dataclasses.dataclass\nclass Config:\n    lr: float = 0.1\n\n"
        "class Opt:\n    Config = Config\n\n    def __init__(self, config):\n        self.cfg = config\n")
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[automodel.optim]\n{plugin} = {module}:Opt\n\n"
                                           f"[automodel.conf]\n{module} = {module}_conf\n")


@pytest.fixture
def two_distributions(tmp_path, monkeypatch):
    """Two third-party distributions, each with an optim plugin and a conf package, installed on sys.path."""
    _fake_distribution(tmp_path, "alpha-plugins", "alpha_opt", "alpha")
    _fake_distribution(tmp_path, "beta-plugins", "beta_opt", "beta")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("AUTOMODEL_PLUGINS", raising=False)

    def fresh():
        registry._entry_points.cache_clear()
        registry.load.cache_clear()

    fresh()
    yield fresh
    monkeypatch.undo()  # sys.path and the environment first, then forget what was found with them
    fresh()
    for name in ("alpha_opt", "beta_opt"):
        sys.modules.pop(name, None)


def _optims() -> dict[str, str]:
    return {p.name: p.dist for p in registry.plugins("optim")}


def test_third_party_distributions_are_found_without_an_allowlist(two_distributions):
    assert _optims() == {"adamw": "automodel", "alpha": "alpha-plugins", "beta": "beta-plugins"}
    assert registry.load("optim", "beta").__module__ == "beta_opt"
    assert {dist for _, dist in registry.conf_packages()} >= {"alpha-plugins", "beta-plugins"}


def test_allowlist_admits_only_the_named_distributions(two_distributions, monkeypatch):
    # automodel's own plugins are always allowed; everything else needs to be named
    monkeypatch.setenv("AUTOMODEL_PLUGINS", " alpha-plugins , someone-else")
    two_distributions()
    assert _optims() == {"adamw": "automodel", "alpha": "alpha-plugins"}
    assert registry.load("optim", "alpha").__module__ == "alpha_opt"
    with pytest.raises(UserError) as e:
        registry.load("optim", "beta")
    head, choices = str(e.value).split("; choose one of: ")
    assert head == "optim.plugin='beta' is not an installed plugin"
    assert sorted(choices.split(", ")) == ["adamw", "alpha"]
    conf_dists = {dist for _, dist in registry.conf_packages()}
    assert "alpha-plugins" in conf_dists and "beta-plugins" not in conf_dists

    monkeypatch.setenv("AUTOMODEL_PLUGINS", "someone-else")
    two_distributions()
    assert _optims() == {"adamw": "automodel"}
