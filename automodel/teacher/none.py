"""Teacher plugin `none`: no distillation; the student learns from the labels alone."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class NoTeacherConfig:
    pass


class NoTeacher:
    Config = NoTeacherConfig
    enabled = False

    def __init__(self, config: NoTeacherConfig):
        self.cfg = config
