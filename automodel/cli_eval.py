"""`automodel eval RUN_OR_FOLDER [eval.KEY=VALUE ...]`: lm-evaluation-harness tasks on a trained model.

RUN_OR_FOLDER is a run directory (its newest state: the final/ export, or a later checkpoint), a
checkpoints/step_N folder (exported first, as `automodel export` would), or any exported HF folder.
The settings are the `eval` section of the run's config (conf/config.yaml's for a bare folder), with the
overrides on top: the same keys train.eval_every uses. Offline, the bundled tiny_tasks and task YAMLs with
local data files (eval.include_path) work; lm-eval's catalogue tasks need their hub datasets.

The scores are printed as lm-eval's table and written to <run>/eval/<final|step_N>.json (or --output).
"""

from __future__ import annotations

import argparse
import json
import os

from automodel.errors import UserError


def eval_config(config_yaml: str | None, overrides: list[str]):
    """The EvalConfig: conf/config.yaml's eval section < the run's < the command line's `eval.KEY=VALUE`s."""
    from omegaconf import DictConfig, OmegaConf

    from automodel import registry
    from automodel.config import CONFIG_NAME, conf_dir
    from automodel.evaluation.config import EvalConfig, check

    for item in overrides:
        if not item.startswith("eval.") or "=" not in item:
            raise UserError(f"'{item}' is not an eval setting; automodel eval takes eval.KEY=VALUE overrides, e.g. "
                            "eval.tasks=[tiny_tasks] eval.limit=50")
    layers = [OmegaConf.load(os.path.join(conf_dir(), f"{CONFIG_NAME}.yaml")).get("eval", {})]
    if config_yaml:
        layers.append(OmegaConf.create(config_yaml).get("eval", {}))
    try:
        layers.append(OmegaConf.from_dotlist(overrides).get("eval", {}))
    except Exception as e:  # a value YAML cannot parse
        raise UserError(f"eval overrides: {str(e).splitlines()[0]}") from None
    merged = OmegaConf.merge(*[x if isinstance(x, DictConfig) else OmegaConf.create(x or {}) for x in layers])
    settings = registry.validate(EvalConfig, OmegaConf.to_container(merged), "eval")
    check(settings)
    return settings


def write_results(results: dict, path: str) -> None:
    """lm-eval's whole results (configs, versions, per-task numbers) as JSON, written whole or not at all."""
    from lm_eval.utils import handle_non_serializable

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    text = json.dumps(results, indent=2, default=handle_non_serializable)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv: list[str]) -> None:
    from automodel.generate import ArgumentParser  # argparse errors as one line, exit code 2

    parser = ArgumentParser(prog="automodel eval", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", metavar="RUN_OR_FOLDER",
                        help="a run directory, a <run>/checkpoints/step_N folder, or an exported HF folder")
    parser.add_argument("overrides", metavar="eval.KEY=VALUE", nargs="*",
                        help="e.g. eval.tasks=[tiny_tasks] eval.limit=50 eval.include_path=my_tasks/")
    parser.add_argument("--output", metavar="FILE", help="the results JSON (default: <run>/eval/<label>.json)")
    parser.add_argument("--samples", action="store_true",
                        help="also write every example's prompt, response and score to the results JSON")
    args = parser.parse_args(argv)

    from automodel.config import register_resolvers
    from automodel.evaluation import harness, target

    register_resolvers()
    harness.require_lm_eval()
    chosen = target.locate(args.target)
    settings = eval_config(chosen.config_yaml, args.overrides)
    harness.quiet()
    manager = harness.task_manager(settings)  # unknown tasks are refused before a checkpoint is exported
    with target.model_folder(chosen) as model_dir:
        print(f"automodel eval: {model_dir} ({chosen.label}); tasks {', '.join(settings.tasks)}", flush=True)
        results = harness.evaluate(model_dir, settings, manager, samples=args.samples)
    from lm_eval.utils import make_table

    print(make_table(results))
    output = args.output or (os.path.join(chosen.run_dir, "eval", f"{chosen.label}.json") if chosen.run_dir else None)
    if output:
        write_results(results, output)
        print(f"results written to {output}")
    for name, value in harness.scores(results).items():
        print(f"{name} {value:.4f}")
