"""The model matrix's runs: the steps and layouts of a cell, one-process and 2-rank runs of a zoo folder
(tests/model_zoo.py), their comparison, and the two anchors that use no automodel code beyond the data plugin's
batch. Shared by tests/test_model_matrix.py (a cheap tier) and scripts/model_matrix.py (the whole family x
layout matrix), and by the MoE matrix (tests/test_moe.py, scripts/moe_matrix.py). The spawned group that runs a
list of checks on every rank is tests/spawned_group.py.
"""

from __future__ import annotations

import os

from model_zoo import build_zoo

STEPS = ["train.max_steps=6", "train.log_every=1", "train.global_batch_size=8", "train.seq_len=48",
         "train.sample_prompts=0", "train.device=cpu", "checkpoint=hf_export",
         # the router's balancing loss is per global micro-batch, which these layouts group differently from one
         # process (tests/test_moe.py checks it where the grouping is the same); dense families ignore it
         "moe.aux_loss_coef=0",
         # DeepSeek-V3's correction-bias balancing is a training rule of its own (not AdamW's): off for the anchors
         "moe.bias_update_rate=0"]
# 2-rank layouts, and the one-process run each is compared with
LAYOUTS = {
    "fsdp2": ["parallel=fsdp2", "train.micro_batch_size=2"],  # dp 2 x 2 micro-batches of 2
    "tp": ["parallel=tp"],  # sequence parallel on; 1 micro-batch of 8
    "pp": ["parallel=pp", "train.micro_batch_size=2"],  # 1F1B, 4 micro-batches of 2
    "lora_tp": ["parallel=tp", "peft=lora"],
}
REFERENCE_OF = {"fsdp2": "full", "tp": "full", "pp": "full", "lora_tp": "lora"}
REFERENCES = {"full": [], "lora": ["peft=lora"]}
# MoE layouts (scripts/moe_matrix.py): name -> (world, overrides, the one-process reference's overrides). The
# balancing loss is per global micro-batch (micro_batch_size x dp rows; ep does not reduce dp), so the reference
# runs micro-batches of that size: micro x world / (tp x pp x cp). Global batch 8 (STEPS).
MOE_LAYOUTS = {
    "ep2": (2, ["parallel=fsdp2_ep", "train.micro_batch_size=4"], ["train.micro_batch_size=8"]),
    "ep4": (4, ["parallel=fsdp2_ep", "parallel.ep=4", "train.micro_batch_size=2"], ["train.micro_batch_size=8"]),
    "tp": (2, ["parallel=tp"], ["train.micro_batch_size=8"]),  # dp 1: one micro-batch of 8
    "ep2_tp2": (4, ["parallel=fsdp2_ep", "parallel.tp=2", "train.micro_batch_size=4"], ["train.micro_batch_size=8"]),
    "ep2_pp2": (4, ["parallel=fsdp2_ep_pp", "train.micro_batch_size=2"], ["train.micro_batch_size=4"]),  # dp 2
    "ep2_cp2": (4, ["parallel=fsdp2_ep", "parallel.cp=2", "train.micro_batch_size=4"], ["train.micro_batch_size=8"]),
    "lora_ep2": (2, ["parallel=fsdp2_ep", "train.micro_batch_size=4", "peft=lora"],
                 ["train.micro_batch_size=8", "peft=lora"]),
    # dp 4 (ep 2 of it): 1f1b needs >= 2 micro-batches a step, so micro-batches of 1 (global micro-batch 4)
    "dp2_ep2_pp2": (8, ["parallel=fsdp2_ep_pp", "train.micro_batch_size=1"], ["train.micro_batch_size=4"]),
}

TOL_LOSS = 1e-5  # max |loss diff| over the 6 steps (fp32)
TOL_GRAD_REL = 1e-4  # max relative grad-norm diff
TOL_LOGITS = 1e-5  # max |logit diff| of the exported final/ folders on the probe batch
TOL_HF_LOSS = 1e-5  # step 1's loss vs the model's own HF labels= loss
TOL_PARAM = 1e-6  # parameters after step 1 vs a hand-written torch AdamW step
MIN_EXPORT_MOVE = 1e-4  # the one-process final/ logits must differ from the initial checkpoint's by more
TASK_EXAMPLES = 256  # the first examples of the bundled tiny tasks: tokenizing all 20,000 costs seconds a run


