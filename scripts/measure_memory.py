"""Peak host memory per rank during set-up and the first step, against the shard arithmetic.

    .venv/bin/python scripts/measure_memory.py                 # qwen3_0_6b: 1 process, 2 FSDP2, 2 TP ranks
    .venv/bin/python scripts/measure_memory.py --rehearse      # + llama3_8b fsdp2_tp lora rehearsals at 8 and 64
    .venv/bin/python scripts/measure_memory.py --no-ranks --vlm --worlds 8   # gemma3_4b image-text rehearsal

Each configuration runs twice, from random init and from a local HF folder of the same model (written once
to --folder). Every rank is a fresh spawned process running the engine for one step; it reports its
peak resident memory (ru_maxrss) and its shard of the training state (fp32 weights, and for trainable
parameters grads + two AdamW moments). The bound the issue sets: peak <= shard + largest tensor + 1.5 GiB.
The rehearsals run `automodel ... launcher.fake_world_size=N` and read rank 0's own report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024**3
STEP = ["train.max_steps=1", "train.log_every=1", "train.seq_len=64", "train.global_batch_size=2",
        "train.sample_prompts=0", "checkpoint.export_final=false"]


def _rank(rank, world, store, out, overrides):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["AUTOMODEL_NO_PROGRESS"] = "1"
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    sys.path.insert(0, ROOT)
    from automodel.compose import compose
    from automodel.engine import memory
    from automodel.engine.run import train

    run = os.path.join(out, "run")
    os.makedirs(run, exist_ok=True)
    result = train(compose(list(overrides)), run)
    local, trainable, full = memory.shard_bytes(result.model)
    largest = max(p.numel() * p.element_size() for p in result.model.parameters())
    report = {"peak": memory.peak_host_bytes(), "shard_state": local + 3 * trainable, "largest": largest,
              "full": full}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def measure(overrides: list[str], world: int) -> list[dict]:
    import torch.multiprocessing as mp

    out = tempfile.mkdtemp(prefix="automodel-mem-")
    mp.spawn(_rank, args=(world, os.path.join(out, "store"), out, overrides), nprocs=world, join=True)
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


def save_folder(folder: str, model: str) -> None:
    if os.path.isfile(os.path.join(folder, "config.json")):
        return
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); from automodel.compose import compose; "
            "from automodel.config import validate; import torch; "
            f"p = validate(compose(['model={model}'])).plugins['model']; torch.manual_seed(0); "
            f"m = p.build('cpu'); m.save_pretrained({folder!r}); p.tokenizer().save_pretrained({folder!r})")
    subprocess.run([sys.executable, "-c", code], check=True)


LLAMA_REHEARSAL = ["model=llama3_8b", "parallel=fsdp2_tp", "peft=lora", "train.seq_len=64"]


def vlm_rehearsal() -> list[str]:
    """gemma3_4b (its published architecture, random init) on the bundled shapes conversations at its own image
    size: 896x896 pictures, 256 image tokens, through a Gemma 3 processor over the tests' small vocabulary (the
    real one cannot be downloaded here), the config's image token ids pointed at that vocabulary's."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import vlm_zoo

    folder = os.path.join(tempfile.gettempdir(), "automodel-gemma3_4b-processor")
    processor, ids = vlm_zoo.gemma3_processor(image_size=896, tokens_per_image=256)
    processor.save_pretrained(folder)
    return ["model=gemma3_4b", f"model.tokenizer={folder}", *(f"+model.config.{k}={v}" for k, v in ids.items()),
            "parallel=fsdp2", "data=shapes", "data.path=${asset:shapes/val.jsonl}", "data.val_path=null",
            "train.seq_len=320", "train.sample_prompts=0"]


