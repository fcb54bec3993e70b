"""At the end of a Hydra multirun: one table of the swept values and each job's final losses.

Printed to the console and written as `summary.csv` in the sweep directory. Reads only what each job
left on disk (`.hydra/overrides.yaml`, `metrics.jsonl`), so it works the same for jobs that ran in this
process, in local subprocesses, or on a SLURM cluster with a shared file system.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from hydra.experimental.callback import Callback


def _overrides(job_dir: str) -> dict[str, str]:
    path = os.path.join(job_dir, ".hydra", "overrides.yaml")
    if not os.path.isfile(path):
        return {}
    from omegaconf import OmegaConf

    pairs = {}
    for item in OmegaConf.load(path):
        key, _, value = str(item).partition("=")
        pairs[key.lstrip("+~")] = value
    return pairs


def _final_metrics(job_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    path = os.path.join(job_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            for key in ("step", "loss", "val_loss"):
                if key in record:
                    out[key] = record[key]
    return out


def summarize(sweep_dir: str) -> list[dict[str, Any]]:
    jobs = sorted((d for d in os.listdir(sweep_dir)  # not .submitit/ (SLURM launcher's scripts and logs)
                   if os.path.isdir(os.path.join(sweep_dir, d)) and not d.startswith(".")),
                  key=lambda d: (not d.isdigit(), int(d) if d.isdigit() else 0, d))
    rows = []
    for job in jobs:
        job_dir = os.path.join(sweep_dir, job)
        metrics = _final_metrics(job_dir)
        rows.append({"job": job, "overrides": _overrides(job_dir), "metrics": metrics})
    keys = sorted({k for r in rows for k in r["overrides"]})
    swept = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1] or keys
    table = []
    for r in rows:
        m = r["metrics"]
        table.append({"job": r["job"], **{k: r["overrides"].get(k, "") for k in swept},
                      "steps": m.get("step", ""), "final_loss": m.get("loss", ""),
                      "final_val_loss": m.get("val_loss", ""), "status": "ok" if "loss" in m else "no metrics"})
    return table


def write(sweep_dir: str, table: list[dict[str, Any]]) -> str:
    path = os.path.join(sweep_dir, "summary.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["job"])
        writer.writeheader()
        writer.writerows(table)
    return path


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = str(config.hydra.sweep.dir)
        if not os.path.isdir(sweep_dir):
            return
        table = summarize(sweep_dir)
        if not table:
            return
        path = write(sweep_dir, table)
        from rich.console import Console
        from rich.table import Table

        view = Table(title=f"sweep summary ({len(table)} jobs)")
        for column in table[0]:
            view.add_column(column)
        for row in table:
            view.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()))
        Console(width=None if os.isatty(1) else 200).print(view)
        print(f"sweep summary written to {path}", flush=True)
