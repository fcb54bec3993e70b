"""Write the bundled `shapes` image-text task: small pictures of one to three coloured shapes, and questions about
their colour, shape and count, as `vlm` conversations: train.parquet (its images in a `datasets` Image column) and
val.jsonl with images/val_*.png (local paths): the two ways data=vlm reads images.

    python scripts/make_shapes.py [--train 3000] [--val 60] [--size 32]

Deterministic (fixed seed): re-running rewrites the same files. The answer to each question is one word, so a
tiny image-text model's held-out accuracy can be read off exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import random

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 30)}
SHAPES = ("square", "circle", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
QUESTIONS = {"colour": "What colour are the shapes?", "shape": "What shape are they?", "count": "How many shapes are there?"}
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "automodel", "resources", "shapes")


def draw(path: str, colour: str, shape: str, count: int, size: int, rng: random.Random) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    cell = size // 3
    slots = rng.sample(range(9), count)
    for slot in slots:
        x, y = (slot % 3) * cell + 1, (slot // 3) * cell + 1
        box = (x, y, x + cell - 2, y + cell - 2)
        if shape == "square":
            pen.rectangle(box, fill=COLOURS[colour])
        elif shape == "circle":
            pen.ellipse(box, fill=COLOURS[colour])
        else:
            pen.polygon([(x + (cell - 2) // 2, y), (x, y + cell - 2), (x + cell - 2, y + cell - 2)], fill=COLOURS[colour])
    image.save(path, optimize=True)


def conversations(split: str, n: int, size: int, rng: random.Random, out: str) -> list[dict]:
    """n records; each image drawn to <out>/images/<split>_<i>.png."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    records = []
    for i in range(n):
        colour, shape, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 3)
        name = f"images/{split}_{i:04d}.png"
        draw(os.path.join(out, name), colour, shape, count, size, rng)
        asked = rng.choice(list(QUESTIONS))
        answer = {"colour": colour, "shape": shape, "count": COUNT_WORDS[count]}[asked]
        records.append({"messages": [{"role": "user", "content": [{"type": "image"},
                                                                  {"type": "text", "text": QUESTIONS[asked]}]},
                                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                        "images": [name]})
    return records


def write_jsonl(records: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_parquet(records: list[dict], out: str, path: str) -> None:
    """The images as bytes in a `datasets` Image column (and their PNG files removed)."""
    from datasets import Dataset, Features, Image, List, Value

    rows = {"messages": [r["messages"] for r in records], "images": []}
    for r in records:
        with open(os.path.join(out, r["images"][0]), "rb") as f:
            rows["images"].append([{"bytes": f.read(), "path": None}])
        os.remove(os.path.join(out, r["images"][0]))
    part = {"type": Value("string"), "text": Value("string")}
    features = Features({"messages": List({"role": Value("string"), "content": List(part)}), "images": List(Image())})
    Dataset.from_dict(rows, features=features).to_parquet(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--val", type=int, default=60)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    rng = random.Random(7)
    train = conversations("train", args.train, args.size, rng, args.out)
    val = conversations("val", args.val, args.size, rng, args.out)
    write_parquet(train, args.out, os.path.join(args.out, "train.parquet"))
    write_jsonl(val, os.path.join(args.out, "val.jsonl"))
    print(f"wrote {args.train} + {args.val} examples to {args.out}")


if __name__ == "__main__":
    main()
