"""Folders written safely: atomically (a folder appears under its final name complete, or not at all), and
claimed (a run refused before it begins leaves its run directory as it found it).

Nothing lost. A run that is refused before it starts (a bad data path, a checkpoint that does not match, a dir
that holds another run) must leave the folder exactly as it found it, and a user's files in it untouched. So
before anything is written there (before Hydra opens its log), the invocation takes a *claim*: which folders
it had to make, and the size and time of every top-level entry already there. A refusal undoes the claim: it
removes the entries that were not there, cuts a file that grew (the log) back to its old length, and removes
the folders it made if they are empty again. Once the run has begun (it writes `config.yaml`), the claim is
spent: the checkpoints and logs of a run that fails later are the user's to keep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil

RESOLVED_CONFIG = "config.yaml"  # written when a run begins: its appearance (or change) spends the claim


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a staging folder; on success it replaces `path` in one rename, on failure it is removed."""
    staging = path.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(path):
        old = path.rstrip("/") + ".old"
        os.replace(path, old)
        os.replace(staging, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, path)


@dataclasses.dataclass
class Claim:
    path: str
    made: list[str]  # folders this invocation created, outermost first
    found: dict[str, tuple[bool, int, int]]  # top-level name -> (is a folder, size, mtime_ns) before the run

    def begun(self) -> bool:
        """Whether the run has begun writing its results (then nothing may be undone)."""
        try:
            st = os.stat(os.path.join(self.path, RESOLVED_CONFIG))
        except OSError:
            return False
        return self.found.get(RESOLVED_CONFIG) != (False, st.st_size, st.st_mtime_ns)


_CLAIMS: dict[str, Claim] = {}


def _scan(path: str) -> dict[str, tuple[bool, int, int]]:
    found = {}
    for entry in os.scandir(path) if os.path.isdir(path) else ():
        st = entry.stat(follow_symlinks=False)
        found[entry.name] = (entry.is_dir(follow_symlinks=False), st.st_size, st.st_mtime_ns)
    return found


def claim(path: str) -> Claim:
    """Record what is in `path` and make it (with its parents) if needed; idempotent within a process."""
    path = os.path.abspath(path)
    if path in _CLAIMS:
        return _CLAIMS[path]
    found = _scan(path)
    missing = []
    head = path
    while not os.path.exists(head):
        missing.append(head)
        head = os.path.dirname(head)
    made = []
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
            made.append(folder)
        except FileExistsError:  # another process made it a moment ago: not ours to remove
            pass
    _CLAIMS[path] = Claim(path, made, found)
    return _CLAIMS[path]


def undo(path: str) -> None:
    """After a refusal: put the folder back as this invocation found it (nothing if the run had begun, or if this
    process holds no claim on it: then it cannot tell what is its own)."""
    c = _CLAIMS.pop(os.path.abspath(path), None)
    if c is None or c.begun():
        return
    for name, (is_dir, size, _) in _scan(c.path).items():
        full = os.path.join(c.path, name)
        before = c.found.get(name)
        if before is None:
            shutil.rmtree(full, ignore_errors=True) if is_dir and not os.path.islink(full) else _unlink(full)
        elif not is_dir and not before[0] and size > before[1]:
            os.truncate(full, before[1])  # a log this run appended to: its own lines go
    for folder in reversed(c.made):
        try:
            os.rmdir(folder)
        except OSError:  # not empty: something else was put there meanwhile
            break


def release_claim(path: str) -> None:
    _CLAIMS.pop(os.path.abspath(path), None)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
