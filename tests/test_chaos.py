"""kill -9 of a whole job (1 process, and a 2-rank launcher with its ranks), resumed: bitwise the same run.

One fixed kill point per kind, chosen to land in a checkpoint save (every 3 steps); `scripts/chaos.py` draws
random points over many trials (its table is in the README).
"""

import importlib.util
import os
import random

import pytest

spec = importlib.util.spec_from_file_location(
    "chaos", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "chaos.py"))
chaos = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chaos)


@pytest.mark.parametrize("ranks,points", [(1, ["step 3+0.05s"]), (2, ["step 6+0.02s"])])
def test_killed_and_resumed_job_is_bitwise_the_uninterrupted_one(tmp_path, ranks, points):
    steps = 8
    ref = chaos.reference(str(tmp_path), ranks, steps)
    row = chaos.trial(str(tmp_path), ranks, steps, ref, random.Random(0), points=points)
    assert row["killed_at_s"] == points, row  # each kill really happened before the job could finish
    assert row["ok"], row["why"]
