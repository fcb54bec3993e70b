"""`launcher.nproc_per_node=N`: start N ranks of this job through torch's elastic launcher.

The relaunch happens inside the Hydra job, after validation and after Hydra chose the job's directory,
so a single run and every job of a multirun sweep get their own N-rank world writing into the same
directory Hydra made. A process that already belongs to a distributed launch (torchrun, or SLURM with
several tasks) is never launched again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid

from automodel.errors import UserError

log = logging.getLogger("automodel")
_ERROR_DIR = "AUTOMODEL_ERROR_DIR"  # where the ranks of a relaunch leave their one-line errors


@dataclasses.dataclass
class LauncherConfig:
    nproc_per_node: int = 1  # ranks to start on this machine (1: run in this process)
    fake_world_size: int = 0  # >0: a rehearsal as rank 0 of that many ranks (torch's fake process group)
    join_timeout_s: float = 300  # how long the ranks of a multi-process job wait for each other to start


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def already_launched() -> bool:
    """True inside torchrun/torch.distributed.run, a spawner that set WORLD_SIZE, or a multi-task SLURM step."""
    # SLURM_STEP_NUM_TASKS: tasks of this job *step* (srun); a batch script (one process) is not a world
    return "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def should_relaunch(launcher: LauncherConfig) -> bool:
    if launcher.nproc_per_node < 1:
        raise UserError(f"launcher.nproc_per_node={launcher.nproc_per_node} must be at least 1")
    if not launcher.join_timeout_s > 0:
        raise UserError(f"launcher.join_timeout_s={launcher.join_timeout_s} must be a positive number of seconds")
    if launcher.fake_world_size < 0:
        raise UserError(f"launcher.fake_world_size={launcher.fake_world_size} must be 0 (off) or a world size")
    if launcher.fake_world_size:
        if launcher.nproc_per_node > 1 or already_launched():
            raise UserError("launcher.fake_world_size rehearses one rank in this one process; drop "
                            "launcher.nproc_per_node and start it without torchrun/srun")
        return False
    if launcher.nproc_per_node == 1:
        return False
    if already_launched():
        world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
        if world != launcher.nproc_per_node and os.environ.get("RANK", "0") == "0":
            log.warning("launcher.nproc_per_node=%d ignored: this process is already one of %d launched ranks",
                        launcher.nproc_per_node, world)
        return False
    return True


def relaunch(launcher: LauncherConfig, job_overrides: list[str], out_dir: str) -> float | None:
    """Run this job again as N local ranks writing into out_dir, through torch's elastic launcher (what
    `torchrun --standalone` runs, called in-process so a failed rank is reported here in one line)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    n = launcher.nproc_per_node
    # ranks share this machine's cores; torchrun would otherwise warn and pin every rank to one thread
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={n}", "-m", "automodel", *job_overrides, f"hydra.run.dir={out_dir}"]
    )
    # what torch.distributed.run.run() does for --standalone: a private c10d rendezvous on a free port
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    config, cmd, cmd_args = config_from_args(args)
    log.info("launching %d local ranks (torch.distributed.run --standalone --nproc-per-node=%d)", n, n)
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)  # the ranks report their own errors
    errors = tempfile.mkdtemp(prefix="automodel-errors-")
    os.environ[_ERROR_DIR] = errors  # the ranks inherit it: their one-line errors come back here
    try:
        elastic_launch(config, cmd)(*cmd_args)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        if 2 in codes and all(c == 2 or c < 0 for c in codes):
            from automodel.engine import run_dir

            run_dir.discard_if_untouched(out_dir)  # here, once every rank has stopped using it
            first = _first_error(errors)
            if first:
                print(f"automodel: error: {first}", file=sys.stderr, flush=True)
            sys.exit(2)  # a user error (the agent then stopped the other ranks)
        ranks = ", ".join(str(r) for r in sorted(e.failures))
        raise SystemExit(f"automodel: error: rank(s) {ranks} failed with exit code(s) {codes}; see their output above")
    finally:
        elastic_log.setLevel(level)
        os.environ.pop(_ERROR_DIR, None)
        shutil.rmtree(errors, ignore_errors=True)
    return final_loss(out_dir)


def report_to_launcher(message: str) -> bool:
    """In a rank this launcher started: leave the one-line error for it to print; False elsewhere."""
    folder = os.environ.get(_ERROR_DIR)
    if not folder or not os.path.isdir(folder):
        return False
    path = os.path.join(folder, f"rank{os.environ.get('RANK', '0')}")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(message)
    os.replace(path + ".tmp", path)  # whole or absent: the launcher never reads half a line
    return True


def _first_error(folder: str) -> str | None:
    """The line of the rank that failed first (the others were stopped, or failed alike after it)."""
    found = [os.path.join(folder, n) for n in os.listdir(folder) if not n.endswith(".tmp")]
    if not found:
        return None
    first = min(found, key=lambda p: os.stat(p).st_mtime_ns)
    with open(first, encoding="utf-8") as f:
        return f.read().strip()


def final_loss(out_dir: str) -> float | None:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    last = None
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            last = record.get("loss", last)
    return last
