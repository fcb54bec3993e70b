"""Break the engine on purpose, one bug at a time, and check that the tests meant to notice each one do.

    .venv/bin/python scripts/mutants.py                     # every mutant (a baseline run of their tests first)
    .venv/bin/python scripts/mutants.py --only lora-alpha   # some of them (names as in --list)
    .venv/bin/python scripts/mutants.py --list              # the mutants and the tests that should catch each
    .venv/bin/python scripts/mutants.py --check             # only: does every original snippet still apply?

Each mutant is an exact text substitution in one source file (the kind of bug that keeps losses within a loose
tolerance, or that every layout shares, so that comparing automodel with itself cannot see it). The script applies
one, runs the few tests named for it (`pytest -x`), and restores the file, always: also on Ctrl-C or SIGTERM (the
test run is its own process group, ended first). No bytecode of a mutated file is written or left behind.

It refuses to start (exit 2) when an original snippet is not found exactly once, or looks applied already, or a
test file is missing: a mutant that no longer applies would otherwise pass for a caught one. It also refuses when
the tests fail with no mutant applied (the baseline; --no-baseline skips it). Prints one row per mutant: caught or
not, by which test, seconds. Exit 1 if any mutant survives. It edits files of the checkout it runs in: use a
worktree of your own. tests/test_mutants.py checks in CI that every snippet still applies.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    mutated: str
    tests: tuple[str, ...]  # pytest node ids that should catch it
    why: str


M = Mutant
LAYOUTS = "tests/test_parallel_layouts.py::test_llama_layouts_on_two_ranks_match_one_process"
PEFT = "tests/test_peft_reference.py::test_lora_and_dora_equal_a_plain_peft_model_built_from_the_same_numbers"
MUTANTS = [
    M("dp-grad-halved", "loss normalization", "automodel/engine/loop.py",
      "backward_scale = scale * self._loss_scale()", "backward_scale = scale / self.dp_size * self._loss_scale()",
      ("tests/test_distributed.py::test_fsdp2_two_ranks_match_one_process",),
      "gradients divided by the dp size once more (the logged loss stays right; AdamW hides the scale)"),
    M("local-token-count", "loss normalization", "automodel/engine/loop.py",
      "        if self.dp_size > 1:\n            dist.all_reduce(count, group=self.dp_group)\n        return count",
      "        return count",
      ("tests/test_distributed.py::test_fsdp2_two_ranks_match_one_process",),
      "each dp rank divides its token sum by its own target count, not the global batch's"),
    M("grad-norm-groups-summed", "grad-norm reduction", "automodel/distributed/grad_norm.py",
      "total = torch.linalg.vector_norm(torch.stack(norms)) if norms", "total = torch.stack(norms).sum() if norms",
      (f"{LAYOUTS}[tp_loss_parallel]",),
      "under tp, the norms of differently laid-out gradient groups added instead of root-sum-squared"),
    M("pp-grad-norm-one-stage", "grad-norm reduction", "automodel/distributed/grad_norm.py",
      "        dist.all_reduce(squared, group=across)\n", "",
      ("tests/test_pipeline.py::test_pipeline_losses_validation_and_export_match_one_process",),
      "under pp, the grad norm (and clipping) of this stage's parameters only"),
    M("sp-norms-dropped", "TP/SP", "automodel/parallel/tensor_parallel.py",
      "                styles[name] = SequenceParallel(use_local_output=True)\n", "                pass\n",
      (f"{LAYOUTS}[tp_loss_parallel]",),
      "norms left plain on the sequence-split stream: each tp rank's norm weight learns from half the tokens"),
    M("pp-grads-scaled", "PP", "automodel/parallel/pipeline.py",
      "loss_fn=loss_fn, scale_grads=False)", "loss_fn=loss_fn, scale_grads=True)",
      ("tests/test_pipeline.py::test_pipeline_losses_validation_and_export_match_one_process",),
      "the schedule divides gradients by the micro-batch count on top of the global-token normalization"),
    M("resume-rng", "resume", "automodel/checkpoint/dcp.py",
      "        _load_rng(point.path, rank)\n", "",
      ("tests/test_resume_dropout.py::test_resume_with_dropout_is_bitwise_the_uninterrupted_run[lora_every_dropout]",),
      "resume without restoring the RNG state (dropout draws other masks)"),
    M("export-draws-training-rng", "resume", "automodel/engine/export.py",
      "    with torch.random.fork_rng(devices=[]):\n", "    with torch.no_grad():\n",
      ("tests/test_resume_dropout.py::test_resume_with_dropout_is_bitwise_the_uninterrupted_run[lora_every_dropout]",),
      "rank 0's HF export inside a save draws from training's RNG (peft's adapter init on the copy)"),
    M("resume-lr-schedule", "resume", "automodel/checkpoint/dcp.py",
      '        state.scheduler.load_state_dict(point.meta["scheduler"])\n', "",
      ("tests/test_checkpoint.py::test_resume_auto_is_bitwise_identical_to_the_uninterrupted_run",),
      "resume restarts the LR schedule at step 0"),
    # (leaving out set_optimizer_state_dict alone changes nothing: dcp.load fills the optimizer's own state tensors)
    M("resume-optimizer-state", "resume", "automodel/checkpoint/dcp.py",
      'payload = {"model": model_sd, "optim": optim_sd["state"]}', 'payload = {"model": model_sd, "optim": {}}',
      ("tests/test_checkpoint.py::test_resume_auto_is_bitwise_identical_to_the_uninterrupted_run",),
      "resume with fresh AdamW moments (the checkpoint's optimizer state not read)"),
    M("prompt-mask-off-by-one", "data masks", "automodel/data/examples.py",
      "labels = [t if i + 1 >= start else IGNORE_INDEX for i, t in enumerate(full[1:])]",
      "labels = [t if i >= start else IGNORE_INDEX for i, t in enumerate(full[1:])]",
      ("tests/test_data_formats.py::test_squad_and_hellaswag_record_formats",),
      "the completion's first token is masked out of the loss"),
    M("padding-trained", "data masks", "automodel/batch.py",
      "    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)\n    for row, (ids, lab)",
      "    labels = torch.full((len(examples), width), pad_id, dtype=torch.long)\n    for row, (ids, lab)",
      ("tests/test_data_packing.py::test_packed_loss_equals_unpacked_loss",),
      "right padding labelled with the pad token instead of IGNORE_INDEX (padding is trained)"),
    M("packed-positions-run-on", "data masks", "automodel/batch.py",
      "position_ids[r, at : at + n] = torch.arange(n)", "position_ids[r, at : at + n] = torch.arange(at, at + n)",
      ("tests/test_data_packing.py::test_packed_loss_equals_unpacked_loss",),
      "packed examples' position ids do not restart: examples attend across each other"),
    M("lora-alpha", "LoRA", "automodel/peft/lora.py",
      "r=self.cfg.r, lora_alpha=self.cfg.alpha,", "r=self.cfg.r, lora_alpha=self.cfg.alpha * self.cfg.r,",
      (f"{PEFT}[lora]",),
      "LoRA scaled by alpha instead of alpha / r (and that alpha written into adapter_config.json)"),
    M("lora-dropout-ignored", "LoRA", "automodel/peft/lora.py",
      "lora_dropout=self.cfg.dropout,", "lora_dropout=0.0,",
      (f"{PEFT}[lora_dropout]",),
      "peft.dropout accepted and not used"),
    M("dora-magnitude-unset", "DoRA", "automodel/peft/lora.py",
      "        if not self.cfg.use_dora:\n            return\n        import torch\n\n        with torch.no_grad():",
      "        return\n        import torch\n\n        with torch.no_grad():",
      (f"{PEFT}[dora]",),
      "DoRA's magnitudes left at 1 instead of the base weight's row norms"),
    M("router-counts-padding", "MoE router", "automodel/moe/router.py",
      "probs_sum = torch.softmax(logits, -1).mul(m[:, None]).sum(0)", "probs_sum = torch.softmax(logits, -1).sum(0)",
      ("tests/test_moe.py::test_balancing_loss_and_its_gradients_equal_transformers_on_one_moe_layer",),
      "the balancing loss averages router probabilities over padded positions too"),
]


# ---------------------------------------------------------------- checks before anything is changed
def problems(mutants: list[Mutant]) -> list[str]:
    """Why the list cannot be trusted as it is (empty: every mutant applies exactly once)."""
    out = []
    names = [m.name for m in mutants]
    out += [f"{n}: the name is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for m in mutants:
        path = os.path.join(REPO, m.file)
        if not os.path.isfile(path):
            out.append(f"{m.name}: {m.file} does not exist")
            continue
        text = open(path, encoding="utf-8").read()
        found = text.count(m.original)
        if m.original == m.mutated:
            out.append(f"{m.name}: the mutated snippet is the original")
        elif found == 0 and m.mutated and m.mutated in text:
            out.append(f"{m.name}: {m.file} looks mutated already (restore it: git checkout -- {m.file})")
        elif found != 1:
            out.append(f"{m.name}: the original snippet occurs {found} times in {m.file}, not once: update the "
                       "mutant to the code as it is now")
        if not m.tests:
            out.append(f"{m.name}: no test is named to catch it")
        for node in m.tests:
            if not os.path.isfile(os.path.join(REPO, node.split("::")[0])):
                out.append(f"{m.name}: test file {node.split('::')[0]} does not exist")
    return out


# ---------------------------------------------------------------- running the tests
def _drop_bytecode(path: str) -> None:
    cached = importlib.util.cache_from_source(path)
    if os.path.exists(cached):
        os.remove(cached)


def run_tests(nodes: list[str], timeout_s: float, first_failure: bool = True) -> dict:
    """Run pytest on `nodes` in a process group of its own: {"rc", "failed": [(node id, message)], "seconds",
    "tail" (the output's end)}."""
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-n", "0", f"--junitxml={xml}",
               *(["-x"] if first_failure else []), *nodes]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "AUTOMODEL_NO_PROGRESS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            out, rc = "", "timeout"
        finally:
            if proc.poll() is None or rc == "timeout":  # interrupted or timed out: end the run and its ranks
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        return {"rc": rc, "failed": _failed(xml), "seconds": time.time() - t0, "tail": (out or "")[-3000:]}


def _failed(xml: str) -> list[tuple[str, str]]:
    """(node id, the first line of its failure) of each test that failed or errored, from pytest's JUnit report."""
    if not os.path.isfile(xml):
        return []
    failed = []
    for case in ET.parse(xml).iter("testcase"):
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        if problem is not None:
            module = case.get("classname", "").replace(".", "/")
            node = f"{module}.py::{case.get('name')}" if module else case.get("name")
            failed.append((node, " ".join((problem.get("message") or "").split())))
    return failed


def try_mutant(m: Mutant, timeout_s: float) -> dict:
    """Apply `m`, run its tests, restore the file (whatever happens)."""
    path = os.path.join(REPO, m.file)
    original = open(path, encoding="utf-8").read()
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original.replace(m.original, m.mutated, 1))
        _drop_bytecode(path)
        result = run_tests(list(m.tests), timeout_s)
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
        _drop_bytecode(path)
    caught = result["rc"] == 1 and bool(result["failed"])
    return {**result, "caught": caught}


