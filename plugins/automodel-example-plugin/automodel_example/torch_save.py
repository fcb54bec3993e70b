"""Checkpoint plugin `torch_save`: one-process checkpoints with torch.save, exact resume, and the final HF folder.

The engine calls, in this order: `resume_point(run_dir, fingerprint)` (every rank, read-only, before the data
and the model are built), `restore(point, state)` (after the optimizer exists), `after_step(step, state,
run_dir)` after every optimizer step, `finish(state, run_dir)` after the last one, and `export_final(model,
tokenizer, out_dir)` on rank 0 to write the final HF folder into the staging folder the engine renames into
place. The engine also reads `cfg.export_final` and `cfg.dirname` (whether, and where in the run directory,
to export). The optional `save_now(step, state, run_dir)` is the checkpoint a preemption signal asks for.

`state` is the engine's TrainState: `model`, `optimizer`, `scheduler`, `fingerprint` (what a resumed run must
share with the saved one) and `config_yaml`. The data needs no state here: the data plugin's batches are a
pure function of (seed, step), so the engine restarts it at the restored step.

Saved files hold tensors and plain containers only and are read with `weights_only=True`, so resuming never
unpickles arbitrary objects. One file per checkpoint, written under a temporary name and renamed: a crash
leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from typing import Any, Optional

from automodel.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TorchSaveConfig:
    every_steps: int = 0  # save every N optimizer steps (0: never)
    keep_last: int = 2  # checkpoints kept (older ones are deleted); 0 keeps all
    resume: Optional[str] = None  # null: start fresh; auto: the latest in <run dir>/<folder>, if any; or a .pt file
    folder: str = "torch_checkpoints"  # inside the run directory
    export_final: bool = True  # the engine reads these two: write <run dir>/<dirname>/ as an HF folder
    dirname: str = "final"


@dataclasses.dataclass
class Point:
    path: str
    step: int
    saved: dict[str, Any]


class TorchSave:
    Config = TorchSaveConfig

    def __init__(self, config: TorchSaveConfig):
        if config.every_steps < 0 or config.keep_last < 0:
            raise UserError("checkpoint.every_steps and checkpoint.keep_last must be 0 or positive")
        self.cfg = config

    def resume_point(self, run_dir: str, fingerprint: dict):
        import torch
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            raise UserError(f"checkpoint=torch_save saves from one process but this run has {dist.get_world_size()} "
                            "ranks; use checkpoint=dcp")
        want = self.cfg.resume
        if want is None or want.lower() in ("", "null", "none", "false"):
            return None
        if want == "auto":  # also what the SLURM launcher sets when it requeues a preempted job
            found = sorted(glob.glob(os.path.join(run_dir, self.cfg.folder, "step_*.pt")))
            if not found:
                log.info("checkpoint.resume=auto: no checkpoint in %s yet; starting at step 0",
                         os.path.join(run_dir, self.cfg.folder))
                return None
            path = found[-1]
        elif os.path.isfile(os.path.expanduser(want)):
            path = os.path.expanduser(want)
        else:
            raise UserError(f"checkpoint.resume='{want}' is not a checkpoint file; use null, auto or a step_N.pt path")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read checkpoint '{path}': {' '.join(str(e).split())[:200]}") from None
        if not isinstance(saved, dict) or not {"step", "fingerprint", "model"} <= set(saved):
            raise UserError(f"'{path}' is not a checkpoint=torch_save checkpoint")
        theirs = json.loads(saved["fingerprint"])
        differ = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
        if differ:
            raise UserError(f"cannot resume from '{path}': it was saved with other {', '.join(differ)} settings; "
                            "resume with the same settings or start fresh (checkpoint.resume=null)")
        return Point(path, saved["step"], saved)

    def restore(self, point: Point, state) -> int:
        import torch

        s = point.saved
        state.model.load_state_dict(s["model"])
        state.optimizer.load_state_dict(s["optimizer"])
        state.scheduler.load_state_dict(s["scheduler"])
        torch.set_rng_state(s["rng"])
        log.info("resumed from %s (step %d)", point.path, point.step)
        return point.step

    def after_step(self, step: int, state, run_dir: str) -> None:
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            self.save_now(step, state, run_dir)

    def save_now(self, step: int, state, run_dir: str) -> None:
        import torch

        folder = os.path.join(run_dir, self.cfg.folder)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step_{step:08d}.pt")
        payload = {"step": step, "fingerprint": json.dumps(state.fingerprint), "model": state.model.state_dict(),
                   "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                   "rng": torch.get_rng_state()}
        torch.save(payload, path + ".partial")
        os.replace(path + ".partial", path)  # the rename commits it
        if self.cfg.keep_last:
            for old in sorted(glob.glob(os.path.join(folder, "step_*.pt")))[: -self.cfg.keep_last]:
                os.remove(old)
        log.info("saved checkpoint %s", path)

    def finish(self, state, run_dir: str) -> None:
        pass  # every save is synchronous: nothing in flight

    def export_final(self, model, tokenizer, out_dir: str) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
