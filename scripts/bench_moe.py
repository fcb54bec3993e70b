#!/usr/bin/env python
"""Tokens/s of transformers' MoE expert implementations (eager / batched_mm / grouped_mm), side by side.

Why: issue 10 asks for the tokens/s of (a) a stack of MoE blocks alone and (b) a whole small MoE causal LM,
with transformers' default experts path ("eager": a Python loop over experts) next to the grouped path
(torch.nn.functional.grouped_mm over experts sorted by id). The target shape is 64 experts, top-8; on a GPU
the grouped path should reach >= 3x the per-expert loop there. "batched_mm" gathers one weight matrix per
(token, expert) pair ([T*k, 2I, H]), which suits decoding, not training: on CPU at the default sizes it takes
~25 s a step in fp32 (7.5 GB RSS) and ~75 s in bf16; drop it with --impls eager,grouped_mm.

Every measurement is forward + backward, after a warm-up step, median of --repeats (a step slower than
--budget seconds is timed once, from its warm-up, to keep CPU runs short). All implementations run on the
same weights and inputs (one model, switched with set_experts_implementation), and their outputs are checked
against eager (fp32: max abs diff < 1e-4 and < 1e-3 of the output's scale; bf16: < 3e-2 of it); a mismatch
exits 1. The block check compares each block's MoE output, not the residual stream that would hide it.

    .venv/bin/python scripts/bench_moe.py [--dtype fp32|bf16|both] [--model-type qwen3_moe|mixtral|olmoe|deepseek_v3]
        [--experts 64 --top-k 8 --hidden 256 --moe-intermediate 128 --layers 4 --seq 256 --batch 2]
        [--device cpu|cuda] [--repeats 3] [--threads 1] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")

IMPLS = ("eager", "batched_mm", "grouped_mm")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (max abs diff, max abs diff / max |eager output|) vs eager; the block check looks at the MoE outputs alone
TOL = {"fp32": (1e-4, 1e-3), "bf16": (float("inf"), 3e-2)}
# size flag -> each config's own key, plus what a model type needs so every layer is a routed MoE layer
CONFIG_KEYS = {
    "qwen3_moe": dict(experts="num_experts", moe_intermediate="moe_intermediate_size",
                      extra=dict(decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe": dict(experts="num_experts", moe_intermediate="intermediate_size", extra={}),
    "mixtral": dict(experts="num_local_experts", moe_intermediate="intermediate_size", extra={}),
    "deepseek_v3": dict(experts="n_routed_experts", moe_intermediate="moe_intermediate_size",
                        extra=dict(first_k_dense_replace=0, n_group=1, topk_group=1, n_shared_experts=1,
                                   q_lora_rank=None, kv_lora_rank=64, qk_rope_head_dim=16, head_dim=16,
                                   qk_nope_head_dim=32, v_head_dim=32)),
}
QUICK = dict(experts=8, top_k=2, hidden=64, moe_intermediate=32, layers=2, seq=32, batch=2, vocab=512, repeats=2)


def build_model(args, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    keys = CONFIG_KEYS[args.model_type]
    heads = max(1, args.hidden // 64)
    kw = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, vocab_size=args.vocab, num_attention_heads=heads,
              num_key_value_heads=heads, head_dim=args.hidden // heads, intermediate_size=args.moe_intermediate,
              num_experts_per_tok=args.top_k)
    kw.update({keys["experts"]: args.experts, keys["moe_intermediate"]: args.moe_intermediate}, **keys["extra"])
    cfg = AutoConfig.for_model(args.model_type, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
    return model.to(device=args.device, dtype=dtype).train()


def moe_blocks(model):
    """The model's own MoE blocks: every module whose child `experts` holds the stacked expert weights."""
    return [m for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.Module)]


def timed(step, args):
    """(median seconds, reps, output of the first step). The first step is the warm-up."""
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    out = step()
    sync()
    first = time.perf_counter() - t0
    if first > args.budget:
        return first, 1, out
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times), out


