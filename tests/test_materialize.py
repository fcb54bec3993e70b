"""Meta-device set-up: every layout starts from bitwise the same weights as one process, each rank holding
only its shard and never more than one module's tensors whole (2 ranks, gloo; one spawn for every check)."""

import json
import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from helpers import MICRO, compose, leave_group

MIXTRAL = ["model.config.model_type=mixtral", "+model.config.num_local_experts=4", "+model.config.num_experts_per_tok=2"]
LAYOUTS = {
    "fsdp2": ["parallel=fsdp2"],
    "tp": ["parallel=tp"],
    "fsdp2_lora": ["parallel=fsdp2", "peft=lora"],
    "pp": ["parallel=pp"],
    "cp": ["parallel=cp"],
    "gemma3_fsdp2": ["parallel=fsdp2", "model.config.model_type=gemma3_text", "+model.config.head_dim=16",
                     "model.config.tie_word_embeddings=true"],
    # stacked experts are initialized one expert at a time, each rank only its own (ep: half the experts)
    "mixtral_ep": ["parallel=fsdp2_ep", *MIXTRAL],
    "mixtral_fsdp2": ["parallel=fsdp2", *MIXTRAL],
}


def initial_weights(overrides: list[str], world: int) -> tuple[dict, dict]:
    """(the full initial state dict, gathered on rank 0; stats of this rank's materialization)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from automodel.config import validate
    from automodel.engine import materialize as mat
    from automodel.engine.export import _gather_stages

    plugins = validate(compose(*MICRO, *overrides)).plugins
    dims = plugins["parallel"].dims(world)
    mesh = dims.build_mesh("cpu") if world > 1 else None
    model = plugins["peft"].apply(plugins["model"].build("meta"))
    names = mat.canonical_names(model)
    model = plugins["parallel"].apply(model, mesh, dims, None)
    inits = [plugins["peft"].init_module] if hasattr(plugins["peft"], "init_module") else []
    seen = []
    real_init = mat._init_module

    def counting(module, name, own, *args):
        seen.append(sum(t.numel() for t, _ in own.values()))
        return real_init(module, name, own, *args)

    mat._init_module = counting
    try:
        mat.materialize(model, names, "cpu", seed=42, inits=[*inits, mat.hf_init(model)])
    finally:
        mat._init_module = real_init
    if dims.pp > 1:
        full = _gather_stages(model, mesh["pp"].get_group())
    else:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    return full, {"largest_module_whole": max(seen), "local": local}


def _entry(rank, world, store, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    try:
        for name, overrides in LAYOUTS.items():
            full, stats = initial_weights(overrides, world)
            if rank == 0:
                one_overrides = [o for o in overrides if not o.startswith("parallel=")]
                ref, ref_stats = initial_weights(["parallel=none", *one_overrides], 1)
                ref = {k: v for k, v in ref.items()}
                results[name] = {
                    "same_keys": sorted(full) == sorted(ref),
                    "bitwise": all(torch.equal(full[k].cpu(), ref[k]) for k in ref if k in full),
                    "largest_module_whole": stats["largest_module_whole"],
                    "largest_param": max(v.numel() for v in ref.values()),
                    "local": stats["local"], "one_process": ref_stats["local"],
                }
    except Exception:
        results["error"] = traceback.format_exc()
        raise
    finally:
        if rank == 0:
            with open(os.path.join(out, "results.json"), "w") as f:
                json.dump(results, f)
        leave_group(clean="error" not in results)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("materialize"))
    mp.spawn(_entry, args=(2, os.path.join(out, "store"), out), nprocs=2, join=True)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert "error" not in results, results.get("error")
    return results


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_starts_from_the_one_process_weights_bitwise(two, layout):
    r = two[layout]
    assert r["same_keys"] and r["bitwise"], r


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_rank_holds_its_shard_and_at_most_one_modules_tensors_whole(two, layout):
    r = two[layout]
    assert r["largest_module_whole"] <= 2 * r["largest_param"]  # e.g. a Linear's weight and bias, never more
    assert r["local"] <= 0.6 * r["one_process"], r  # about half (FSDP2 also shards over cp ranks)


def test_a_tensor_the_initializer_leaves_unset_is_refused_not_trained_from_garbage():
    from automodel.config import validate
    from automodel.engine import materialize as mat
    from automodel.errors import UserError

    model = validate(compose(*MICRO)).plugins["model"].build("meta")
    with pytest.raises(UserError, match=r"cannot initialize 'model.embed_tokens.weight' \(Embedding\) on the meta "
                                        r"device: the model's initializer leaves it unset"):
        mat.materialize(model, mat.canonical_names(model), "cpu", seed=0, inits=[lambda name, shadow: True])


def test_pretrained_weights_of_another_shape_are_refused_in_one_line(tmp_path):
    from helpers import save_micro_hf_model

    from automodel.config import validate
    from automodel.engine import materialize as mat
    from automodel.errors import UserError

    folder = save_micro_hf_model(str(tmp_path / "m"))  # the model below asks for more embedding rows
    plugin = validate(compose("model=hf", f"model.path={folder}", "+model.config_overrides.vocab_size=2000")
                      ).plugins["model"]
    model = plugin.build("meta")
    source = plugin.weights(model)
    with pytest.raises(UserError, match=r"holds 'model.embed_tokens.weight' with shape \(\d+, 64\) but the model "
                                        r"expects \(2000, 64\)"):
        mat.materialize(model, mat.canonical_names(model), "cpu", seed=0, inits=[mat.hf_init(model)], source=source,
                        base_keys=set(model.state_dict()))
