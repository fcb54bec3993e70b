"""`automodel plot`: one PNG of a sweep's runs (or of single runs) against step, written next to them."""

import json
import os

from helpers import cli


def _run(folder, lr: float, override: str | None):
    os.makedirs(os.path.join(folder, ".hydra"), exist_ok=True)
    if override:
        with open(os.path.join(folder, ".hydra", "overrides.yaml"), "w") as f:
            f.write(f"- {override}\n")
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step in range(10, 110, 10):
            record = {"step": step, "loss": 5.0 / step ** (lr * 100), "lr": lr, "tokens_per_s": 1000.0 + step}
            if step % 50 == 0:
                record["val_loss"] = record["loss"] * 1.1
            f.write(json.dumps(record) + "\n")
        f.write('{"step": 110, "lo')  # a line still being written: skipped, not an error


def _colors(png: str) -> set:
    """The distinct saturated colours in the image (the lines; axes, text and grid are grey)."""
    import matplotlib.image

    pixels = (matplotlib.image.imread(png)[..., :3] * 255).astype(int).reshape(-1, 3)
    saturated = pixels[(pixels.max(1) - pixels.min(1)) > 80]
    return {tuple(p // 32) for p in saturated}


def test_a_sweep_is_one_png_with_a_line_per_run_labelled_by_what_it_swept(tmp_path):
    sweep = tmp_path / "multirun" / "2026-12-02" / "10-00-00"
    for job, lr in enumerate((1e-3, 3e-3, 1e-2, 3e-2)):
        _run(str(sweep / str(job)), lr, f"optim.lr={lr}")
    proc = cli("plot", str(sweep), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    png = str(sweep / "metrics.png")
    assert proc.stdout.strip() == png
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(_colors(png)) >= 4  # matplotlib's first four line colours: one per run

    single = tmp_path / "run"
    _run(str(single), 1e-3, None)
    out = str(tmp_path / "plots" / "one.png")
    proc = cli("plot", str(single), "-o", out, cwd=str(tmp_path))
    assert proc.returncode == 0 and os.path.getsize(out) > 10_000, proc.stderr
    assert 1 <= len(_colors(out)) < len(_colors(png))
