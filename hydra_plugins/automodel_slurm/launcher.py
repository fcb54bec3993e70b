"""`hydra/launcher=slurm`: hydra-submitit-launcher's SLURM launcher, made to run automodel jobs.

A multirun becomes a job array, one array task per sweep point, each with `tasks_per_node` x `nodes`
SLURM tasks forming one torch.distributed world. Added to the plain submitit launcher:

* on the compute node, where automodel's CLI never ran: automodel's resolvers, the sweep directory the
  submitter chose (`${stamp:...}` would name another time there), and the torch.distributed variables;
* requeue and resume: on SLURM's warning signal (`--signal=USR2@signal_delay_s` before the time limit,
  or `scancel --signal=USR2` for a preemption), the ranks save a checkpoint at the end of the step they
  are in (automodel/engine/preemption.py), then submitit calls `checkpoint()` on global rank 0, which
  hands back the same job with `checkpoint.resume=auto`; submitit then requeues it. The requeued job
  continues from that checkpoint; batches are a pure function of (seed, step), so it ends where an
  uninterrupted run ends.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher

from automodel.launch.slurm import export_torch_env

_FRESH = {f"checkpoint.resume={v}" for v in ("null", "none", "false", "")}
log = logging.getLogger("automodel")


@contextlib.contextmanager
def _announcing_jobs(first_idx: int):
    """While the base launcher submits and then waits for every job: say each job id and its log as soon as it
    is submitted (the wait can be hours in a queue). Scoped to this launch; submitit is as it was after."""
    import submitit

    submit = submitit.AutoExecutor.map_array

    def map_array(executor, *args, **kwargs):
        jobs = submit(executor, *args, **kwargs)
        for i, job in enumerate(jobs):
            log.info("sweep job #%d: SLURM job %s, log %s", first_idx + i, job.job_id, job.paths.stdout)
        log.info("waiting for %d SLURM job(s) (squeue --me shows them)", len(jobs))
        return jobs

    submitit.AutoExecutor.map_array = map_array
    try:
        yield
    finally:
        submitit.AutoExecutor.map_array = submit


def _say_refusals(returns, first_idx: int) -> None:
    """A job refused on the cluster (bad data, say) returns its UserError: one line here, exit code 2, as for a run
    started by hand, instead of Hydra's report of a failed job."""
    import sys

    from hydra.core.utils import JobStatus

    from automodel.errors import UserError

    for i, ret in enumerate(returns):
        error = getattr(ret, "_return_value", None)
        if ret.status == JobStatus.FAILED and isinstance(error, UserError):
            print(f"automodel: error: sweep job #{first_idx + i}: {error}", file=sys.stderr, flush=True)
            sys.exit(error.exit_code)


class SlurmLauncher(_SubmititSlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher, made to run automodel jobs (see the module docstring)."""

    def launch(self, job_overrides, initial_job_idx):
        # `${stamp:...}` would give another time on the compute node: pin the directory chosen here
        self._sweep_dir = str(self.config.hydra.sweep.dir)
        self._resumable = "resume" in self.config.get("checkpoint", {})
        with _announcing_jobs(initial_job_idx):
            returns = super().launch(job_overrides, initial_job_idx)
        _say_refusals(returns, initial_job_idx)
        return returns

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state) -> Any:
        from automodel.config import register_resolvers

        register_resolvers()  # on the compute node, where automodel's CLI did not run
        export_torch_env()
        overrides = [*sweep_overrides, f"hydra.sweep.dir='{self._sweep_dir}'"]
        return super().__call__(overrides, job_dir_key, job_num, job_id, singleton_state)

    def checkpoint(self, sweep_overrides, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on rank 0 when the job is signalled: the job to requeue in its place."""
        overrides = list(sweep_overrides)
        if self._resumable:  # continue from the run's latest save, unless the job names its own checkpoint
            overrides = [o for o in overrides if o.lstrip("+~").lower() not in _FRESH]
            if not any(o.lstrip("+~").startswith("checkpoint.resume=") for o in overrides):
                overrides.append("checkpoint.resume=auto")
        return super().checkpoint(overrides, *args, **kwargs)
