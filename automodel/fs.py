"""Atomic directory writes: a folder appears under its final name complete, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil


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
