"""A write that fails (disk full, quota, permissions) during a checkpoint save or an export: one line, on every rank.

What the libraries raise when a disk fills is no help: torch's zip writer (which DCP uses) reports a short write
as "unexpected pos 704 vs 598", the `OSError(ENOSPC)` behind it only in `__context__`, and DCP loses even that
when it carries a rank's error to the others. `describe` finds the cause (the errno anywhere in the chain, the
text, or a filesystem with nothing left after a short write) and says it in one line naming the path.

A rank that fails alone must not leave the others waiting in the next collective: `agree` is the collective
after each part of a save that can fail, so every rank ends with the same line, and the half-written folder is
removed before it is said.
"""

from __future__ import annotations

import errno
import os
import shutil

from automodel.errors import UserError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_SHORT_WRITE_TEXT = ("unexpected pos",)  # torch's zip writer (torch.save, DCP's files): the write came up short
_NEARLY_FULL = 1 << 20  # bytes: what a filesystem that refused a write has left (a few blocks at most)


def _chain(error: BaseException):
    """The error, what caused it, and the per-rank errors a DCP CheckpointException carries."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():  # DCP: {rank: (exception, traceback)}
            todo.append(failure[0] if isinstance(failure, tuple) else failure)


def free_bytes(path: str) -> int | None:
    """Bytes this user may still write on the filesystem holding `path` (or its nearest existing parent)."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


def no_space(error: BaseException, path: str) -> bool:
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        if any(t in str(e) for t in _NO_SPACE_TEXT):
            return True
    short = any(any(t in str(e) for t in _SHORT_WRITE_TEXT) for e in _chain(error))
    free = free_bytes(path)
    return short and free is not None and free < _NEARLY_FULL


def describe(error: BaseException, path: str, what: str, if_full: str = "") -> str | None:
    """One line for a write the machine refused (no space, permissions, I/O), None for anything else (a bug:
    it keeps its traceback). `what`: e.g. "save the checkpoint"; `if_full`: advice added when the disk is full."""
    if no_space(error, path):
        return f"cannot {what} {path}: no space left on device{if_full}"
    refused = next((e for e in _chain(error) if isinstance(e, OSError) and e.errno is not None), None)
    if refused is not None:
        return f"cannot {what} {path}: {refused.strerror or refused}"
    return None


def attempt(fn, path: str, what: str, if_full: str = ""):
    """Run fn(); return None, or what `agree` takes when it failed: (the one line or None, the exception)."""
    try:
        fn()
    except (KeyboardInterrupt, SystemExit):  # a stop, not a failed write
        raise
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        return describe(e, path, what, if_full), e
    return None


def agree(outcome, remove: str | None = None) -> None:
    """Collective: raise on every rank if `outcome` (from `attempt`) failed on any. Rank 0 first removes
    `remove` (the half-written folder). A failure with no one line (a bug) re-raises its exception on the rank
    it happened on; the others say which rank failed."""
    import torch.distributed as dist

    line = None if outcome is None else (outcome[0] or "")
    lines = [line]
    if dist.is_initialized() and dist.get_world_size() > 1:
        lines = [None] * dist.get_world_size()
        dist.all_gather_object(lines, line)
    failed = [(r, text) for r, text in enumerate(lines) if text is not None]
    if not failed:
        return
    if remove and (not dist.is_initialized() or dist.get_rank() == 0):
        shutil.rmtree(remove, ignore_errors=True)
    if outcome is not None and not outcome[0]:
        raise outcome[1]
    said = next((text for _, text in failed if text), None)
    if said is None:
        raise UserError(f"rank {failed[0][0]} failed while writing {remove or 'its files'} (its traceback is above)")
    raise UserError(said) from None
