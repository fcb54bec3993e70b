"""`logger=wandb`: Weights & Biases. `WANDB_MODE=offline` (or `logger.wandb.mode=offline`) needs no account.

A resumed run continues the same wandb run: its id is kept in the run folder (wandb_run_id). Every metric is
plotted against automodel's `step`, so a resumed run's redone steps land where they belong.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import string
from typing import Optional

from automodel.errors import UserError
from automodel.loggers.common import numbers, require
from automodel.secrets import redact_text

ID_FILE = "wandb_run_id"


class WandbLogger:
    background = True

    @dataclasses.dataclass
    class Config:
        project: str = "automodel"
        entity: Optional[str] = None  # null: the account's default entity
        name: Optional[str] = None  # null: a sweep point's overrides, else wandb's generated name
        group: Optional[str] = None  # null: the sweep (its runs grouped together)
        tags: list[str] = dataclasses.field(default_factory=list)
        notes: Optional[str] = None
        mode: Optional[str] = None  # online | offline | disabled; null: WANDB_MODE, else online

    def __init__(self, cfg: Config):
        if cfg.mode not in (None, "online", "offline", "disabled"):
            raise UserError(f"logger.wandb.mode={cfg.mode!r} is not one of: online, offline, disabled (or null: "
                            "WANDB_MODE)")
        self.cfg = cfg
        self._run = None

    def check(self) -> None:
        require("wandb", "wandb", "wandb")
        mode = self.cfg.mode or os.environ.get("WANDB_MODE", "online")
        if mode in ("online", "run") and not _logged_in():  # else wandb would ask for a key mid-run, on a thread
            raise UserError("logger=wandb: this machine has no wandb login (WANDB_API_KEY or `wandb login`); log in, "
                            "or log offline with WANDB_MODE=offline (or logger.wandb.mode=offline) and `wandb sync` "
                            "the run folder later")

    def prepare(self) -> None:
        import wandb  # noqa: F401  (seconds of imports, while the trainer sets up)

    def start(self, run) -> None:
        import wandb

        id_path = os.path.join(run.run_dir, ID_FILE)
        run_id = None
        if run.start_step > 0 and os.path.isfile(id_path):
            with open(id_path, encoding="utf-8") as f:
                run_id = f.read().strip() or None
        run_id = run_id or _new_id()
        with open(id_path, "w", encoding="utf-8") as f:
            f.write(run_id)
        c = self.cfg
        self._run = wandb.init(project=c.project, entity=c.entity, name=redact_text(c.name or run.name),
                               group=c.group or run.group, tags=[redact_text(t) for t in c.tags] or None,
                               notes=redact_text(c.notes),
                               config=run.config, dir=run.run_dir, id=run_id, resume="allow", mode=c.mode,
                               settings=wandb.Settings(console="off"))  # train.log already holds the console
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    def log(self, record: dict) -> None:
        self._run.log({"step": record["step"], **numbers(record)})

    def finish(self, ok: bool) -> None:
        if self._run is not None:
            self._run.finish(exit_code=0 if ok else 1)
            self._run = None


def _new_id() -> str:
    """A run id the way wandb makes them: 8 lowercase letters and digits."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _logged_in() -> bool:
    """An API key in the environment, or `wandb login`'s entry in the netrc file for the wandb server."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
