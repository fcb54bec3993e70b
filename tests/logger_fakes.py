"""Logger plugins for tests: importable by the loggers' own process, which reports what it saw in a file."""

import os


class Recorder:
    def __init__(self, name, fail_at=None, background=True):
        self.name, self.fail_at, self.background = name, fail_at, background

    def _write(self, word):
        with open(os.path.join(self.run_dir, f"{self.name}.log"), "a") as f:
            f.write(f"{word}\n")

    def start(self, run):
        self.run_dir = run.run_dir
        self._write("start")

    def log(self, record):
        if record["step"] == self.fail_at:
            raise ConnectionError("server went away")
        self._write(record["step"])

    def finish(self, ok):
        self._write(f"finish:{ok}")
