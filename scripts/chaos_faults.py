"""The fault kinds of scripts/chaos.py: stop signals, a full disk, a stale launch environment.

Each trial returns a table row: kind, where the fault landed, ok, why not, tracebacks seen, and whether a resumed
run ended bitwise equal to the uninterrupted one. tests/test_signals.py runs one fixed point of each kind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import chaos

KINDS = [f"{s}-{n}" for s in ("sigint", "sigterm", "sigint2") for n in (1, 2)] + ["disk-1", "disk-2", "stale"]
LINE = re.compile(r"^automodel: .*$", re.M)


def ranks_of(kind: str) -> int:
    """Ranks of the job (its reference run's), 0 for a kind that needs no reference."""
    return int(kind) if kind in ("1", "2") else 0 if kind == "stale" else int(kind.rsplit("-", 1)[1])


def run(kind: str, workdir: str, steps: int, ref: str | None, rng) -> dict:
    if kind == "stale":
        return stale_trial(workdir)
    name, ranks = kind.rsplit("-", 1)
    if name == "disk":
        return disk_trial(workdir, int(ranks), steps, ref)
    return signal_trial(workdir, int(ranks), steps, ref, rng, signal.SIGTERM if name == "sigterm" else signal.SIGINT,
                        twice=name == "sigint2")


def start(run_dir: str, ranks: int, steps: int, *extra: str, env: dict | None = None,
          base: list[str] | None = None) -> subprocess.Popen:
    full = {**os.environ, "AUTOMODEL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "automodel", *(chaos.MICRO if base is None else base), *chaos.KINDS[ranks],
           f"train.max_steps={steps}",
           f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(cmd, cwd=chaos.REPO, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, preexec_fn=as_from_a_terminal)


def as_from_a_terminal() -> None:
    """A command started from a shell prompt has Ctrl-C's default action; one started in the background by a
    non-interactive shell (this script under nohup, CI) inherits SIGINT ignored, and automodel leaves an ignored
    signal ignored. The trials are of the former."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def one_line(out: str, code: int, want_code: int, want: str) -> str | None:
    """Why the output is not exactly one automodel line matching `want` with exit code `want_code` (None: it is)."""
    lines = LINE.findall(out)
    if "Traceback" in out:
        return f"a traceback in the output:\n{out[-3000:]}"
    if code != want_code:
        return f"exit code {code}, expected {want_code}:\n{out[-2000:]}"
    if len(lines) != 1 or not re.search(want, lines[0]):
        return f"expected one line matching {want!r}, got {lines}"
    return None


def job_processes(run_dir: str) -> list[int]:
    """Live processes whose command line names this run dir (the launcher, its ranks)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f"hydra.run.dir={run_dir}".encode() in f.read():
                    with open(f"/proc/{entry}/stat") as f2:
                        if f2.read().rsplit(")", 1)[1].split()[0] != "Z":
                            found.append(int(entry))
        except OSError:
            pass
    return found


def _signal_point(rng, steps: int) -> str:
    """While the command starts (imports, config), in set-up (a moment after the run logs its first line), or a
    moment after a step is logged."""
    draw = rng.random()
    if draw < 0.15:
        return f"start-up+{rng.uniform(0.5, 4):.1f}s"
    if draw < 0.3:
        return f"set-up+{rng.uniform(0.2, 3):.1f}s"
    return f"step {rng.randint(1, steps - 1)}+{rng.uniform(0, 0.3):.2f}s"


def _wait_for_point(proc, run_dir: str, when: str) -> bool:
    if when.startswith("set-up"):  # the run's first log line (its data is read): the engine's set-up is under way
        log = os.path.join(run_dir, "train.log")
        while not (os.path.exists(log) and os.path.getsize(log) > 0):
            if proc.poll() is not None:
                return False
            time.sleep(0.02)
        when = "now+" + when.partition("+")[2]
    return chaos._wait_for(proc, run_dir, when)


def _not_counted(row: dict, why: str) -> dict:
    """A trial whose fault missed the job (it finished first): nothing was tested; neither a pass nor a failure."""
    row.update(ok=None, why=why, killed_at_s=[f"{w} (missed)" for w in row["killed_at_s"]])
    return row


def signal_trial(workdir: str, ranks: int, steps: int, ref: str | None, rng, signum: int, twice: bool = False,
                 point: str | None = None) -> dict:
    """A Ctrl-C/SIGTERM to the job's process group at a random point (or `point`); the one line checked; then
    resumed (checkpoint.resume=auto, as the line says) to the end and compared with `ref`."""
    kind = f"{'sigint2' if twice else signal.Signals(signum).name.lower()}-{ranks}"
    run_dir = os.path.join(workdir, f"{kind}_{rng.randrange(10**9)}")
    proc = start(run_dir, ranks, steps)
    when = point or _signal_point(rng, steps)
    row = {"kind": kind, "killed_at_s": [when], "ok": False, "why": "", "tracebacks": 0, "resumed": False}
    if not _wait_for_point(proc, run_dir, when):
        proc.communicate()
        return _not_counted(row, "the job ended before the signal point")
    os.killpg(proc.pid, signum)  # a terminal's Ctrl-C reaches the foreground group: here, the launcher alone
    if twice:  # two signals before Python's handler runs count as one: the second comes a moment later
        time.sleep(rng.uniform(0.05, 0.3))
        if proc.poll() is None:
            os.killpg(proc.pid, signum)
    code, out = chaos._finish(proc, timeout=300)
    row["tracebacks"] = out.count("Traceback")
    if code == 0 and not LINE.findall(out) and f"trained {steps} steps" in out:  # it came as the process ended:
        return _not_counted(row, "the run had finished when the signal came")  # its exit code stands, rightly
    name = signal.Signals(signum).name
    row["why"] = one_line(out, code, 128 + signum, rf"^automodel: stopped (by|at once by a second) {name}") or ""
    left = job_processes(run_dir)
    if not row["why"] and left:
        row["why"] = f"processes left running: {left}"
    if not row["why"]:
        row["why"] = _check_saved(LINE.findall(out)[0], run_dir) or ""
    if row["why"] or ref is None:  # no reference: the stop itself was the test
        row["ok"] = not row["why"]
        return row
    resumed = _resume_and_compare(run_dir, ranks, steps, ref)
    row.update(ok=resumed is None, why=resumed or "", resumed=resumed is None)
    return row


def _check_saved(line: str, run_dir: str) -> str | None:
    """A line that says it saved a step: that checkpoint is committed and is the last step logged."""
    saved = re.search(r"after step (\d+) of \d+: saved a checkpoint of that step in (\S+);", line)
    if not saved:
        return None
    from automodel.checkpoint.files import read_meta

    step, folder = int(saved.group(1)), saved.group(2)
    if read_meta(folder)["step"] != step or chaos._last_step(run_dir) != step:
        return f"the checkpoint {folder} or metrics.jsonl does not end at step {step}"
    if f"checkpoint.resume=auto hydra.run.dir={run_dir}" not in line:
        return f"the line does not say how to resume: {line}"
    return None


def _resume_and_compare(run_dir: str, ranks: int, steps: int, ref: str) -> str | None:
    code, out = chaos._finish(start(run_dir, ranks, steps), timeout=600)
    if code != 0:
        return f"resume failed ({code}):\n{out[-2000:]}"
    got, want = chaos._records(run_dir), chaos._records(ref)
    if got != want:
        return f"metrics.jsonl differs: steps {[r['step'] for r in got]} vs {[r['step'] for r in want]}"
    if not chaos._same_weights(run_dir, ref):
        return "exported weights differ from the uninterrupted run"
    partial = [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.endswith(".partial")]
    return f"half-written checkpoints left: {partial}" if partial else None


# ------------------------------------------------------------------ disk full
def mount_tmpfs(folder: str, size_mb: int = 64) -> str | None:
    """A small tmpfs at `folder`; None, or why it cannot be had (not root, no mount)."""
    os.makedirs(folder, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", folder],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run mount: {e}"
    return None if done.returncode == 0 else f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}"


def unmount(folder: str) -> None:
    subprocess.run(["umount", "-l", folder], capture_output=True, timeout=30)


def fill(folder: str, leave: int) -> None:
    """Write a ballast file until only `leave` bytes are free on the filesystem of `folder`."""
    free = shutil.disk_usage(folder).free
    with open(os.path.join(folder, "ballast"), "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        todo = max(0, free - leave)
        while todo > 0:
            todo -= f.write(chunk[:min(len(chunk), todo)])


def disk_trial(workdir: str, ranks: int, steps: int, ref: str) -> dict:
    """On a small tmpfs: a first checkpoint (step 3); then a ballast leaves less than a checkpoint needs, and a
    sync save, an async save, and the final export each fail in one line, exit 2, every rank ended, the step-3
    checkpoint intact and nothing half-written left; the ballast goes, and the resumed run ends bitwise equal."""
    row = {"kind": f"disk-{ranks}", "killed_at_s": [], "ok": False, "why": "", "tracebacks": 0, "resumed": False}
    mount = os.path.join(workdir, f"tmpfs_{ranks}")
    why = mount_tmpfs(mount)
    if why:
        row.update(ok=True, why=f"skipped: {why}")
        print(f"disk-{ranks}: skipped: {why}", flush=True)
        return row
    try:
        run_dir = os.path.join(mount, "run")
        code, out = chaos._finish(start(run_dir, ranks, 3, "checkpoint.export_final=false"))
        if code != 0:
            row["why"] = f"the first run failed:\n{out[-2000:]}"
            return row
        first = os.path.join(run_dir, "checkpoints", "step_00000003")
        size = sum(os.path.getsize(os.path.join(first, n)) for n in os.listdir(first))
        fill(mount, min(256 << 10, size // 4))  # the next checkpoint cannot fit; a log line still can
        cases = [("sync save", ["checkpoint.async_save=false"], r"(step_00000006|metrics\.jsonl)"),
                 ("async save", ["checkpoint.async_save=true"], r"(step_00000006|metrics\.jsonl)"),
                 ("export", ["checkpoint.every_steps=0"], r"final")]
        for what, extra, path in cases:
            code, out = chaos._finish(start(run_dir, ranks, steps, *extra), timeout=600)
            row["tracebacks"] += out.count("Traceback")
            row["killed_at_s"].append(what)
            why = one_line(out, code, 2, rf"^automodel: error: cannot \w+ the [\w' ]+ \S*{path}\S*: no space left "
                                         "on device")
            if why is None and job_processes(run_dir):
                why = f"processes left running: {job_processes(run_dir)}"
            if why is None:
                why = _intact(run_dir)
            if why:
                row["why"] = f"{what}: {why}"
                return row
        os.unlink(os.path.join(mount, "ballast"))
        resumed = _resume_and_compare(run_dir, ranks, steps, ref)
        row.update(ok=resumed is None, why=resumed or "", resumed=resumed is None)
        return row
    finally:
        unmount(mount)


def _intact(run_dir: str) -> str | None:
    from automodel.checkpoint.files import read_meta

    kept = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    if kept != ["step_00000003"]:
        return f"checkpoints after the failure: {kept}"
    read_meta(os.path.join(run_dir, "checkpoints", kept[0]))  # every file there, whole
    half = [n for n in os.listdir(run_dir) if n.endswith(".partial")]
    return f"half-written exports left: {half}" if half else None


# ------------------------------------------------------------------ stale launch variables
def stale_trial(workdir: str) -> dict:
    """WORLD_SIZE=2 RANK=0 left in the environment: without MASTER_ADDR one line at once; with it, one line naming
    the rank that never joined within launcher.join_timeout_s; as RANK=1, the same naming rank 0."""
    row = {"kind": "stale", "killed_at_s": [], "ok": False, "why": "", "tracebacks": 0, "resumed": False}
    port = str(20000 + os.getpid() % 20000)
    cases = [("no MASTER_ADDR", {"WORLD_SIZE": "2", "RANK": "0"}, r"MASTER_ADDR and MASTER_PORT are not set", 60),
             ("rank 1 missing", {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
              r"rank\(s\) 1 of 2 never joined within launcher\.join_timeout_s=5; .*WORLD_SIZE=2 RANK=0", 60),
             ("rank 0 missing", {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
              r"rank\(s\) 0 of 2 never joined within launcher\.join_timeout_s=5; .*WORLD_SIZE=2 RANK=1", 60)]
    for what, env, want, limit in cases:
        run_dir = os.path.join(workdir, f"stale_{len(row['killed_at_s'])}")
        t0 = time.time()
        code, out = chaos._finish(start(run_dir, 1, 3, "launcher.join_timeout_s=5", env=env), timeout=limit + 60)
        row["killed_at_s"].append(f"{what} ({time.time() - t0:.0f}s)")
        row["tracebacks"] += out.count("Traceback")
        why = one_line(out, code, 2, "^automodel: error: .*" + want)
        if why is None and time.time() - t0 > limit:
            why = f"took {time.time() - t0:.0f}s"
        if why is None and os.path.exists(run_dir):
            why = f"{run_dir} was created by a run that could not start"
        if why:
            row["why"] = f"{what}: {why}"
            return row
    row["ok"] = True
    return row
