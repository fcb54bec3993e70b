"""`torchrun --nproc-per-node 2 -m automodel parallel=fsdp2 ...`: the launch path users type.

(Parity over every step is shown by test_distributed.py with cheaper spawned ranks; this checks the launcher
integration: env:// rendezvous, one shared run directory, rank-0-only outputs, the export, and that what the
two ranks trained is what one process trains on the same global batches.)
"""

import json
import os
import subprocess
import sys

from helpers import MICRO, train

STEPS = ["train.max_steps=6", "train.log_every=3", "train.global_batch_size=8"]


def test_torchrun_two_ranks_one_run_dir(tmp_path):
    # launcher.nproc_per_node=2 must not launch again: torchrun already did
    args = [*MICRO, "parallel=fsdp2", "launcher.nproc_per_node=2", *STEPS, "train.micro_batch_size=2"]
    (tmp_path / "torchrun").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "automodel",
         *args], cwd=str(tmp_path / "torchrun"), capture_output=True, text=True, timeout=300,
        env={**os.environ, "AUTOMODEL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    # both ranks resolved the same ${stamp:...}: exactly one run directory
    outputs = tmp_path / "torchrun" / "outputs"
    runs = [os.path.join(outputs, d, r) for d in os.listdir(outputs) for r in os.listdir(outputs / d)]
    assert len(runs) == 1, runs
    run = runs[0]
    records = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [3, 6]  # written once (rank 0), not once per rank
    assert "2 rank(s)" in proc.stdout and "dp_shard=2" in proc.stdout and "launching" not in proc.stdout
    assert os.path.isfile(os.path.join(run, "final", "model.safetensors"))

    # what the two ranks trained: one process on the same global batches (8 = 2 micro x 2 dp x 2 accumulation
    # there, 8 x 1 here) logs the same losses and token counts and exports the same weights
    (tmp_path / "one").mkdir()
    one = train(str(tmp_path / "one"), *STEPS, "train.micro_batch_size=8")
    assert [r["step"] for r in one.records] == [3, 6]
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(records, one.records)]
    assert max(diffs) < 1e-5, ([r["loss"] for r in records], [r["loss"] for r in one.records])
    assert [r["tokens"] for r in records] == [r["tokens"] for r in one.records]
    from safetensors.torch import load_file

    got = load_file(os.path.join(run, "final", "model.safetensors"))
    want = load_file(os.path.join(str(tmp_path / "one"), "final", "model.safetensors"))
    assert got.keys() == want.keys() and got
    worst = max((got[k].float() - want[k].float()).abs().max().item() for k in got)
    assert worst < 1e-5, worst
    assert records[-1]["loss"] < records[0]["loss"]  # and it learned something
