"""`automodel plot`: one PNG of a sweep's runs (or of single runs) against step, written next to them."""

import json
import os

from helpers import cli


def _run(folder, lr: float, override: str | None, validated: bool = True):
    os.makedirs(os.path.join(folder, ".hydra"), exist_ok=True)
    if override:
        with open(os.path.join(folder, ".hydra", "overrides.yaml"), "w") as f:
            f.write(f"- {override}\n")
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step in range(10, 110, 10):
            record = {"step": step, "loss": 5.0 / step ** (lr * 100), "lr": lr, "tokens_per_s": 1000.0 + step}
            if validated and step % 50 == 0:
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


def test_each_run_has_one_colour_in_every_panel_and_the_legend_lies_inside_the_figure(tmp_path):
    import matplotlib.colors
    import matplotlib.pyplot as plt

    from automodel.cli_plot import draw, find_runs

    # long labels (a swept data path), and the first run logged no validation loss: before, the validation
    # panel gave the second run the first run's colour, and the legend ran off both sides of the figure
    sweep = tmp_path / "multirun" / "2026-12-02" / "10-00-00"
    long_folder = "/datasets/a-long-folder-name-for-the-experiment/" * 3
    for job, lr in enumerate((1e-3, 3e-3, 1e-2)):
        _run(str(sweep / str(job)), lr, f"data.path={long_folder}part-{job}.jsonl", validated=job > 0)
    fig = draw(find_runs([str(sweep)]))
    try:
        colours = {}
        for ax in fig.axes:
            for line in ax.lines:
                colours.setdefault(line.get_label(), []).append(matplotlib.colors.to_hex(line.get_color()))
        assert len(colours) == 3 and sorted(len(c) for c in colours.values()) == [3, 4, 4]  # one lacks val_loss
        assert all(len(set(c)) == 1 for c in colours.values()), colours  # the same colour in every panel
        assert len({c[0] for c in colours.values()}) == 3, colours  # and a colour of its own

        fig.canvas.draw()
        (legend,) = fig.legends
        assert len(legend.get_texts()) == 3
        box, page = legend.get_window_extent(), fig.bbox
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, (box, page)
        for ax in fig.axes:  # and it covers no panel
            assert not box.overlaps(ax.get_tightbbox()), (box, ax.get_tightbbox())
    finally:
        plt.close(fig)


def test_more_runs_than_the_colour_cycle_still_get_a_colour_each():
    import matplotlib.colors

    from automodel.cli_plot import run_colors

    for n in (1, 4, 10, 11, 25):
        assert len({matplotlib.colors.to_hex(c) for c in run_colors(n)}) == n
