"""Who am I in the job: rank, world size and device, from torchrun's (or a spawner's) environment.

Every rank runs the same program. A process started without a launcher is a world of one and still gets
a process group (an in-memory store), so the engine has a single code path for one process and for many.

The ranks meet through a TCP store at MASTER_ADDR:MASTER_PORT (what torch's env:// does), with a deadline of
its own: `launcher.join_timeout_s`. A shell left with `WORLD_SIZE=2 RANK=0` by an earlier torchrun or SLURM
session would otherwise wait 30 minutes in silence for a rank that will never come. Each rank that reaches
the store leaves its number there, so the one line at the deadline names the ranks missing and the
variables that made this process think it was one of many.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import time

from automodel import stop_signals
from automodel.errors import UserError


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: "object"  # torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CREATED_HERE = {"group": False}  # whether this module made the default group (and so must destroy it)


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _backend(device_type: str) -> str:
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def _device(kind: str, local_rank: int):
    import torch

    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(device: str = "auto", fake_world_size: int = 0, join_timeout_s: float = 300) -> DistEnv:
    """Join (or create) the default process group; idempotent.

    `fake_world_size` > 0: this process is rank 0 of a world of that size under torch's fake process group
    (collectives return at once and move no data): real shapes and memory for one rank, no other ranks.
    `join_timeout_s`: how long the ranks of a multi-process launch wait for each other before one line says
    which ranks never came (launcher.join_timeout_s)."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device, local_rank)
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    world = launched_world_size()
    timeout = datetime.timedelta(minutes=int(os.environ.get("AUTOMODEL_DIST_TIMEOUT_MIN", "30")))
    if fake_world_size:
        from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=fake_world_size)
    elif world == 1:
        dist.init_process_group(_backend(dev.type), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:  # env:// from the launcher, with a deadline for the ranks to meet
        store, rank = _rendezvous(world, join_timeout_s)
        dist.init_process_group(_backend(dev.type), store=dist.PrefixStore("default_pg", store), rank=rank,
                                world_size=world, timeout=timeout)
    _CREATED_HERE["group"] = True
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def shutdown(clean: bool = False) -> None:
    """Destroy the default group if automodel created it (a caller's own group, as in tests, is left alone).

    After a clean run every rank first waits for the others: a rank tearing gloo down while a peer still
    uses its connections can make that peer abort at exit ('terminate called without an active exception')."""
    import torch.distributed as dist

    if _CREATED_HERE["group"] and dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
        _CREATED_HERE["group"] = False


def share_run_stamp(argv: list[str] | None = None) -> None:
    """Make every rank of a multi-process launch use rank 0's clock for `${stamp:...}` run-dir names.

    Without this, ranks that start a second apart would each create their own `outputs/<time>` folder.
    `argv`: the command line's overrides (default sys.argv[1:]), read for launcher.join_timeout_s.
    """
    if launched_world_size() == 1:
        return
    import sys

    import torch.distributed as dist

    from automodel.config import set_run_stamp

    _check_can_meet(launched_world_size())  # before composing: a stale WORLD_SIZE alone is one line at once
    init("auto", join_timeout_s=_join_timeout_from(sys.argv[1:] if argv is None else argv))
    box = [time.time()]
    dist.broadcast_object_list(box, src=0)
    set_run_stamp(box[0])


# what makes a process think it is one rank of many (values shown in the one line: none of them is a secret)
_LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "SLURM_JOB_ID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_PROCID")


def _launch_vars() -> str:
    return " ".join(f"{k}={os.environ[k]}" for k in _LAUNCH_VARS if k in os.environ)


def _advice() -> str:
    names = " ".join(f"-u {k}" for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
                     if k in os.environ)
    return (f"if they are left over from an earlier torchrun or SLURM shell, run alone with `env {names} "
            "automodel ...`; otherwise start every rank (torchrun, srun, or launcher.nproc_per_node)")


def _check_can_meet(world: int) -> None:
    """A world of several ranks needs a place to meet: without MASTER_ADDR, one line now."""
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UserError(f"this process is one of {world} ranks ({_launch_vars()} in the environment), but "
                        f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set, so the ranks "
                        f"cannot meet; {_advice()}")


