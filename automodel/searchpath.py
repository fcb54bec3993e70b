"""Hydra search-path plugin: every installed package that registers an `automodel.conf` entry point
contributes its YAML options, so `pip install some-plugin` makes `group=its_option` valid (and
uninstalling removes it).

Registered explicitly by the CLI (Hydra's `Plugins.register`) rather than discovered through the
`hydra_plugins` namespace package, because namespace scanning misses modules served by an editable
install's import hook.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class AutomodelPluginConfs(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from automodel.registry import conf_packages

        for package, dist in conf_packages():
            search_path.append(provider=f"automodel-plugin:{dist}", path=f"pkg://{package}")


def register() -> None:
    from hydra.core.plugins import Plugins

    Plugins.instance().register(AutomodelPluginConfs)
