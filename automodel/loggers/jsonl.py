"""`logger=jsonl` (always on): metrics.jsonl in the run folder, one flushed line per logged step.

It is the run's own record: resume trims it to the checkpoint's step, `automodel plot` and the sweep summary
read it. Written in the training thread and flushed after every line, so a crash loses nothing already logged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os


class JsonlLogger:
    background = False

    @dataclasses.dataclass
    class Config:
        pass

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._f = None

    def start(self, run) -> None:
        self._f = open(os.path.join(run.run_dir, "metrics.jsonl"), "a", buffering=1, encoding="utf-8")

    def log(self, record: dict) -> None:
        # strict JSON for every reader (jq, JavaScript): a non-finite number (a skipped step's NaN) becomes null
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean, allow_nan=False) + "\n")
        self._f.flush()

    def finish(self, ok: bool) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