def _join_timeout_from(argv: list[str]) -> float:
    """launcher.join_timeout_s as the command line composes it (the run's config is composed after the ranks
    meet, so this reads it the same way; a sweep's first point)."""
    from omegaconf import OmegaConf

    from automodel import registry
    from automodel.compose import compose, needs_check, parse_args, sweep_points
    from automodel.launch.local import LauncherConfig

    args = parse_args(argv)
    points = sweep_points(args.overrides, args.multirun) if needs_check(args) else []
    node = OmegaConf.to_container(compose(points[0]).get("launcher", {})) if points else {}
    return registry.validate(LauncherConfig, node, "launcher").join_timeout_s


def _rendezvous(world: int, join_timeout_s: float):
    """(store, rank): every rank of `world` has reached the TCP store at MASTER_ADDR:MASTER_PORT, or one line
    naming the ranks that never did, after join_timeout_s."""
    _check_can_meet(world)
    if not join_timeout_s or join_timeout_s <= 0:
        raise UserError(f"launcher.join_timeout_s={join_timeout_s} must be a positive number of seconds")
    rank = int(os.environ["RANK"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    deadline = time.monotonic() + join_timeout_s
    # under torchrun the agent hosts the store; otherwise rank 0 does (torch's env:// makes the same choice)
    hosts = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    limit = datetime.timedelta(seconds=join_timeout_s)
    with stop_signals.at_once("waiting for the other ranks to join"):
        return _meet(rank, world, addr, port, hosts, deadline, limit, join_timeout_s)


def _meet(rank: int, world: int, addr: str, port: int, hosts: bool, deadline: float, limit, join_timeout_s: float):
    import torch.distributed as dist

    if not hosts:
        _wait_for_host(addr, port, deadline, world, join_timeout_s)
    try:
        store = dist.TCPStore(addr, port, world, is_master=hosts, timeout=limit, wait_for_workers=False,
                              multi_tenant=True)
    except (RuntimeError, ValueError) as e:  # the port is taken, the address is not this host's, ...
        raise UserError(f"rank {rank} cannot {'open' if hosts else 'reach'} the ranks' meeting point "
                        f"MASTER_ADDR={addr} MASTER_PORT={port}: {' '.join(str(e).split())[:200]}; set a free "
                        f"MASTER_PORT ({_launch_vars()} in the environment)") from None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # an agent's store outlives a restarted round
    key = f"automodel/joined/{attempt}/"
    try:
        store.set(key + str(rank), "1")
        while True:
            missing = [r for r in range(world) if not store.check([key + str(r)])]
            if not missing:
                return store, rank
            if time.monotonic() > deadline:
                raise _never_joined(missing, world, join_timeout_s)
            time.sleep(0.1)
    except RuntimeError as e:  # the host of the store went away while the ranks were meeting
        raise UserError(f"rank {rank} lost the ranks' meeting point MASTER_ADDR={addr} MASTER_PORT={port} while "
                        f"waiting for the others ({' '.join(str(e).split())[:200]}); {_advice()}") from None


def _wait_for_host(addr: str, port: int, deadline: float, world: int, join_timeout_s: float) -> None:
    """Until the store's host answers (a plain connect: torch's client would log a C++ trace every retry)."""
    while True:
        try:
            socket.create_connection((addr, port), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise _never_joined([0], world, join_timeout_s) from None
            time.sleep(0.2)


def _never_joined(missing: list[int], world: int, join_timeout_s: float) -> UserError:
    """The one line. The CLI prints only rank 0's (every rank hits the same refusal); when rank 0 is the one
    missing, no rank 0 will say anything, so this rank says it here."""
    ranks = ", ".join(map(str, missing))
    error = UserError(f"rank(s) {ranks} of {world} never joined within launcher.join_timeout_s={join_timeout_s:g}; "
                      f"this process waited for them because of {_launch_vars()} in the environment; {_advice()}")
    if 0 in missing and os.environ.get("RANK", "0") != "0" and not os.environ.get("AUTOMODEL_ERROR_DIR"):
        import sys

        print(f"automodel: error: {error}", file=sys.stderr, flush=True)
    return error
