"""`automodel plot RUN_OR_SWEEP...`: the loss, validation loss, learning rate and throughput of runs against step,
as one PNG (matplotlib, `pip install 'automodel[plot]'`).

Each argument is a run directory (it holds metrics.jsonl) or a sweep directory (its jobs are run directories:
`multirun/<date>/<time>/`): every run found is one line per panel, labelled by the values its sweep swept
(from `.hydra/overrides.yaml`) or its path. The PNG goes next to the first argument, as `metrics.png` inside it,
unless `-o FILE.png` says where. Reads only files, so it works on a run in progress, and on runs from a cluster.
"""

from __future__ import annotations

import argparse
import json
import math
import os

from automodel.errors import UserError

PANELS = [("loss", "training loss"), ("val_loss", "validation loss"), ("lr", "learning rate"),
          ("tokens_per_s", "tokens / s")]


def find_runs(paths: list[str]) -> list[tuple[str, str]]:
    """(label, run dir) of every run the paths name, in order, labelled by the overrides that differ between
    them (or by path); a path with no run is refused."""
    from automodel.launch.sweep_summary import _overrides

    runs = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "metrics.jsonl")):
            found = [path]
        elif os.path.isdir(path):
            jobs = sorted((d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "metrics.jsonl"))),
                          key=lambda d: (not d.isdigit(), int(d) if d.isdigit() else 0, d))
            found = [os.path.join(path, d) for d in jobs]
        else:
            raise UserError(f"'{path}' does not exist; give a run directory (it holds metrics.jsonl) or a sweep "
                            "directory (multirun/<date>/<time>)")
        if not found:
            raise UserError(f"'{path}' holds no metrics.jsonl, nor do its subfolders; give a run directory or a "
                            "sweep directory")
        runs += found
    overrides = {run: {k: v for k, v in _overrides(run).items() if not k.startswith("hydra")} for run in runs}
    keys = {k for o in overrides.values() for k in o}
    varying = [k for k in sorted(keys) if len({o.get(k) for o in overrides.values()}) > 1]  # what tells runs apart
    labels = [" ".join(f"{k}={overrides[run][k]}" for k in varying if k in overrides[run]) for run in runs]
    return [(label or os.path.normpath(run), run) for label, run in zip(labels, runs)]


def read_metrics(run: str) -> list[dict]:
    records = []
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == 1 or line.endswith("\n"):  # a last line still being written is skipped
                    raise UserError(f"{run}/metrics.jsonl line {number} is not JSON; is it a metrics file "
                                    "automodel wrote?") from None
    return records


def plot(runs: list[tuple[str, str]], out: str) -> str:
    import matplotlib.pyplot as plt

    fig = draw(runs)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw(runs: list[tuple[str, str]]):
    """The figure: one panel per metric, one colour per run in every panel (a run that logged no validation
    loss must not shift the others' colours there), and the legend below the panels, inside the figure."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("automodel plot needs matplotlib, which is not installed: pip install 'automodel[plot]' "
                        "(or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: no display needed (a cluster's login node, CI)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for (label, run), color in zip(runs, run_colors(len(runs))):
        records = read_metrics(run)
        for ax, (key, _) in zip(axes.flat, PANELS):
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
                      and math.isfinite(r[key])]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if key == "val_loss" else None, markersize=3, label=label,
                        color=color)
    for ax, (key, title) in zip(axes.flat, PANELS):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key in ("loss", "val_loss") and ax.lines:
            ax.set_yscale("log")
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    if len(runs) > 1:
        _legend(fig, axes)
    return fig


def run_colors(n: int) -> list:
    """matplotlib's ten distinct line colours, or for more runs n evenly spaced along one colour map."""
    import matplotlib

    if n <= 10:
        return [f"C{i}" for i in range(n)]
    return [matplotlib.colormaps["viridis"](i / (n - 1)) for i in range(n)]


def _legend(fig, axes, wrap: int = 70) -> None:
    """One entry per run (from every panel: the loss panel may lack a run), below the panels: as many columns as
    fit the figure's width, labels longer than `wrap` characters wrapped, and the figure taller when the
    legend needs the room, so that no label runs off the figure."""
    import textwrap

    entries = {}
    for ax in axes.flat:
        for line in ax.lines:
            entries.setdefault(line.get_label(), line)
    labels = [textwrap.fill(label, wrap) for label in entries]
    text_lines = sum(label.count("\n") + 1 for label in labels)
    for ncol in range(min(len(labels), 4), 0, -1):
        fig.set_figheight(7 + 0.2 * math.ceil(text_lines / ncol))
        legend = fig.legend(list(entries.values()), labels, loc="outside lower center", ncol=ncol, fontsize="small")
        fig.canvas.draw()
        if within(legend.get_window_extent(), fig.bbox) or ncol == 1:
            return
        legend.remove()


def within(box, outer) -> bool:
    return box.x0 >= outer.x0 and box.x1 <= outer.x1 and box.y0 >= outer.y0 and box.y1 <= outer.y1


def main(argv: list[str]) -> None:
    from automodel.generate import ArgumentParser  # argparse errors as one line, exit code 2

    parser = ArgumentParser(prog="automodel plot", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP", help="run or sweep directories")
    parser.add_argument("-o", "--out", default=None, help="the PNG to write (default: <first>/metrics.png)")
    args = parser.parse_args(argv)
    runs = find_runs(args.paths)
    out = args.out or os.path.join(args.paths[0], "metrics.png")
    if not out.lower().endswith(".png"):
        raise UserError(f"-o {out}: give a .png file")
    print(plot(runs, out))
