"""Composition of every shipped option, the train contract, layouts and batch arithmetic."""

import dataclasses
import os

import pytest
from omegaconf import OmegaConf
from helpers import compose

from automodel import registry
from automodel.config import TrainConfig, conf_dir, validate
from automodel.distributed.parallel_dims import ParallelDims
from automodel.engine.preflight import accumulation_steps, micro_batch_size
from automodel.errors import UserError
from automodel.sampling import GlobalBatchSampler


def _options(group):
    return sorted(f[:-5] for f in os.listdir(conf_dir() / group) if f.endswith(".yaml"))


@pytest.mark.parametrize("group", registry.GROUPS)
def test_every_shipped_option_composes_validates_and_lists_all_its_plugin_fields(group):
    for option in _options(group):
        overrides = [f"{group}={option}"]
        if option == "hf":  # the user names a model (a hub id here: a local path must exist)
            overrides.append(f"{'teacher.model' if group == 'teacher' else 'model'}.path=some-org/some-model")
        elif option in ("instruction", "text", "chat", "alpaca", "sharegpt", "vlm"):  # options that need a data path
            overrides.append(f"{group}.path=/some/where")
        cfg = compose(*overrides)
        if group in registry.LIST_GROUPS:  # several at once: each option under its own name
            node = dict(cfg[group][option])
            plugins = validate(cfg).plugins[group]
            assert type(plugins[-1] if option != registry.LIST_GROUPS[group] else plugins[0]) is registry.load(
                group, node["plugin"])
            fields = {f.name for f in dataclasses.fields(registry.load(group, node.pop("plugin")).Config)}
            assert set(node) == fields, (group, option, fields ^ set(node))
            continue
        if option == "qlora":  # refused as the config is read where bitsandbytes is not installed
            from helpers import extras_on_path

            with extras_on_path():
                validate(cfg)
        else:
            validate(cfg)
        node = dict(cfg[group])
        cls = registry.load(group, node.pop("plugin"))
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        # every field is spelled out, so users can override any of them without Hydra's '+'
        assert set(node) == fields, (group, option, fields ^ set(node))


def test_user_contract_keys_exist():
    cfg = compose()
    for key in ("train.max_steps", "train.global_batch_size", "train.micro_batch_size", "train.seq_len",
                "train.seed", "train.log_every", "optim.lr", "model.path", "data.path"):
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", key
    fsdp = compose("parallel=fsdp2")
    for dim in ("dp_replicate", "dp_shard", "tp", "cp", "pp"):
        assert dim in fsdp.parallel
    assert {f.name for f in dataclasses.fields(TrainConfig)} >= set(cfg.train)


def test_missing_option_lists_choices():
    with pytest.raises(UserError) as e:
        compose("parallel=fsdp3")
    assert str(e.value).startswith("parallel=fsdp3: no such option; choose one of: cp, fsdp2, fsdp2_cp, "
                                   "fsdp2_cp_tp_pp, fsdp2_ep, fsdp2_ep_pp, fsdp2_pp, fsdp2_tp, fsdp2_tp_pp, hsdp, none, pp, tp")


def test_unknown_override_key():
    with pytest.raises(UserError) as e:
        compose("train.max_stepz=3")
    assert str(e.value).startswith("train.max_stepz: unknown key; valid keys are: max_steps, global_batch_size")


def test_wrong_type():
    with pytest.raises(UserError) as e:
        validate(compose("train.max_steps=lots"))
    assert str(e.value) == "train.max_steps='lots': wrong type, expected int"


@pytest.mark.parametrize("world,kw,expect", [
    (4, {}, dict(dp_shard=4)),
    (8, dict(dp_replicate=2), dict(dp_replicate=2, dp_shard=4)),
    (8, dict(dp_shard=2, tp=-1), dict(dp_shard=2, tp=4)),
    (1, {}, dict(dp_shard=1)),
])
def test_parallel_dims_infer(world, kw, expect):
    dims = ParallelDims.infer(world, **kw)
    for k, v in expect.items():
        assert getattr(dims, k) == v
    assert dims.dp_replicate * dims.dp_shard * dims.cp * dims.tp * dims.pp == world


@pytest.mark.parametrize("world,kw,msg", [
    (3, dict(tp=2), "world size 3 is not divisible by tp=2"),
    (4, dict(dp_shard=2, tp=4), "dp_shard=2 x tp=4 uses 8 processes but the world size is 4"),
    (4, dict(dp_shard=-1, tp=-1), "only one size may be -1"),
    (4, dict(tp=0), "parallel.tp=0: sizes are positive"),
])
def test_parallel_dims_refusals_name_the_numbers(world, kw, msg):
    with pytest.raises(UserError, match=msg):
        ParallelDims.infer(world, **kw)


def test_accumulation_steps():
    t = TrainConfig(global_batch_size=16, micro_batch_size=2)
    assert accumulation_steps(t, dp=2) == 4
    with pytest.raises(UserError, match="not divisible by train.micro_batch_size=2 x 3 data-parallel"):
        accumulation_steps(t, dp=3)


def test_each_dp_rank_reads_its_own_slice_of_every_global_batch():
    s = GlobalBatchSampler(num_examples=10, global_batch_size=4, seed=3)
    for step in range(6):  # crosses epoch boundaries
        g = s.global_indices(step)
        parts = [s.rank_indices(step, r, 2) for r in range(2)]
        assert parts[0] + parts[1] == g and len(set(g)) == 4  # disjoint, no example twice in a batch
    # the order is a pure function of (seed, step): a fresh sampler agrees
    assert GlobalBatchSampler(10, 4, 3).global_indices(5) == s.global_indices(5)
    assert GlobalBatchSampler(10, 4, 4).global_indices(0) != s.global_indices(0)
    # an epoch is 10 // 4 = 2 whole batches (the remainder is dropped); each example at most once per epoch
    epoch = s.global_indices(0) + s.global_indices(1)
    assert len(set(epoch)) == 8
    with pytest.raises(UserError, match="3 usable examples, fewer than one global batch of 4"):
        GlobalBatchSampler(3, 4, 0)


def test_unset_micro_batch_under_pipeline_gives_one_micro_batch_per_stage():
    t = TrainConfig(global_batch_size=32, micro_batch_size=None)
    assert micro_batch_size(t, dp=2, pp=4) == 4 and accumulation_steps(t, dp=2, pp=4) == 4
    assert micro_batch_size(t, dp=2) == 16 and accumulation_steps(t, dp=2) == 1
    with pytest.raises(UserError) as e:
        micro_batch_size(TrainConfig(global_batch_size=6, micro_batch_size=None), dp=1, pp=4)
    assert str(e.value) == ("train.global_batch_size=6 is not divisible by the 1 data-parallel ranks x 4 pipeline "
                            "micro-batches; pick a multiple of 4 (or set train.micro_batch_size)")
