"""Source experts: read one ``config.sources`` entry, load its LoRA, split fused projections.

Sources are never run: HeteroFusion reads only their LoRA factors (``layers.N.`` keys,
``lora_A`` / ``lora_B``), so a source may come from any family, including ones hfjax cannot
run as a target (Gemma 2, OLMo 2, Phi-3, ...). What must line up with the target is the module
*suffix* (``self_attn.q_proj``), and Phi-3 fuses two groups of them: its ``qkv_proj`` and
``gate_up_proj`` are split here, exactly, into LoRAs on the parts (`bridge.split_fused`)::

    opts = source_options({"adapter_path": "experts/phi3-ner", "num_heads": 40,
                           "num_kv_heads": 10}, index=0)
    src = load_source(opts, target_types={"q_proj", "k_proj", "v_proj", "o_proj"})
    # model.layers.0.self_attn.qkv_proj (B 7680 rows) -> q_proj 5120, k_proj 1280, v_proj 1280
    # gate_up_proj stays fused: the target adapts neither gate_proj nor up_proj

The fields of an entry and their defaults are `configs.fuse.source_defaults`; `source_options`
is the one place that reads them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from bridge import FUSED_PARTS, HeadLayout, LoraAdapter, layout_from_hf_config, load_adapter
from bridge import split_fused as _split_fused
from hfjax.configs.fuse import source_defaults
from hfjax.errors import UserError

__all__ = ["SourceOptions", "SourceSpecError", "head_layout", "load_source", "load_sources",
           "source_options"]


class SourceSpecError(UserError):
    """A ``config.sources`` entry with an unknown field or a value of the wrong kind."""


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """One source entry, read and checked (see `configs.fuse.source_defaults` for the fields)."""

    index: int  # position in config.sources (fixes token order, names fields in messages)
    name: str
    adapter_path: str
    split_fused: bool = True
    config_path: str = ""
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0

    @property
    def field(self) -> str:
        """How the entry is addressed in the config: ``sources.0``."""
        return f"sources.{self.index}"


def source_options(spec: Any, index: int) -> SourceOptions:
    """Read one ``config.sources`` entry: a path, or a mapping / ConfigDict of its fields.

    Missing fields take `configs.fuse.source_defaults`; an unknown field or a value of the
    wrong kind raises `SourceSpecError` naming ``sources.<index>.<field>``.
    """
    where = f"sources.{index}"
    defaults = source_defaults()
    if isinstance(spec, (str, Path)):
        spec = {"adapter_path": str(spec)}
    if not isinstance(spec, Mapping) and not hasattr(spec, "keys"):
        raise SourceSpecError(f"{where}: expected a path or {{name, adapter_path, ...}}, "
                              f"got {spec!r}")
    known = list(defaults.keys())
    for key in spec.keys():
        if key not in known:
            raise SourceSpecError(f"{where}.{key}: unknown field (known: {', '.join(known)})")
    values = {k: spec[k] if k in spec.keys() else defaults[k] for k in known}
    for key in ("name", "adapter_path", "config_path"):
        if not isinstance(values[key], (str, Path)):
            raise SourceSpecError(f"{where}.{key}: expected a string, got {values[key]!r}")
        values[key] = str(values[key])
    if not isinstance(values["split_fused"], bool):
        raise SourceSpecError(f"{where}.split_fused: expected true or false, got "
                              f"{values['split_fused']!r}")
    for key in ("num_heads", "num_kv_heads", "head_dim"):
        v = values[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SourceSpecError(f"{where}.{key}: expected an integer >= 0 (0 = unknown), "
                                  f"got {v!r}")
    if not values["adapter_path"]:
        raise SourceSpecError(f"{where}.adapter_path: must be set")
    values["name"] = values["name"] or f"source{index}"
    return SourceOptions(index=index, **values)


def head_layout(opts: SourceOptions) -> HeadLayout:
    """The head layout of a source: its config.json's, with the entry's own numbers on top.

    A number given both ways must agree (a mismatch means the wrong config.json).
    """
    base = layout_from_hf_config(opts.config_path) if opts.config_path else HeadLayout()
    given = {"num_heads": opts.num_heads, "num_kv_heads": opts.num_kv_heads,
             "head_dim": opts.head_dim}
    fields = {}
    for key, value in given.items():
        known = getattr(base, key)
        if value and known is not None and value != known:
            raise SourceSpecError(f"{opts.field}.{key} is {value} but {base.origin} says {known}")
        if value:
            fields[key] = value
    if not fields:
        return base
    origin = f"{opts.field}" + (f" and {base.origin}" if base.origin else "")
    return dataclasses.replace(base, **fields, origin=origin)


def load_source(opts: SourceOptions, target_types: Collection[str]) -> LoraAdapter:
    """Load a source adapter; split its fused projections whose parts the target adapts.

    ``target_types``: the module types (``q_proj``, ...) the target adapter has. A fused
    type is split when ``opts.split_fused`` and the target has at least one of its parts;
    otherwise it stays as it is (and the plan reports it as unmatched, with the reason).
    """
    adapter = load_adapter(opts.adapter_path)
    if not opts.split_fused:
        return adapter
    present = {m.module_type for m in adapter.modules.values()}
    types = [f for f, parts in FUSED_PARTS.items()
             if f in present and set(parts) & set(target_types)]
    if not types:
        return adapter
    hint = (f"set {opts.field}.num_heads / num_kv_heads (and head_dim if it is not "
            f"hidden // num_heads) or {opts.field}.config_path (the source model's config.json)")
    return _split_fused(adapter, types=types, layout=head_layout(opts), hint=hint)


def load_sources(specs: Sequence[Any], target: LoraAdapter
                 ) -> tuple[list[SourceOptions], list[LoraAdapter]]:
    """Read every ``config.sources`` entry and load (and split) its adapter, in order."""
    opts = [source_options(s, i) for i, s in enumerate(specs)]
    names = [o.name for o in opts]
    for o in opts:
        if names.count(o.name) > 1:
            raise SourceSpecError(f"{o.field}.name: two sources are called {o.name!r}")
    types = {m.module_type for m in target.modules.values()}
    return opts, [load_source(o, types) for o in opts]
