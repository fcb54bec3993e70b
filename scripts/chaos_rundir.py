"""The run-directory kinds of scripts/chaos.py: what a run does to a folder it does not own, and to the settings it
resumes with. Each trial draws its case at random and returns a table row (chaos.py's fields, plus `lost`: files
of the user's or of another run that were removed or changed, which must stay 0).

- `userdir`: a refused run (a bad data path, an unknown option, a folder that cannot be made) into a folder
  holding a user's files, an older log and sub-folders, or into a new nested path: nothing of theirs changes,
  nothing of the refused run's stays;
- `finished`: a fresh run into a finished run dir, or an earlier checkpoint resumed beside later ones: refused
  in one line, nothing changed; then `checkpoint.resume=auto` there continues it;
- `changed`: a random trajectory setting changed on resume: refused in one line naming it with both values;
  accepted by name, the run trains with it (its logged values follow the new setting);
- `simultaneous`: two jobs started at the same instant into one new dir: one trains to the end bitwise as the
  reference, the other is refused and the folder holds only the winner's record.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import chaos
import chaos_faults as faults

KINDS = ["userdir", "finished", "changed", "simultaneous"]
# (override, checkpoint's value, how the record shows it) of the settings the `changed` kind draws from
CHANGES = [("optim.lr=0.002", "optim.lr", 0.001), ("optim.weight_decay=0.0", "optim.weight_decay", 0.1),
           ("optim.warmup_steps=2", "optim.warmup_steps", 10), ("train.seed=7", "train.seed", 42),
           ("train.max_grad_norm=0.5", "train.max_grad_norm", 1.0)]


def ranks_of(kind: str) -> int:
    return 1


def run(kind: str, workdir: str, steps: int, ref: str, rng) -> dict:
    row = {"kind": kind, "killed_at_s": [], "ok": False, "why": "", "tracebacks": 0, "resumed": False, "lost": 0}
    trial = {"userdir": _userdir, "finished": _finished, "changed": _changed, "simultaneous": _simultaneous}[kind]
    why = trial(os.path.join(workdir, f"{kind}_{rng.randrange(10**9)}"), steps, ref, rng, row)
    row.update(ok=why is None, why=why or "")
    return row


def digest(folder: str) -> dict:
    """Every file and folder under `folder` (the job lock aside: each job rewrites its holder note) -> sha256."""
    found = {}
    for root, dirs, files in os.walk(folder):
        found.update({os.path.relpath(os.path.join(root, d), folder) + "/": "" for d in dirs})
        for name in files:
            if name != ".lock":
                with open(os.path.join(root, name), "rb") as f:
                    found[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def _lost(before: dict, after: dict) -> int:
    return sum(1 for k, v in before.items() if after.get(k) != v)


def _refused(run_dir: str, row: dict, *extra: str, want: str, base=None) -> str | None:
    code, out = chaos._finish(faults.start(run_dir, 1, 3, *extra, base=base))
    row["tracebacks"] += out.count("Traceback")
    return faults.one_line(out, code, 2, "^automodel: error: .*" + want)


def _userdir(run_dir: str, steps: int, ref: str, rng, row: dict) -> str | None:
    case = rng.choice(["bad data", "unknown option", "cannot be made", "new nested folder"])
    row["killed_at_s"].append(case)
    if case == "new nested folder":
        target = os.path.join(run_dir, "a", "b")
        why = _refused(target, row, "data=instruction", "data.path=/nonexistent.jsonl", want="does not exist")
        return why or (f"{run_dir} was left behind" if os.path.exists(run_dir) else None)
    os.makedirs(os.path.join(run_dir, "notes"))
    for name, text in (("experiment-notes.log", "mine\n"), ("train.log", "an older run's log\n"),
                       (os.path.join("notes", "a.txt"), "x")):
        with open(os.path.join(run_dir, name), "w") as f:
            f.write(text)
    before = digest(run_dir)
    if case == "bad data":
        why = _refused(run_dir, row, "data=instruction", "data.path=/nonexistent.jsonl", want="does not exist")
    elif case == "unknown option":
        why = _refused(run_dir, row, "parallel=fsdp3", want="no such option")
    else:  # a file where its folder should be
        why = _refused(os.path.join(run_dir, "experiment-notes.log", "run"), row, want="cannot be made")
    row["lost"] += _lost(before, digest(run_dir))
    extra = set(digest(run_dir)) - set(before)
    return why or (f"files of the user's changed: {row['lost']}" if row["lost"] else None) or \
        (f"the refused run left {sorted(extra)}" if extra else None)


def _finished(run_dir: str, steps: int, ref: str, rng, row: dict) -> str | None:
    shutil.copytree(ref, run_dir, ignore=shutil.ignore_patterns(".lock"))
    before = digest(run_dir)
    case = rng.choice(["fresh run", "earlier checkpoint"])
    row["killed_at_s"].append(case)
    if case == "fresh run":
        why = _refused(run_dir, row, want="holds another run", base=[m for m in chaos.MICRO
                                                                      if m != "checkpoint.resume=auto"])
    else:
        earliest = sorted(n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith("step_"))[0]
        why = _refused(run_dir, row, f"checkpoint.resume={run_dir}/checkpoints/{earliest}", want="mix two histories")
    row["lost"] += _lost(before, digest(run_dir))
    if why or row["lost"]:
        return why or f"{row['lost']} files of the finished run changed"
    # continuing it is what the refusal advised: a longer run from its last checkpoint
    code, out = chaos._finish(faults.start(run_dir, 1, steps + 3))
    row["tracebacks"] += out.count("Traceback")
    if code != 0:
        return f"resume=auto into the finished run failed:\n{out[-2000:]}"
    got = [r["step"] for r in chaos._records(run_dir)]
    row["resumed"] = got == list(range(1, steps + 4))
    return None if row["resumed"] else f"the continued run's steps are {got}"


def _changed(run_dir: str, steps: int, ref: str, rng, row: dict) -> str | None:
    override, key, old = rng.choice(CHANGES)
    row["killed_at_s"].append(override)
    shutil.copytree(ref, run_dir, ignore=shutil.ignore_patterns(".lock", "final"))
    kept = sorted(n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith("step_"))
    for name in kept[1:]:  # resume=auto takes the newest: keep the oldest, from which a few steps remain
        shutil.rmtree(os.path.join(run_dir, "checkpoints", name))
    before = digest(run_dir)
    new = override.split("=", 1)[1]
    why = _refused(run_dir, row, override, want=f"{key} is {old!r} in the checkpoint but .* in this run.*"
                                                f"checkpoint.allow_changed=\\[{key}\\]")
    row["lost"] += _lost(before, digest(run_dir))
    if why or row["lost"]:
        return why or f"{row['lost']} files changed by a refused resume"
    code, out = chaos._finish(faults.start(run_dir, 1, steps, override, f"checkpoint.allow_changed=[{key}]"))
    row["tracebacks"] += out.count("Traceback")
    if code != 0 or f"{key} {old!r} -> " not in out:
        return f"the accepted change did not run, or was not said:\n{out[-2000:]}"
    with open(os.path.join(run_dir, "config.yaml")) as f:
        recorded = f.read()
    leaf = key.split(".")[-1]
    if f"{leaf}: {new}" not in recorded and f"{leaf}: {float(new)}" not in recorded:
        return f"config.yaml does not record {key}={new}"
    first = int(kept[0].split("_")[1]) + 1
    got, want = chaos._records(run_dir), chaos._records(ref)
    if [r["step"] for r in got] != [r["step"] for r in want]:
        return f"steps {[r['step'] for r in got]} != {[r['step'] for r in want]}"
    same = [r["loss"] for r in got[first - 1:]] == [r["loss"] for r in want[first - 1:]]
    if same and first <= steps:  # every such change moves the trajectory: the same losses mean it was ignored
        return f"{key}={new} was accepted but the losses after step {first - 1} are the checkpoint's run's"
    return None


def _simultaneous(run_dir: str, steps: int, ref: str, rng, row: dict) -> str | None:
    env = {**os.environ, "AUTOMODEL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    base = [m for m in chaos.MICRO if not m.startswith("train.log_every=")]
    procs = [subprocess.Popen([sys.executable, "-m", "automodel", *base, f"train.max_steps={steps}",
                               f"hydra.run.dir={run_dir}", f"train.log_every={every}"], cwd=chaos.REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for every in (1, 2)]
    outs = [(p.communicate(timeout=600)[0], p.returncode) for p in procs]
    row["tracebacks"] += sum(out.count("Traceback") for out, _ in outs)
    codes = sorted(code for _, code in outs)
    if codes != [0, 2]:
        return f"exit codes {codes}, expected one 0 and one 2:\n{outs[0][0][-1500:]}\n{outs[1][0][-1500:]}"
    winner = [1, 2][[code for _, code in outs].index(0)]
    refused = outs[[code for _, code in outs].index(2)][0]
    if faults.one_line(refused, 2, 2, "is in use by another automodel job"):
        return f"the refused job did not say so in one line:\n{refused[-1500:]}"
    with open(os.path.join(run_dir, ".hydra", "overrides.yaml")) as f:
        if f"train.log_every={winner}" not in f.read():
            return "the run dir's .hydra/overrides.yaml is not the record of the job that ran"
    got = [r["loss"] for r in chaos._records(run_dir)]
    want = [r["loss"] for r in chaos._records(ref)][winner - 1::winner]
    row["resumed"] = got == want and chaos._same_weights(run_dir, ref)
    return None if row["resumed"] else "the job that ran did not train as the reference did"

