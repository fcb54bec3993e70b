"""Checkpoint plugin `dcp`: periodic distributed checkpoints, exact resume, resharding, and the final HF folder.

Layout of a run directory:

    checkpoints/step_00000010/      one committed checkpoint (a DCP folder)
        .metadata, __<rank>_0.distcp   model + optimizer tensors (DCP; each rank writes its own shards)
        rng_rank<r>.safetensors        each rank's torch (and CUDA) RNG state; python's in its metadata
        automodel_ckpt.json            step, LR schedule, optimizer hyper-parameters, the run's fingerprint,
                                       the resolved config and the size of every file (written last)
    checkpoints/step_00000012.partial/  a save in progress (or killed): never taken for a checkpoint

files.py holds the on-disk side (finding, checking, RNG files). Pretrained HF weights are read into shards
by the model plugin (automodel/model/hf_weights.py) when the engine materializes the model.

A save writes everything into `<name>.partial/`, and only then does rank 0 write `automodel_ckpt.json` and
rename the folder to its final name: a crash (even kill -9) at any point leaves either no new folder or a
`.partial` one, and the previous checkpoint stays the latest valid one. Resume only reads; it refuses (one
line) a checkpoint from another model or an incompatible config, and one whose files are missing or
truncated. The DCP payload holds tensors only (the rest is JSON), and loading refuses pickled objects, so
resuming never unpickles anything.

The data position needs no state of its own: batches are a pure function of (seed, step), so the data
plugin restarts at the checkpoint's step.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any, Optional

from automodel.errors import UserError
from automodel.write_errors import agree, attempt

log = logging.getLogger("automodel")
_IF_FULL = ("; the previous checkpoint is kept and this partial one removed: free space (or lower "
            "checkpoint.keep_last), then resume with checkpoint.resume=auto")

from automodel.checkpoint.files import (  # noqa: F401  (read_meta, latest_valid ... are this plugin's API too)
    FORMAT, META, _crc32, _fsync_dir, _load_rng, _save_rng, _write_synced, checkpoint_dirs, find_checkpoint,
    latest_valid, read_meta, refuse_foreign_outputs, verify_checksums,
)
from automodel.checkpoint.settings import check_resumable


@dataclasses.dataclass
class DCPConfig:
    every_steps: int = 0  # save a checkpoint every N optimizer steps (0: never)
    keep_last: int = 2  # committed checkpoints kept (older ones are deleted); 0 keeps all
    resume: Optional[str] = None  # null: start fresh; auto: latest valid checkpoint of this run dir; or a path
    async_save: bool = False  # write in a background thread (dcp.async_save); the step only waits for a CPU copy
    checksums: bool = True  # a CRC32 of every file, checked on resume and export (catches corrupted bytes)
    folder: str = "checkpoints"  # inside the run directory
    export_final: bool = True  # write <run dir>/<dirname>/ as an HF folder at the end
    dirname: str = "final"
    export_every_save: bool = False  # also write an HF folder into every checkpoint (checkpoints/step_N/hf/)
    merge_adapter: bool = True  # under PEFT: also write the merged full model (the adapter is always in adapter/)
    # settings a resumed run may change (keys such as optim.lr, or whole sections such as optim); any other
    # change from the checkpoint's settings is refused (checkpoint/settings.py)
    allow_changed: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ResumePoint:
    path: str
    step: int
    meta: dict


class DCPCheckpoint:
    Config = DCPConfig

    def __init__(self, config: DCPConfig):
        if config.every_steps < 0:
            raise UserError(f"checkpoint.every_steps={config.every_steps} must be 0 (never) or positive")
        if config.keep_last < 0:
            raise UserError(f"checkpoint.keep_last={config.keep_last} must be 0 (keep all) or positive")
        if config.resume is not None and not str(config.resume).strip():
            raise UserError("checkpoint.resume is empty; use null, auto, or a checkpoint path")
        if config.allow_changed and not _resuming(config.resume):
            log.warning("checkpoint.allow_changed=%s has no effect: this run does not resume (checkpoint.resume=null)",
                        list(config.allow_changed))
        self.cfg = config
        self._pending = None  # (future, staging, final, meta) of an async save not yet committed
        self._async_pg = None
        self._saved_step = None  # the step of the latest save this run started
        self._drop_at_exit = False

    # ------------------------------------------------------------------ resume
    def resume_point(self, run_dir: str, fingerprint: dict) -> ResumePoint | None:
        """Which checkpoint to resume from (read-only; every rank). None: start at step 0."""
        try:
            return self._resume_point(run_dir, fingerprint)
        except (OSError, ValueError, KeyError, TypeError) as e:  # a file vanished or is garbled mid-read
            raise UserError(f"cannot read the checkpoint to resume from in {run_dir}: {_first_line(e)}; resume "
                            "from another one (checkpoint.resume=PATH) or start fresh (checkpoint.resume=null)") \
                from None

    def _resume_point(self, run_dir: str, fingerprint: dict) -> ResumePoint | None:
        want = self.cfg.resume
        if not _resuming(want):
            refuse_foreign_outputs(run_dir, self.cfg.folder, self.cfg.dirname, None, "null")
            return None
        if str(want) == "auto":
            path = latest_valid(os.path.join(run_dir, self.cfg.folder))
            if path is None:
                refuse_foreign_outputs(run_dir, self.cfg.folder, self.cfg.dirname, None, "auto")
                log.info("checkpoint.resume=auto: no checkpoint in %s yet; starting at step 0",
                         os.path.join(run_dir, self.cfg.folder))
                return None
        else:
            path = find_checkpoint(str(want), self.cfg.folder)
        meta = read_meta(path)
        check_resumable(path, meta.get("fingerprint", {}), fingerprint, list(self.cfg.allow_changed))
        refuse_foreign_outputs(run_dir, self.cfg.folder, self.cfg.dirname, (path, meta["step"]), str(want))
        return ResumePoint(path, meta["step"], meta)

    def restore(self, point: ResumePoint, state) -> int:
        """Collective: load model, optimizer, LR schedule and RNG states from `point`; return its step."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
        )

        t0 = time.perf_counter()
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        try:  # each rank checks its share of the files (sizes are always checked, by read_meta)
            bad = verify_checksums(point.path, point.meta, rank, world) if self.cfg.checksums else None
        except OSError as e:  # removed or unreadable under us (another process pruning it, a failing disk)
            bad = f"cannot read checkpoint '{point.path}': {_first_line(e)}"
        if world > 1:
            found = [None] * world
            dist.all_gather_object(found, bad)
            bad = next((b for b in found if b), None)
        if bad:
            raise UserError(bad)
        model_sd = get_model_state_dict(state.model)
        optim_sd = get_optimizer_state_dict(state.model, state.optimizer)  # initializes empty optimizer state
        payload = {"model": model_sd, "optim": optim_sd["state"]}
        try:
            dcp.load(payload, checkpoint_id=point.path, planner=_TensorsOnlyLoadPlanner())
        except UserError:
            raise
        except Exception as e:  # DCP wraps per-rank failures; keep one line
            raise UserError(f"cannot load checkpoint '{point.path}': {_first_line(e)}") from None
        set_model_state_dict(state.model, payload["model"])
        _check_groups(point.meta["param_groups"], optim_sd["param_groups"])
        # this run's hyper-parameters (equal to the checkpoint's unless a change was accepted by name: then the
        # new value is the one that trains), the checkpoint's moments and step counts
        set_optimizer_state_dict(state.model, state.optimizer,
                                 {"state": payload["optim"], "param_groups": optim_sd["param_groups"]})
        peak_lrs = list(getattr(state.scheduler, "base_lrs", []))
        state.scheduler.load_state_dict(point.meta["scheduler"])
        if peak_lrs:
            state.scheduler.base_lrs = peak_lrs
        _lr_from_schedule(state.scheduler, state.optimizer)
        if getattr(state, "extra", None) is not None and "extra" in point.meta:
            state.extra.load_state_dict(point.meta["extra"])
        _load_rng(point.path, rank)
        log.info("resumed from %s (step %d) in %.1fs", point.path, point.step, time.perf_counter() - t0)
        return point.step

    # ------------------------------------------------------------------ save
    def after_step(self, step: int, state, run_dir: str) -> None:
        """Collective: save when `step` is due; commit an async save that has finished."""
        self._poll()
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            self.save(step, state, run_dir)

    def save_now(self, step: int, state, run_dir: str) -> str:
        """Collective: `step` saved and committed before returning (the checkpoint a stop signal asks for);
        returns its folder."""
        final = os.path.join(run_dir, self.cfg.folder, f"step_{step:08d}")
        if self._saved_step != step:
            self.save(step, state, run_dir, background=False)
        self._wait()
        return final

    def finish(self, state, run_dir: str) -> None:
        """Collective: wait for an async save in flight and commit it."""
        import torch.distributed as dist

        self._wait()
        if dist.is_initialized():
            dist.barrier()

    def save(self, step: int, state, run_dir: str, background: bool | None = None) -> str:
        """Collective. `background`: write in a background thread (default: checkpoint.async_save).

        Every part that writes is followed by the ranks agreeing on its outcome (write_errors.agree): a full
        disk ends every rank with the same line, the previous checkpoint untouched and the partial removed."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        self._wait()  # one save in flight at most
        self._saved_step = step
        rank = dist.get_rank() if dist.is_initialized() else 0
        root = os.path.join(run_dir, self.cfg.folder)
        final = os.path.join(root, f"step_{step:08d}")
        staging = final + ".partial"
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        agree(_attempt(lambda: os.makedirs(staging), final) if rank == 0 else None, staging)
        t0 = time.perf_counter()
        optim_sd = get_optimizer_state_dict(state.model, state.optimizer)
        payload = {"model": get_model_state_dict(state.model), "optim": optim_sd["state"]}
        meta = {
            "format": FORMAT, "step": step, "time": time.time(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "fingerprint": state.fingerprint,
            "scheduler": state.scheduler.state_dict(),
            "param_groups": optim_sd["param_groups"],
            "config_yaml": state.config_yaml,
        }
        if getattr(state, "extra", None) is not None:
            meta["extra"] = state.extra.state_dict()
        json.dumps(meta)  # fail now, in every rank, if something is not JSON
        agree(_attempt(lambda: _save_rng(staging, rank), final), staging)
        if self.cfg.export_every_save and state.export_hf is not None:
            try:  # inside the staging folder: committed with it
                state.export_hf(os.path.join(staging, "hf"))
            except UserError:  # every rank (the export agrees on its outcome): the partial goes with it
                if rank == 0:
                    shutil.rmtree(staging, ignore_errors=True)
                raise
        if self.cfg.async_save if background is None else background:
            if self._async_pg is None:  # the background thread's collectives must not share the training group
                self._async_pg = dist.new_group(backend="gloo") if dist.is_initialized() else None
            future = dcp.async_save(payload, checkpoint_id=staging, process_group=self._async_pg)
            self._pending = (future, staging, final, meta, t0)
            if rank == 0 and not self._drop_at_exit:  # the run may end (fail) before this save is committed
                atexit.register(self._drop_uncommitted)
                self._drop_at_exit = True
            log.info("checkpoint of step %d: copied for a background save in %.2fs", step, time.perf_counter() - t0)
            return final
        # DCP raises the same error on every rank; agreeing makes the diagnosis (no space, say) the same too
        agree(_attempt(lambda: dcp.save(payload, checkpoint_id=staging), final), staging)
        crcs = self._gather_crcs(staging, final, rank)
        agree(_attempt(lambda: self._commit(staging, final, meta, crcs), final) if rank == 0 else None, staging)
        if rank == 0:
            log.info("saved checkpoint %s in %.2fs", final, time.perf_counter() - t0)
        return final

    def _gather_crcs(self, staging: str, final: str, rank: int) -> dict:
        """Each rank sums the files it wrote; rank 0 adds the rest at the commit."""
        import torch.distributed as dist

        if not self.cfg.checksums:
            return {}
        crcs = {}

        def mine():
            for n in os.listdir(staging):
                if n.startswith(f"__{rank}_") or n == f"rng_rank{rank}.safetensors":
                    crcs[n] = _crc32(os.path.join(staging, n))

        agree(_attempt(mine, final), staging)
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, crcs)
            crcs = {k: v for part in parts for k, v in part.items()}
        return crcs

    def _drop_uncommitted(self) -> None:
        """At exit (rank 0): a background save the run never committed (it failed first) leaves no partial."""
        if self._pending is not None:
            future, staging = self._pending[0], self._pending[1]
            try:
                future.result()  # the write ends first (Python has already joined its thread)
            except BaseException:
                pass
            shutil.rmtree(staging, ignore_errors=True)

    def _poll(self) -> None:
        """Collective: commit a background save once it has finished on every rank (the ranks agree, so a
        failed one ends them all at the same step)."""
        if self._pending is None:
            return
        import torch
        import torch.distributed as dist

        done = self._pending[0].done()
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1 if done else 0], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            done = bool(flag.item())
        if done:
            self._wait()

    def _wait(self) -> None:
        """Collective: wait for the background save, then commit it (rank 0)."""
        if self._pending is None:
            return
        import torch.distributed as dist

        future, staging, final, meta, t0 = self._pending
        self._pending = None
        agree(_attempt(future.result, final), staging)  # a failed background save: on every rank, at the same step
        main = not dist.is_initialized() or dist.get_rank() == 0
        # the coordinator's future ends after every rank's data and the global .metadata are written
        agree(_attempt(lambda: self._commit(staging, final, meta), final) if main else None, staging)
        if main:
            log.info("saved checkpoint %s in the background (%.2fs after the step)", final, time.perf_counter() - t0)

    def _commit(self, staging: str, final: str, meta: dict, crcs: dict | None = None) -> None:
        """Rank 0: describe the written files, then rename the folder; the rename is the commit."""
        files = [n for n in sorted(os.listdir(staging)) if os.path.isfile(os.path.join(staging, n))]
        meta = dict(meta, files={n: os.path.getsize(os.path.join(staging, n)) for n in files})
        if self.cfg.checksums:
            crcs = crcs or {}
            meta["crc32"] = {n: crcs[n] if n in crcs else _crc32(os.path.join(staging, n)) for n in files}
        _write_synced(os.path.join(staging, META), json.dumps(meta, indent=1))
        _before_commit(staging)
        if os.path.isdir(final):  # an abandoned later attempt of this step (e.g. after resuming an older checkpoint)
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(os.path.dirname(final))
        self._prune(os.path.dirname(final), meta["step"])

    def _prune(self, root: str, step: int) -> None:
        """keep_last among this run's history (steps up to the one just saved): a later step's folder is never
        a reason to delete the checkpoint this run just made."""
        if self.cfg.keep_last:
            history = [(s, path) for s, path in checkpoint_dirs(root) if s <= step]
            for _, path in history[:-self.cfg.keep_last]:
                shutil.rmtree(path, ignore_errors=True)
        in_flight = self._pending[1] if self._pending else None
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if name.endswith(".partial") and path != in_flight:
                shutil.rmtree(path, ignore_errors=True)  # left by a crash: never a checkpoint

    # ------------------------------------------------------------------ export
    def export_final(self, model, tokenizer, out_dir: str) -> None:
        """Rank 0: write an HF folder (config, generation config, safetensors, tokenizer).

        Under PEFT the peft plugin has already written the adapter, in PEFT format, to out_dir/adapter/,
        and `model` is the merged model: it is written too unless checkpoint.merge_adapter=false (then the
        folder holds adapter/ and the tokenizer, and the adapter folder gets the tokenizer as well)."""
        adapter = os.path.join(out_dir, "adapter")
        if os.path.isdir(adapter) and not self.cfg.merge_adapter:
            tokenizer.save_pretrained(adapter)
        else:
            model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)


def _attempt(fn, final: str):
    return attempt(fn, final, "save the checkpoint", _IF_FULL)


def _before_commit(staging: str) -> None:
    """A seam for tests that kill the process between the write and the commit."""


def _first_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text[:300] or type(e).__name__


class _TensorsOnlyLoadPlanner:
    """DCP's default load planner, refusing pickled (non-tensor) entries: loading never unpickles."""

    def __new__(cls):
        from torch.distributed.checkpoint import DefaultLoadPlanner

        class Planner(DefaultLoadPlanner):
            def load_bytes(self, read_item, value):
                raise UserError(f"checkpoint entry '{read_item.dest_index.fqn}' is a pickled object; automodel "
                                "checkpoints hold tensors only, refusing to unpickle it")

        return Planner()


