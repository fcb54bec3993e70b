"""lm-evaluation-harness on an HF folder: the scores as flat numbers every logger takes, and lm-eval's own results.

lm-eval is an optional extra (`pip install 'automodel[eval]'`), imported only here. Task YAMLs come from the
bundled folder (tiny_tasks: offline), `eval.include_path` (your own, with local data files), and lm-eval's
built-in catalogue; the catalogue (~15k YAML files, ~10 s to index) is read only when a task is not local.
"""

from __future__ import annotations

import importlib.util
import logging
import os

from automodel.errors import UserError
from automodel.evaluation.config import EvalConfig

log = logging.getLogger("automodel")

BUNDLED_TASKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "resources", "eval_tasks")


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("evaluation needs lm-evaluation-harness, which is not installed: "
                        "pip install 'automodel[eval]'")


def task_manager(e: EvalConfig):
    """A TaskManager that knows every task in eval.tasks, or the one-line refusal naming the unknown one."""
    from lm_eval.tasks import TaskManager

    include = [BUNDLED_TASKS] + ([os.path.abspath(os.path.expanduser(e.include_path))] if e.include_path else [])
    local = TaskManager(include_path=include, include_defaults=False, verbosity="ERROR")
    if all(local.match_tasks([name]) for name in e.tasks):
        return local
    catalogue = TaskManager(include_path=include, verbosity="ERROR")
    for name in e.tasks:
        if not catalogue.match_tasks([name]):
            import difflib

            close = difflib.get_close_matches(name, catalogue.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"eval.tasks: '{name}' is not an lm-eval task{hint}; name tasks from `lm-eval ls tasks`, "
                            f"the bundled tiny_tasks, or YAML files in eval.include_path")
    return catalogue


def device(e: EvalConfig) -> str:
    import torch

    if e.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if e.device == "cuda" and not torch.cuda.is_available():
        raise UserError("eval.device=cuda but no CUDA device is visible; use eval.device=cpu (or auto)")
    return e.device


def evaluate(model_dir: str, e: EvalConfig, manager=None, samples: bool = False) -> dict:
    """lm-eval's results dict (`results`, `configs`, ...) for the HF model in `model_dir`; `samples`: with each
    example's document, response and score (`samples`)."""
    require_lm_eval()
    quiet()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    manager = manager or task_manager(e)
    # automodel trains on [bos] + tokens whenever the tokenizer has a bos token (data/pairs.py), whatever the
    # tokenizer's own special-token rule: the prompts are scored the same way
    try:
        bos = AutoTokenizer.from_pretrained(model_dir).bos_token_id is not None
        lm = HFLM(pretrained=model_dir, device=device(e), batch_size=e.batch_size, trust_remote_code=False,
                  add_bos_token=bos)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"'{model_dir}' could not be loaded as a model: {' '.join(str(err).split())[:300]}") from None
    limit = int(e.limit) if e.limit is not None and e.limit >= 1 else e.limit
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=list(e.tasks), task_manager=manager, limit=limit,
                                       num_fewshot=e.num_fewshot, log_samples=samples, bootstrap_iters=0)
    except (OSError, ConnectionError) as err:  # a catalogue task's dataset lives on the hub
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE")
        why = "offline" if offline else "unreachable"
        raise UserError(f"eval.tasks={list(e.tasks)}: a task's dataset could not be loaded (the hub is {why}?): "
                        f"{' '.join(str(err).split())[:200]}; offline, use task YAMLs with local data files "
                        "(eval.include_path)") from None


def scores(results: dict) -> dict[str, float]:
    """{"eval/<task>/<metric>": value}: lm-eval's "metric,filter" keys, stderr left out (it stays in the JSON);
    a filter other than lm-eval's default "none" is kept as a suffix."""
    import math

    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            name = f"eval/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")
            if math.isfinite(float(value)):
                flat[name] = float(value)
    return flat


def quiet() -> None:
    """lm-eval's own INFO lines and warnings (one per task about its custom dataset) say nothing to act on."""
    for name in ("lm-eval", "lm_eval", "evaluate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
