"""The mixture-of-experts matrix (issue 10): every MoE family of tests/model_zoo.py x every expert-parallel
layout of matrix_runs.MOE_LAYOUTS, fp32, 6 steps, router balancing loss ON (moe.aux_loss_coef=0.05 in every
run; DeepSeek-V3's bias balancing too), each against one process on the same global micro-batches.
tests/test_moe.py is the cheap CI tier (five families at ep=2, one family for the rest); this is all of it.
Prints a table, exits 1 unless every cell is ok (a refusal is a failure unless listed in EXPECTED_REFUSALS).

    .venv/bin/python scripts/moe_matrix.py                          # everything (2, 4 and 8 ranks; slow on 2 cores)
    .venv/bin/python scripts/moe_matrix.py --quick                  # smoke: one family, ep2
    .venv/bin/python scripts/moe_matrix.py --families olmoe --layouts ep4,ep2_pp2 --json /tmp/moe.json

Cells: `ok <max loss diff>` (losses within 1e-5 over 6 steps, grad norms within 1e-4 relative, exported
final/ logits within 1e-5), MISMATCH:<the numbers>, REFUSED:<automodel's one line>, ERROR:<why>.
Column 1proc is the one-process run with micro-batches of 8: first -> last loss and step 1's balancing loss
(it must be logged and > 0: the loss is on), and its final/ must differ from the initial checkpoint.

The reference rule: the balancing loss is computed per *global* micro-batch (micro_batch_size x dp rows,
ep does not reduce dp), so a layout's reference runs micro-batches of micro x dp; the script checks each
layout's reference against the dims automodel infers. Each world size spawns one gloo group for all its cells.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import matrix_runs as mr  # noqa: E402
import spawned_group  # noqa: E402

FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "olmoe", "qwen2_moe"]
# the router's training signals, which matrix_runs.STEPS turns off for its anchors (as tests/test_moe.py's ON): the
# balancing loss (the tiny configs' own coefficients differ) and DeepSeek-V3's correction-bias balancing
ON = ["moe.aux_loss_coef=0.05", "moe.bias_update_rate=0.001"]
# (family, layout) -> a substring of the refusal's line. transformers' tp plan of GptOss covers only the embedding
# and the head (its experts are meant for expert parallel): automodel refuses tp rather than replicate every block.
EXPECTED_REFUSALS = {("gpt_oss", lay): "the tensor-parallel plan of GptOssForCausalLM shards no layer"
                     for lay in ("tp", "ep2_tp2")}


def check_reference(world: int, over: list, ref: list) -> str | None:
    """Why `ref` is not the one-process grouping of the layout (global micro-batch = micro x dp), or None."""
    from automodel.compose import compose
    from automodel.config import validate

    def rows(extra, world_size):
        c = validate(compose([*mr.STEPS, *extra]))
        dp = c.plugins["parallel"].dims(world_size).dp
        return (c.train.micro_batch_size or c.train.global_batch_size // dp) * dp

    try:
        want, got = rows(over, world), rows(ref, 1)
    except Exception as e:
        return "checking the reference's grouping: " + mr.short_error(e)
    return None if want == got else f"the reference groups {got} rows a micro-batch, the layout {want}"


def cell_text(o: dict, fam: str, col: str) -> str:
    s = o["status"]
    if s == "refused":
        return ("refused (expected): " if expected(fam, col, o) else "REFUSED:") + o["reason"]
    if s == "mismatch":
        return "MISMATCH:" + o["error"]
    if s != "ok":
        return "ERROR:" + (o.get("error") or s)
    if col == "1proc":
        return f"{o['losses'][0]:.3f}->{o['losses'][-1]:.3f} aux {o['aux']:.3f}"
    return f"ok {o['loss_diff']:.1e}"


def expected(fam: str, col: str, o: dict) -> bool:
    want = EXPECTED_REFUSALS.get((fam, col))
    return o["status"] == "refused" and want is not None and want in o["reason"]


def print_table(families: list, columns: list, cells: dict, width: int = 30) -> None:
    notes, rows = [], []
    for fam in families:
        row = [fam]
        for col in columns:
            text = cell_text(cells[fam, col], fam, col) if (fam, col) in cells else "-"
            if len(text) > width:
                notes.append(f"[{len(notes) + 1}] {fam} / {col}: {text}")
                text = text[: width - 6 - len(str(len(notes)))] + f"...[{len(notes)}]"
            row.append(text)
        rows.append(row)
    header = ["family", *columns]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line + "\n" + "-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if notes:
        print("\n" + "\n".join(notes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="", help=f"comma-separated (default: all): {','.join(FAMILIES)}")
    ap.add_argument("--layouts", default="", help=f"comma-separated (default: all): {','.join(mr.MOE_LAYOUTS)}")
    ap.add_argument("--quick", action="store_true", help="smoke: the first family only, ep2 only")
    ap.add_argument("--zoo", default=os.path.join(tempfile.gettempdir(), "automodel_model_zoo"),
                    help="where the tiny checkpoints are built (kept and reused)")
    ap.add_argument("--workdir", default=None, help="work directory for the runs (default: a new temporary one)")
    ap.add_argument("--pg-timeout", type=float, default=120.0, help="seconds a collective may wait on a failed peer")
    ap.add_argument("--deadline", type=float, default=3600.0, help="seconds for each world size's spawned group")
    ap.add_argument("--json", default=None, help="also write every cell's outcome to this file")
    args = ap.parse_args(argv)

    families = [f for f in args.families.split(",") if f] or list(FAMILIES)
    layouts = [c for c in args.layouts.split(",") if c] or list(mr.MOE_LAYOUTS)
    if args.quick:
        families, layouts = families[:1], ["ep2"]
    unknown = [f for f in families if f not in FAMILIES] + [c for c in layouts if c not in mr.MOE_LAYOUTS]
    if unknown:
        ap.error(f"unknown families/layouts: {', '.join(unknown)}")
    layouts = [c for c in mr.MOE_LAYOUTS if c in layouts]
    out = args.workdir or tempfile.mkdtemp(prefix="moe_matrix_")
    t0 = time.time()
    zoo, tasks = mr.start_matrix(args.zoo, families, out)
    bad_ref = {lay: check_reference(*mr.MOE_LAYOUTS[lay]) for lay in layouts}

    cells, refs, logits = {}, {}, {}
    main_ref = ("train.micro_batch_size=8",)
    kinds = sorted({main_ref} | {tuple(mr.MOE_LAYOUTS[lay][2]) for lay in layouts})
    for fam in families:  # one process: the references (ref_<overrides>)
        for kind in kinds:
            run_dir = os.path.join(out, "ref", "_".join(k.split("=")[-1] for k in kind), fam)
            refs[fam, kind] = r = mr.attempt(mr.run_train, run_dir, mr.overrides(zoo[fam], tasks, *ON, *kind))
            if r["status"] == "ok":  # the balancing loss must be on: logged, and > 0
                with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                    r["aux"] = json.loads(f.readline()).get("aux_loss", 0.0)
                if not r["aux"] > 0:
                    r.update(status="error", error="no balancing loss logged: moe.aux_loss_coef=0.05 did not apply")
        cells[fam, "1proc"] = ref = refs[fam, main_ref]
        if ref["status"] == "ok":
            try:
                if not mr.export_moved(ref, zoo[fam], logits) > mr.MIN_EXPORT_MOVE:
                    ref.update(status="error", error="final/ logits equal the initial checkpoint's")
            except Exception as e:
                ref.update(status="error", error="exported final/ folder: " + mr.short_error(e))
        print(f"  {fam}: one process done ({time.time() - t0:.0f}s)", flush=True)

    for world in sorted({mr.MOE_LAYOUTS[lay][0] for lay in layouts}):
        mine = [lay for lay in layouts if mr.MOE_LAYOUTS[lay][0] == world]
        checks = [(f"{fam}/{lay}", mr.overrides(zoo[fam], tasks, *ON, *mr.MOE_LAYOUTS[lay][1]))
                  for fam in families for lay in mine]
        print(f"{world} ranks: {len(checks)} checks in one spawned group ...", flush=True)
        got = spawned_group.run_spawned(checks, os.path.join(out, f"ranks{world}"), world=world, pg_timeout_s=args.pg_timeout,
                             deadline_s=args.deadline)
        for fam in families:
            for lay in mine:
                o = mr.compare(got[f"{fam}/{lay}"], refs[fam, tuple(mr.MOE_LAYOUTS[lay][2])], logits)
                if bad_ref[lay] and o["status"] == "ok":
                    o = {**o, "status": "error", "error": bad_ref[lay]}
                cells[fam, lay] = o
        print(f"{world} ranks done ({time.time() - t0:.0f}s)", flush=True)

    with open(os.path.join(out, "tracebacks.txt"), "w") as f:
        for (fam, col), o in cells.items():
            if o.get("traceback"):
                f.write(f"===== {fam} / {col}\n{o['traceback']}\n")
    elapsed = time.time() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": elapsed, "cells": {f"{fam}/{col}": {k: v for k, v in o.items() if k != "traceback"}
                                                     for (fam, col), o in cells.items()}}, f, indent=1, default=str)
    print()
    print_table(families, ["1proc", *layouts], cells)
    bad = [k for k, o in cells.items() if o["status"] != "ok" and not expected(*k, o)]
    print(f"\n{len(cells)} cells: {len(cells) - len(bad)} ok, {len(bad)} not ok; elapsed {elapsed:.0f}s "
          f"(tracebacks in {os.path.join(out, 'tracebacks.txt')})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
