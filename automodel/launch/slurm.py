"""SLURM tasks -> one torch.distributed world: RANK, WORLD_SIZE, MASTER_ADDR... from SLURM's variables.

SLURM starts every task of a job step itself (`srun`, or submitit's sbatch script), so no torchrun sets
the env:// variables that torch.distributed needs. submitit's TorchDistributedEnvironment derives them
(the master port from the job id, so array tasks sharing a node do not collide). Used by `automodel`
run under `srun -n N`, and by the SLURM launcher on the compute node (hydra_plugins/automodel_slurm/launcher.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from automodel.errors import UserError


def check_can_submit(argv: list[str]) -> None:
    """`hydra/launcher=slurm` where SLURM's tools are missing: one line now, not a traceback from Hydra."""
    chosen = [a for a in argv if a in ("hydra/launcher=slurm", "hydra/launcher=submitit_slurm")]
    if not chosen:
        return
    if shutil.which("sbatch") is None:
        raise UserError(f"{chosen[0]} needs SLURM's sbatch on PATH: run it on a SLURM login node "
                        f"(no cluster: scripts/slurm_local.sh start), or drop {chosen[0]}")
    try:  # sbatch on PATH but no controller answering: submitit would fail after Hydra made the sweep dir
        probe = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
        problem = None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["no answer"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        problem = str(e) or type(e).__name__
    if problem:
        raise UserError(f"{chosen[0]}: no SLURM controller answers here (sinfo: {problem}); run it where the "
                        f"cluster is reachable (no cluster: scripts/slurm_local.sh start), or drop {chosen[0]}")


def slurm_task_count() -> int:
    """Tasks in the SLURM step this process belongs to (1 outside a step, e.g. in the batch script)."""
    return int(os.environ.get("SLURM_STEP_NUM_TASKS") or 1)


def export_torch_env() -> bool:
    """In a multi-task SLURM step that no launcher has set up: export torch.distributed's env:// variables.

    Returns whether it did. CUDA_VISIBLE_DEVICES is left alone: a task may already see only its own GPU
    (--gpus-per-task), and otherwise automodel picks the GPU by LOCAL_RANK."""
    if "WORLD_SIZE" in os.environ or slurm_task_count() <= 1:
        return False
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":  # a submitit job: its own reading of SLURM's variables
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    else:  # plain srun (submitit's JobEnvironment works only inside submitit jobs)
        os.environ.update(_env_from_slurm())
    return True


def _env_from_slurm() -> dict[str, str]:
    """What submitit's TorchDistributedEnvironment exports, read from the step's SLURM variables."""
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "localhost")
    if any(c in nodes for c in "[,"):
        nodes = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                               check=True, timeout=30).stdout
    world = slurm_task_count()
    n_nodes = int(os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    job = os.environ.get("SLURM_JOB_ID", "0")
    port = os.environ.get("MASTER_PORT") or str(20000 + int(job) % 40000)
    return {"MASTER_ADDR": nodes.split()[0], "MASTER_PORT": port, "RANK": os.environ["SLURM_PROCID"],
            "WORLD_SIZE": str(world), "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(world // n_nodes)}
