"""The on-disk side of a `dcp` checkpoint: finding committed folders, checking that every file is whole
(sizes and CRC32s recorded at the commit), each rank's RNG state, and durable writes.

Everything here reads or writes files; the collective save/restore logic stays in dcp.py.
"""

from __future__ import annotations

import json
import logging
import os
import re

from automodel.errors import UserError

log = logging.getLogger("automodel")

META = "automodel_ckpt.json"
FORMAT = 1
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(root: str) -> list[tuple[int, str]]:
    """(step, path) of every committed checkpoint folder under `root`, oldest first (validity not checked)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _NAME.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def read_meta(path: str) -> dict:
    """The checkpoint's own description, after checking that every file it lists is there, whole."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise UserError(f"'{path}' is not a complete automodel checkpoint (no {META}); give a "
                        "<run>/checkpoints/step_N folder, a run directory, or checkpoint.resume=auto")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        files, step = meta["files"], int(meta["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint '{path}' is corrupt: {META} does not parse ({e})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint '{path}' has format {meta.get('format')}; this automodel reads format {FORMAT}")
    for name, size in sorted(files.items()):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise UserError(f"checkpoint '{path}' is incomplete: file {name} is missing")
        if os.path.getsize(full) != size:
            raise UserError(f"checkpoint '{path}' is corrupt: file {name} has {os.path.getsize(full)} bytes, "
                            f"{size} were written")
    meta["step"] = step
    return meta


def find_checkpoint(path: str, folder: str = "checkpoints") -> str:
    """A checkpoint folder from what a user may name: the folder itself, a run dir, or a checkpoints dir."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise UserError(f"checkpoint '{path}' does not exist; give a <run>/checkpoints/step_N folder or a run directory")
    if os.path.isfile(os.path.join(path, META)) or _NAME.match(os.path.basename(path)):
        return path
    for root in (os.path.join(path, folder), path):
        found = latest_valid(root)
        if found:
            return found
    raise UserError(f"no complete checkpoint in '{path}' (looked for {folder}/step_N folders with {META})")


def latest_valid(root: str) -> str | None:
    """The newest committed checkpoint under `root` whose files are all there (broken ones are skipped, with a warning)."""
    for _, path in reversed(checkpoint_dirs(root)):
        try:
            read_meta(path)
            return path
        except UserError as e:
            log.warning("skipping checkpoint %s: %s", path, e)
    return None


def _crc32(path: str) -> int:
    import zlib

    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify_checksums(path: str, meta: dict, rank: int = 0, world: int = 1) -> str | None:
    """The first file (of this rank's share) whose CRC32 differs from the one recorded, as a message."""
    recorded = meta.get("crc32") or {}
    for name in sorted(recorded)[rank::world]:
        if _crc32(os.path.join(path, name)) != recorded[name]:
            return f"checkpoint '{path}' is corrupt: file {name} does not match its checksum"
    return None


def _write_synced(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_rng(folder: str, rank: int) -> None:
    import random

    import torch
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, state, gauss = random.getstate()
    save_file(tensors, os.path.join(folder, f"rng_rank{rank}.safetensors"),
              metadata={"python": json.dumps([version, list(state), gauss])})


def _load_rng(folder: str, rank: int) -> None:
    import random

    import torch
    from safetensors import safe_open

    path = os.path.join(folder, f"rng_rank{rank}.safetensors")
    if not os.path.isfile(path):  # resumed on more ranks than saved: exactness is not possible anyway
        path = os.path.join(folder, "rng_rank0.safetensors")
    with safe_open(path, framework="pt") as f:
        torch.set_rng_state(f.get_tensor("torch"))
        if "cuda" in f.keys() and torch.cuda.is_available():
            torch.cuda.set_rng_state(f.get_tensor("cuda"))
        version, state, gauss = json.loads(f.metadata()["python"])
    random.setstate((version, tuple(state), gauss))


def refuse_foreign_outputs(run_dir: str, folder: str, dirname: str, source: tuple[str, int] | None,
                           resume: str) -> None:
    """Refuse (one line) a run whose run dir holds what another run made: its checkpoints or its final export.

    A fresh run there would lose them or mix with them (keep_last would delete the new run's checkpoints in
    favour of the old, higher-numbered ones; a later resume=auto would export the old weights). `source` is the
    (path, step) this run resumes from, None for a fresh start. Resuming the run dir's own checkpoint is the run
    continuing, unless the dir holds later checkpoints too: training on from an earlier one would mix two
    histories, so that is refused as well."""
    root = os.path.join(run_dir, folder)
    ours = checkpoint_dirs(root)
    final = os.path.join(run_dir, dirname)
    elsewhere = "choose another hydra.run.dir (e.g. a new one, with checkpoint.resume=PATH to start from a checkpoint)"
    if source is not None and os.path.dirname(os.path.abspath(source[0])) == os.path.abspath(root):
        later = [s for s, path in ours if s > source[1] and _complete(path)]  # a broken one is never resumed
        if later:
            raise UserError(f"checkpoint.resume={resume} is step {source[1]}, but {root} also holds step "
                            f"{later[-1]}: training on from the earlier one here would mix two histories; "
                            f"{elsewhere}")
        return
    held = ([f"checkpoints up to step {ours[-1][0]} in {folder}/"] if ours else []) + \
        ([f"a final export in {dirname}/"] if os.path.exists(final) else [])
    if not held:
        return
    if source is None and resume == "auto":
        what = f"{' and '.join(held)}, but no complete checkpoint to resume from"
    else:
        what = " and ".join(held)
    advice = elsewhere if source is not None or resume == "auto" else \
        f"continue that run with checkpoint.resume=auto, or {elsewhere}"
    raise UserError(f"the run dir {run_dir} holds another run ({what}); {advice}")


def _complete(path: str) -> bool:
    try:
        read_meta(path)
        return True
    except UserError:
        return False
