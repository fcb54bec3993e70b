"""Who am I in the job: rank, world size and device, from torchrun's (or a spawner's) environment.

Every rank runs the same program. A process started without a launcher is a world of one and still gets
a process group (an in-memory store), so the engine has a single code path for one process and for many.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

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


def init(device: str = "auto", fake_world_size: int = 0) -> DistEnv:
    """Join (or create) the default process group; idempotent.

    `fake_world_size` > 0: this process is rank 0 of a world of that size under torch's fake process group
    (collectives return at once and move no data): real shapes and memory for one rank, no other ranks."""
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
    else:
        dist.init_process_group(_backend(dev.type), timeout=timeout)  # env:// from the launcher
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


def share_run_stamp() -> None:
    """Make every rank of a multi-process launch use rank 0's clock for `${stamp:...}` run-dir names.

    Without this, ranks that start a second apart would each create their own `outputs/<time>` folder.
    """
    if launched_world_size() == 1:
        return
    import time

    import torch.distributed as dist

    from automodel.config import set_run_stamp

    init("auto")  # the engine reuses this group and destroys it at the end
    box = [time.time()]
    dist.broadcast_object_list(box, src=0)
    set_run_stamp(box[0])
