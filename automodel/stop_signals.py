"""Ctrl-C (SIGINT) and SIGTERM: the pieces the launcher, the ranks' rendezvous and the engine share.

What each does with a stop signal is in automodel/engine/preemption.py (a rank) and automodel/launch/local.py
(the launcher). Common to all: automodel takes over only a signal whose handler is still Python's default (a
caller's own handler, or submitit's inside a SLURM job, stays), the process says one line, and it ends with
exit code 128+signal (130 for SIGINT, 143 for SIGTERM), as a shell reports a process a signal ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(SystemExit):
    """The process ends because it was asked to: its one line has been said. The exit code is 128+signal
    unless `code` says otherwise."""

    def __init__(self, signum: int, code: int | None = None):
        super().__init__(128 + signum if code is None else code)
        self.signum = signum


def name(signum: int) -> str:
    return signal.Signals(signum).name


def say(line: str) -> None:
    """`automodel: <line>` on stderr. Safe inside a signal handler: os.write, not the buffered stream that the
    interrupted code may be in the middle of."""
    os.write(2, f"automodel: {line}\n".encode())


def _is_default(signum: int) -> bool:
    """Python's own handling, or automodel's `at_once` (an outer part of the same process, e.g. the CLI's)."""
    current = signal.getsignal(signum)
    if getattr(current, "automodel_at_once", False):
        return True
    return current is signal.default_int_handler if signum == signal.SIGINT else current == signal.SIG_DFL


def take(signals, handler) -> dict:
    """Install `handler` for each of `signals` whose handler is still Python's default; the handlers replaced,
    for `give_back`. Outside the main thread (where Python cannot install handlers) nothing is taken."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in signals if _is_default(s)}


def give_back(previous: dict) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)
    previous.clear()


@contextlib.contextmanager
def at_once(what: str):
    """While `what` runs (e.g. "waiting for the other ranks to join"), a stop signal ends the process at once
    with one line."""

    def stop(signum, frame):
        if os.environ.get("RANK", "0") == "0":  # the ranks of a torchrun all get it: one of them says it
            say(f"stopped by {name(signum)} while {what}; nothing was trained or saved")
        raise Stopped(signum)

    stop.automodel_at_once = True  # an inner part may take the signals over, and gives them back after
    previous = take(STOP_SIGNALS, stop)
    try:
        yield
    finally:
        give_back(previous)
