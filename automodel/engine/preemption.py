"""Signals that ask a run to stop: a checkpoint at the next step boundary, taken by every rank together.

Two kinds:

- SLURM's warning, SIGUSR2, sent to every task of a job `signal_delay_s` before its time limit, and on a
  preemption (`scancel --signal=USR2`). submitit's handler, installed before the run starts, requeues the job
  from global rank 0. Inside a SLURM job the ranks save at the next step boundary, then the handler that was
  there before runs: submitit's requeues the job with `checkpoint.resume=auto`; with none before (a plain
  `srun`), the signal's default action ends the process.
- Ctrl-C (SIGINT) and SIGTERM to a run started by hand (one process, torchrun, automodel's launcher). Before
  the first step the run ends at once. During training every rank finishes the step it is in, they save that
  step (the checkpoint plugin's `save_now`), one line says where and how to resume, and the process ends with
  128+signal. Where the plugin cannot save mid-run (hf_export, a rehearsal) the run still stops there, and the
  line says that nothing was saved. A second signal ends the process at once: a save under way is left as a
  `.partial` folder, which resume never takes. After the last step the run finishes (its export), then ends
  with 128+signal.

A save is collective, so it cannot run inside a handler: the handlers only note the signal. After each
optimizer step the ranks agree (one all-reduce over a CPU group: no device sync) whether any was signalled, and
how, so a rank signalled alone (`kill <pid>`) stops the others with it, at the same step.

Under automodel's launcher (launch/local.py) the ranks live in sessions of their own and only the launcher gets
the terminal's Ctrl-C; it forwards a stop to them as SIGINT. There a rank leaves what it did in the launcher's
folder (AUTOMODEL_ERROR_DIR) instead of printing, the launcher prints the one line, and SIGTERM keeps its
default action in the ranks: it is how torch's agent ends the other ranks of a job in which one has failed.
"""

from __future__ import annotations

import json
import os
import shlex
import signal

from automodel import fs, stop_signals
from automodel.errors import UserError
from automodel.stop_signals import Stopped

SIGNAL = signal.SIGUSR2  # SLURM's warning
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Connection refused", "Broken pipe")
PEER_LOST_LINE = "stopped because another rank of this job ended first (that rank's own output says why)"


def describe(report: dict, signame: str, out_dir: str) -> str:
    """The one line for what a stop did (`report`, as SignalCheckpoint records it). Shared with the launcher."""
    resume = f"checkpoint.resume=auto hydra.run.dir={shlex.quote(out_dir)}"
    phase, step = report["phase"], report.get("step")
    if phase == "set-up":
        return f"stopped by {signame} during set-up, before the first step; nothing was trained or saved"
    if phase == "step" and report.get("saved"):
        return (f"stopped by {signame} after step {step} of {report['max_steps']}: saved a checkpoint of that step "
                f"in {report['saved']}; to resume, run the same command with {resume}")
    if phase == "step":
        return f"stopped by {signame} after step {step} of {report['max_steps']}; nothing was saved ({report['why']})"
    if phase == "finished":
        return f"stopped by {signame} after the last step, once the run had finished (its export included)"
    how = "at once by a second " if phase == "at once" else ""
    lost = "" if phase == "at once" else ": another rank ended before the ranks could save together"
    return (f"stopped {how}{signame}{lost}; the step in progress was not saved (a save under way is left as a "
            f".partial folder, which resume never takes); {resume} resumes from the latest checkpoint, if any")


