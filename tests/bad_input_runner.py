"""Run many `automodel` command lines in one process tree, paying the import cost once.

    python bad_input_runner.py CASES.json RESULTS.json WORKDIR

CASES.json is a list of {"id", "argv", "env"?, "sys_path"?, "timeout"?}. The parent imports automodel and its
heavy dependencies (torch, transformers, peft, hydra, every installed plugin) once, without running any
tensor op (torch's thread pool must not exist before fork), then forks one child per case, at most two at a
time. A child chdirs into an empty folder WORKDIR/<id>/cwd, sends fds 1 and 2 to files and calls
`automodel.cli.main(argv)` exactly as the console script would; its exit status is what a shell would see.
The parent records, per case: the exit code, stdout, stderr, what is left in the working folder, and
whether any `hydra.*.dir=` path the case names changed. Each child starts from a copy of the parent's
memory, so Hydra's global state is fresh every time.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

TIMEOUT_S = 90  # per case, unless it names its own; a case still running then is killed (and fails)
PARALLEL = 2


def _preload() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=r".*torchao.*")
    import automodel.cli  # noqa: F401
    import automodel.compose  # noqa: F401
    import automodel.config  # noqa: F401
    import automodel.engine.run  # noqa: F401
    import datasets  # noqa: F401
    import hydra  # noqa: F401
    import peft  # noqa: F401
    import peft.tuners.lora  # noqa: F401
    import transformers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401  (the default model's code)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from automodel import registry

    for group in registry.GROUPS:  # every installed plugin's module (imports only; the cache is per process)
        for info in registry.plugins(group):
            try:
                registry.load(group, info.name)
            except Exception:
                pass


def _snapshot(path: str):
    """What a folder holds (relative paths), 'FILE' for a file, None when nothing is there."""
    if os.path.isfile(path):
        return "FILE"
    if not os.path.isdir(path):
        return None
    found = []
    for root, dirs, files in os.walk(path):
        rel = os.path.relpath(root, path)
        found += [os.path.normpath(os.path.join(rel, n)) for n in dirs + files]
    return sorted(found)


def _watched(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[1] for a in argv if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]


def _child(case: dict, cwd: str, out_path: str, err_path: str) -> None:
    code = 1
    try:
        os.chdir(cwd)
        for fd, path in ((1, out_path), (2, err_path)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.environ.update(case.get("env") or {})
        sys.path[:0] = case.get("sys_path") or []  # e.g. a folder holding an extra installed distribution
        if case.get("env") or case.get("sys_path"):  # the plugin registry caches what it found installed
            from automodel import registry

            registry._entry_points.cache_clear()
            registry.load.cache_clear()
        sys.argv = ["automodel", *case["argv"]]
        from automodel.cli import main

        try:
            main(list(case["argv"]))
            code = 0
        except SystemExit as e:  # what the interpreter does with it
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run(cases: list[dict], workdir: str) -> list[dict]:
    _preload()
    pending, running, results = list(cases), {}, {}
    while pending or running:
        while pending and len(running) < PARALLEL:
            case = pending.pop(0)
            base = os.path.join(workdir, case["id"])
            cwd = os.path.join(base, "cwd")
            os.makedirs(cwd)
            out, err = os.path.join(base, "stdout"), os.path.join(base, "stderr")
            before = {p: _snapshot(p) for p in _watched(case["argv"])}
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(case, cwd, out, err)
            running[pid] = (case, cwd, out, err, before, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for p, (case, *_, t0) in list(running.items()):
                if time.monotonic() - t0 > case.get("timeout", TIMEOUT_S):
                    os.kill(p, 9)
            time.sleep(0.05)
            continue
        case, cwd, out, err, before, t0 = running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        with open(out, errors="replace") as f:
            stdout = f.read()
        with open(err, errors="replace") as f:
            stderr = f.read()
        results[case["id"]] = {
            "id": case["id"], "argv": case["argv"], "code": code, "stdout": stdout, "stderr": stderr,
            "seconds": round(time.monotonic() - t0, 2), "left_in_cwd": _snapshot(cwd),
            "changed": {p: [b, _snapshot(p)] for p, b in before.items() if _snapshot(p) != b},
        }
    return [results[c["id"]] for c in cases]


def main() -> None:
    cases_path, results_path, workdir = sys.argv[1:4]
    with open(cases_path) as f:
        cases = json.load(f)
    with open(results_path, "w") as f:
        json.dump(run(cases, workdir), f, indent=1)


if __name__ == "__main__":
    main()
