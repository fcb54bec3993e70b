"""Compose and validate the user's overrides with Hydra's compose API, before Hydra's own run starts.

`hydra.main` creates the run directory before the task function sees the config; checking here first is
what lets a bad override exit with one line and leave no directory behind. A multirun sweep is expanded
and every point is checked, so a sweep does not fail on its fifth job.
"""

from __future__ import annotations

import os
import re

from automodel.config import CONFIG_NAME, conf_dir, register_resolvers, validate
from automodel.errors import UserError

_NO_CHECK_FLAGS = ("help", "hydra_help", "info", "shell_completion", "version")


def parse_args(argv: list[str]):
    from hydra._internal.utils import get_args_parser

    def refuse(message: str):  # argparse would print its usage block and exit; one line instead
        raise UserError(f"{message}; automodel takes group=option and key=value overrides and Hydra's flags "
                        "(automodel --help)")

    parser = get_args_parser()
    parser.error = refuse
    args = parser.parse_args(argv)
    for override in args.overrides:
        if override.lstrip("+~").startswith("="):
            raise UserError(f"'{override}': an override needs a key: key=value (e.g. train.max_steps=10)")
    return args


def expand_home(argv: list[str]) -> list[str]:
    """argv with every override value that holds `~` made one Hydra's grammar parses: a leading `~` (or
    `~user`) expanded to the home folder, as a shell would have done had the word not begun with a key, and
    the value quoted (`data.path=~/x.jsonl` -> `data.path='/home/me/x.jsonl'`). Hydra refuses an unquoted `~`
    anywhere in a value ("cannot parse the override"), so a path written as it is written everywhere else
    would never reach the data loader. Each element of a sweep (`a,b`) is treated alike; a value that is
    already quoted, or holds brackets, braces or quotes, is left for Hydra to read as written."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if arg.startswith("-") or not eq or "~" not in value or any(c in value for c in "'\"[]{}()$"):
            out.append(arg)
            continue
        parts = [os.path.expanduser(v) if v.startswith("~") else v for v in value.split(",")]
        out.append(f"{key}=" + ",".join(f"'{v}'" if ("~" in o or v != o) else v
                                         for v, o in zip(parts, value.split(","))))
    return out


def needs_check(args) -> bool:
    return not any(getattr(args, flag, None) for flag in _NO_CHECK_FLAGS)


def sweep_points(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Each job's overrides: one list for a plain run, every combination for a basic-sweeper multirun."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    if any(o.key_or_group.startswith("hydra/sweeper") for o in parsed):
        return []  # another sweeper decides its own points: each job validates itself
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(point) for batch in batches for point in batch]


def compose(overrides: list[str], with_hydra: bool = False):
    """The composed job config for one list of overrides (no run directory, no side effects); with_hydra adds
    the `hydra` node, which costs nothing extra and saves a second composition where its values are wanted."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    register_resolvers()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3", job_name="automodel"):
            return hydra_compose(CONFIG_NAME, overrides=overrides, return_hydra_config=with_hydra)
    except MissingConfigException as e:
        raise UserError(_missing_option_line(e)) from None
    except HydraException as e:
        raise UserError(_hydra_line(e, overrides)) from None
    except (ValueError, TypeError) as e:  # Hydra's defaults list refusing an override it parsed
        raise UserError(f"cannot apply the overrides {' '.join(overrides)}: {' '.join(str(e).split())}; overrides "
                        "are key=value or group=option") from None


def check(argv: list[str]) -> tuple[str, str] | None:
    """Raise UserError (one line) if any job that argv describes has an invalid config. Returns the folder the
    run would write and the key that names it (hydra.run.dir, or a sweep's hydra.sweep.dir), or None where it
    writes none (--cfg) or cannot be known before Hydra runs."""
    args = parse_args(argv)
    if not needs_check(args):
        return None
    points = sweep_points(args.overrides, args.multirun)
    first = None
    for i, point in enumerate(points):
        cfg = compose(point, with_hydra=i == 0)  # the first also answers where the job would write
        validate(cfg)
        if i == 0:
            first = cfg
    if args.cfg or not points:
        return None  # shows a config and writes nothing / another sweeper's points: each job checks itself
    key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
    folder = _hydra_value(first, key)  # the first point's: every point of a sweep shares hydra.sweep.dir
    return (folder, key) if folder else None


