"""launcher.fake_world_size=N: this process rehearses rank 0 of an N-rank world (torch's fake process group).

It must lay the model out as rank 0 of N would (its shard, not the whole model), run the steps, and write
neither a checkpoint nor an export."""

import os

from helpers import train

REHEARSE = ["launcher.fake_world_size=8", "train.max_steps=2", "train.log_every=1", "train.global_batch_size=8",
            "checkpoint.every_steps=1"]


def _local_and_full(model):
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    return local, sum(p.numel() for p in model.parameters())


def test_a_rehearsal_holds_rank_0s_shard_runs_the_steps_and_writes_no_checkpoint_or_export(tmp_path):
    result = train(str(tmp_path), "parallel=fsdp2_tp", *REHEARSE)  # dp_shard 4 x tp 2
    assert [r["step"] for r in result.records] == [1, 2]
    local, full = _local_and_full(result.model)
    assert full / local > 6  # about 1/8 of the model (norms and biases are split less evenly)
    assert result.final_dir is None
    assert not os.path.exists(tmp_path / "checkpoints") and not os.path.exists(tmp_path / "final")


def test_a_rehearsal_refuses_a_layout_that_does_not_fit_its_world(tmp_path):
    import pytest

    from automodel.errors import UserError

    with pytest.raises(UserError, match="world size 8"):
        train(str(tmp_path), "parallel=fsdp2_tp", "parallel.tp=3", *REHEARSE)
