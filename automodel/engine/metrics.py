"""The progress display of the logged steps (rank 0); where the records themselves go is the `logger` group's
(automodel/loggers: metrics.jsonl always)."""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("automodel")


class Progress:
    """A rich progress bar (step, loss, tokens/s, ETA) on a terminal; plain log lines otherwise."""

    def __init__(self, total_steps: int, enabled: bool):
        self.total = total_steps
        self.enabled = enabled
        self.live = enabled and sys.stdout.isatty() and not os.environ.get("AUTOMODEL_NO_PROGRESS")
        self._bar = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("{task.fields[extra]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            )
            self._task = self._bar.add_task("train", total=total_steps, loss="-", tps="-", extra="")
            self._bar.start()
        self._t0 = time.perf_counter()

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def logged(self, record: dict) -> None:
        if not self.enabled:
            return
        if "skipped" in record:  # always said, bar or not: the user must know a step did not count
            log.warning("step %d skipped (not applied to the weights): %s", record["step"], record["skipped"])
        if self._bar is not None:
            self._bar.update(self._task, completed=record["step"], loss=f"{record['loss']:.4f}",
                             tps=f"{record['tokens_per_s']:,.0f}", extra=_extra(record))
            if "val_loss" in record:  # a line of its own, kept above the bar (and in train.log)
                log.info("step %d/%d  val_loss %.4f", record["step"], self.total, record["val_loss"])
            return
        done = record["step"] / self.total
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done - elapsed if done else 0.0
        extra = _extra(record)
        log.info("step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %s tok/s%s  ETA %s", record["step"], self.total,
                 record["loss"], record["lr"], record["grad_norm"], f"{record['tokens_per_s']:,.0f}",
                 f"  {extra}" if extra else "", _hms(eta))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _extra(record: dict) -> str:
    return "  ".join(part for part in (f"val_loss {record['val_loss']:.4f}" if "val_loss" in record else "",
                                       f"MFU {record['mfu']:.1f}%" if "mfu" in record else "", _memory(record),
                                       _moe(record)) if part)


def _memory(record: dict) -> str:
    """The peak of the rank that holds the most: on the GPU when there is one, else on the host."""
    if "mem_device_gib" in record:
        return f"mem {record['mem_device_gib']:.1f} GiB"
    return f"mem {record['mem_host_gib']:.2f} GiB" if "mem_host_gib" in record else ""


def _moe(record: dict) -> str:
    """A mixture-of-experts run's worst layer: its busiest expert's load over the mean (1.0 is balanced)."""
    if "moe_load_max_over_mean" not in record:
        return ""
    aux = f" aux {record['aux_loss']:.3f}" if "aux_loss" in record else ""
    return f"experts max/mean {record['moe_load_max_over_mean']:.2f} (layer {record['moe_worst_layer']}){aux}"


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
