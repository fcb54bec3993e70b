"""`automodel list`: every plugin and config option per group, and which installed package provides it."""

from __future__ import annotations

from automodel import registry
from automodel.errors import UserError
from automodel.options import options


def main(argv: list[str]) -> None:
    import sys

    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    if argv:  # a typo such as `automodel list model` would otherwise print the whole table as if understood
        raise UserError(f"automodel list takes no arguments (got: {' '.join(argv)}); it lists every group's options")

    from rich.console import Console
    from rich.table import Table

    table = Table(title="automodel plugins and options (select with group=option)")
    for column in ("group", "option", "plugin", "option from", "plugin class", "plugin from"):
        table.add_column(column, overflow="fold")
    for group in registry.GROUPS:
        plugins = {p.name: p for p in registry.plugins(group)}
        shown = set()
        for opt in options(group):
            plug = plugins.get(opt.plugin or "")
            shown.add(opt.plugin)
            table.add_row(group, opt.name, opt.plugin or "?", opt.source,
                          plug.target if plug else "(not installed)", plug.dist if plug else "-")
        for name, plug in plugins.items():
            if name not in shown:  # a plugin no option file selects yet: usable via <group>.plugin=<name>
                table.add_row(group, "-", name, "-", plug.target, plug.dist)
        table.add_section()
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped output: whole rows, no "…"