def rehearse(world: int, overrides: list[str], per_rank: int) -> dict:
    cmd = [os.path.join(ROOT, ".venv", "bin", "automodel"), *overrides, f"launcher.fake_world_size={world}",
           "train.max_steps=2", f"train.global_batch_size={max(1, world // per_rank)}"]  # one row per dp rank
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.mkdtemp(), env={**os.environ,
                          "AUTOMODEL_NO_PROGRESS": "1"})
    text = proc.stdout + proc.stderr
    line = next((ln for ln in text.splitlines() if "rehearsal of rank 0" in ln), None)
    if proc.returncode or line is None:
        return {"error": text[-1500:]}
    peak = float(re.search(r"peak host memory ([\d.]+) GiB", line).group(1))
    state = float(re.search(r"= ([\d.]+) GiB$", line).group(1))
    setup_line = next(ln for ln in text.splitlines() if ln.startswith("set-up done"))
    setup = float(re.search(r"peak host memory so far ([\d.]+) GiB", setup_line).group(1))
    largest = float(re.search(r"largest tensor held whole: ([\d.]+) MiB", text).group(1)) / 1024
    return {"peak_gib": peak, "state_gib": state, "setup_gib": setup, "largest_gib": largest, "line": line}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3_0_6b")
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "automodel-qwen3_0_6b-hf"))
    ap.add_argument("--rehearse", action="store_true")
    ap.add_argument("--vlm", action="store_true", help="rehearse gemma3_4b (image-text) at its image size")
    ap.add_argument("--worlds", default="8,64", help="rehearsal world sizes")
    ap.add_argument("--no-ranks", action="store_true", help="only the rehearsals")
    args = ap.parse_args()
    rows = []
    if not args.no_ranks:
        save_folder(args.folder, args.model)
    for source, extra in () if args.no_ranks else (("random init", [f"model={args.model}"]),
                          ("local HF folder", [f"model={args.model}", f"model.path={args.folder}"])):
        for name, world, layout in (("1 process", 1, ["parallel=none"]), ("2 x FSDP2", 2, ["parallel=fsdp2"]),
                                    ("2 x TP", 2, ["parallel=tp"])):
            reports = measure([*extra, *layout, *STEP], world)
            for rank, r in enumerate(reports):
                bound = r["shard_state"] + r["largest"] + 1.5 * GiB
                rows.append((source, name, rank, r["peak"] / GiB, r["shard_state"] / GiB, r["largest"] / GiB,
                             bound / GiB, r["peak"] <= bound))
    if rows:
        print(f"\n{args.model}: peak host memory per rank, set-up + first step (GiB)")
        print("| source | layout | rank | peak | shard of training state | largest tensor | bound | within |")
        print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]:.2f} | {row[4]:.2f} | {row[5]:.2f} | {row[6]:.2f} | "
              f"{'yes' if row[7] else 'NO'} |")
    failed = not all(r[7] for r in rows)
    rehearsals = ([("llama3_8b parallel=fsdp2_tp peft=lora", LLAMA_REHEARSAL, 2)] if args.rehearse else []) + (
        [("gemma3_4b (image-text) parallel=fsdp2, 896x896 images", vlm_rehearsal(), 1)] if args.vlm else [])
    for title, overrides, per_rank in rehearsals:
        print(f"\n{title}, rehearsal of rank 0 (launcher.fake_world_size=N)")
        print("| world | set-up peak | set-up + 2 steps peak | shard of training state | largest tensor | "
              "shard + largest + 1.5 |")
        print("|---|---|---|---|---|---|")
        for world in (int(w) for w in args.worlds.split(",")):
            r = rehearse(world, overrides, per_rank)
            if "error" in r:
                print(f"| {world} | FAILED | | | | |\n{r['error']}")
                failed = True
            else:
                bound = r["state_gib"] + r["largest_gib"] + 1.5
                print(f"| {world} | {r['setup_gib']:.2f} | {r['peak_gib']:.2f} | {r['state_gib']:.2f} | "
                      f"{r['largest_gib']:.2f} | {bound:.2f} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