def _check_groups(saved: list[dict], current: list[dict]) -> None:
    if len(saved) != len(current):
        raise UserError(f"the checkpoint's optimizer has {len(saved)} parameter groups, this run's has "
                        f"{len(current)}; resume with the same model, peft and optimizer settings")


def _resuming(want) -> bool:
    return want is not None and str(want).lower() not in ("null", "none", "false")


def _lr_from_schedule(scheduler, optimizer) -> None:
    """Set the next step's LR from this run's schedule at the restored position.

    With the same train.max_steps this is the saved LR exactly (the same formula on the same step); a run
    extended to more steps continues on its own, longer schedule instead of the old one's next value."""
    import warnings

    if not hasattr(scheduler, "get_lr"):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "call get_last_lr()": here the value for the next step is wanted
        lrs = scheduler.get_lr()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def load_model_state(path: str, template: dict[str, Any]) -> dict[str, Any]:
    """Offline (one process, no process group needed): fill `template` (fqn -> tensor) with the saved model."""
    import torch.distributed.checkpoint as dcp

    bad = verify_checksums(path, read_meta(path))
    if bad:
        raise UserError(bad)
    payload = {"model": template}
    try:
        dcp.load(payload, checkpoint_id=path, planner=_TensorsOnlyLoadPlanner())
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot load checkpoint '{path}': {_first_line(e)}") from None
    return payload["model"]
