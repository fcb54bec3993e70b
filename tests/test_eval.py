"""`automodel eval` and train.eval_every: lm-evaluation-harness answers exactly as automodel's own greedy generation
does, on a run's final export, on a checkpoint, and during a 2-rank run, offline, with the bundled task and a user's
local task file; every logger receives the scores; bad input is one line."""

from __future__ import annotations

import json
import os

import pytest
from helpers import MICRO, cli

from automodel.errors import UserError

STEPS = 20
LIMIT = 12
VAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "automodel", "resources",
                   "tiny_tasks", "val.jsonl")


def _prompts(n: int) -> list[dict]:
    with open(VAL) as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-rank FSDP2 run evaluated at its last step (train.eval_every), with TensorBoard on, checkpointed there.
    A learning rate this low keeps the model near its random start, whose greedy answers differ from prompt to
    prompt: a strong comparison (trained 20 steps at the default rate, it answers spaces to almost everything)."""
    tmp = tmp_path_factory.mktemp("eval")
    done = cli(*MICRO, "parallel=fsdp2", "launcher.nproc_per_node=2", f"train.max_steps={STEPS}", "optim.lr=1e-6",
               f"train.eval_every={STEPS}", f"eval.limit={LIMIT}", f"checkpoint.every_steps={STEPS}",
               "logger=[jsonl,tensorboard]", "hydra.run.dir=run", cwd=str(tmp))
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run"


def _greedy_answers(model_dir: str, rows: list[dict]) -> list[str]:
    """automodel's own answers (`automodel generate`), cut where the task stops generating (a newline)."""
    from automodel.generate import greedy, load

    model, tok = load(model_dir)
    return [greedy(model, tok, r["prompt"], max_new_tokens=16).split("\n")[0] for r in rows]


def _responses(results: dict, task: str) -> list[str]:
    return [s["resps"][0][0] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_in_training_scores_reach_the_record_every_logger_and_a_results_file(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    key = "eval/tiny_tasks/exact_match"
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    evaluated = [r for r in records if key in r]
    assert [r["step"] for r in evaluated] == [STEPS]
    with open(run / "eval" / f"step_{STEPS:08d}.json") as f:
        saved = json.load(f)
    assert saved["results"]["tiny_tasks"]["exact_match,none"] == evaluated[0][key]
    assert saved["results"]["tiny_tasks"]["sample_len"] == LIMIT
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars(key)] == [(STEPS, pytest.approx(evaluated[0][key]))]
    assert not [p for p in os.listdir(run / "eval") if p.startswith(".")]  # the temporary export is gone


def test_final_export_answers_as_automodel_generate_and_scores_as_in_training(run, capsys):
    from automodel.cli_eval import main

    out = run / "final-eval.json"
    main([str(run), f"eval.limit={LIMIT}", "--samples", "--output", str(out)])  # in this process: the CLI is below
    assert "(final)" in capsys.readouterr().out  # a finished run: its final/ export
    with open(out) as f:
        results = json.load(f)
    rows = _prompts(LIMIT)
    expected = _greedy_answers(str(run / "final"), rows)
    assert len(set(expected)) >= LIMIT // 2, expected  # answers that tell models apart
    assert _responses(results, "tiny_tasks") == expected
    with open(run / "metrics.jsonl") as f:
        last = [json.loads(line) for line in f][-1]
    assert results["results"]["tiny_tasks"]["exact_match,none"] == last["eval/tiny_tasks/exact_match"]


def test_a_checkpoint_and_a_local_task_file_evaluate_offline(run, tmp_path):
    """The checkpoint is exported first (as `automodel export`); a user's task YAML reads a local JSON file."""
    rows = _prompts(LIMIT)
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"q": r["prompt"], "a": r["completion"].strip()}) + "\n" for r in rows[:5]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text(
        "task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 16\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    regexes_to_ignore: ['^\\s+', '\\s+$']\n")
    checkpoint = run / "checkpoints" / f"step_{STEPS:08d}"
    done = cli("eval", str(checkpoint), f"eval.limit={LIMIT}", f"eval.include_path={tasks}",
               "eval.tasks=[tiny_tasks,mine]", "--samples", cwd=str(tmp_path),
               env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    with open(run / "eval" / f"step_{STEPS:08d}.json") as f:  # a run's checkpoint: next to the run's other results
        results = json.load(f)
    expected = _greedy_answers(str(run / "final"), rows)  # the checkpoint of the last step holds the final weights
    assert _responses(results, "tiny_tasks") == expected
    assert _responses(results, "mine") == expected[:5]
    right = sum(e.strip() == r["completion"].strip() for e, r in zip(expected[:5], rows))
    assert results["results"]["mine"]["exact_match,none"] == right / 5
    assert not [p for p in os.listdir(run / "eval") if p.startswith(".")]


@pytest.mark.parametrize("args, message", [
    (["{missing}"], r"is not a folder; pass a run directory"),
    (["{empty}"], r"holds no model: no config.json"),
    (["{adapter}"], r"holds a PEFT adapter, not a model"),
    (["{run}", "foo=1"], r"'foo=1' is not an eval setting; automodel eval takes eval.KEY=VALUE"),
    (["{run}", "eval.limit=-3"], r"eval.limit=-3.0 must be a whole number of examples"),
    (["{run}", "eval.tasks=[]"], r"eval.tasks=\[\] must name at least one lm-eval task"),
    (["{run}", "eval.bogus=1"], r"eval.bogus: unknown key; valid keys are: tasks, include_path"),
    (["{run}", "eval.include_path=/no/such"], r"eval.include_path='/no/such' is not a folder"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    from automodel.cli_eval import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    names = {k: str(tmp_path / k) for k in ("missing", "empty", "adapter", "run")}
    with pytest.raises(UserError, match=message):
        main([a.format(**names) for a in args])


def test_an_unknown_task_is_refused_before_anything_is_exported(tmp_path):
    from automodel.cli_eval import main

    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"eval.tasks: 'tiny_taks' is not an lm-eval task \(did you mean tiny_tasks"):
        main([str(tmp_path / "final"), "eval.tasks=[tiny_taks]"])


def test_without_lm_eval_evaluation_is_refused_with_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    from automodel.config import validate
    from automodel.compose import compose

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(UserError, match=r"^evaluation needs lm-evaluation-harness, which is not installed: "
                                        r"pip install 'automodel\[eval\]'$"):
        validate(compose(["train.eval_every=10"]))
