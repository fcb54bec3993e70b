"""Whether a checkpoint may be resumed by this run: the same model, and the same settings unless the user accepts
a change by name.

A resumed run whose config differs from the checkpoint's in a setting that changes the trajectory (the
optimizer's learning rate, the data, the seed, ...) would otherwise train with the checkpoint's values while its
config.yaml records the new ones. So every difference is refused in one line listing each changed key with both
values, unless `checkpoint.allow_changed` names it (a key, or a whole section such as `optim`); an accepted
change is then used, and said in the log. The architecture can never change: the weights would not fit.
"""

from __future__ import annotations

import logging

from automodel.errors import UserError

log = logging.getLogger("automodel")
_UNSET = "<unset>"


def differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, checkpoint's value, this run's value) of every key that differs; a key one side lacks is unset."""
    keys = sorted(set(saved) | set(current), key=lambda k: (not k.endswith(".plugin"), k))  # a plugin change first
    return [(k, saved.get(k, _UNSET), current.get(k, _UNSET)) for k in keys
            if saved.get(k, _UNSET) != current.get(k, _UNSET)]


def describe(found: list[tuple[str, object, object]], prefix: str = "") -> str:
    return "; ".join(f"{prefix}{k} is {a!r} in the checkpoint but {b!r} in this run" for k, a, b in found)


def accepted(key: str, allowed: list[str]) -> bool:
    return any(key == name or key.startswith(name + ".") for name in allowed)


def check_resumable(path: str, saved: dict, current: dict, allowed: list[str]) -> None:
    """Refuse (one line) a checkpoint of another model, or changed settings the user did not accept by name."""
    arch = differences(saved.get("architecture", saved.get("model", {})), current["architecture"])  # or 0.1's name
    if arch:
        raise UserError(f"cannot resume from '{path}': it is a checkpoint of another model ({describe(arch, 'model.')}"
                        "); resume with the same model, or start fresh (checkpoint.resume=null)")
    if "settings" not in saved:
        log.warning("the checkpoint %s records no settings to compare (an earlier automodel made it): this run's are "
                    "used as they are", path)
        return
    _check_names(allowed, current["settings"])
    changed = differences(saved["settings"], current["settings"])
    refused = [d for d in changed if not accepted(d[0], allowed)]
    if refused:
        names = ",".join(k for k, _, _ in changed)
        raise UserError(f"cannot resume from '{path}' with changed settings: {describe(refused)}; to train on with "
                        f"the new values add checkpoint.allow_changed=[{names}], or resume with the checkpoint's "
                        "settings (a layout change needs neither)")
    if changed:
        log.warning("resuming with changed settings (accepted by checkpoint.allow_changed): %s",
                    "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed))


def _check_names(allowed: list[str], settings: dict) -> None:
    """A name that is no setting at all (a typo) would accept nothing, silently: refuse it."""
    for name in allowed:
        if any(accepted(k, [name]) for k in settings):
            continue
        section = name.split(".")[0]
        known = sorted(k for k in settings if k.split(".")[0] == section) or sorted({k.split(".")[0] for k in settings})
        raise UserError(f"checkpoint.allow_changed names '{name}', which is not a setting a checkpoint records; "
                        f"valid names: {', '.join(known)} (or a whole section, e.g. optim)")
