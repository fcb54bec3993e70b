"""automodel's Hydra launcher for SLURM (`hydra/launcher=slurm`).

Hydra instantiates launchers only from the `hydra_plugins` namespace package, hence this location; the
class is also registered explicitly (`register()`), since Hydra's namespace scan misses editable installs.
"""


def register() -> None:
    from hydra.core.plugins import Plugins

    from hydra_plugins.automodel_slurm.launcher import SlurmLauncher

    Plugins.instance().register(SlurmLauncher)
