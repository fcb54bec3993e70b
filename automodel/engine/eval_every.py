"""train.eval_every: lm-evaluation-harness on the model as trained so far, its scores in that step's record.

Every rank takes part in gathering the weights into an HF folder (as the final export does); rank 0 then runs
`automodel eval` on it in a child process, and the other ranks wait on a gloo group of their own whose timeout
is eval.timeout_minutes (the training groups' timeouts are sized for collectives, not for an evaluation).
A child process, not a call: lm-eval reseeds Python's, numpy's and torch's generators and configures logging;
in the trainer, rank 0's dropout would drift from the other ranks' and a resumed run would not repeat itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys

from automodel.errors import UserError

log = logging.getLogger("automodel")


class HarnessEval:
    def __init__(self, settings, export_hf, is_main: bool, out_dir: str):
        import datetime

        import torch.distributed as dist
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per shard written, each evaluation: noise in the run's output
        self.settings, self.export_hf, self.is_main = settings, export_hf, is_main
        self.folder = os.path.join(out_dir, "eval")
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:  # collective: every rank builds it, at set-up
            self.group = dist.new_group(backend="gloo",
                                        timeout=datetime.timedelta(minutes=settings.timeout_minutes))

    def __call__(self, step: int) -> dict:
        """Collective. The scores ({"eval/<task>/<metric>": value}) on rank 0, {} on the others."""
        import torch.distributed as dist

        model_dir = os.path.join(self.folder, f".step_{step:08d}-model")
        self.export_hf(model_dir)
        outcome = None
        if self.is_main:
            try:
                outcome = self._run(model_dir, step)
            except UserError as e:
                outcome = str(e)
            finally:
                shutil.rmtree(model_dir, ignore_errors=True)
        if self.group is not None:
            box = [outcome]
            dist.broadcast_object_list(box, src=0, group=self.group)
            outcome = box[0]
        if isinstance(outcome, str):  # every rank stops with rank 0's line
            raise UserError(outcome)
        return outcome if self.is_main else {}

    def _run(self, model_dir: str, step: int) -> dict:
        from automodel.evaluation.harness import scores

        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise UserError("train.eval_every needs the merged model, but the export holds only the PEFT adapter "
                            "(checkpoint.merge_adapter=false); set checkpoint.merge_adapter=true")
        name = f"step_{step:08d}"
        results, transcript = os.path.join(self.folder, f"{name}.json"), os.path.join(self.folder, f"{name}.log")
        overrides = [f"eval.{k}={json.dumps(v)}" for k, v in dataclasses.asdict(self.settings).items()]
        command = [sys.executable, "-m", "automodel", "eval", model_dir, *overrides, "--output", results]
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1"}  # a plain process, not a member of this job
        for key in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "AUTOMODEL_ERROR_DIR"):
            env.pop(key, None)
        with open(transcript, "w") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0:
            with open(transcript) as f:
                said = [line.strip() for line in f if line.startswith("automodel: error:")]
            reason = said[-1].removeprefix("automodel: error: ") if said else f"exit code {done.returncode}"
            raise UserError(f"evaluation at step {step} failed: {reason} (its output: {transcript})")
        with open(results) as f:
            found = scores(json.load(f))
        log.info("step %d eval: %s", step, "  ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in found.items()))
        return found
