"""Packed data and validation on 2 FSDP2 ranks (gloo) against one process: same losses, grad norms and val_loss."""

import json
import os

import pytest
import torch.multiprocessing as mp
from helpers import train

from automodel.config import RESOURCES


def _overrides(path):
    return ["data=instruction", f"data.path={path}", "data.packing=true", "data.val_size=61", "train.val_every=3",
            "train.max_steps=6", "train.log_every=1", "train.global_batch_size=8", "checkpoint.export_final=false"]


def _entry(rank, world, store, out, checks):
    from dist_workers import run_checks

    run_checks(rank, world, store, out, checks)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist_data"))
    path = os.path.join(out, "pairs.jsonl")
    with open(RESOURCES / "tiny_tasks" / "train.jsonl") as f, open(path, "w") as g:
        g.write("".join(next(f) for _ in range(600)))
    os.makedirs(os.path.join(out, "ref"))
    ref = train(os.path.join(out, "ref"), *_overrides(path), "train.micro_batch_size=8")
    checks = [("fsdp2_packed", ["parallel=fsdp2", *_overrides(path), "train.micro_batch_size=2"])]
    mp.spawn(_entry, args=(2, os.path.join(out, "store"), out, checks), nprocs=2, join=True)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert "error" not in results, results.get("error")
    return ref.records, results["fsdp2_packed"]["records"]


def test_packed_training_and_validation_on_two_ranks_match_one_process(runs):
    one, two = runs
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) < 1e-5
    assert max(abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] for a, b in zip(one, two)) < 1e-5
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    vals = [(a["val_loss"], b["val_loss"]) for a, b in zip(one, two) if "val_loss" in a]
    assert len(vals) == 2 and all("val_loss" in b for a, b in zip(one, two) if "val_loss" in a)
    print("val_loss 1 process vs 2 ranks:", vals, "max train loss diff:", max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)))
    assert max(abs(a - b) for a, b in vals) < 1e-5, vals
