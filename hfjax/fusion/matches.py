"""The source side of a plan: which source module feeds which target module, and why not.

`FusionPlan.unfused` says which *target* modules get nothing; this table answers the other
question, per *source* module: matched (the target module and its group), or the reason it
contributes nothing. Rows of equal outcome are merged over layers; a reason that holds for a
whole layer (alignment, ratio) takes one row. Example (Llama target, 4 layers adapting
q/k/v/gate/up/down but v only on layers 2..3; a Phi-3 source with 6 layers, fused projections
split; ``transfer_ratio`` 3/4)::

    [0] phi3 (6 layers, 42 modules; 30 from splitting 12 fused; 17 matched):
      source layers  source module                                     target
      0..1           every module (6 types)                            -x no target layer: ...
      2              every module (6 types)                            -x cut by transfer_ratio
      3..5           self_attn.q_proj (self_attn.qkv_proj rows 0:16)   -> layers 1..3
                                                                 self_attn.q_proj [q_proj_r4]
      3              self_attn.v_proj (self_attn.qkv_proj rows 24:32)  -x target layer 1 has
                                                                          no self_attn.v_proj
      0..5           self_attn.o_proj                                  -x no self_attn.o_proj
                                                                          in the target adapter

Statuses: ``matched``; ``unaligned`` (the layer alignment gives the source layer no target
layer); ``ratio`` (aligned, but cut by ``transfer_ratio``); ``no_type`` (the target adapts no
module with this suffix); ``no_layer`` (the target has the suffix, not at the aligned layer);
``no_index`` (no ``layers.N.`` in the path).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from bridge import FUSED_PARTS, LoraAdapter


def format_ranges(xs: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0..2, 5, 7..8"``."""
    xs = list(xs)
    if not xs:
        return "-"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(str(start) if start == prev else f"{start}..{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


_ranges = format_ranges

_LAYER_WIDE = ("unaligned", "ratio", "no_index")
# Rows of the text table follow the usual projection order, then the first source layer.
_TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _row_order(suffix: str, rows: Sequence[SourceMatch]) -> tuple[int, str, int]:
    mtype = suffix.rsplit(".", 1)[-1]
    rank = _TYPE_ORDER.index(mtype) if mtype in _TYPE_ORDER else len(_TYPE_ORDER)
    first = min((r.layer for r in rows if r.layer is not None), default=-1)
    return (-1 if not suffix else rank, suffix, first)


STATUSES = ("matched", "unaligned", "ratio", "no_type", "no_layer", "no_index")


@dataclasses.dataclass(frozen=True)
class SourceMatch:
    """What became of one source module (a row of the match table)."""

    source: int  # source index
    name: str  # source module path, e.g. model.layers.2.self_attn.q_proj
    layer: int | None  # its layer index
    suffix: str  # self_attn.q_proj
    origin: str  # for a split part: "self_attn.qkv_proj rows 0:32"; "" otherwise
    status: str  # one of STATUSES
    target: str = ""  # matched target module path ("" unless matched)
    target_layer: int | None = None  # the aligned target layer (matched / no_layer)
    group: str = ""  # the matched target module's group, e.g. "q_proj_r4"
    alignment: str = "tail"  # the plan's layer alignment (named in the "unaligned" reason)


def _reason_text(status: str, suffix: str, target_layer: int | None,
                 full_map: Mapping[int, int] | None, layer_map: Mapping[int, int] | None,
                 alignment: str = "tail") -> str:
    def pairs(m: Mapping[int, int] | None) -> str:
        if not m:
            return "no layers"
        ts = sorted(m)
        return f"source layers {_ranges([m[t] for t in ts])} with target layers {_ranges(ts)}"

    if status == "unaligned":
        return f"no target layer: {alignment} alignment pairs {pairs(full_map)}"
    if status == "ratio":
        return f"cut by transfer_ratio: only {pairs(layer_map)} transfer"
    if status == "no_type":
        parts = FUSED_PARTS.get(suffix.rsplit(".", 1)[-1])
        hint = (f" (a fused projection; split_fused splits it into {', '.join(parts)} when the "
                "target adapts them)") if parts else ""
        return f"no {suffix} in the target adapter{hint}"
    if status == "no_layer":
        return f"target layer {target_layer} has no {suffix}"
    if status == "no_index":
        return "no layers.N. in the module path"
    raise ValueError(status)


def match_sources(target: LoraAdapter, sources: Sequence[LoraAdapter],
                  layer_maps: Sequence[Mapping[int, int]],
                  full_maps: Sequence[Mapping[int, int]],
                  groups: Mapping[str, str], *, alignment: str = "tail"
                  ) -> tuple[SourceMatch, ...]:
    """One row per source module, sources in order, modules in adapter order.

    ``layer_maps`` / ``full_maps``: per source, target -> source layer after / before
    ``transfer_ratio``; ``groups``: fused target module -> its group name; ``alignment``: the
    layer alignment's name (for the reasons). Ranks are not checked here (`build_plan`
    refuses a mismatch before calling this). Under uniform alignment a kept source layer need
    not be in the full map, so the kept map is consulted first.
    """
    target_index = {(m.layer, m.suffix): m for m in target.modules.values()}
    target_suffixes = {m.suffix for m in target.modules.values()}
    rows = []
    for k, src in enumerate(sources):
        inverse = {s: t for t, s in layer_maps[k].items()}
        inverse_full = {s: t for t, s in full_maps[k].items()}
        for m in src.modules.values():
            row = dict(source=k, name=m.name, layer=m.layer, suffix=m.suffix, origin=m.origin,
                       alignment=alignment)
            if m.layer is None:
                rows.append(SourceMatch(**row, status="no_index"))
                continue
            if m.suffix not in target_suffixes:
                rows.append(SourceMatch(**row, status="no_type"))
                continue
            if m.layer not in inverse and m.layer not in inverse_full:
                rows.append(SourceMatch(**row, status="unaligned"))
                continue
            if m.layer not in inverse:
                rows.append(SourceMatch(**row, status="ratio", target_layer=inverse_full[m.layer]))
                continue
            t = inverse[m.layer]
            tm = target_index.get((t, m.suffix))
            if tm is None:
                rows.append(SourceMatch(**row, status="no_layer", target_layer=t))
                continue
            rows.append(SourceMatch(**row, status="matched", target=tm.name, target_layer=t,
                                    group=groups.get(tm.name, "")))
    return tuple(rows)


def match_report(matches: Sequence[SourceMatch], full_maps: Sequence[Mapping[int, int]],
                 layer_maps: Sequence[Mapping[int, int]]) -> list[dict[str, Any]]:
    """The table as JSON-able rows (one per source module)."""
    out = []
    for r in matches:
        out.append({
            "source": r.source, "module": r.name, "origin": r.origin, "status": r.status,
            "target": r.target or None, "group": r.group or None,
            "reason": None if r.status == "matched" else _reason_text(
                r.status, r.suffix, r.target_layer, full_maps[r.source], layer_maps[r.source],
                r.alignment),
        })
    return out


def describe_matches(matches: Sequence[SourceMatch], source_names: Sequence[str],
                     source_layers: Sequence[int], full_maps: Sequence[Mapping[int, int]],
                     layer_maps: Sequence[Mapping[int, int]]) -> list[str]:
    """The table as text lines: per source, rows of equal outcome merged over layers."""
    lines = ["Source modules (source module -> target module [group], or -x why not):"]
    for k, name in enumerate(source_names):
        rows = [r for r in matches if r.source == k]
        n_split = len({r.name.rsplit(".", 1)[0] + r.origin.split(" ")[0]
                       for r in rows if r.origin})
        split = f"; {sum(1 for r in rows if r.origin)} from splitting {n_split} fused" \
            if n_split else ""
        n_used = sum(1 for r in rows if r.status == "matched")
        lines.append(f"  [{k}] {name} ({source_layers[k]} layers, {len(rows)} modules{split}; "
                     f"{n_used} matched):")
        merged: dict[tuple[str, str, str, str, str], list[SourceMatch]] = {}
        for r in rows:
            if r.status in _LAYER_WIDE:  # the reason does not depend on the module
                key = ("", "", r.status, "", "")
            else:
                tsuffix = r.target.split(f"layers.{r.target_layer}.", 1)[-1] if r.target else ""
                key = (r.suffix, r.origin, r.status, tsuffix, r.group)
            merged.setdefault(key, []).append(r)
        table = []
        for (suffix, origin, status, tsuffix, group), rs in sorted(
                merged.items(), key=lambda kv: _row_order(kv[0][0], kv[1])):
            src_layers = _ranges(sorted({r.layer for r in rs if r.layer is not None})) \
                if status != "no_index" else "-"
            if status in _LAYER_WIDE:
                module = f"every module ({len({r.suffix for r in rs})} types)"
            else:
                module = suffix + (f" ({origin})" if origin else "")
            t_layers = sorted({r.target_layer for r in rs if r.target_layer is not None})
            if status == "matched":
                outcome = f"-> layers {_ranges(t_layers)} {tsuffix} [{group}]"
            elif status == "no_layer":
                which = f"layer {t_layers[0]} has" if len(t_layers) == 1 else \
                    f"layers {_ranges(t_layers)} have"
                outcome = f"-x target {which} no {suffix}"
            else:
                outcome = "-x " + _reason_text(status, suffix, None, full_maps[k], layer_maps[k],
                                               rs[0].alignment)
            table.append((src_layers, module, outcome))
        w0 = max([len("source layers")] + [len(a) for a, _, _ in table])
        w1 = max([len("source module")] + [len(b) for _, b, _ in table])
        lines.append(f"    {'source layers':<{w0}}  {'source module':<{w1}}  target")
        lines += [f"    {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in table]
    return lines