class SignalCheckpoint:
    """Made at the start of a run (stop signals end set-up at once), armed just before the first step (then they
    stop the run at the next step boundary), told when training is over, closed when the run ends."""

    def __init__(self, out_dir: str, max_steps: int):
        self.out_dir, self.max_steps = out_dir, max_steps
        self.phase = "set-up"  # -> "training" (arm) -> "finishing" (training_over)
        self.signum = None  # the first stop signal this rank got, or that the ranks agreed on
        self._received = False  # whether this rank got one itself (the next one is a second: at once)
        self.report = None  # what the stop did, once it did it
        self.preempted_at = None  # the step SLURM's warning stopped the run at
        self.enabled = False  # SLURM's warning handled (inside a SLURM job, with a plugin that can save)
        self._noted = False  # SLURM's warning arrived
        self._previous = None  # the SIGUSR2 handler before
        self._group = None
        self._said = False  # the stop's line has been said (or left for the launcher)
        self._why_unsaved = ""
        self._launcher = os.environ.get("AUTOMODEL_ERROR_DIR")  # under automodel's launcher: it speaks
        if self._launcher and not os.path.isdir(self._launcher):
            self._launcher = None
        # under automodel's launcher SIGTERM keeps its default: torch's agent ends a failed job's ranks with it
        self._stops = stop_signals.take((signal.SIGINT,) if self._launcher else stop_signals.STOP_SIGNALS,
                                        self._on_stop)
        if self._launcher and self._stops:  # the launcher may now forward a stop here (before: it ends us at once)
            _write(os.path.join(self._launcher, f"ready.{os.getpid()}"), "")

    @staticmethod
    def wanted() -> bool:
        """Inside a SLURM job, where the warning signal can come."""
        return bool(os.environ.get("SLURM_JOB_ID"))

    def arm(self, ckpt, alone: bool, unsaved: str) -> None:
        """Collective (unless `alone`: one real process), just before the first step. `unsaved`: why nothing is
        saved at a stop when the checkpoint plugin cannot save mid-run (it has no `save_now`)."""
        import threading

        import torch.distributed as dist

        self._why_unsaved = unsaved
        if not alone and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")  # CPU flag: agreeing costs no device sync
        self.enabled = (self.wanted() and hasattr(ckpt, "save_now")
                        and threading.current_thread() is threading.main_thread())
        if self.enabled:
            self._previous = signal.signal(SIGNAL, self._note)
        self.phase = "training"

    def _note(self, signum, frame) -> None:
        self._noted = True

    def _on_stop(self, signum, frame) -> None:
        if self._received:  # a second stop signal: at once (one line, unless the stop said it already)
            if not self._said:
                self._tell({"phase": "at once"}, signum)
            os._exit(128 + signum)
        # the ranks may have agreed on a stop before this rank's own signal got here: it is the same stop
        self._received, self.signum = True, self.signum or signum
        stop_signals.quiet_exit()
        if self.phase == "set-up":  # nothing trained: end now. An exception raised here would land wherever set-up
            self._tell({"phase": "set-up"}, signum)  # is (an import, say), where library code may swallow it and go
            fs.undo(self.out_dir)  # on half-imported; the folder goes back as found (unless the run had begun)
            os._exit(128 + signum)

    def requested(self) -> tuple[bool, int]:
        """Collective: (whether any rank got SLURM's warning, the largest stop signal any rank got, or 0)."""
        flags = [1 if self._noted else 0, self.signum or 0]
        if self._group is not None:
            import torch
            import torch.distributed as dist

            flag = torch.tensor(flags, dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            flags = flag.tolist()
        return bool(flags[0]), int(flags[1])

    def stop_here(self, step: int, ckpt, state) -> bool:
        """Collective, after each optimizer step: True when a signal reached any rank. The step is saved first
        (SLURM's warning: always; a stop signal: where the plugin can)."""
        preempted, signum = self.requested()
        if preempted:
            ckpt.save_now(step, state, self.out_dir)
            self.preempted_at = step
            return True
        if not signum:
            return False
        self.signum = self.signum or signum  # a rank that was not signalled itself stops with the others
        stop_signals.quiet_exit()
        saved = None
        if hasattr(ckpt, "save_now"):  # the folder it saved (a plugin that does not say: the run dir)
            saved = ckpt.save_now(step, state, self.out_dir) or self.out_dir
        self.report = {"phase": "step", "step": step, "max_steps": self.max_steps, "saved": saved,
                       "why": self._why_unsaved}
        return True

    def training_over(self) -> None:
        """After the loop: a stop signal now lets the run finish; SLURM's handler goes back unless it acts."""
        self.phase = "finishing"
        if self.preempted_at is None:
            self.close_slurm()

    def close_slurm(self) -> None:
        """Put the previous SIGUSR2 handler back."""
        if self.enabled and self._previous is not None:
            signal.signal(SIGNAL, self._previous)
            self._previous = None

    def hand_over(self) -> None:
        """After the warning's checkpoint: let the handler that was there before act on the signal."""
        previous = self._previous
        self.close_slurm()
        if callable(previous):
            previous(SIGNAL, None)  # submitit: requeue from rank 0 and exit; other ranks return
        elif previous == signal.SIG_DFL:
            signal.raise_signal(SIGNAL)  # the default action: the process ends

    def close(self) -> None:
        """The run is over: every handler goes back; after a stop signal its handler stays, so that another one
        while the process ends still ends it at once, in one line."""
        self.close_slurm()
        stop_signals.run_ended()
        if self.signum is None:
            stop_signals.give_back(self._stops)

    def end(self) -> None:
        """After a run that got a stop signal: say what it did, and end the process (Stopped)."""
        if self.signum is None:
            return
        self._tell(self.report or {"phase": "finished"}, self.signum)
        raise Stopped(self.signum, code=0 if self._launcher else None)  # the launcher exits with 128+signal

    def ending(self, error: BaseException) -> BaseException:
        """What to end a failed run with: a stop already said stays; after a stop signal, a failure is the
        stop (a rank that stopped at once broke the collective this rank was in), said once; a lost peer
        without one is one line (the rank that ended first says why)."""
        if _found(error, lambda e: isinstance(e, Stopped)) or (self._received and self.phase == "set-up"):
            # the stop raised in set-up may reach here changed by the code it interrupted (an import that
            # reports any failure as a missing module, DCP wrapping it per rank): its line was said
            return error if isinstance(error, Stopped) else Stopped(self.signum or signal.SIGINT)
        lost = _found(error, lambda e: any(t in str(e) for t in _PEER_LOST))
        if self.signum is not None and lost:
            if not self._said:
                self._tell({"phase": "interrupted"}, self.signum)
            return Stopped(self.signum)
        if lost and not isinstance(error, UserError):
            return UserError(PEER_LOST_LINE)
        return error

    def _tell(self, report: dict, signum: int) -> None:
        """The one line: printed by rank 0, or left for automodel's launcher, which prints it."""
        self._said = True
        report = dict(report, signal=stop_signals.name(signum))
        if self._launcher:
            rank = os.environ.get("RANK", "0")
            _write(os.path.join(self._launcher, f"stop.rank{rank}"), json.dumps(report))
        elif os.environ.get("RANK", "0") == "0":
            stop_signals.say(describe(report, report["signal"], self.out_dir))


def _found(error: BaseException, test) -> bool:
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if test(e):
            return True
        todo += [e.__cause__, e.__context__]
        todo += [f[0] if isinstance(f, tuple) else f for f in (getattr(e, "failures", None) or {}).values()]
    return False


def _write(path: str, text: str) -> None:
    """Whole or absent: the reader never sees half of it."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