def start_matrix(root: str, families: list, out: str) -> tuple[dict, str]:
    """What a matrix script does first: quiet, single-threaded runs; the zoo and the tasks under `root`."""
    import logging
    import time

    import torch

    os.environ.setdefault("AUTOMODEL_NO_PROGRESS", "1")
    torch.set_num_threads(1)
    logging.getLogger("automodel").setLevel(logging.WARNING)
    t0 = time.time()
    zoo, tasks = build_zoo(root, families), write_tasks(root)
    print(f"zoo: {len(zoo)} families in {root} ({time.time() - t0:.0f}s); runs in {out}", flush=True)
    return zoo, tasks


def write_tasks(root: str) -> str:
    """A small prompt/completion jsonl (the first TASK_EXAMPLES bundled tiny-task examples) under `root`."""
    from automodel.config import RESOURCES

    path = os.path.join(root, "tasks.jsonl")
    if not os.path.isfile(path):
        with open(RESOURCES / "tiny_tasks" / "train.jsonl") as f:
            lines = [next(f) for _ in range(TASK_EXAMPLES)]
        with open(path + ".partial", "w") as f:
            f.writelines(lines)
        os.replace(path + ".partial", path)
    return path


def overrides(folder: str, tasks: str, *extra: str) -> list[str]:
    """The CLI overrides of a run of the checkpoint in `folder` on `tasks`."""
    return ["model=hf", f"model.path={folder}", "data=instruction", f"data.path={tasks}", *STEPS, *extra]


def run_train(out_dir: str, over: list[str]) -> dict:
    """Train with automodel (in this process, or as one rank of a spawned group) and return the numbers."""
    import time

    from automodel.compose import compose
    from automodel.engine.run import train

    import torch.distributed as dist

    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    result = train(compose(list(over)), out_dir)
    out = {"losses": [r["loss"] for r in result.records], "grad_norms": [r["grad_norm"] for r in result.records],
           "final_dir": result.final_dir, "seconds": time.perf_counter() - t0, "records": result.records}
    if dist.is_initialized() and dist.get_world_size() > 1:  # collective: every rank of the group trained
        from layout_workers import replicated_mismatches

        out["replicated_mismatch"] = replicated_mismatches(result.model)
    return out


def short_error(exc: BaseException, tb=None) -> str:
    """One line: the exception and where it was raised (the innermost frame in automodel, else the last)."""
    import traceback

    frames = traceback.extract_tb(tb if tb is not None else exc.__traceback__)
    ours = [f for f in frames if "/automodel/" in f.filename and "/site-packages/" not in f.filename]
    at = (ours or frames or [None])[-1]
    where = f" at {os.path.relpath(at.filename)}:{at.lineno} in {at.name}" if at else ""
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}{where}"


def attempt(fn, *args) -> dict:
    """{"status": "ok", **fn(...)}, or refused (a UserError: its one line), or error (with the traceback)."""
    import traceback

    from automodel.errors import UserError

    try:
        return {"status": "ok", **fn(*args)}
    except UserError as e:
        return {"status": "refused", "reason": str(e)}
    except Exception as e:  # a bug (or a missing feature): a failure of the cell, with its traceback
        return {"status": "error", "error": short_error(e), "traceback": traceback.format_exc()}


# ------------------------------------------------------------------ comparisons
def probe_batch():
    import torch

    g = torch.Generator().manual_seed(7)
    return torch.randint(4, 360, (2, 24), generator=g)  # token ids every tokenizer here has


def probe_logits(folder: str):
    """Logits of the HF folder (plain transformers) on the probe batch."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe_batch()).logits.float()


def export_moved(ref: dict, folder: str, logits_cache: dict | None = None) -> float:
    """How far training moved the exported logits from the initial checkpoint's (a final/ folder that still
    held the initial weights would match every layout's just as well)."""
    cache = logits_cache if logits_cache is not None else {}
    for f in (ref["final_dir"], folder):
        if f not in cache:
            cache[f] = probe_logits(f)
    return float((cache[ref["final_dir"]] - cache[folder]).abs().max())


