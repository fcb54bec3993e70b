"""A `logger` plugin: every logged step as a row of a CSV file in the run folder (a spreadsheet's view of a run).

Loggers run on rank 0 only, several at once (`logger=[jsonl,csv]`). `background = False`: its calls happen in
the training loop's thread (a line to a local file is cheap); a logger that imports a large package or talks to
a server sets it True and is called on the loggers' own thread instead.
"""

from __future__ import annotations

import csv
import dataclasses
import os

COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "val_loss")


@dataclasses.dataclass
class CsvLoggerConfig:
    filename: str = "metrics.csv"  # inside the run folder


class CsvLogger:
    Config = CsvLoggerConfig
    background = False

    def __init__(self, config: CsvLoggerConfig):
        self.cfg = config
        self._file = None

    def start(self, run):
        path = os.path.join(run.run_dir, self.cfg.filename)
        fresh = run.start_step == 0 or not os.path.isfile(path)
        self._file = open(path, "w" if fresh else "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, COLUMNS, extrasaction="ignore")
        if fresh:
            self._writer.writeheader()

    def log(self, record):
        self._writer.writerow(record)
        self._file.flush()

    def finish(self, ok):
        if self._file is not None:
            self._file.close()
            self._file = None
