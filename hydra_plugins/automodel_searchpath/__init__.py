"""Hydra search-path plugin: every installed package that registers an `automodel.conf` entry point
contributes its YAML options, so `pip install some-plugin` makes `group=its_option` valid (and
uninstalling removes it). Hydra discovers this module through the `hydra_plugins` namespace package.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class AutomodelPluginConfs(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from automodel.registry import conf_packages

        for package, dist in conf_packages():
            search_path.append(provider=f"automodel-plugin:{dist}", path=f"pkg://{package}")
