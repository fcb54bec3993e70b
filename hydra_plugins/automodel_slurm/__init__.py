"""automodel's Hydra launcher for SLURM (`hydra/launcher=slurm`, also under hydra-submitit-launcher's own
name `hydra/launcher=submitit_slurm`).

Hydra instantiates launchers only from the `hydra_plugins` namespace package, hence this location; the
class is also registered explicitly (`register()`), since Hydra's namespace scan misses editable installs.
"""


def register() -> None:
    from hydra.core.plugins import Plugins

    from hydra_plugins.automodel_slurm.launcher import SlurmLauncher

    Plugins.instance().register(SlurmLauncher)
    _take_over_submitit_slurm()


def _take_over_submitit_slurm() -> None:
    """Make `hydra/launcher=submitit_slurm` automodel's launcher with conf/hydra/launcher/slurm.yaml's keys.

    Users of hydra-submitit-launcher type that name; its plain launcher would start every SLURM task of a
    job as a separate one-process run writing into the same folder. The config node of that name is
    replaced in Hydra's ConfigStore (after the package registered its own, so ours stays)."""
    from hydra.core.config_store import ConfigStore
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf  # registers the original first
    from omegaconf import OmegaConf

    from automodel.config import conf_dir

    ours = OmegaConf.load(conf_dir() / "hydra" / "launcher" / "slurm.yaml")
    ours.pop("defaults", None)
    node = OmegaConf.merge(OmegaConf.structured(SlurmQueueConf), ours)
    ConfigStore.instance().store(group="hydra/launcher", name="submitit_slurm", node=node, provider="automodel")
