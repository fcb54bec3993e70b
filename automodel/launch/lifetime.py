"""A job's processes live and die together, and one job at a time writes a run directory.

Ranks die with their launcher. torch's elastic agent (what `launcher.nproc_per_node` and `torchrun` run) starts
every rank in a session of its own, so killing the launcher, even its whole process group with SIGKILL, left the
ranks training and writing into the run dir. Each rank asks the kernel (Linux `PR_SET_PDEATHSIG`) to SIGKILL it
when the agent that started it dies, however it dies.

One job per run directory. Two jobs writing one run dir corrupt it (one's `keep_last` pruned the checkpoint the
other was reading). The job's first process takes an exclusive `flock` on `<run dir>/.lock` for the whole run:
the kernel drops it when the process ends, kill -9 included, so a lock is never stale. A second job is refused in
one line naming the holder. The launcher takes it for its ranks (they see AUTOMODEL_RUN_LOCK); under torchrun or
srun rank 0 takes it and tells the others.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import time

from automodel.errors import UserError

LOCK_NAME = ".lock"
_HELD_ENV = "AUTOMODEL_RUN_LOCK"  # set by a launcher holding the lock for the ranks it starts
_HELD: dict[str, int] = {}  # run dir -> fd of the lock this process holds (kept open: closing would release it)
_PR_SET_PDEATHSIG = 1


class RunDirBusy(UserError):
    """Another job holds the run dir: nothing in it may be touched, not even to clean up."""


def die_with_parent() -> None:
    """Inside a rank started by torch's elastic agent: be SIGKILLed when the agent dies."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl (a libc without it): nothing more this process can do
        return
    if parent == 1 or os.getppid() != parent:  # the agent died before the request took effect
        os._exit(1)


def take(run_dir: str, key: str = "hydra.run.dir") -> None:
    """Before Hydra writes anything there: claim the run dir (automodel.fs.claim: make it, noting what was in it)
    and hold its lock for this process's lifetime; or refuse in one line, touching nothing: a folder that cannot
    be made, or that another job holds. Taking the lock first is what keeps a job started at the same instant
    from writing into the folder of the one that won."""
    from automodel import fs

    path = os.path.abspath(run_dir)
    if os.environ.get(_HELD_ENV) == path:  # a rank of the launcher that holds it
        return
    try:
        fs.claim(path)
    except OSError as e:
        where = f"{e.filename}: " if e.filename and os.path.abspath(e.filename) != path else ""
        raise UserError(f"{key}={run_dir} cannot be made ({where}{e.strerror.lower()}); choose a folder this user "
                        "can write") from None
    try:
        acquire(path, key)
    except RunDirBusy:
        fs.release_claim(path)  # the folder is the other job's: a refusal here must not touch it
        raise
    except UserError:  # e.g. a folder this user may not write into: the folders made for it go again
        fs.undo(path)
        raise


def acquire(run_dir: str, key: str = "hydra.run.dir") -> None:
    """Hold `run_dir` for this process's lifetime, or raise UserError naming the job that holds it."""
    import fcntl

    if os.environ.get(_HELD_ENV) == os.path.abspath(run_dir) or os.path.abspath(run_dir) in _HELD:
        return
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write into the run dir {run_dir}: {e.strerror.lower()}; choose a writable {key}") \
            from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(fd)
        os.close(fd)
        raise _busy(run_dir, holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    _HELD[os.path.abspath(run_dir)] = fd


def hand_to_children(run_dir: str) -> None:
    """The ranks this process launches run under its lock."""
    os.environ[_HELD_ENV] = os.path.abspath(run_dir)


def release(run_dir: str, refused: bool = False) -> None:
    """Let go of the run dir. `refused`: the run stopped before it began; if the lock is all it left there,
    the lock file goes too, so a refusal leaves the folder as it found it."""
    fd = _HELD.pop(os.path.abspath(run_dir), None)
    if fd is None:
        return
    if refused and os.path.isdir(run_dir) and os.listdir(run_dir) == [LOCK_NAME]:
        os.unlink(os.path.join(run_dir, LOCK_NAME))  # while still held: no other job can have taken it
    os.close(fd)


def acquire_for_job(run_dir: str, is_main: bool, world_size: int) -> None:
    """Collective: rank 0 takes the lock; every rank raises the same UserError if it cannot."""
    problem = None
    if is_main:
        try:
            acquire(run_dir)
        except UserError as e:
            problem = (type(e) is RunDirBusy, str(e))
    if world_size > 1:
        import torch.distributed as dist

        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise (RunDirBusy if problem[0] else UserError)(problem[1])


def _busy(run_dir: str, holder: str) -> RunDirBusy:
    return RunDirBusy(f"the run dir {run_dir} is in use by another automodel job ({holder}); wait for it to end, "
                      "stop it, or choose another hydra.run.dir")


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "a process that holds its lock"
