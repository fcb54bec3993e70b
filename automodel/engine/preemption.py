"""A checkpoint at SLURM's warning signal, taken at the next step boundary by every rank together.

SLURM sends SIGUSR2 to every task of a job `signal_delay_s` before its time limit, and on a preemption
(`scancel --signal=USR2`). submitit's handler, installed before the run starts, requeues the job from
global rank 0, in the middle of whatever the process was doing. A save is collective, so it cannot run
inside that handler. Instead, while a run is inside a SLURM job:

- every rank's handler only notes the signal;
- after each optimizer step the ranks agree (one all-reduce of a flag over a CPU group: no device sync)
  whether any rank was signalled;
- if so, every rank saves (the checkpoint plugin's `save_now`), the loop stops, and the handler that was
  there before runs: submitit's requeues the job with `checkpoint.resume=auto`; with no handler before
  (a plain `srun`), the signal's default action ends the process.

So the requeued job continues from the step the signal arrived at, not from the last periodic save.
"""

from __future__ import annotations

import os
import signal

SIGNAL = signal.SIGUSR2


class SignalCheckpoint:
    def __init__(self, enabled: bool):
        import threading

        import torch.distributed as dist

        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self._noted = False
        self._previous = None
        self._group = None
        if not self.enabled:
            return
        if dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")  # CPU flag: agreeing costs no device sync
        self._previous = signal.signal(SIGNAL, self._note)

    @staticmethod
    def wanted() -> bool:
        """Inside a SLURM job, where the warning signal can come."""
        return bool(os.environ.get("SLURM_JOB_ID"))

    def _note(self, signum, frame) -> None:
        self._noted = True

    def requested(self) -> bool:
        """Collective (when enabled): whether any rank has been signalled."""
        if not self.enabled:
            return False
        if self._group is None:
            return self._noted
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self._noted else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def close(self) -> None:
        """Put the previous handler back (the run is over)."""
        if self.enabled and self._previous is not None:
            signal.signal(SIGNAL, self._previous)
            self._previous = None

    def hand_over(self) -> None:
        """After the signal's checkpoint: let the handler that was there before act on the signal."""
        previous = self._previous
        self.close()
        if callable(previous):
            previous(SIGNAL, None)  # submitit: requeue from rank 0 and exit; other ranks return
        elif previous == signal.SIG_DFL:
            signal.raise_signal(SIGNAL)  # the default action: the process ends
