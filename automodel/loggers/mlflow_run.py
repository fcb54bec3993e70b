"""`logger=mlflow`: an MLflow run (params: the flattened config; metrics per step).

The tracking server is `logger.mlflow.tracking_uri`, else MLFLOW_TRACKING_URI, else a sqlite file in the run
folder (mlflow.db: MLflow's own default would put it in whatever folder the run was started from). A resumed
run continues the same MLflow run: its id is kept in the run folder (mlflow_run_id)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

from automodel.errors import UserError
from automodel.loggers.common import flatten, numbers, require
from automodel.secrets import redact_text

ID_FILE = "mlflow_run_id"
_BATCH = 100  # MLflow's limit of params per request
_VALUE_LIMIT = 6000  # and of a param's length


class MlflowLogger:
    background = True

    @dataclasses.dataclass
    class Config:
        tracking_uri: Optional[str] = None  # null: MLFLOW_TRACKING_URI, else <run folder>/mlflow.db
        experiment: str = "automodel"
        run_name: Optional[str] = None  # null: a sweep point's overrides, else MLflow's generated name
        tags: dict[str, str] = dataclasses.field(default_factory=dict)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._client = None
        self._run_id = None

    def check(self) -> None:
        require("mlflow", "mlflow", "mlflow")
        uri = self._configured_uri()
        if (not uri or uri.startswith("sqlite:")) and _missing("sqlalchemy"):
            raise UserError("logger=mlflow with a local sqlite store (its default) needs sqlalchemy and alembic: "
                            "pip install 'automodel[mlflow]', or point logger.mlflow.tracking_uri (or "
                            "MLFLOW_TRACKING_URI) at a tracking server")

    def _configured_uri(self) -> str | None:
        return self.cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None

    def prepare(self) -> None:
        """The imports and, for a configured store, its set-up (its schema checked or created), while the trainer
        sets up. The default store lives in the run folder, which start() is told: it is set up there."""
        import logging

        import mlflow.tracking  # noqa: F401  (the seconds of import, now)

        for noisy in ("mlflow", "alembic"):  # the store's set-up (creating tables) at INFO: not the run's news
            logging.getLogger(noisy).setLevel(logging.WARNING)
        uri = self._configured_uri()
        if uri and self._client is None:
            self._open(uri)

    def _open(self, uri: str) -> None:
        from mlflow import MlflowClient

        self._client = client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(self.cfg.experiment)
        self._experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.cfg.experiment)

    def start(self, run) -> None:
        from mlflow.entities import Param

        if self._client is None:
            self.prepare()
            if self._client is None:
                self._open(f"sqlite:///{os.path.abspath(os.path.join(run.run_dir, 'mlflow.db'))}")
        client, experiment_id = self._client, self._experiment_id
        id_path = os.path.join(run.run_dir, ID_FILE)
        if run.start_step > 0 and os.path.isfile(id_path):
            with open(id_path, encoding="utf-8") as f:
                self._run_id = f.read().strip()
            client.update_run(self._run_id, status="RUNNING")
            return  # its params were logged when it started
        tags = {k: redact_text(v) for k, v in {**self.cfg.tags, **({"sweep": run.group} if run.group else {})}.items()}
        self._run_id = client.create_run(experiment_id, run_name=redact_text(self.cfg.run_name or run.name),
                                         tags=tags).info.run_id
        with open(id_path, "w", encoding="utf-8") as f:
            f.write(self._run_id)
        params = [Param(k[:250], v[:_VALUE_LIMIT]) for k, v in flatten(run.config).items()]
        for i in range(0, len(params), _BATCH):
            client.log_batch(self._run_id, params=params[i:i + _BATCH])

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(k, v, now, record["step"])
                                                      for k, v in numbers(record).items()])

    def finish(self, ok: bool) -> None:
        if self._run_id is not None:
            self._client.set_terminated(self._run_id, "FINISHED" if ok else "FAILED")
            self._run_id = None


def _missing(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is None