def _verdict(r: dict) -> tuple[str, str]:
    if r["caught"]:
        return "yes", "; ".join(f"{node} ({message[:90]})" for node, message in r["failed"])
    if r["rc"] == 0:
        return "NO", "every selected test passed"
    if r["rc"] == "timeout":
        return "NO", "the tests ran past the timeout"
    return "NO", f"pytest exit code {r['rc']} (not a test failure): " + " ".join(r["tail"].split()[-30:])


def table(rows: list[tuple[Mutant, dict]]) -> str:
    lines = [f"{'mutant':26s} {'area':20s} {'caught':6s} {'seconds':>7s}  by"]
    for m, r in rows:
        caught, by = _verdict(r)
        lines.append(f"{m.name:26s} {m.area:20s} {caught:6s} {r['seconds']:7.0f}  {by}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    ap.add_argument("--list", action="store_true", help="print the mutants and their tests, change nothing")
    ap.add_argument("--check", action="store_true", help="only check that every mutant still applies")
    ap.add_argument("--no-baseline", action="store_true", help="skip running the tests unmutated first")
    ap.add_argument("--show-output", action="store_true", help="print the end of each mutant's test output")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds for one mutant's tests (default 1200)")
    args = ap.parse_args(argv)
    chosen = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
        if unknown:
            print(f"mutants.py: no mutant named {', '.join(unknown)}; see --list", file=sys.stderr)
            return 2
        chosen = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:26s} {m.area:20s} {m.file}: {m.why}\n{'':27s}caught by: {', '.join(m.tests)}")
        return 0
    found = problems(chosen)
    if found:
        print("mutants.py: cannot run:\n  " + "\n  ".join(found), file=sys.stderr)
        return 2
    if args.check:
        print(f"all {len(chosen)} mutants apply exactly once")
        return 0

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    t0 = time.time()
    if not args.no_baseline:
        nodes = list(dict.fromkeys(n for m in chosen for n in m.tests))
        base = run_tests(nodes, args.timeout * 2, first_failure=False)
        print(f"baseline: {len(nodes)} test ids unmutated in {base['seconds']:.0f}s: exit code {base['rc']}",
              flush=True)
        if base["rc"] != 0:
            print("mutants.py: the tests fail with no mutant applied (fix them first): "
                  f"{'; '.join(n for n, _ in base['failed']) or base['tail'][-2000:]}", file=sys.stderr)
            return 2
    rows = []
    for m in chosen:
        print(f"{m.name}: {m.why} ...", flush=True)
        r = try_mutant(m, args.timeout)
        rows.append((m, r))
        print(f"  {_verdict(r)[0]} ({r['seconds']:.0f}s) {_verdict(r)[1]}", flush=True)
        if args.show_output:
            print("  | " + "\n  | ".join(r["tail"].splitlines()[-40:]), flush=True)
    print()
    print(table(rows))
    survivors = [m.name for m, r in rows if not r["caught"]]
    print(f"\n{len(rows) - len(survivors)} of {len(rows)} mutants caught in {time.time() - t0:.0f}s"
          + (f"; survivors: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
