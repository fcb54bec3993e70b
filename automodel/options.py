"""Where config options come from: the built-in conf/ folder and every installed package's conf package.

Hydra's search path is extended with the same list (hydra_plugins/automodel_searchpath), so what
`automodel list` shows is exactly what `group=option` can select.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

from automodel import registry
from automodel.config import conf_dir


@dataclasses.dataclass(frozen=True)
class Option:
    group: str
    name: str
    plugin: str | None
    source: str  # distribution that provides the YAML


def _yaml_options(folder, group: str):
    node = folder / group
    if not node.is_dir():
        return []
    return sorted(f.name[: -len(".yaml")] for f in node.iterdir() if f.name.endswith(".yaml"))


def _plugin_of(folder, group: str, name: str) -> str | None:
    for line in (folder / group / f"{name}.yaml").read_text().splitlines():
        if line.startswith("plugin:"):
            return line.split(":", 1)[1].split("#")[0].strip()
    return None


def conf_sources() -> list[tuple[object, str]]:
    """(folder, distribution) pairs: built-in first, then installed plugin packages."""
    sources: list[tuple[object, str]] = [(Path(conf_dir()), registry.BUILTIN_DIST)]
    for package, dist in registry.conf_packages():
        try:
            sources.append((resources.files(package), dist))
        except ModuleNotFoundError:
            continue
    return sources


def options(group: str) -> list[Option]:
    found = []
    for folder, dist in conf_sources():
        for name in _yaml_options(folder, group):
            found.append(Option(group, name, _plugin_of(folder, group, name), dist))
    return found
