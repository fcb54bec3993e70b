"""What the optional loggers share: refusing a missing package up front, and the numbers a step logs."""

from __future__ import annotations

import importlib.util
import math
import sys

from automodel.errors import UserError


def require(package: str, option: str, extra: str) -> None:
    """One line naming the install command when `package` cannot be imported (checked without importing it:
    the import itself happens on the loggers' thread)."""
    present = sys.modules[package] is not None if package in sys.modules else (
        importlib.util.find_spec(package) is not None)
    if not present:
        raise UserError(f"logger={option} needs the {package} package, which is not installed: "
                        f"pip install 'automodel[{extra}]'")


def numbers(record: dict) -> dict[str, float]:
    """The step's finite numbers (not `step` itself, not flags or strings such as `skipped`)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flatten(node, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys -> strings (MLflow params)."""
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: str(node)}
