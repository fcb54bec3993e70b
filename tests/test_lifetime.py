"""A job's processes die together, and one job at a time writes a run dir (automodel/launch/lifetime.py)."""

import json
import os
import signal
import subprocess
import sys
import time

from helpers import MICRO, cli

from automodel.launch import lifetime


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _logged_steps(run) -> int:
    try:
        return len([ln for ln in (run / "metrics.jsonl").read_text().splitlines() if json.loads(ln)])
    except (OSError, ValueError):
        return 0


def test_a_busy_run_dir_is_refused_and_ranks_die_with_their_launcher(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "AUTOMODEL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "automodel", *MICRO, "launcher.nproc_per_node=2", "parallel=fsdp2",
         "train.max_steps=100000", "train.log_every=1", "checkpoint.every_steps=0", f"hydra.run.dir={run}"],
        cwd=str(tmp_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while _logged_steps(run) < 2:
            assert launcher.poll() is None and time.time() < deadline, "the 2-rank job did not start training"
            time.sleep(0.2)
        ranks = _children(launcher.pid)
        assert len(ranks) == 2, ranks
        hydra_config = (run / ".hydra" / "config.yaml").read_bytes()

        # a second job into the same dir: one line naming the holder; the holder's files untouched
        second = cli(*MICRO, "train.max_steps=2", f"hydra.run.dir={run}", "checkpoint.resume=auto", cwd=str(tmp_path))
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
        assert lines[0].startswith(f"automodel: error: the run dir {run} is in use by another automodel job "
                                   f"(pid {launcher.pid} on "), lines[0]
        assert "Traceback" not in second.stdout + second.stderr
        assert (run / ".hydra" / "config.yaml").read_bytes() == hydra_config

        # kill -9 the launcher alone (the ranks are in sessions of their own): they follow it
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 20
        while any(_alive(r) for r in ranks) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(r) for r in ranks), "ranks outlived their launcher"
        steps = _logged_steps(run)
        time.sleep(1.0)
        assert _logged_steps(run) == steps  # nothing writes into the run dir any more
        lifetime.acquire(str(run))  # and the dir is free: the kernel dropped the dead job's lock
        lifetime.release(str(run))
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