def compare(got: dict, ref: dict, logits_cache: dict | None = None) -> dict:
    """The numbers of one check against its one-process reference; `ok` when every one is within tolerance."""
    if got.get("status") != "ok":
        return got
    if ref.get("status") != "ok":
        why = ref.get("error") or ref.get("reason")
        return {"status": "error", "error": f"its one-process reference failed: {why}"}
    out = {"status": "ok", "seconds": got.get("seconds")}
    n = len(ref["losses"])
    if len(got["losses"]) != n or n == 0:
        return {"status": "error", "error": f"{len(got['losses'])} logged steps, the reference has {n}"}
    out["loss_diff"] = max(abs(a - b) for a, b in zip(got["losses"], ref["losses"]))
    out["grad_rel"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got["grad_norms"], ref["grad_norms"]))
    cache = logits_cache if logits_cache is not None else {}
    try:
        for run in (got, ref):
            if run["final_dir"] not in cache:
                cache[run["final_dir"]] = probe_logits(run["final_dir"])
        out["logits_diff"] = float((cache[got["final_dir"]] - cache[ref["final_dir"]]).abs().max())
    except Exception as e:
        return {**out, "status": "error", "error": "exported final/ folder: " + short_error(e)}
    problems = [f"{k}={out[k]:.2e} > {tol:g}" for k, tol in (("loss_diff", TOL_LOSS), ("grad_rel", TOL_GRAD_REL),
                                                              ("logits_diff", TOL_LOGITS)) if not out[k] <= tol]
    if got.get("replicated_mismatch"):  # e.g. a norm's copies on the tp ranks drifted apart
        problems.append(f"replicated parameters differ between ranks: {', '.join(got['replicated_mismatch'][:3])}")
    if problems:
        out["status"] = "mismatch"
        out["error"] = ", ".join(problems)
    return out


# ------------------------------------------------------------------ anchors: one process, plain HF and torch
def first_batch(cfg):
    """The global batch automodel trains step 1 on (the data plugin's first, with the run's own seed, seq_len and
    batch size, on one data-parallel rank); and the validated config (fresh plugin instances)."""
    from automodel.config import validate

    checked = validate(cfg)
    t = checked.train
    tok = checked.plugins["model"].tokenizer()
    batches = checked.plugins["data"].build(tok, seq_len=t.seq_len, seed=t.seed, dp_rank=0, dp_size=1,
                                            global_batch_size=t.global_batch_size,
                                            micro_batch_size=t.global_batch_size)
    return next(batches), checked


def hf_labels_inputs(micro: dict) -> dict:
    """automodel's micro-batch (labels already shifted: labels[t] is the target of position t) as the inputs
    of an HF `labels=` call, which shifts itself: one more (pad) position, labels moved right by one."""
    import torch

    ids, labels = micro["input_ids"], micro["labels"]
    pad = torch.zeros_like(ids[:, :1])
    ignore = torch.full_like(labels[:, :1], -100)
    return {"input_ids": torch.cat([ids, pad], 1), "labels": torch.cat([ignore, labels], 1)}


