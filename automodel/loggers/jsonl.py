"""`logger=jsonl` (always on): metrics.jsonl in the run folder, one flushed line per logged step.

It is the run's own record: resume trims it to the checkpoint's step, `automodel plot` and the sweep summary
read it. Written in the training thread, one unbuffered write per line, so a crash loses nothing already logged;
a line the disk took only in part (full) is cut back off, so the record never holds half a line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from automodel.errors import UserError


class JsonlLogger:
    background = False

    @dataclasses.dataclass
    class Config:
        pass

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._f = None

    def start(self, run) -> None:
        self._f = open(os.path.join(run.run_dir, "metrics.jsonl"), "ab", buffering=0)

    def log(self, record: dict) -> None:
        # strict JSON for every reader (jq, JavaScript): a non-finite number (a skipped step's NaN) becomes null
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        line = memoryview((json.dumps(clean, allow_nan=False) + "\n").encode())
        size = os.fstat(self._f.fileno()).st_size
        try:
            while line:
                line = line[self._f.write(line):]
        except OSError as e:
            from automodel.write_errors import describe

            self._f.truncate(size)  # the part written would be a torn record for the next resume
            raise UserError(describe(e, self._f.name, "write the run's record") or
                            f"cannot write the run's record {self._f.name}: {e.strerror}") from None

    def finish(self, ok: bool) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
