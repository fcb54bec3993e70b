"""`torchrun --nproc-per-node 2 -m automodel parallel=fsdp2 ...`: the launch path users type.

(Parity itself is shown by test_distributed.py with cheaper spawned ranks; this checks the launcher
integration: env:// rendezvous, one shared run directory, rank-0-only outputs, the export.)
"""

import json
import os
import subprocess
import sys

from helpers import MICRO


def test_torchrun_two_ranks_one_run_dir(tmp_path):
    # launcher.nproc_per_node=2 must not launch again: torchrun already did
    args = [*MICRO, "parallel=fsdp2", "launcher.nproc_per_node=2", "train.max_steps=6", "train.log_every=3", "train.global_batch_size=8",
            "train.micro_batch_size=2"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "automodel",
         *args], cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
        env={**os.environ, "AUTOMODEL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # both ranks resolved the same ${stamp:...}: exactly one run directory
    days = os.listdir(tmp_path / "outputs")
    runs = [os.path.join(tmp_path, "outputs", d, r) for d in days for r in os.listdir(tmp_path / "outputs" / d)]
    assert len(runs) == 1, runs
    run = runs[0]
    records = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [3, 6]  # written once (rank 0), not once per rank
    assert "2 rank(s)" in proc.stdout and "dp_shard=2" in proc.stdout and "launching" not in proc.stdout
    assert os.path.isfile(os.path.join(run, "final", "model.safetensors"))
