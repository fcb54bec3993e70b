"""The loggers' own process (started by engine/loggers.py on rank 0): reads pickled messages from its parent on
stdin (first the plugins, then ("start", RunInfo), ("log", record)... and ("finish", ok)) and calls the plugins.

A plugin that fails is named in one warning (console and train.log, secrets masked) and dropped; the others go
on. End of input without a "finish" (the training process died) finishes every logger as failed. It runs at
the lowest CPU priority (wandb's own service process, started from here, inherits it).
"""

from __future__ import annotations

import logging
import os
import pickle
import sys

log = logging.getLogger("automodel")


def _logging(run_dir: str) -> None:
    from automodel.secrets import RedactFilter

    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    handlers = [console]
    if os.path.isdir(run_dir):
        file = logging.FileHandler(os.path.join(run_dir, "train.log"))  # appended to, beside the trainer's lines
        file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
        handlers.append(file)
    for handler in handlers:
        handler.addFilter(RedactFilter())
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _guarded(plugin, method: str, arg) -> bool:
    from automodel.secrets import redact_text

    try:
        getattr(plugin, method)(arg)
        return True
    except Exception as e:  # a logger's server or disk: the training run goes on without that logger
        line = redact_text(" ".join(str(e).split())[:300])
        log.warning("logger %s failed in %s (%s: %s); the run goes on without it", type(plugin).__name__, method,
                    type(e).__name__, line)
        return False


def main() -> None:
    if hasattr(os, "nice"):  # training first: logging takes the CPU the trainer leaves (on a GPU node, most of it)
        os.nice(19)
    source = sys.stdin.buffer
    plugins = pickle.load(source)
    for plugin in plugins:  # the packages' imports, while the trainer sets up (a failure shows at start)
        if hasattr(plugin, "prepare"):
            try:
                plugin.prepare()
            except Exception:
                pass
    live, ok, started = [], False, False
    while True:
        try:
            kind, value = pickle.load(source)
        except (EOFError, pickle.UnpicklingError):  # the trainer is gone without saying goodbye
            break
        if kind == "start":
            _logging(value.run_dir)
            live, started = [p for p in plugins if _guarded(p, "start", value)], True
        elif kind == "log":
            live = [p for p in live if _guarded(p, "log", value)]
        elif kind == "finish":
            ok = value
            break
    for plugin in live if started else []:
        _guarded(plugin, "finish", ok)


if __name__ == "__main__":
    main()
