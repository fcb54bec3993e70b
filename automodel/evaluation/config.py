"""The `eval` section: what lm-evaluation-harness runs, for `automodel eval` and for train.eval_every alike."""

from __future__ import annotations

import dataclasses
import os
from typing import List, Optional

from automodel.errors import UserError


@dataclasses.dataclass
class EvalConfig:
    tasks: List[str] = dataclasses.field(default_factory=lambda: ["tiny_tasks"])  # lm-eval task or group names
    include_path: Optional[str] = None  # a folder of your own task YAMLs (their local data files work offline)
    limit: Optional[float] = None  # examples per task: an int, or a fraction below 1; null: all
    num_fewshot: Optional[int] = None  # null: each task's own setting
    batch_size: int = 16
    device: str = "auto"  # auto (cuda when there is one) | cpu | cuda
    timeout_minutes: float = 60.0  # train.eval_every: how long the other ranks wait for rank 0's evaluation


def check(e: EvalConfig) -> None:
    if not e.tasks or not all(isinstance(t, str) and t.strip() for t in e.tasks):
        raise UserError(f"eval.tasks={list(e.tasks)} must name at least one lm-eval task, e.g. eval.tasks=[tiny_tasks]")
    if e.include_path is not None and not os.path.isdir(os.path.expanduser(e.include_path)):
        raise UserError(f"eval.include_path='{e.include_path}' is not a folder; give a folder of lm-eval task YAML "
                        "files, or null")
    if e.limit is not None and not (e.limit > 0 and (e.limit < 1 or float(e.limit).is_integer())):
        raise UserError(f"eval.limit={e.limit} must be a whole number of examples, a fraction between 0 and 1, or "
                        "null (all)")
    if e.num_fewshot is not None and e.num_fewshot < 0:
        raise UserError(f"eval.num_fewshot={e.num_fewshot} must be >= 0, or null (each task's own)")
    if e.batch_size < 1:
        raise UserError(f"eval.batch_size={e.batch_size} must be at least 1")
    if e.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"eval.device='{e.device}' is not one of: auto, cpu, cuda")
    if not e.timeout_minutes > 0:
        raise UserError(f"eval.timeout_minutes={e.timeout_minutes} must be positive")