def run_dtype(args, dname):
    model = build_model(args, DTYPES[dname])
    blocks = moe_blocks(model)
    assert blocks, f"no MoE block with an `experts` child found in {args.model_type}"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.seq, args.hidden, generator=g).to(args.device, DTYPES[dname])
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)

    def block_step():
        h, outs = x, []
        for blk in blocks:
            outs.append(blk(h))
            h = h + outs[-1]
        h.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        return torch.cat(outs).detach().float()  # not h: the residual would dwarf the MoE part

    def model_step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return out.logits.detach().float()

    rows, ref = [], {}
    tokens = args.batch * args.seq
    for impl in args.impls:
        model.set_experts_implementation(impl)
        row = dict(impl=impl, dtype=dname)
        for name, step in (("block", block_step), ("model", model_step)):
            try:
                sec, reps, out = timed(step, args)
            except Exception as e:  # e.g. a kernel missing for this dtype/device: report it, keep going
                row.update({f"{name}_tok_s": None, f"{name}_error": f"{type(e).__name__}: {str(e)[:120]}"})
                continue
            ref.setdefault(name, out)
            diff = (out - ref[name]).abs().max().item()
            rel = diff / max(ref[name].abs().max().item(), 1e-12)
            row.update({f"{name}_tok_s": tokens / sec, f"{name}_reps": reps, f"{name}_maxdiff": diff,
                        f"{name}_reldiff": rel, f"{name}_ok": diff <= TOL[dname][0] and rel <= TOL[dname][1]})
            del out
        rows.append(row)
    for row in rows:
        for name in ("block", "model"):
            base = next((r[f"{name}_tok_s"] for r in rows if r["impl"] == "eager"), None)
            v = row.get(f"{name}_tok_s")
            row[f"{name}_x_eager"] = v / base if v and base else None
    return rows


def grouped_kernel_note(device, dtype):
    """Whether transformers' grouped_mm path will use the native kernel or its per-expert loop fallback."""
    try:
        from transformers.integrations.moe import _can_use_grouped_mm

        w = torch.zeros(2, 8, 8, device=device, dtype=dtype)
        native = _can_use_grouped_mm(w[0], w, torch.tensor([8, 8], device=device, dtype=torch.int32))
        return "native F.grouped_mm" if native else "loop fallback"
    except Exception as e:  # private helper: may move between transformers versions
        return f"unknown ({type(e).__name__})"


def fmt(v, spec):
    return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-type", default="qwen3_moe", choices=sorted(CONFIG_KEYS))
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--moe-intermediate", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "both"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list, eager first (it is the reference)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=5.0, help="a warm-up step slower than this is the measurement")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the table here")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (< 20 s)")
    if "--quick" in sys.argv:
        p.set_defaults(**QUICK)
    args = p.parse_args()
    args.impls = [i.strip() for i in args.impls.split(",")]
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    dnames = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    print(f"{args.model_type}: experts={args.experts} top_k={args.top_k} hidden={args.hidden} "
          f"moe_intermediate={args.moe_intermediate} layers={args.layers} vocab={args.vocab} "
          f"seq={args.seq} batch={args.batch} device={args.device} threads={args.threads} torch={torch.__version__}")
    rows = []
    for d in dnames:
        print(f"grouped_mm on {args.device}/{d}: {grouped_kernel_note(args.device, DTYPES[d])}")
        rows += run_dtype(args, d)

    print(f"\n{'impl':<11}{'dtype':<6}{'block tok/s':>12}{'x eager':>9}{'model tok/s':>12}{'x eager':>9}"
          f"{'block maxdiff':>15}{'model maxdiff':>15}  check")
    bad = False
    for r in rows:
        ok = all(r.get(f"{n}_ok", False) for n in ("block", "model"))
        bad |= not ok
        reps = " (1 rep)" if 1 in (r.get("block_reps"), r.get("model_reps")) else ""
        errs = "; ".join(r[k] for k in ("block_error", "model_error") if k in r)
        print(f"{r['impl']:<11}{r['dtype']:<6}{fmt(r.get('block_tok_s'), '12.0f')}{fmt(r['block_x_eager'], '8.2f')}x"
              f"{fmt(r.get('model_tok_s'), '12.0f')}{fmt(r['model_x_eager'], '8.2f')}x"
              f"{fmt(r.get('block_maxdiff'), '15.2e')}{fmt(r.get('model_maxdiff'), '15.2e')}  "
              f"{'ok' if ok else 'MISMATCH/FAIL'}{reps}{' ' + errs if errs else ''}")
    fastest = {}
    for d in dnames:
        parts = []
        for n in ("block", "model"):
            cand = [r for r in rows if r["dtype"] == d and r.get(f"{n}_tok_s")]
            best = max(cand, key=lambda r: r[f"{n}_tok_s"]) if cand else None
            fastest[f"{d}_{n}"] = best and best["impl"]
            parts.append(f"{n} {best['impl']} ({fmt(best[f'{n}_x_eager'], '.2f')}x eager)" if best else f"{n} -")
        print(f"fastest {d}: " + ", ".join(parts))
    wall = time.perf_counter() - t0
    print(f"wall time {wall:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows, fastest=fastest, wall_s=wall), f, indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
