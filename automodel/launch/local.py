"""`launcher.nproc_per_node=N`: start N ranks of this job through torch's elastic launcher.

The relaunch happens inside the Hydra job, after validation and after Hydra chose the job's directory,
so a single run and every job of a multirun sweep get their own N-rank world writing into the same
directory Hydra made. A process that already belongs to a distributed launch (torchrun, or SLURM with
several tasks) is never launched again.

The ranks live in sessions of their own, so a terminal's Ctrl-C (or a SIGTERM to this process) reaches only
this launcher. It takes SIGINT and SIGTERM from torch's agent (which would pass them on for 30 s and then kill)
and forwards a stop to each rank as SIGINT: a rank that is training saves at the next step boundary with the
others (engine/preemption.py), a rank still setting up ends at once, and a rank not yet that far (still
importing) is killed, having nothing to save. The ranks leave what they did in AUTOMODEL_ERROR_DIR; the launcher
prints the one line and exits with 128+signal. A second signal kills the ranks and ends the launcher at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid

from automodel import stop_signals
from automodel.errors import UserError
from automodel.stop_signals import Stopped

log = logging.getLogger("automodel")
_ERROR_DIR = "AUTOMODEL_ERROR_DIR"  # where the ranks of a relaunch leave their one-line errors


@dataclasses.dataclass
class LauncherConfig:
    nproc_per_node: int = 1  # ranks to start on this machine (1: run in this process)
    fake_world_size: int = 0  # >0: a rehearsal as rank 0 of that many ranks (torch's fake process group)
    join_timeout_s: float = 300  # how long the ranks of a multi-process job wait for each other to start


def is_first_process() -> bool:
    """Not a later rank of a launched world (torchrun, srun, this launcher's ranks): rank 0, or a lone process."""
    return os.environ.get("RANK", "0") == "0"


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
    args.signals_to_handle = "SIGHUP,SIGQUIT"  # SIGINT and SIGTERM are this launcher's own (_Forward)
    config, cmd, cmd_args = config_from_args(args)
    log.info("launching %d local ranks (torch.distributed.run --standalone --nproc-per-node=%d)", n, n)
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)  # the ranks report their own errors
    errors = tempfile.mkdtemp(prefix="automodel-errors-")
    os.environ[_ERROR_DIR] = errors  # the ranks inherit it: their one-line errors come back here
    forward = _Forward(errors, out_dir)
    try:
        elastic_launch(config, cmd)(*cmd_args)
        forward.end(completed=True)  # the ranks stopped cleanly on a signal: its line, 128+signal
    except ChildFailedError as e:
        if not _first_error(errors):  # no rank failed: a stop ended some with 128+signal, the agent the others
            forward.end(completed=False)
        codes = sorted({f.exitcode for f in e.failures.values()})
        if (2 in codes and all(c == 2 or c < 0 for c in codes)) or forward.signum:
            from automodel import fs

            fs.undo(out_dir)  # here, once every rank has stopped using it (this process holds its lock)
            first = _first_error(errors)
            if first:
                print(f"automodel: error: {first}", file=sys.stderr, flush=True)
            sys.exit(2)  # a user error (the agent then stopped the other ranks)
        ranks = ", ".join(str(r) for r in sorted(e.failures))
        raise SystemExit(f"automodel: error: rank(s) {ranks} failed with exit code(s) {codes}; see their output above")
    finally:
        forward.close()
        elastic_log.setLevel(level)
        os.environ.pop(_ERROR_DIR, None)
        shutil.rmtree(errors, ignore_errors=True)
    return final_loss(out_dir)


class _Forward:
    """This launcher's SIGINT/SIGTERM while its ranks run (see the module docstring)."""

    def __init__(self, errors: str, out_dir: str):
        self.errors, self.out_dir = errors, out_dir
        self.signum = None
        self._said = False
        self._previous = stop_signals.take(stop_signals.STOP_SIGNALS, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        ranks = _children()
        if self.signum is not None:  # the second: everything ends now (one line, unless the first said it)
            if not self._said:
                stop_signals.say(_describe({"phase": "at once"}, stop_signals.name(signum), self.out_dir))
            for pid in ranks:
                _kill_group(pid, signal.SIGKILL)
            shutil.rmtree(self.errors, ignore_errors=True)
            os._exit(128 + signum)
        self.signum = signum
        stop_signals.quiet_exit()
        if not ranks and not self._started():  # none started yet: nothing to save
            self._said = True
            stop_signals.say(_describe({"phase": "set-up"}, stop_signals.name(signum), self.out_dir))
            raise Stopped(signum)
        for pid in ranks:
            if os.path.exists(os.path.join(self.errors, f"ready.{pid}")):
                _kill(pid, signal.SIGINT)  # it stops at the next step boundary with the others
            else:
                _kill_group(pid, signal.SIGKILL)  # still importing, before its handlers: nothing to save

    def _started(self) -> bool:
        """Whether any rank got as far as its signal handlers."""
        return any(n.startswith("ready.") for n in os.listdir(self.errors))

    def end(self, completed: bool) -> None:
        """After the ranks have ended (`completed`: all of them with exit code 0): if a stop signal came (here,
        or to a rank), its one line and the exit code."""
        reports = _stop_reports(self.errors)
        if self.signum is None and not reports:
            return
        # no report: the ranks had finished when the signal came, or were killed before their handlers
        report = reports[0] if reports else {"phase": "finished" if completed else "set-up"}
        signame = stop_signals.name(self.signum) if self.signum else report["signal"]
        self._said = True
        stop_signals.say(_describe(report, signame, self.out_dir))
        raise Stopped(self.signum or signal.Signals[signame])

    def close(self) -> None:
        stop_signals.run_ended()
        if self.signum is None:  # after a stop, a second signal while this process ends still ends it at once
            stop_signals.give_back(self._previous)


def _describe(report: dict, signame: str, out_dir: str) -> str:
    from automodel.engine.preemption import describe

    return describe(report, signame, out_dir)


def _stop_reports(folder: str) -> list[dict]:
    """What the ranks' stops did, rank 0's first."""
    names = sorted((n for n in os.listdir(folder) if n.startswith("stop.rank") and not n.endswith(".tmp")),
                   key=lambda n: int(n[len("stop.rank"):]))
    reports = []
    for name in names:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            reports.append(json.load(f))
    return reports


def _children() -> list[int]:
    """The processes this one started (the ranks: torch's agent runs in this process)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _kill_group(pid: int, signum: int) -> None:
    """The rank and what it started (it leads a session of its own)."""
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        _kill(pid, signum)


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
    """The line of the rank that failed first (the others were stopped, or failed alike after it). A rank that
    only saw another end first says so: its line is shown when no other rank said anything."""
    from automodel.engine.preemption import PEER_LOST_LINE

    found = sorted((os.path.join(folder, n) for n in os.listdir(folder)
                    if n.startswith("rank") and not n.endswith(".tmp")), key=lambda p: os.stat(p).st_mtime_ns)
    lines = []
    for path in found:
        with open(path, encoding="utf-8") as f:
            lines.append(f.read().strip())
    return next((ln for ln in lines if PEER_LOST_LINE not in ln), lines[0] if lines else None)


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
