"""The model matrix: every family of tests/model_zoo.py x every 2-rank layout, against one process, plus two
independent anchors per family. Prints a table and exits 1 if any cell fails.

    .venv/bin/python scripts/model_matrix.py                         # everything (several minutes on 2 cores)
    .venv/bin/python scripts/model_matrix.py --families llama,granite --layouts tp,pp
    .venv/bin/python scripts/model_matrix.py --layouts hf_loss,adamw   # the anchors only, no ranks spawned

Columns (cells are the largest difference found, or REFUSED:<automodel's one-line UserError>, or FAIL:<why>):

  1proc    one process, 6 steps (fp32): first -> last loss; its final/ logits must differ from the initial
           checkpoint's (the export holds the trained weights)
  fsdp2, tp, pp, lora_tp
           2 ranks (gloo, one spawned group for every cell) vs one process (lora_tp vs one-process LoRA):
           max loss diff over 6 steps <= 1e-5, grad norms within 1e-4 relative, and the exported final/
           folders' logits (plain transformers, a probe batch) within 1e-5 (the cell shows the loss diff)
  hf_loss  step 1's loss vs the plain HF model's own `labels=` loss on the batch automodel used
  adamw    parameters after step 1 vs a hand-written torch.optim.AdamW step on the plain HF model (<= 1e-6)

A refused layout (e.g. pipeline parallel of a model with tied embeddings) is not a failure; a traceback is.
Full refusal and failure texts follow the table; tracebacks go to <out>/tracebacks.txt.
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
import model_zoo as mz  # noqa: E402

COLUMNS = ["1proc", *mr.LAYOUTS, "hf_loss", "adamw"]


def cell_text(outcome: dict | None, column: str) -> str:
    if outcome is None:
        return "-"
    status = outcome.get("status")
    if status == "refused":
        return "REFUSED:" + outcome["reason"]
    if status != "ok":
        return "FAIL:" + (outcome.get("error") or status)
    if column == "1proc":
        return f"{outcome['losses'][0]:.3f}->{outcome['losses'][-1]:.3f}"
    if column in ("hf_loss", "adamw"):
        return f"{outcome['diff']:.1e}"
    return f"{outcome['loss_diff']:.1e}"


def failed(outcome: dict | None) -> bool:
    return outcome is not None and outcome.get("status") not in ("ok", "refused")


def print_table(families: list[str], columns: list[str], cells: dict, width: int = 28) -> None:
    notes: list[str] = []
    rows = []
    for fam in families:
        row = [fam]
        for col in columns:
            text = cell_text(cells.get((fam, col)), col)
            if len(text) > width:
                notes.append(f"[{len(notes) + 1}] {fam} / {col}: {text}")
                text = text[: width - 6 - len(str(len(notes)))] + f"...[{len(notes)}]"
            row.append(text)
        rows.append(row)
    header = ["family", *columns]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if notes:
        print()
        print("\n".join(notes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="", help=f"comma-separated (default: all): {','.join(mz.FAMILIES)}")
    ap.add_argument("--layouts", default="", help=f"comma-separated columns (default: all): {','.join(COLUMNS)}")
    ap.add_argument("--zoo", default=os.path.join(tempfile.gettempdir(), "automodel_model_zoo"),
                    help="where the tiny checkpoints are built (kept and reused)")
    ap.add_argument("--out", default=None, help="work directory for the runs (default: a new temporary one)")
    ap.add_argument("--pg-timeout", type=float, default=120.0, help="seconds a collective may wait on a failed peer")
    ap.add_argument("--deadline", type=float, default=3600.0, help="seconds for the whole 2-rank part")
    ap.add_argument("--json", default=None, help="also write every cell's numbers to this file")
    args = ap.parse_args(argv)

    families = [f for f in args.families.split(",") if f] or list(mz.FAMILIES)
    columns = [c for c in args.layouts.split(",") if c] or list(COLUMNS)
    unknown = [f for f in families if f not in mz.FAMILIES] + [c for c in columns if c not in COLUMNS]
    if unknown:
        ap.error(f"unknown families/layouts: {', '.join(unknown)}")
    columns = [c for c in COLUMNS if c in columns]
    layouts = [c for c in columns if c in mr.LAYOUTS]
    out = args.out or tempfile.mkdtemp(prefix="model_matrix_")
    t0 = time.time()
    zoo, tasks = mr.start_matrix(args.zoo, families, out)

    cells: dict = {}
    # one process: the references every layout is compared with (always the full run: it is the 1proc column)
    refs: dict = {}
    needed = {"full"} | {mr.REFERENCE_OF[lay] for lay in layouts}
    for fam in families:
        for kind in sorted(needed):
            refs[fam, kind] = mr.attempt(mr.run_train, os.path.join(out, "ref", kind, fam),
                                         mr.overrides(zoo[fam], tasks, *mr.REFERENCES[kind]))
        cells[fam, "1proc"] = ref = dict(refs[fam, "full"])
        if ref["status"] == "ok":  # the export must hold the trained weights, not the initial ones
            try:
                ref["export_moved"] = mr.export_moved(ref, zoo[fam])
                if not ref["export_moved"] > mr.MIN_EXPORT_MOVE:
                    ref.update(status="error", error=f"final/ logits equal the initial checkpoint's "
                                                     f"({ref['export_moved']:.1e}): the export lost the training")
            except Exception as e:
                ref.update(status="error", error="exported final/ folder: " + mr.short_error(e))
        if "hf_loss" in columns or "adamw" in columns:
            a = mr.anchors(zoo[fam], tasks, os.path.join(out, "anchor", fam))
            for col in ("hf_loss", "adamw"):
                if col in columns:
                    cells[fam, col] = a[col]
        print(f"  {fam}: one process{' and anchors' if 'adamw' in columns else ''} done ({time.time() - t0:.0f}s)",
              flush=True)

    if layouts:
        checks = mr.two_rank_checks(zoo, tasks, [(f, lay) for f in families for lay in layouts])
        print(f"2 ranks: {len(checks)} checks in one spawned group ...", flush=True)
        spawned = spawned_group.run_spawned(checks, os.path.join(out, "ranks2"), pg_timeout_s=args.pg_timeout,
                                 deadline_s=args.deadline)
        logits: dict = {}
        for fam in families:
            for lay in layouts:
                cells[fam, lay] = mr.compare(spawned[f"{fam}/{lay}"], refs[fam, mr.REFERENCE_OF[lay]], logits)
        print(f"2 ranks done ({time.time() - t0:.0f}s)", flush=True)

    with open(os.path.join(out, "tracebacks.txt"), "w") as f:
        for (fam, col), o in cells.items():
            if o.get("traceback"):
                f.write(f"===== {fam} / {col}\n{o['traceback']}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{fam}/{col}": {k: v for k, v in o.items() if k not in ("state", "before", "after")}
                       for (fam, col), o in cells.items()}, f, indent=1, default=str)
    print()
    print_table(families, columns, cells)
    bad = [(fam, col) for (fam, col), o in cells.items() if failed(o)]
    refused = sum(1 for o in cells.values() if o.get("status") == "refused")
    print(f"\n{len(cells)} cells: {len(cells) - len(bad) - refused} pass, {refused} refused, {len(bad)} fail "
          f"({time.time() - t0:.0f}s; tracebacks in {os.path.join(out, 'tracebacks.txt')})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
