"""The image-text model matrix: every family of tests/vlm_zoo.py (Gemma 3 and LLaVA; with torchvision also
Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision) x every 2- and 4-rank layout, against one process, on the bundled shapes
conversations. Prints a table and exits 1 if any cell fails.

    .venv/bin/python scripts/vlm_matrix.py                       # Gemma 3 and LLaVA (about 2 minutes here)
    /tmp/automodel-tv/bin/python scripts/vlm_matrix.py           # + the torchvision families (that venv comes
                                                                 #   from scripts/vlm_torchvision.sh)

Columns (each multi-rank cell: max |loss diff| over 6 fp32 steps vs the one-process run it must equal, <= 1e-5, and
grad norms within 1e-4 relative; or REFUSED:<automodel's one line>, or FAIL:<why>):

  1proc       one process: first -> last loss (the vision tower frozen, the default)
  fsdp2       FSDP2 over 2 ranks                         lora          FSDP2 + LoRA (language model)
  tp          tensor + sequence parallel on the language model (the vision tower replicated)
  tp_lora     tp + LoRA                                  tp_open       tp with nothing frozen (model.freeze=[])
  vision_lora FSDP2 + LoRA on the vision tower alone (model.freeze=[language,projector])
  ac          FSDP2 with full activation checkpointing (language and vision blocks)
  bf16        FSDP2 under precision=bf16 vs one process under bf16 autocast: within 2e-2 (bf16's precision)
  fsdp2_tp    4 ranks: FSDP2 (dp_shard 2) x tp 2            hsdp    4 ranks: dp_replicate 2 x dp_shard 2
  pp, cp      pipeline and context parallel: refused for image-text models, in one line
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import matrix_runs as mr  # noqa: E402
import spawned_group  # noqa: E402
import vlm_zoo  # noqa: E402

STEPS = 6
DATA = ["data=shapes", "data.path=${asset:shapes/val.jsonl}", "data.val_path=null", "train.seq_len=64",
        "train.sample_prompts=0", "train.global_batch_size=4", "train.log_every=1", "optim.warmup_steps=0",
        f"train.max_steps={STEPS}", "checkpoint.export_final=false", "train.device=cpu"]
# layout -> (2-rank overrides, the one-process run's overrides it must equal)
LAYOUTS = {
    "fsdp2": (["parallel=fsdp2"], []),
    "lora": (["parallel=fsdp2", "peft=lora"], ["peft=lora"]),
    "tp": (["parallel=tp"], []),
    "tp_lora": (["parallel=tp", "peft=lora"], ["peft=lora"]),
    "tp_open": (["parallel=tp", "model.freeze=[]"], ["model.freeze=[]"]),
    "vision_lora": (["parallel=fsdp2", "peft=lora", "model.freeze=[language,projector]"],
                    ["peft=lora", "model.freeze=[language,projector]"]),
    "ac": (["parallel=fsdp2", "parallel.activation_checkpointing=full"], []),
    "bf16": (["parallel=fsdp2", "precision=bf16"], ["precision=bf16"]),
    "fsdp2_tp": (["parallel=fsdp2_tp", "parallel.tp=2"], []),  # 4 ranks: dp_shard 2 x tp 2
    "hsdp": (["parallel=hsdp"], []),  # 4 ranks: dp_replicate 2 x dp_shard 2
    "pp": (["parallel=pp", "train.micro_batch_size=2"], []),
    "cp": (["parallel=cp"], []),
}
FOUR_RANKS = {"fsdp2_tp", "hsdp"}  # the others run on 2
TOL_LOSS, TOL_GRAD_REL = 1e-5, 1e-4
# bf16 rounds differently when FSDP2 casts the gathered weights (MixedPrecisionPolicy) than when autocast casts
# them in one process: the two agree to bf16's precision, not fp32's
TOL_BF16_LOSS, TOL_BF16_GRAD_REL = 2e-2, 2e-2


def compare(two: dict, one: dict, tol_loss: float = TOL_LOSS, tol_grad: float = TOL_GRAD_REL) -> dict:
    if two["status"] != "ok":
        return two
    if one["status"] != "ok":
        return {"status": "error", "error": "the one-process reference failed: " + (one.get("error") or "")}
    loss = max(abs(a - b) for a, b in zip(two["losses"], one["losses"]))
    grad = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(two["grad_norms"], one["grad_norms"]))
    ok = len(two["losses"]) == len(one["losses"]) == STEPS and loss <= tol_loss and grad <= tol_grad
    return {"status": "ok" if ok else "mismatch", "loss_diff": loss, "grad_rel": grad,
            "error": None if ok else f"loss diff {loss:.1e}, grad norm rel {grad:.1e}"}


def text(outcome: dict, column: str) -> str:
    if outcome["status"] == "refused":
        return "REFUSED"
    if outcome["status"] != "ok":
        return "FAIL"
    if column == "1proc":
        return f"{outcome['losses'][0]:.3f}->{outcome['losses'][-1]:.3f}"
    return f"{outcome['loss_diff']:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(vlm_zoo.FAMILIES))
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    families, layouts = args.families.split(","), args.layouts.split(",")
    unknown = [f for f in families if f not in vlm_zoo.FAMILIES] + [lay for lay in layouts if lay not in LAYOUTS]
    if unknown:
        sys.exit(f"vlm_matrix: unknown {unknown[0]!r}; families here: {', '.join(vlm_zoo.FAMILIES)} (the Qwen and "
                 f"OneVision ones need torchvision); layouts: {', '.join(LAYOUTS)}")
    import logging

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("AUTOMODEL_NO_PROGRESS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the spawned ranks' library deprecation notices
    logging.getLogger("automodel").setLevel(logging.WARNING)
    out = args.out or tempfile.mkdtemp(prefix="vlm_matrix_")
    start = time.time()
    folders = {f: vlm_zoo.build(os.path.join(out, "zoo"), f) for f in families}
    base = {f: ["model=hf", f"model.path={folders[f]}", *DATA] for f in families}
    two = {}
    for world in (2, 4):
        checks = [(f"{f}/{lay}", [*base[f], *LAYOUTS[lay][0]]) for f in families for lay in layouts
                  if (lay in FOUR_RANKS) == (world == 4)]
        if checks:
            two.update(spawned_group.run_spawned(checks, os.path.join(out, f"ranks{world}"), world=world, pg_timeout_s=60,
                                      deadline_s=1800))
    references = {}
    for f in families:
        for over in [[], *(LAYOUTS[lay][1] for lay in layouts)]:
            key = (f, tuple(over))
            if key not in references:
                name = "_".join([f, *over]).replace("=", "-").replace("[", "").replace("]", "").replace(",", "+")
                references[key] = mr.attempt(mr.run_train, os.path.join(out, "one", name), [*base[f], *over])
    cells = {(f, "1proc"): references[(f, ())] for f in families}
    cells.update({(f, lay): compare(two[f"{f}/{lay}"], references[(f, tuple(LAYOUTS[lay][1]))],
                                    *((TOL_BF16_LOSS, TOL_BF16_GRAD_REL) if lay == "bf16" else ()))
                  for f in families for lay in layouts})
    columns = ["1proc", *layouts]
    print(f"{'family':16s}" + "".join(f"{c:>13s}" for c in columns))
    for f in families:
        print(f"{f:16s}" + "".join(f"{text(cells[(f, c)], c):>13s}" for c in columns))
    counts = {"ok": 0, "refused": 0, "fail": 0}
    notes = []
    for (f, c), o in cells.items():
        kind = o["status"] if o["status"] in ("ok", "refused") else "fail"
        counts[kind] += 1
        if kind != "ok":
            notes.append(f"  {f}/{c}: {o.get('reason') or o.get('error')}")
    def worst(keep):
        return max((o["loss_diff"] for (f, c), o in cells.items() if keep(c) and o["status"] == "ok"
                    and "loss_diff" in o), default=0.0)
    print(f"\n{len(cells)} cells: {counts['ok']} pass, {counts['refused']} refused, {counts['fail']} fail; largest "
          f"loss diff {worst(lambda c: c != 'bf16'):.1e} in fp32, {worst(lambda c: c == 'bf16'):.1e} in bf16; "
          f"{time.time() - start:.0f}s (torch {torch.__version__})")
    print("\n".join(notes))
    sys.exit(1 if counts["fail"] else 0)


if __name__ == "__main__":
    main()
