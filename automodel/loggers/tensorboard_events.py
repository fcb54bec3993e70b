"""`logger=tensorboard`: event files under <run folder>/tensorboard (`tensorboard --logdir outputs`).

Written with the tensorboard package's own event writer and protobufs, not torch.utils.tensorboard: that one
imports torch, seconds of CPU in the loggers' process that a 2-core machine takes from training. A resumed run
purges the events past its checkpoint's step, so TensorBoard shows each step once."""

from __future__ import annotations

import dataclasses
import os
import time

import yaml

from automodel.loggers.common import numbers, require


class TensorBoardLogger:
    background = True

    @dataclasses.dataclass
    class Config:
        dirname: str = "tensorboard"  # inside the run folder

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._writer = None

    def check(self) -> None:
        require("tensorboard", "tensorboard", "tensorboard")

    def prepare(self) -> None:
        import tensorboard.summary.writer.event_file_writer  # noqa: F401

    def start(self, run) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._writer = EventFileWriter(os.path.join(run.run_dir, self.cfg.dirname))
        if run.start_step:  # TensorBoard hides the events of steps after this one written before it
            self._writer.add_event(Event(wall_time=time.time(), step=run.start_step + 1,
                                         session_log=SessionLog(status=SessionLog.START)))
        else:
            self._write(0, _text("config", "    " + yaml.safe_dump(run.config, sort_keys=False).replace("\n", "\n    ")))

    def log(self, record: dict) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._write(record["step"], [Summary.Value(tag=k, simple_value=v) for k, v in numbers(record).items()])

    def _write(self, step: int, values: list) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))

    def finish(self, ok: bool) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _text(tag: str, markdown: str) -> list:
    """A value TensorBoard's Text tab shows (markdown: indented lines are a code block)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.compat.proto.types_pb2 import DT_STRING

    tensor = TensorProto(dtype=DT_STRING, string_val=[markdown.encode()],
                         tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
    return [Summary.Value(tag=tag, metadata=metadata, tensor=tensor)]
