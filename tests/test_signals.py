"""Faults that end a run in one line: Ctrl-C/SIGTERM (a checkpoint at the step it stops at, resumed bitwise), a
full disk during a save or the export, and launch variables left over from another job.

Fixed points of the kinds scripts/chaos.py draws at random over many trials (scripts/chaos_faults.py holds the
checks both share). The disk tests mount a small tmpfs (root) and skip, saying why, where they cannot.
"""

import os
import random
import signal
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import chaos  # noqa: E402
import chaos_faults as faults  # noqa: E402
from helpers import compose  # noqa: E402

from automodel.errors import UserError  # noqa: E402


def _ok(row):
    assert row["killed_at_s"], row  # the fault really happened before the job could finish
    assert row["tracebacks"] == 0 and row["ok"], row["why"]


def test_ctrl_c_saves_the_step_it_stops_at_in_one_line_and_the_resumed_run_is_bitwise_the_same(tmp_path):
    ref = str(tmp_path / "ref")
    _train(ref)  # in this process: the same config as the command line's, so the same numbers
    row = faults.signal_trial(str(tmp_path), 1, 6, ref, random.Random(0), signal.SIGINT, point="step 3+0.05s")
    _ok(row)
    assert row["resumed"]


def test_sigterm_to_the_launcher_stops_every_rank_at_one_step_saved_in_one_line(tmp_path):
    """The ranks are in sessions of their own: the signal reaches the launcher alone, which forwards it. The
    2-rank resume is compared bitwise by scripts/chaos.py (--kinds sigterm-2); here: exit code, the one line, the
    checkpoint of the step the line names, no rank left."""
    row = faults.signal_trial(str(tmp_path), 2, 100000, None, random.Random(0), signal.SIGTERM,
                              point="step 2+0.05s")
    _ok(row)
    assert not row["resumed"]  # no reference run here to compare with


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, ranks):
    proc = faults.start(str(tmp_path / "run"), ranks, 100000)
    assert chaos._wait_for(proc, str(tmp_path / "run"), "step 2+0.01s")
    t0 = time.time()
    # Ctrl-C pressed again and again: two signals before Python's handler runs count as one, so the second that
    # counts comes while the first waits for its step boundary, or saves
    while proc.poll() is None and time.time() - t0 < 10:
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.05)
    code, out = chaos._finish(proc, timeout=120)
    why = faults.one_line(out, code, 130, r"^automodel: stopped at once by a second SIGINT; .* checkpoint\.resume=auto "
                                          rf"hydra\.run\.dir={tmp_path / 'run'} resumes from the latest checkpoint")
    assert why is None, why
    assert time.time() - t0 < 30 and not faults.job_processes(str(tmp_path / "run"))


@pytest.mark.parametrize("when,extra,want", [
    ("set-up+0.0s", [], r"^automodel: stopped by SIGTERM during set-up, before the first step; nothing was trained"),
    ("step 2+0.01s", ["checkpoint=hf_export"], r"^automodel: stopped by SIGTERM after step \d+ of 100000; nothing "
                                               r"was saved \(checkpoint=hf_export saves no training state mid-run\)$"),
])
def test_a_signal_in_set_up_or_with_a_plugin_that_cannot_save_still_ends_in_one_line(tmp_path, when, extra, want):
    run = str(tmp_path / "run")
    base = [o for o in chaos.MICRO if not extra or not o.startswith("checkpoint.")]  # hf_export has none of them
    proc = faults.start(run, 1, 100000, *extra, base=base)
    assert faults._wait_for_point(proc, run, when)
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = chaos._finish(proc, timeout=120)
    why = faults.one_line(out, code, 143, want)
    assert why is None, why
    assert not os.path.isdir(os.path.join(run, "checkpoints")) or not os.listdir(os.path.join(run, "checkpoints"))


# ------------------------------------------------------------------ disk full
@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    why = faults.mount_tmpfs(str(mount))
    if why:
        print(f"skipped: {why}")
        pytest.skip(why)
    yield mount
    faults.unmount(str(mount))


def _train(out: str, *overrides: str):
    from automodel.engine.run import train

    os.makedirs(out, exist_ok=True)  # Hydra's part on the command line
    return train(compose(*chaos.MICRO, "train.max_steps=6", *overrides), out)


def _first_checkpoint_then_full(run: str, mount) -> None:
    """A step-3 checkpoint, then a ballast that leaves less free space than the next one needs."""
    _train(run, "train.max_steps=3", "checkpoint.export_final=false")
    first = os.path.join(run, "checkpoints", "step_00000003")
    size = sum(os.path.getsize(os.path.join(first, n)) for n in os.listdir(first))
    faults.fill(str(mount), min(256 << 10, size // 4))


def test_disk_full_in_a_save_or_the_export_is_one_line_and_resume_after_is_bitwise(tmpfs, tmp_path):
    run = str(tmpfs / "run")
    ref = _train(str(tmp_path / "ref"))
    _first_checkpoint_then_full(run, tmpfs)
    # the command line: one line, exit 2, for a sync and an async save (the async one may meet the full disk in
    # metrics.jsonl first: that line is named then); the step-3 checkpoint intact, nothing half-written left
    for mode in ("false", "true"):
        code, out = chaos._finish(faults.start(run, 1, 6, f"checkpoint.async_save={mode}"))
        why = faults.one_line(out, code, 2, rf"^automodel: error: cannot \w+ the [\w' ]+ {run}/"
                                            r"(checkpoints/step_00000006|metrics\.jsonl): no space left on device")
        assert why is None, f"async_save={mode}: {why}"
        assert faults._intact(run) is None, faults._intact(run)
    with pytest.raises(UserError, match=rf"^cannot write the export {run}/final: no space left on device"):
        _train(run, "checkpoint.every_steps=0")
    assert faults._intact(run) is None, faults._intact(run)
    os.unlink(tmpfs / "ballast")
    resumed = _train(run)
    assert [r["step"] for r in resumed.records] == [4, 5, 6]
    assert chaos._records(run) == chaos._records(str(tmp_path / "ref"))  # every line, every field but timing
    assert chaos._same_weights(run, str(tmp_path / "ref")) and ref.records


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_disk_full_on_two_ranks_ends_every_rank_with_the_same_line(tmpfs, async_save):
    run = str(tmpfs / "run")
    _first_checkpoint_then_full(run, tmpfs)  # one process wrote it; two ranks resume it (resharded)
    code, out = chaos._finish(faults.start(run, 2, 6, f"checkpoint.async_save={async_save}"), timeout=300)
    why = faults.one_line(out, code, 2, rf"^automodel: error: cannot \w+ the [\w' ]+ {run}/"
                                        r"(checkpoints/step_00000006|metrics\.jsonl): no space left on device")
    assert why is None, why
    assert not faults.job_processes(run) and faults._intact(run) is None, faults._intact(run)


# ------------------------------------------------------------------ launch variables
def test_stale_world_size_and_rank_end_in_one_line_naming_the_missing_ranks_and_the_variables(tmp_path):
    row = faults.stale_trial(str(tmp_path))
    assert row["ok"] and row["tracebacks"] == 0, row["why"]
    assert len(row["killed_at_s"]) == 3, row


def test_join_timeout_must_be_positive(tmp_path):
    from helpers import cli

    proc = cli("launcher.join_timeout_s=0", "launcher.nproc_per_node=2", f"hydra.run.dir={tmp_path / 'r'}",
               cwd=str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "automodel: error: launcher.join_timeout_s=0.0 must be a positive number of seconds"], proc.stderr
    assert not (tmp_path / "r").exists()