def hf_model(folder: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    return model


def lr_at_step_1(optim_cfg) -> float:
    """optim=adamw's LR for the first step: linear warmup (step+1)/warmup_steps, cosine after (1.0 at its start)."""
    return optim_cfg.lr * (1.0 / optim_cfg.warmup_steps if optim_cfg.warmup_steps > 0 else 1.0)


def anchors(folder: str, tasks: str, out_dir: str) -> dict:
    """Both anchors of one family: {"hf_loss": outcome, "adamw": outcome}.

    hf_loss: step 1's loss of a 1-step automodel run equals the plain HF model's own `labels=` loss on the
    batch automodel used (the data plugin's first batch). adamw: the parameters after that step equal a
    hand-written step on the plain HF model: that loss, backward, torch's clip_grad_norm_ to
    train.max_grad_norm, torch.optim.AdamW with optim's lr (warmup applied), betas, eps, and weight decay on
    >= 2-D parameters only."""
    import torch

    over = overrides(folder, tasks, "train.max_steps=1", "checkpoint.export_final=false")
    result = {}

    def compose_run():
        from automodel.compose import compose

        return {"cfg": compose(over)}

    composed = attempt(compose_run)
    if composed["status"] != "ok":
        return {"hf_loss": composed, "adamw": composed}
    cfg = composed["cfg"]

    def automodel_step():
        from automodel.engine.run import train

        os.makedirs(out_dir, exist_ok=True)
        r = train(cfg, out_dir)
        return (r.records[0]["loss"], {k: v.detach().clone() for k, v in r.model.state_dict().items()},
                r.records[0]["grad_norm"])

    auto = attempt(lambda: dict(zip(("loss", "state", "grad_norm"), automodel_step())))
    if auto["status"] != "ok":
        return {"hf_loss": auto, "adamw": auto}

    def hf_side():
        batch, checked = first_batch(cfg)
        (micro,) = batch.micro_batches
        ids, labels = micro["input_ids"], micro["labels"]
        # the labels are the next tokens (checked where the next position has a target too: it is inside the example)
        inside = (labels[:, :-1] != -100) & (labels[:, 1:] != -100)
        if not torch.equal(labels[:, :-1][inside], ids[:, 1:][inside]):
            raise AssertionError("the data plugin's labels are not the next input tokens")
        model = hf_model(folder)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with torch.no_grad():  # HF's own shift: one more position, labels moved right by one
            hf_loss = float(model(**hf_labels_inputs(micro)).loss)
        targets = int((labels != -100).sum())
        # the step: HF's labels= loss on automodel's own shapes (pre-shifted labels through `shift_labels`), so
        # that the gradients are computed as automodel computes them, not rounded differently
        loss = model(input_ids=ids, labels=labels, shift_labels=labels).loss
        o, t = checked.plugins["optim"].cfg, checked.train
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
                                 {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                lr=lr_at_step_1(o), betas=(o.beta1, o.beta2), eps=o.eps)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)) if t.max_grad_norm > 0 else None
        opt.step()
        after = model.state_dict()
        return hf_loss, targets, grad_norm, before, after

    hf = attempt(lambda: dict(zip(("loss", "targets", "grad_norm", "before", "after"), hf_side())))
    if hf["status"] != "ok":
        return {"hf_loss": hf, "adamw": hf}
    diff = abs(auto["loss"] - hf["loss"])
    result["hf_loss"] = {"status": "ok" if diff <= TOL_HF_LOSS else "mismatch", "diff": diff,
                         "automodel": auto["loss"], "hf": hf["loss"], "targets": hf["targets"]}
    if diff > TOL_HF_LOSS:
        result["hf_loss"]["error"] = f"step-1 loss {auto['loss']:.6f} vs HF labels= loss {hf['loss']:.6f}"
    state, after, before = auto["state"], hf["after"], hf["before"]
    missing = sorted(set(after) ^ set(state))
    if missing:
        result["adamw"] = {"status": "error", "error": f"parameter names differ from the HF model's: {missing[:3]}"}
        return result
    pdiff = max(float((state[k].float() - after[k].float()).abs().max()) for k in after)
    moved = max(float((after[k].float() - before[k].float()).abs().max()) for k in after)
    result["adamw"] = {"status": "ok" if pdiff <= TOL_PARAM else "mismatch", "diff": pdiff, "moved": moved,
                       "grad_norm": hf["grad_norm"], "automodel_grad_norm": auto["grad_norm"]}
    if pdiff > TOL_PARAM:
        worst = max(after, key=lambda k: float((state[k].float() - after[k].float()).abs().max()))
        result["adamw"]["error"] = f"max param diff {pdiff:.2e} (at {worst}; the step moved weights by {moved:.2e})"
    return result


def two_rank_checks(zoo: dict, tasks: str, cells: list[tuple[str, str]]) -> list:
    """[(name, overrides)] of (family, layout) cells, named family/layout."""
    return [(f"{fam}/{layout}", overrides(zoo[fam], tasks, *LAYOUTS[layout])) for fam, layout in cells]



if __name__ == "__main__":  # python tests/model_zoo.py <root>: build and describe the zoo
    import sys

    from transformers import AutoConfig, AutoTokenizer

    for fam, path in build_zoo(sys.argv[1] if len(sys.argv) > 1 else "/tmp/automodel_zoo").items():
        tok = AutoTokenizer.from_pretrained(path)
        cfg = AutoConfig.from_pretrained(path)
        print(f"{fam:12s} {cfg.model_type:12s} {type(tok).__name__:18s} {len(tok):4d} tokens  bos={tok.bos_token} "
              f"eos={tok.eos_token} pad={tok.pad_token} tied={cfg.tie_word_embeddings}")
