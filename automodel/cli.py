"""`automodel`: the Hydra entry point for training, plus a few subcommands that read config only.

    automodel [overrides...]        train (Hydra: --help, --cfg job, -m for sweeps)
    automodel list                  installed plugins and config options, with the package providing each
    automodel generate DIR PROMPT   greedy generation from an exported HF folder
    automodel export CKPT OUT       a DCP checkpoint -> an HF folder, offline, on one process
    automodel plot RUN_OR_SWEEP...  loss, val_loss, lr and tokens/s against step, as a PNG
    automodel plan ... plan.world_size=N   per-rank memory and communication of a run at N ranks, no hardware
    automodel eval RUN_OR_FOLDER    lm-evaluation-harness tasks on a run's model (eval.KEY=VALUE overrides)
    automodel help | --version
"""

from __future__ import annotations

import sys
import warnings

from automodel.errors import UserError

SUBCOMMANDS = {
    "list": "automodel.cli_list:main",
    "generate": "automodel.generate:main",
    "export": "automodel.cli_export:main",
    "plot": "automodel.cli_plot:main",
    "plan": "automodel.cli_plan:main",
    "eval": "automodel.cli_eval:main",
}


def _quiet_third_party() -> None:
    # torchao (imported by transformers/peft) warns at import about optional kernels it cannot find.
    warnings.filterwarnings("ignore", module=r"torchao(\.|$)")
    warnings.filterwarnings("ignore", message=r".*torchao.*")
    # peft asks transformers a deprecated question while wrapping a model; nothing for a user to act on
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*is deprecated")
    # HF returns logits as a slice of a larger tensor; the loss never writes to them in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # expert parallel slices flattened mesh dimensions (dp_shard = dp_shard_mod_ep x ep), as torchtitan does
    warnings.filterwarnings("ignore", message=r"Slicing a flattened dim from root mesh")
    # DCP read/written by one process (automodel export, a single-process resume): exactly the intent
    warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")
    # transformers announcing its own future API changes: addressed to library authors, not to a user's run
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")


def fail(error: UserError) -> None:
    """Print the one line (once: every rank of a job hits the same refusal, rank 0 says it) and exit.

    Under automodel's own launcher every rank hands its line to the launcher instead (AUTOMODEL_ERROR_DIR),
    which prints the first: the rank that fails first may be any rank, and the agent kills the others
    before rank 0 could speak."""
    import os

    from automodel.launch import local
    from automodel.secrets import redact_text

    line = redact_text(str(error))  # e.g. a path that ${oc.env:HF_TOKEN} filled in
    if local.report_to_launcher(line):
        sys.exit(error.exit_code)
    if os.environ.get("RANK", "0") == "0":
        print(f"automodel: error: {line}", file=sys.stderr, flush=True)
    if os.environ.get("SUBMITIT_EXECUTOR"):  # a sweep job on SLURM: the job returns the error to the submitter,
        raise type(error)(line)  # which says it in one line (an exit would leave submitit no result to report)
    sys.exit(error.exit_code)


def _looks_like_a_command(word: str) -> bool:
    """A bare word first (`automodel plan`): not an override (key=value, +key=, ~key) nor a flag."""
    return word not in SUBCOMMANDS and not word.startswith("-") and "=" not in word and not word.startswith("~")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return (f"automodel {v('automodel')} (torch {v('torch')}, transformers {v('transformers')}, peft {v('peft')}, "
            f"hydra-core {v('hydra-core')}, Python {sys.version.split()[0]})")


def main(argv: list[str] | None = None) -> None:
    from automodel import stop_signals

    try:
        with stop_signals.around_the_cli():  # Ctrl-C/SIGTERM outside a run's own handling: one line, 128+signal
            _main(argv)
    except BrokenPipeError:  # `automodel ... --cfg job | head`: the reader left; nothing more to say, no traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail too
        sys.exit(1)


