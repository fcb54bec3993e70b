"""Pretrained weights of an HF folder, one in-memory tensor at a time, as transformers would convert them.

Checkpoints on disk keep older or per-piece names that transformers converts at load time: MoE experts
stored one by one (`experts.0.w1.weight` ...) become one fused `experts.gate_up_proj` [E, 2I, H], legacy
names are renamed. A sharded loader must apply the same conversions, so this reader asks transformers
for the model's own conversion mapping (`get_model_conversion_mapping`) and runs its converters on the
on-disk tensors that make up each in-memory tensor. Nothing here knows a model name.

`get(name)` returns one whole in-memory tensor (the materializer keeps this rank's slice of it), so a
rank holds at most the largest single tensor (and, for a fused tensor, the pieces it is made of) on top
of its shards. A block of a stored tensor is read alone (`get(name, region)`); so is a block of experts of
a tensor stacked from per-expert stored tensors (transformers' `MergeModulelist` over dim 0): only the
experts in the block are read and converted, so under expert parallel a rank reads only its experts.
safetensors only: pickled weights are never loaded.
"""

from __future__ import annotations

import copy
import logging
import os

from automodel.errors import UserError

log = logging.getLogger("automodel")


class HFWeights:
    """The tensors of an HF safetensors folder, under the in-memory names of `skeleton` (a plain HF model
    of the same architecture, on the meta device)."""

    def __init__(self, folder: str, skeleton, label: str | None = None):
        from safetensors import safe_open

        self.folder = folder
        self.label = label or folder
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            pickled = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth"))]
            hint = (f" (it has {pickled[0]}: pickled weights are not loaded; convert them to safetensors, e.g. "
                    "save_pretrained(..., safe_serialization=True))") if pickled else ""
            raise UserError(f"model.path='{self.label}' holds no .safetensors weights{hint}")
        self._where: dict[str, str] = {}
        for f in files:
            try:
                with safe_open(os.path.join(folder, f), framework="pt") as h:
                    for key in h.keys():
                        self._where[key] = f
            except Exception as e:  # a truncated or foreign file
                raise UserError(f"model.path='{self.label}': cannot read {f}: {' '.join(str(e).split())[:200]}") from None
        self._skeleton = skeleton
        self._targets, self._aliases = self._plan(skeleton)
        self._pending: dict = {}  # other outputs of a one-to-many conversion, until asked for
        self._handles: dict = {}

    def describe(self) -> str:
        return f"model.path='{self.label}'"

    def _plan(self, skeleton):
        """{in-memory name: (converter or None, [(source pattern, on-disk key), ...])} and, for converters
        with several outputs, {other output name: the name its conversion is keyed under}."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        try:
            from transformers.conversion_mapping import get_model_conversion_mapping

            mapping = get_model_conversion_mapping(skeleton) or []
        except Exception as e:  # a model transformers has no mapping machinery for
            log.debug("no weight conversion mapping: %s", e)
            mapping = []
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        by_pattern = {k: c for c in converters for k in c.source_patterns}
        meta = skeleton.state_dict()
        prefix = getattr(skeleton, "base_model_prefix", None)
        targets, aliases = {}, {}
        for key in sorted(self._where, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if name not in meta and key in meta:
                name, pattern = key, None
            if name not in meta:
                continue  # on disk but not in the model (e.g. a stored rotary buffer): transformers skips it too
            converter = by_pattern.get(pattern) if pattern is not None else None
            entry = targets.setdefault(name, (converter, []))
            entry[1].append((pattern if converter is not None else key, key))
            if converter is not None and len(converter.target_patterns) > 1:
                first = converter.target_patterns[0]
                for other in converter.target_patterns[1:]:
                    if first in name:
                        aliases[name.replace(first, other, 1)] = name
        return targets, aliases

    def keys(self) -> set[str]:
        return set(self._targets) | set(self._aliases)

    def _read(self, key: str, region: tuple | None = None):
        from safetensors import safe_open

        f = self._where[key]
        if f not in self._handles:
            self._handles[f] = safe_open(os.path.join(self.folder, f), framework="pt")
        tensor = self._handles[f].get_slice(key)[region] if region else self._handles[f].get_tensor(key)
        HFWeights.elements_read += tensor.numel()
        return tensor

    elements_read = 0  # over every reader in this process (tests check that ranks read only their part)

    def shape(self, name: str) -> tuple | None:
        """The stored shape of `name` when it is stored as is (read from the header, no data); None when
        it is made by a conversion."""
        if name in self._pending or self._aliases.get(name, name) != name or self._targets[name][0] is not None:
            return None
        from safetensors import safe_open

        key = self._targets[name][1][0][1]
        f = self._where[key]
        if f not in self._handles:
            self._handles[f] = safe_open(os.path.join(self.folder, f), framework="pt")
        return tuple(self._handles[f].get_slice(key).get_shape())

    def reads_blocks(self, name: str) -> bool:
        """Whether `get(name, region)` reads only the block (stored as is, or stacked from per-expert tensors)."""
        if name in self._pending or self._aliases.get(name, name) != name:
            return False
        converter = self._targets[name][0]
        return converter is None or _stacks_experts(converter)

    def get(self, name: str, region: tuple | None = None):
        """The in-memory tensor `name`, converted as transformers would; `region` (slices, one per dim): only
        that part of it, read alone from disk when the stored tensor needs no conversion or is stacked from
        per-expert tensors."""
        if name in self._pending:
            value = self._pending.pop(name)
            return value[region] if region else value
        primary = self._aliases.get(name, name)
        converter, sources = self._targets[primary]
        if converter is None:
            return self._read(sources[0][1], region)
        if region is not None and name == primary and _stacks_experts(converter):
            first, last = region[0].start, region[0].stop
            sources = [(p, k) for p, k in sources if first <= _expert_index(p, k) < last]
            region = (slice(None), *region[1:])
        conv = copy.deepcopy(converter)
        for pattern, key in sources:
            conv.add_tensor(primary, key, pattern, lambda key=key: self._read(key))
        try:
            out = conv.convert(primary, model=self._skeleton, config=self._skeleton.config)
        except Exception as e:
            raise UserError(f"{self.describe()}: cannot convert the stored tensors of '{primary}' "
                            f"({' '.join(str(e).split())[:200]})") from None
        if name not in out:
            raise UserError(f"{self.describe()}: converting the stored tensors of '{primary}' did not give '{name}'")
        value = out.pop(name)
        self._pending.update(out)
        return value[region] if region else value

    def close(self) -> None:
        self._handles.clear()
        self._pending.clear()


def _stacks_experts(converter) -> bool:
    """A converter whose first step stacks per-expert stored tensors along dim 0 into one output."""
    ops = getattr(converter, "operations", None) or []
    return (bool(ops) and type(ops[0]).__name__ == "MergeModulelist" and getattr(ops[0], "dim", 0) == 0
            and len(converter.target_patterns) == 1)


def _expert_index(pattern: str, key: str) -> int:
    """The expert number the `*` of a stored-key pattern (e.g. '.experts.*.w1.weight') stands for in `key`."""
    import re

    match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)") + "$", key)
    if match is None:
        raise UserError(f"stored tensor '{key}' does not follow its conversion pattern '{pattern}'")
    return int(match.group(1))
