"""Rank 0's loggers (the `logger` group) behind one object the loop hands each logged record to.

metrics.jsonl is written in the loop's own thread (its record must survive a crash line by line). The others
(wandb, TensorBoard, MLflow: `background = True`) run in a process of their own (logger_worker.py), fed through
a pipe: their imports (seconds of Python, done while this process sets up), files and network never hold a
training step nor the interpreter lock, and one that fails mid-run is a warning, not a lost run. The worker
outlives a crash of this process long enough to mark the runs failed (it sees the pipe close).
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys

from automodel.protocols import RunInfo
from automodel.secrets import redact_config

log = logging.getLogger("automodel")


class RunLoggers:
    """Made as the run begins: the background loggers' process starts at once and imports their packages
    (`prepare()`) while this process sets up. `start(run)` once nothing can be refused any more (they open their
    runs then); `open_record()` once the run's own record may be written (after a resume has trimmed it);
    `close(ok)` once, or again as a no-op."""

    def __init__(self, plugins: list):
        self._run = None
        self._inline = [p for p in plugins if not getattr(p, "background", False)]
        self._opened: list = []
        background = [p for p in plugins if getattr(p, "background", False)]
        self._worker = _start_worker(background) if background else None

    def start(self, run: RunInfo) -> None:
        self._run = run
        if self._worker is not None:
            self._send(("start", run))

    def open_record(self) -> None:
        for plugin in self._inline:
            plugin.start(self._run)
            self._opened.append(plugin)

    def log(self, record: dict) -> None:
        for plugin in self._opened:
            plugin.log(record)
        if self._worker is not None:
            self._send(("log", dict(record)))

    def close(self, ok: bool) -> None:
        """Every record handed over is delivered (waits for the worker), then each logger finishes."""
        for plugin in self._opened:
            plugin.finish(ok)
        self._opened = []
        worker = self._worker
        if worker is None:
            return
        self._send(("finish", ok))
        self._worker = None
        try:
            worker.stdin.close()
        except OSError:
            pass
        try:
            worker.wait(timeout=5)
        except subprocess.TimeoutExpired:  # uploads still going (an online wandb or MLflow server)
            log.info("waiting for the loggers to finish sending the run (wandb, MLflow)...")
            worker.wait()

    def _send(self, message) -> None:
        try:
            pickle.dump(message, self._worker.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._worker.stdin.flush()
        except (BrokenPipeError, OSError):  # the worker died (it said why on stderr): train on without it
            log.warning("the loggers' process ended early (exit code %s); wandb/TensorBoard/MLflow get no more "
                        "records from this run", self._worker.poll())
            self._worker = None


def _start_worker(plugins: list) -> subprocess.Popen:
    env = dict(os.environ)
    # the plugins must import there as here (a third-party package found through this process's path)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if isinstance(p, str) and p)
    worker = subprocess.Popen([sys.executable, "-m", "automodel.engine.logger_worker"], stdin=subprocess.PIPE,
                              env=env, start_new_session=True)  # Ctrl-C reaches training, which closes us cleanly
    pickle.dump(plugins, worker.stdin, protocol=pickle.HIGHEST_PROTOCOL)
    worker.stdin.flush()
    return worker


def run_info(cfg, run_dir: str, start_step: int) -> RunInfo:
    """The run as loggers name it: the resolved config (secrets masked) and, in a sweep, the point's overrides
    and the sweep's folder."""
    from omegaconf import OmegaConf

    config = redact_config(OmegaConf.to_container(cfg, resolve=True))
    config.pop("hydra", None)
    name = group = None
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get()
        if hydra.mode == RunMode.MULTIRUN:
            name = hydra.job.override_dirname or os.path.basename(run_dir)
            group = os.path.basename(os.path.normpath(hydra.sweep.dir))
    except (ValueError, ImportError):  # not under Hydra's run (tests, scripts): a plain run
        pass
    return RunInfo(run_dir=run_dir, config=config, start_step=start_step, name=name, group=group)
