"""The `logger` group: wandb (offline), TensorBoard and MLflow record exactly what metrics.jsonl records, a resumed
run continues the same wandb and MLflow runs, no secret reaches anything written, and a missing package is refused
in one line."""

from __future__ import annotations

import glob
import json
import logging
import os
import sqlite3

import pytest
from helpers import MICRO, cli, compose

from automodel.config import validate
from automodel.engine.loggers import RunLoggers
from automodel.errors import UserError
from automodel.protocols import RunInfo
from automodel.secrets import MASK, is_secret_name, redact_config, redact_text

# what a user's shell holds: none of these values may appear in any file or line the runs write
SECRETS = {"HF_TOKEN": "hf_teSt0kenValue1234", "WANDB_API_KEY": "0123456789abcdef0123456789abcdefwandbkey",
           "MY_SERVICE_PASSWORD": "pw-swordfish-98765", "AWS_SECRET_ACCESS_KEY": "awsSecretKeyValue/Abc+123"}
URL_PASSWORD = "hunter22urlpass"
ALL = "logger=[jsonl,wandb,tensorboard,mlflow]"


def _run(tmp, *overrides):
    return cli(*MICRO, ALL, "train.log_every=5", "checkpoint.every_steps=10", "hydra.run.dir=run",
               f"logger.mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "logger.wandb.notes=${oc.env:MY_SERVICE_PASSWORD}",
               f"+logger.mlflow.tags.source='https://bob:{URL_PASSWORD}@example.com/repo'", *overrides,
               cwd=str(tmp), env={**SECRETS, "WANDB_MODE": "offline"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 10-step run with all four loggers, then the same run resumed from its step-10 checkpoint to step 20."""
    tmp = tmp_path_factory.mktemp("loggers")
    first = _run(tmp, "train.max_steps=10")
    assert first.returncode == 0, first.stderr[-3000:]
    ids = {name: open(tmp / "run" / f"{name}_run_id").read() for name in ("wandb", "mlflow")}
    second = _run(tmp, "train.max_steps=20", "checkpoint.resume=auto")
    assert second.returncode == 0, second.stderr[-3000:]
    return tmp, ids, (first, second)


def _jsonl(tmp):
    return [json.loads(line) for line in open(tmp / "run" / "metrics.jsonl")]


def test_tensorboard_and_mlflow_hold_every_step_metrics_jsonl_holds_once(runs):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, ids, _ = runs
    records = _jsonl(tmp)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    expected = {r["step"]: r["loss"] for r in records}

    events = EventAccumulator(str(tmp / "run" / "tensorboard"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("loss")}
    assert sorted(tb) == [5, 10, 15, 20]
    assert all(abs(tb[s] - expected[s]) <= 1e-6 * abs(expected[s]) for s in expected)  # float32 in the events
    assert {"lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mem_host_gib"} <= set(events.Tags()["scalars"])

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    run = client.get_run(ids["mlflow"])  # the resumed job continued this run: one MLflow run for the whole training
    assert run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "loss"))
    assert history == sorted(expected.items())
    assert run.data.params["train.global_batch_size"] == str(compose().train.global_batch_size)
    assert run.data.params["logger.wandb.notes"] == MASK  # resolved from ${oc.env:MY_SERVICE_PASSWORD}: masked
    assert run.data.tags["source"] == f"https://{MASK}@example.com/repo"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_wandb_offline_run_holds_every_step_and_the_resume_continues_it(runs):
    from wandb_records import records

    tmp, ids, _ = runs
    assert open(tmp / "run" / "wandb_run_id").read() == ids["wandb"]
    logs = sorted(glob.glob(str(tmp / "run" / "wandb" / "offline-run-*" / "*.wandb")))
    assert len(logs) == 2 and all(os.path.basename(p) == f"run-{ids['wandb']}.wandb" for p in logs)  # one id, twice
    expected = {r["step"]: r["loss"] for r in _jsonl(tmp)}
    logged, configs = {}, []
    for path in logs:
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                item = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                logged[item["step"]] = item["loss"]
            elif kind == "run":
                configs.append({i.key or ".".join(i.nested_key): json.loads(i.value_json)
                                for i in record.run.config.update})
    assert logged == pytest.approx(expected, rel=1e-12)
    assert configs and all(c["train"]["max_steps"] in (10, 20) for c in configs)  # the resolved config
    assert all(c["logger"]["wandb"]["notes"] == MASK for c in configs)


def test_no_secret_reaches_any_file_or_line_the_runs_wrote(runs):
    tmp, _, procs = runs
    secrets = [*SECRETS.values(), URL_PASSWORD]
    leaks = []
    for root, _, files in os.walk(tmp):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            data = open(path, "rb").read()
            leaks += [(path, s) for s in secrets if s.encode() in data]
    for p in procs:
        leaks += [("output", s) for s in secrets if s in p.stdout + p.stderr]
    assert leaks == []
    # and the files that would hold them exist: config dumps, the checkpoint's config, wandb's log, MLflow's store
    assert os.path.isfile(tmp / "run" / "config.yaml") and os.path.isfile(tmp / "mlflow.db")
    assert glob.glob(str(tmp / "run" / "checkpoints" / "*"))
    assert MASK in open(tmp / "run" / "config.yaml").read()
    with sqlite3.connect(tmp / "mlflow.db") as db:
        assert db.execute("select count(*) from params").fetchone()[0] > 50


def test_mlflow_keeps_its_default_store_in_the_run_folder(tmp_path, monkeypatch):
    """No tracking_uri and no MLFLOW_TRACKING_URI: MLflow's own default would write mlflow.db into the folder the
    run was started from (a repo checkout); the store goes into the run folder, where a resume finds it again."""
    from mlflow import MlflowClient

    from automodel.loggers.mlflow_run import MlflowLogger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    logger = MlflowLogger(MlflowLogger.Config())
    logger.prepare()
    logger.start(RunInfo(run_dir="run", config={"optim": {"lr": 0.001}}, start_step=0, name=None, group=None))
    logger.log({"step": 5, "loss": 2.5})
    logger.finish(True)
    assert sorted(os.listdir(tmp_path)) == ["run"]  # nothing in the working folder
    assert sorted(os.listdir(tmp_path / "run")) == ["mlflow.db", "mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/run/mlflow.db")
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(5, 2.5)]
    assert client.get_run(run_id).data.params == {"optim.lr": "0.001"}


def test_a_refusal_that_names_a_secret_masks_it(tmp_path):
    r = cli("model=hf", "model.path=/models/${oc.env:HF_TOKEN}", cwd=str(tmp_path), env=SECRETS)
    assert r.returncode == 2
    assert SECRETS["HF_TOKEN"] not in r.stderr + r.stdout and f"/models/{MASK}" in r.stderr, r.stderr


def test_a_logger_whose_package_is_missing_is_refused_in_one_line_before_anything_is_written(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None  # as if not installed\n")
    r = cli(*MICRO, "logger=[jsonl,wandb]", "hydra.run.dir=run", cwd=str(tmp_path),
            env={"PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "automodel: error: logger=wandb needs the wandb package, which is not installed: pip install 'automodel[wandb]'"]
    assert not (tmp_path / "run").exists()


def test_selections_always_include_jsonl_and_bad_values_are_one_line():
    names = lambda *o: [type(p).__name__ for p in validate(compose(*o)).plugins["logger"]]  # noqa: E731
    assert names() == ["JsonlLogger"]
    assert names("logger=tensorboard") == ["JsonlLogger", "TensorBoardLogger"]
    assert names("logger=[wandb,jsonl,mlflow]") == ["JsonlLogger", "WandbLogger", "MlflowLogger"]
    with pytest.raises(UserError, match=r"logger.wandb.mode='online2' is not one of: online, offline, disabled"):
        validate(compose("logger=[jsonl,wandb]", "logger.wandb.mode=online2"))
    with pytest.raises(UserError, match=r"^logger.tensorboard.dir: unknown key; valid keys are: dirname$"):
        validate(compose("logger=tensorboard", "+logger.tensorboard.dir=x"))


def test_wandb_online_without_a_login_is_refused_before_anything_is_built(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(UserError, match=r"^logger=wandb: this machine has no wandb login .*WANDB_MODE=offline"):
        validate(compose("logger=wandb"))
    validate(compose("logger=wandb", "logger.wandb.mode=offline"))
    (tmp_path / "no-netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    validate(compose("logger=wandb"))  # `wandb login` wrote its key here


def test_a_logger_that_fails_mid_run_is_a_warning_and_the_others_get_every_record(tmp_path, caplog):
    """The background loggers live in a process of their own: each fake writes what it saw to a file."""
    from logger_fakes import Recorder

    good, bad, inline = Recorder("good"), Recorder("bad", fail_at=3), Recorder("inline", background=False)
    hub = RunLoggers([good, bad, inline])
    hub.start(RunInfo(str(tmp_path), {}, 0, None, None))
    hub.open_record()
    with caplog.at_level(logging.WARNING, logger="automodel"):
        for step in range(1, 6):
            hub.log({"step": step, "loss": 1.0 / step})
        hub.close(ok=True)
        hub.close(ok=True)  # a second close (the engine's error path after a clean close) changes nothing
    seen = {name: (tmp_path / f"{name}.log").read_text().split() for name in ("good", "bad", "inline")}
    assert seen["good"] == seen["inline"] == ["start", "1", "2", "3", "4", "5", "finish:True"]
    assert seen["bad"] == ["start", "1", "2"]
    warning = "logger Recorder failed in log (ConnectionError: server went away); the run goes on without it"
    assert warning in (tmp_path / "train.log").read_text()  # the worker's warning, in the run's log


def test_a_trainer_that_dies_leaves_its_loggers_finished_as_failed(tmp_path):
    from logger_fakes import Recorder

    hub = RunLoggers([Recorder("orphan")])
    hub.start(RunInfo(str(tmp_path), {}, 0, None, None))
    hub.log({"step": 1, "loss": 1.0})
    worker = hub._worker
    worker.stdin.close()  # what the kernel does when the training process is killed
    assert worker.wait(timeout=60) == 0
    assert (tmp_path / "orphan.log").read_text().split() == ["start", "1", "finish:False"]


def test_secret_names_values_and_url_passwords_are_masked(monkeypatch):
    for name in ("HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "api_key", "password", "GITHUB_TOKEN"):
        assert is_secret_name(name), name
    for name in ("bos_token_id", "num_key_value_heads", "tokenizer", "chunk_tokens", "SSH_AUTH_SOCK", "key"):
        assert not is_secret_name(name), name
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh123")
    monkeypatch.setenv("NUM_TOKEN", "1")  # too short to be a credential: masking it would garble every number
    assert redact_text("hf_abcdefgh123/x https://u:p4ss@h:1/y step 1") == f"{MASK}/x https://{MASK}@h:1/y step 1"
    assert redact_config({"a": {"api_key": "k", "tokenizer": "hf_abcdefgh123", "n": [1, "hf_abcdefgh123"]}}) == {
        "a": {"api_key": MASK, "tokenizer": MASK, "n": [1, MASK]}}
