"""scripts/mutants.py's list stays true to the code: every deliberate bug still applies to exactly one place, and
every test named to catch one exists. (Running the mutants takes tens of minutes: the script itself does that.)"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mutants():
    spec = importlib.util.spec_from_file_location("mutants_script", os.path.join(ROOT, "scripts", "mutants.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_exactly_once_and_names_tests_that_exist(mutants):
    assert mutants.problems(mutants.MUTANTS) == []
    assert len(mutants.MUTANTS) >= 12
    areas = {m.area for m in mutants.MUTANTS}
    assert {"loss normalization", "grad-norm reduction", "TP/SP", "PP", "resume", "data masks", "LoRA", "DoRA",
            "MoE router"} <= areas
    for m in mutants.MUTANTS:
        for node in m.tests:
            path, _, name = node.partition("::")
            function = name.split("[")[0]
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                assert f"def {function}(" in f.read(), f"{m.name}: {node} names no test function"


def test_a_snippet_that_no_longer_applies_is_reported_not_skipped(mutants, tmp_path, monkeypatch):
    (tmp_path / "engine.py").write_text("scale = a / b\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("def test_x():\n    pass\n")
    monkeypatch.setattr(mutants, "REPO", str(tmp_path))
    Mutant = mutants.Mutant
    gone = Mutant("gone", "loss normalization", "engine.py", "scale = a / c", "scale = 1", ("tests/test_x.py::test_x",),
                  "")
    applied = Mutant("applied", "loss normalization", "engine.py", "scale = a / c", "scale = a / b",
                     ("tests/test_x.py::test_x",), "")
    twice = Mutant("twice", "loss normalization", "engine.py", "a", "z", ("tests/test_missing.py::test_y",), "")
    found = mutants.problems([gone, applied, twice])
    assert found == ["gone: the original snippet occurs 0 times in engine.py, not once: update the mutant to the code "
                     "as it is now",
                     "applied: engine.py looks mutated already (restore it: git checkout -- engine.py)",
                     "twice: the original snippet occurs 2 times in engine.py, not once: update the mutant to the code "
                     "as it is now",
                     "twice: test file tests/test_missing.py does not exist"]


def test_a_mutant_is_applied_for_its_tests_and_the_file_restored_even_when_interrupted(mutants, tmp_path, monkeypatch):
    source = tmp_path / "engine.py"
    source.write_text("scale = a / b\n")
    monkeypatch.setattr(mutants, "REPO", str(tmp_path))
    m = mutants.Mutant("m", "loss normalization", "engine.py", "a / b", "a * b", ("tests/test_x.py::test_x",), "")
    seen = []

    def tests_that_see_the_mutant(nodes, timeout_s, first_failure=True):
        seen.append(source.read_text())
        return {"rc": 1, "failed": [(n, "assert 1 < 0") for n in nodes], "seconds": 0.0, "tail": ""}

    monkeypatch.setattr(mutants, "run_tests", tests_that_see_the_mutant)
    assert mutants.try_mutant(m, 10)["caught"] and seen == ["scale = a * b\n"]
    assert source.read_text() == "scale = a / b\n"

    def interrupted(nodes, timeout_s, first_failure=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(mutants, "run_tests", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mutants.try_mutant(m, 10)
    assert source.read_text() == "scale = a / b\n"
