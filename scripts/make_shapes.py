"""Write the bundled `shapes` image-text task: small pictures of one to three coloured shapes, and questions about
their colour, shape and count, as `vlm` conversations (automodel/resources/shapes/{train,val}.jsonl + images/).

    python scripts/make_shapes.py [--train 480] [--val 60] [--size 32]

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


def write(split: str, n: int, size: int, rng: random.Random, out: str = OUT) -> None:
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
        for i in range(n):
            colour, shape, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 3)
            name = f"images/{split}_{i:04d}.png"
            draw(os.path.join(out, name), colour, shape, count, size, rng)
            asked = rng.choice(list(QUESTIONS))
            answer = {"colour": colour, "shape": shape, "count": COUNT_WORDS[count]}[asked]
            record = {"messages": [{"role": "user", "content": [{"type": "image"},
                                                                {"type": "text", "text": QUESTIONS[asked]}]},
                                   {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                      "images": [name]}
            f.write(json.dumps(record) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=480)
    ap.add_argument("--val", type=int, default=60)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    rng = random.Random(7)
    write("train", args.train, args.size, rng, args.out)
    write("val", args.val, args.size, rng, args.out)
    print(f"wrote {args.train} + {args.val} examples to {args.out}")


if __name__ == "__main__":
    main()