def _main(argv: list[str] | None) -> None:
    from automodel.launch import lifetime

    lifetime.die_with_parent()  # a rank started by torch's elastic agent ends with it, however it ends
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_third_party()
    if argv and argv[0] in ("--version", "version"):
        return print(_version())
    if argv and argv[0] == "help":
        argv = ["--help", *argv[1:]]
    if argv and _looks_like_a_command(argv[0]):
        fail(UserError(f"'{argv[0]}' is not an automodel command; the commands are: {', '.join(SUBCOMMANDS)}, help, "
                       "--version; training takes group=option and key=value overrides (automodel --help)"))
    if argv and argv[0] in SUBCOMMANDS:
        module, func = SUBCOMMANDS[argv[0]].split(":")
        import importlib

        try:
            return getattr(importlib.import_module(module), func)(argv[1:])
        except UserError as e:
            fail(e)

    from automodel import compose
    from automodel.distributed import launch_env
    from automodel.launch import lifetime, local, slurm

    argv = compose.expand_home(argv)  # `data.path=~/x.jsonl`: Hydra's grammar refuses an unquoted ~
    try:
        slurm.export_torch_env()  # under `srun -n N automodel ...`: the N tasks become one world
        slurm.check_can_submit(argv)
        launch_env.share_run_stamp()  # every rank of a torchrun/SLURM job names the same run dir
        target = compose.check(argv)
        if compose.show_sweep_configs(argv):
            return
        if target and local.is_first_process():  # the other ranks of a launch write under rank 0's lock
            lifetime.take(*target)  # before Hydra writes anything there: made, noted, locked
    except UserError as e:
        fail(e)
    _hydra_main(argv)


def _hydra_main(argv: list[str]) -> None:
    import hydra

    from automodel.config import CONFIG_NAME, conf_dir, register_resolvers

    from hydra_plugins import automodel_slurm

    register_resolvers()
    automodel_slurm.register()  # hydra/launcher=slurm (conf/hydra/launcher/slurm.yaml)
    if not any(a.lstrip("+~").startswith("hydra.output_subdir=") for a in argv):
        # the run writes .hydra/ itself when it begins (engine/run_dir.py); placed among the other overrides,
        # since argparse takes one run of them
        at = next((i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")), len(argv))
        argv = [*argv[:at], "hydra.output_subdir=null", *argv[at:]]
    sys.argv = [sys.argv[0] or "automodel", *argv]
    entry = hydra.main(config_path=str(conf_dir()), config_name=CONFIG_NAME, version_base="1.3")(_run_job)
    entry()


def _run_job(cfg) -> float | None:
    """Hydra's task function: one training job inside Hydra's run (or sweep sub-) directory."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from automodel import fs
    from automodel.engine import run_dir
    from automodel.launch import lifetime, local

    hydra_cfg = HydraConfig.get()
    out = hydra_cfg.runtime.output_dir
    if local.is_first_process():
        if hydra_cfg.mode == RunMode.MULTIRUN:
            run_dir.mask_sweep_record(hydra_cfg.sweep.dir)
        fs.claim(out)  # a sweep's job dir (a single run's was claimed before Hydra started)
    try:
        from automodel.config import validate
        from automodel.engine.preflight import preflight

        checked = validate(cfg)
        if local.should_relaunch(checked.launcher):
            preflight(checked, world_size=checked.launcher.nproc_per_node)
            lifetime.acquire(out)  # held here for the ranks below, which die with this process
            lifetime.hand_to_children(out)
            try:
                return local.relaunch(checked.launcher, list(hydra_cfg.overrides.task), out)
            finally:
                lifetime.release(out)
        from automodel.engine.run import train

        result = train(cfg, out)
    except lifetime.RunDirBusy as e:  # the dir belongs to the job that holds it: touch nothing
        fs.release_claim(out)
        fail(e)
    except UserError as e:
        if local.launched_world_size() == 1:  # with several ranks, another may still be writing there
            fs.undo(out)
        fail(e)
    return result.final_loss if result is not None else None


if __name__ == "__main__":
    main()
