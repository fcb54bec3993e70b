"""Launching without typing torchrun, and Hydra multirun sweeps with their summary."""

import csv
import json
import os

from helpers import MICRO, cli

FAST = [*MICRO, "train.max_steps=4", "train.log_every=2", "train.global_batch_size=8"]


def _run_dirs(root):
    out = root / "outputs"
    return [out / d / r for d in os.listdir(out) for r in os.listdir(out / d)] if out.exists() else []


def test_launcher_nproc_per_node_starts_the_ranks_itself(tmp_path):
    proc = cli(*FAST, "launcher.nproc_per_node=2", "parallel=fsdp2", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "automodel: error" not in proc.stderr, proc.stderr[-3000:]
    assert "launching 2 local ranks" in proc.stdout
    assert "2 rank(s)" in proc.stdout and "8 = 4 micro x 2 dp x 1 accumulation" in proc.stdout
    runs = _run_dirs(tmp_path)
    assert len(runs) == 1, runs
    records = [json.loads(ln) for ln in open(runs[0] / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 4]
    assert (runs[0] / "final" / "model.safetensors").is_file()


def test_launcher_refusals_are_one_line_before_any_rank_starts(tmp_path):
    proc = cli(*FAST, "launcher.nproc_per_node=3", "parallel=fsdp2", cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    expected = ("automodel: error: train.global_batch_size=8 is not divisible by the 3 data-parallel ranks; "
                "pick a multiple of 3")
    assert proc.stderr.strip().splitlines()[-1] == expected
    # one line is all the user gets: no traceback, no second error (a crash after the message would not be exit 2)
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert errors == [expected], proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "launching" not in proc.stdout and not os.listdir(tmp_path)


def test_a_refusal_inside_the_ranks_is_printed_once(tmp_path):
    proc = cli(*FAST, "launcher.nproc_per_node=2", "parallel=fsdp2", "data.path=/nonexistent.jsonl",
               cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "launching 2 local ranks" in proc.stdout  # it is the ranks that refused, each of them, and one line shows
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("automodel: error:")]
    assert errors == ["automodel: error: data.path='/nonexistent.jsonl' does not exist or is not a file"], proc.stderr
    assert not [ln for ln in proc.stderr.splitlines() if "error" in ln.lower() and ln not in errors], proc.stderr
    assert "Traceback" not in proc.stderr and not _run_dirs(tmp_path)


def test_multirun_sweep_runs_every_point_and_writes_a_summary(tmp_path):
    proc = cli("-m", *FAST, "checkpoint.export_final=false", "optim.lr=1e-3,3e-3", "train.seed=1,2",
               cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "automodel: error" not in proc.stderr, proc.stderr[-3000:]
    assert "sweep summary (4 jobs)" in proc.stdout
    (day,) = os.listdir(tmp_path / "multirun")
    (sweep,) = os.listdir(tmp_path / "multirun" / day)
    sweep_dir = tmp_path / "multirun" / day / sweep
    assert sorted(d for d in os.listdir(sweep_dir) if d.isdigit()) == ["0", "1", "2", "3"]
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert [(r["optim.lr"], r["train.seed"]) for r in rows] == [("0.001", "1"), ("0.001", "2"), ("0.003", "1"),
                                                                ("0.003", "2")]
    for row in rows:
        job_records = [json.loads(ln) for ln in open(sweep_dir / row["job"] / "metrics.jsonl")]
        assert float(row["final_loss"]) == job_records[-1]["loss"] and row["status"] == "ok"
    assert rows[0]["final_loss"] != rows[2]["final_loss"]  # the swept value really reached each job