def show_sweep_configs(argv: list[str]) -> bool:
    """`-m ... --cfg job`: Hydra refuses the pair with a traceback; print each sweep point's job config instead."""
    from omegaconf import OmegaConf

    args = parse_args(argv)
    if not (args.multirun and args.cfg):
        return False
    if args.cfg != "job":
        raise UserError(f"--cfg {args.cfg} with -m: a sweep shows its jobs' configs with --cfg job; drop -m to see "
                        f"Hydra's config of one run")
    points = sweep_points(args.overrides, True)
    for i, point in enumerate(points):
        cfg = compose(point)
        print(f"# sweep job #{i}: {' '.join(point) or '(no overrides)'}")
        print(OmegaConf.to_yaml(cfg, resolve=False))
    return True


def _hydra_value(cfg, key: str) -> str | None:
    """A hydra.* value as this run would resolve it (None when it needs Hydra's runtime to resolve)."""
    from omegaconf import OmegaConf

    try:
        return str(OmegaConf.select(cfg, key))
    except Exception:  # interpolations only Hydra's run can resolve (${hydra:...}): Hydra will say
        return None


def _missing_option_line(e) -> str:
    missing = getattr(e, "missing_cfg_file", None) or ""
    options = getattr(e, "options", None)
    if "/" in missing:
        group, option = missing.rsplit("/", 1)
        if options is None:  # an option of a list selection (logger=[jsonl,x]): Hydra does not say the choices
            from automodel.options import options as group_options

            options = {o.name for o in group_options(group)}
        if options:
            return f"{group}={option}: no such option; choose one of: {', '.join(sorted(options))}"
    return str(e).splitlines()[0]


def _hydra_line(e, overrides: list[str]) -> str:
    text, cause = str(e), e.__cause__
    while cause is not None:  # Hydra wraps OmegaConf's error; the useful words are in the chain
        text, cause = f"{text}\n{cause}", cause.__cause__
    m = re.search(r"Could not override '([^']+)'", text)
    if m and "not in struct" in text:
        return _unknown_key_line(m.group(1), overrides)
    m = re.search(r"Could not append to config. An item is already at '([^']+)'", text)
    if m:
        return f"+{m.group(1)}: the key already exists; drop the '+' to override it"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    m = re.match(r"Ambiguous value for argument '([^']+)'", first)
    if m:
        return (f"{m.group(1)}: a comma-separated value is a sweep: add -m to sweep (automodel -m {m.group(1)}); "
                "a list is key=[a,b], a text with commas key='a,b'")
    if "LexerNoViableAlt" in first or "mismatched input" in first or "no viable alternative" in first:
        bad = next((o for o in overrides if o in text), " ".join(overrides))
        quote = (f"; quote a value that holds '~' for Hydra (\"{bad.split('=', 1)[0]}='...'\")" if "~" in
                 bad.partition("=")[2] else "")
        return (f"cannot parse the override '{bad}': overrides are key=value with a dotted key "
                f"(train.max_steps=10) or group=option (parallel=fsdp2){quote}")
    return first


def _unknown_key_line(key: str, overrides: list[str]) -> str:
    from omegaconf import OmegaConf

    parent, _, leaf = key.rpartition(".")
    rest = [o for o in overrides if not o.lstrip("+~").startswith(key)]
    valid: list[str] = []
    try:
        cfg = compose(rest)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        valid = [k for k in node.keys()] if hasattr(node, "keys") else []
    except UserError:
        pass
    where = key if parent else leaf
    hint = f"; valid keys are: {', '.join(str(k) for k in valid)}" if valid else ""
    return f"{where}: unknown key{hint}"
