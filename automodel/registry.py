"""Entry-point discovery: (group, name) -> plugin class, and typed validation of a plugin's config node.

Every plugin, built-in or third-party, comes from an installed distribution's entry points in the groups
`automodel.<group>`. There is no private registration path. `AUTOMODEL_PLUGINS`, when set, is a
comma-separated allowlist of distributions whose plugins may load (the built-in `automodel` is always
allowed), for sites that must control what code a config can pull in.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from automodel.errors import UserError

GROUPS = ("model", "parallel", "data", "peft", "precision", "checkpoint", "optim", "loss", "teacher", "logger")
# groups a run selects several options of at once (`logger=[jsonl,wandb]`): their node maps option -> its config
LIST_GROUPS = {"logger": "jsonl"}  # group -> the option that is always on
CONF_GROUP = "automodel.conf"  # entry points naming a package whose folder holds extra YAML options
BUILTIN_DIST = "automodel"


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    group: str
    name: str
    target: str  # "module:Class"
    dist: str  # the installed distribution that provides it


def _allowed(dist: str) -> bool:
    allow = os.environ.get("AUTOMODEL_PLUGINS")
    if not allow or dist == BUILTIN_DIST:
        return True
    return dist in {d.strip() for d in allow.split(",")}


def _dist_name(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "?"


@functools.cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=f"automodel.{group}"):
        if _allowed(_dist_name(ep)):
            found.setdefault(ep.name, ep)
    return found


def plugins(group: str) -> list[PluginInfo]:
    """Every plugin installed for `group`, sorted by name."""
    return [PluginInfo(group, n, ep.value, _dist_name(ep)) for n, ep in sorted(_entry_points(group).items())]


def conf_packages() -> list[tuple[str, str]]:
    """(package, distribution) for every installed package that contributes YAML options."""
    return [(ep.value, _dist_name(ep)) for ep in entry_points(group=CONF_GROUP) if _allowed(_dist_name(ep))]


@functools.cache
def load(group: str, name: str) -> type:
    """The plugin class registered as `name` in `automodel.<group>`; loaded once per process."""
    if group not in GROUPS:
        raise UserError(f"unknown plugin group '{group}'; groups are: {', '.join(GROUPS)}")
    eps = _entry_points(group)
    if name not in eps:
        choices = ", ".join(eps) or "(none installed)"
        raise UserError(f"{group}.plugin='{name}' is not an installed plugin; choose one of: {choices}")
    try:
        cls = eps[name].load()
    except Exception as e:  # a broken or half-installed package: the user reinstalls it or picks another plugin
        others = ", ".join(n for n in eps if n != name) or "(none)"
        raise UserError(f"{group}.plugin='{name}' ({eps[name].value}, from the installed package "
                        f"{_dist_name(eps[name])}) cannot be imported: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}; reinstall that package or choose another plugin: "
                        f"{others}") from None
    if not (isinstance(getattr(cls, "Config", None), type) and dataclasses.is_dataclass(cls.Config)):
        raise UserError(f"plugin {group}/{name} ({eps[name].value}) does not declare a dataclass `Config`")
    return cls


def validate(dataclass_type: type, node: Any, where: str) -> Any:
    """Check a config node against a dataclass and return a typed instance of it.

    OmegaConf does the type checking (ints, floats, bools, enums, Optional, nested dataclasses, dict/list
    fields); this function only turns its exceptions into one line naming the key and what is allowed.
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    schema = OmegaConf.structured(dataclass_type)
    data = node if isinstance(node, DictConfig) else OmegaConf.create(node or {})
    try:
        merged = OmegaConf.merge(schema, data)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        valid = ", ".join(f.name for f in dataclasses.fields(dataclass_type))
        key = _full_key(where, e)
        raise UserError(f"{key}: unknown key; valid keys are: {valid}") from None
    except ValidationError as e:
        key = _full_key(where, e)
        expected = _expected_type(dataclass_type, e)
        raise UserError(f"{key}={getattr(e, 'value', None)!r}: wrong type, expected {expected}") from None
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise UserError(f"{_full_key(where, e)}: {msg}") from None


def _full_key(where: str, e: Exception) -> str:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    return f"{where}.{key}" if key else where


def _expected_type(dataclass_type: type, e: Exception) -> str:
    key = str(getattr(e, "full_key", "") or getattr(e, "key", "") or "")
    obj = dataclass_type
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
        if part not in fields:
            return getattr(e, "msg", "another type").splitlines()[0]
        obj = fields[part].type
    return getattr(obj, "__name__", None) or str(obj)


def instantiate(group: str, node: Any, where: str | None = None) -> Any:
    """Build the plugin that a group's config node names, with its validated typed config (`where`: the node's
    key in messages, e.g. logger.wandb; default the group)."""
    from omegaconf import DictConfig, OmegaConf

    if node is None:
        raise UserError(f"config group '{group}' is missing; pick an option with {group}=<option>")
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    node = dict(node)
    name = node.pop("plugin", None)
    if not name:
        raise UserError(f"{where or group}: the option does not name a plugin (add `plugin: <name>` to its YAML)")
    cls = load(group, name)
    return cls(validate(cls.Config, node, where or group))


def instantiate_all(group: str, node: Any) -> list:
    """The plugins of a list group's node ({option: {plugin: ..., ...}}), the always-on option first (added when
    the selection left it out: `logger=wandb` still writes metrics.jsonl)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    node = dict(node or {})
    if not all(isinstance(v, dict) for v in node.values()):
        raise UserError(f"{group}: expected options selected as {group}=[option,...] (e.g. {group}="
                        f"[{LIST_GROUPS[group]},wandb]), got keys {', '.join(map(str, node))}")
    always = LIST_GROUPS[group]
    node = {always: node.pop(always, {"plugin": always}), **node}
    return [instantiate(group, sub, f"{group}.{option}") for option, sub in node.items()]
