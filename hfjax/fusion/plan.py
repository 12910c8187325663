"""Topology alignment: which target LoRA modules receive knowledge from which source modules.

This is docs/algorithm.md §2, done once before any training, from adapter *shapes and names* only
(no array is read). The result, a :class:`FusionPlan`, fixes every token position the transfer
networks will see, so everything in it is deterministic.

Worked example (Llama target with 32 layers, one Qwen source with 28, q/v LoRA, r = 8,
``block_size = 4096``)::

    plan = build_plan(llama_lora, [qwen_lora], block_size=4096)
    plan.layer_maps    # ({4: 0, 5: 1, ..., 31: 27},)       tail alignment, off = 32 - 28
    plan.groups        # (Group("q_proj_r8"), Group("v_proj_r8"))  first appearance order
    g = plan.groups[0]
    g.buckets[0].modules[0]
    # ModuleEntry(name="model.layers.4.self_attn.q_proj", layer=4, d_out=4096, d_in=4096,
    #             rank=8, sources=((0, "model.layers.0.self_attn.q_proj"),),
    #             n_a=1, n_b=1, n_src_tokens=2)   # Qwen q_proj: A^T 3584 rows, B 3584 rows
    plan.unfused       # layers 0..3: no source layer maps there

Terms:

- **token**: one ``block_size x r`` block of a LoRA factor (``A^T`` or ``B``), zero-padded;
  ``n_a = ceil(d_in / block_size)``, ``n_b = ceil(d_out / block_size)``.
- **group**: ``(module_type, rank)``, one transfer network and one alpha each (docs/algorithm.md §2,
  [code≠paper]: one group per projection name).
- **bucket**: the modules of a group whose token counts ``(n_a, n_b, n_s)`` agree, so that
  they can be stacked into one batch (e.g. target layers reached by fewer sources form their
  own bucket).

Orders: sources in the order given; groups in order of first appearance in the target
adapter's module order (layer, then module path); modules ascending by layer (then path);
buckets in order of first appearance among their group's modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from bridge.lora_adapter import LoraAdapter, LoraModule
from hfjax.config.components import LAYER_ALIGNMENTS, UPDATE_MODES, PlanConfig  # noqa: F401
from hfjax.errors import UserError
from hfjax.fusion.matches import (
    SourceMatch,
    describe_matches,
    match_report,
    match_sources,
)
from hfjax.fusion.matches import format_ranges as _ranges

# Rows of different sizes (a group's buckets in the network, the RDM's pairs) run as one padded
# call while the padding adds at most 50% to the real rows (docs/performance.md §6).
MERGE_PAD_LIMIT = 1.5


def greedy_merge(order: Sequence[int], fits: Callable[[list[int]], bool]
                 ) -> list[tuple[int, ...]]:
    """Items taken in ``order``, each joining the last call while ``fits(call + [item])``
    holds, else starting a new one: the padded calls of `merged_calls` and `rdm_calls`.
    Calls and their items come back sorted."""
    calls: list[list[int]] = []
    for i in order:
        if calls and fits([*calls[-1], i]):
            calls[-1].append(i)
        else:
            calls.append([i])
    return sorted(tuple(sorted(c)) for c in calls)

class FusionError(UserError):
    """A fusion request that cannot be honoured; the message is one line naming the culprit."""


@dataclasses.dataclass(frozen=True)
class ModuleEntry:
    """One fused target module and the source modules that feed it.

    Attributes:
        name: the target module path, e.g. ``model.layers.4.self_attn.q_proj``.
        layer: its layer index.
        suffix: path after ``layers.{l}.`` (``self_attn.q_proj``): what sources must match.
        module_type: the projection name (``q_proj``).
        d_out, d_in: the target's ``B`` rows and ``A`` columns.
        rank: the LoRA rank r (equal for target and every source).
        sources: ``(source index, source module name)`` in source order.
        n_a, n_b: target tokens of ``A^T`` and of ``B``.
        n_src_tokens: source tokens, all sources concatenated.
    """

    name: str
    layer: int
    suffix: str
    module_type: str
    d_out: int
    d_in: int
    rank: int
    sources: tuple[tuple[int, str], ...]
    n_a: int
    n_b: int
    n_src_tokens: int


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Modules of one group that share token counts, processed as one batch."""

    modules: tuple[ModuleEntry, ...]
    n_a: int
    n_b: int
    n_t: int  # = n_a + n_b target tokens per module
    n_s: int  # source tokens per module


@dataclasses.dataclass(frozen=True)
class Group:
    """One transfer network and one alpha: all fused modules of a (module_type, rank)."""

    name: str  # e.g. "q_proj_r8"
    module_type: str
    rank: int
    buckets: tuple[Bucket, ...]

    @property
    def modules(self) -> tuple[ModuleEntry, ...]:
        """All modules of the group, ascending by layer."""
        mods = [m for b in self.buckets for m in b.modules]
        return tuple(sorted(mods, key=lambda m: (m.layer, m.name)))


@dataclasses.dataclass(frozen=True)
class FusionPlan:
    """Everything fusion needs to know about the adapters' topology (docs/algorithm.md §2, §3).

    Hashable (``layer_maps`` is hashed by its items), so it can be a static argument of
    ``jax.jit``.

    Attributes:
        block_size: rows per token block.
        groups: the fused groups, in deterministic order.
        layer_maps: per source, ``{target layer: source layer}`` after ``transfer_ratio``.
        source_names: display names of the sources, in order.
        unfused: target modules left unchanged (exported as they are).
        unfused_reasons: why, parallel to ``unfused``.
        target_layers: ``L_t``; source_layers: ``L_s`` per source.
        transfer_ratio: the ratio the layer maps were cut with.
        matches: one row per source module: the target module it feeds, or why none
            (`hfjax.fusion.matches`).
        full_layer_maps: per source, the same alignment before ``transfer_ratio``.
        layer_alignment: how layers were paired (``LAYER_ALIGNMENTS``; docs/algorithm.md §11).
        update_mode: which target factors the networks patch: ``"b_only"`` (B' = B + α·ΔB,
            the method), ``"a_only"`` (A' = A + α·ΔA) or ``"ab_joint"`` (both; docs/algorithm.md
            §11).
            It fixes which target tokens are decoded, so it is part of the static plan.
    """

    block_size: int
    groups: tuple[Group, ...]
    layer_maps: tuple[dict[int, int], ...]
    source_names: tuple[str, ...]
    unfused: tuple[str, ...]
    unfused_reasons: tuple[str, ...] = ()
    target_layers: int = 0
    source_layers: tuple[int, ...] = ()
    transfer_ratio: float = 1.0
    matches: tuple[SourceMatch, ...] = ()
    full_layer_maps: tuple[dict[int, int], ...] = ()
    layer_alignment: str = "tail"
    update_mode: str = "b_only"

    def __hash__(self) -> int:
        maps = tuple(tuple(sorted(m.items())) for m in self.layer_maps)
        full = tuple(tuple(sorted(m.items())) for m in self.full_layer_maps)
        return hash((self.block_size, self.groups, maps, self.source_names, self.unfused,
                     self.unfused_reasons, self.target_layers, self.source_layers,
                     self.transfer_ratio, self.matches, full, self.layer_alignment,
                     self.update_mode))

    @property
    def patches_A(self) -> bool:
        """Whether the networks' outputs on the ``A^T`` tokens patch A (docs/algorithm.md §11)."""
        return self.update_mode in ("a_only", "ab_joint")

    @property
    def patches_B(self) -> bool:
        """Whether the networks' outputs on the ``B`` tokens patch B (docs/algorithm.md §5)."""
        return self.update_mode in ("b_only", "ab_joint")

    @property
    def fused_modules(self) -> tuple[str, ...]:
        """Names of every fused target module, group by group, ascending layer within one."""
        return tuple(m.name for g in self.groups for m in g.modules)

    def group(self, name: str) -> Group:
        """The group called ``name``."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def report(self) -> dict[str, Any]:
        """A JSON-able summary: layer maps, groups, modules, token counts, what is left out."""
        sources = []
        for k, name in enumerate(self.source_names):
            lm = self.layer_maps[k]
            sources.append({
                "index": k,
                "name": name,
                "num_layers": self.source_layers[k] if self.source_layers else None,
                "layer_map": {str(t): s for t, s in sorted(lm.items())},
            })
        groups = []
        for g in self.groups:
            groups.append({
                "name": g.name,
                "module_type": g.module_type,
                "rank": g.rank,
                "num_modules": len(g.modules),
                "buckets": [{
                    "n_a": b.n_a, "n_b": b.n_b, "n_t": b.n_t, "n_s": b.n_s,
                    "modules": [{
                        "name": m.name, "layer": m.layer, "d_out": m.d_out, "d_in": m.d_in,
                        "sources": [[k, s] for k, s in m.sources],
                    } for m in b.modules],
                } for b in g.buckets],
            })
        reasons = self.unfused_reasons or ("",) * len(self.unfused)
        return {
            "block_size": self.block_size,
            "transfer_ratio": self.transfer_ratio,
            "layer_alignment": self.layer_alignment,
            "update_mode": self.update_mode,
            "target_layers": self.target_layers,
            "sources": sources,
            "groups": groups,
            "num_fused": len(self.fused_modules),
            "unfused": [{"name": n, "reason": r}
                        for n, r in zip(self.unfused, reasons, strict=True)],
            "matches": match_report(self.matches, self._full_maps, self.layer_maps),
        }

    @property
    def _full_maps(self) -> tuple[dict[int, int], ...]:
        return self.full_layer_maps or self.layer_maps

    def describe(self) -> str:
        """A human-readable pre-flight compatibility report (what ``--dry_run`` prints)."""
        lines = [
            f"HeteroFusion plan: target has {self.target_layers} layers, "
            f"{len(self.source_names)} source(s), block_size {self.block_size}, "
            f"transfer_ratio {self.transfer_ratio:g}",
            f"Layer alignment {self.layer_alignment!r} "
            f"({_ALIGNMENT_TEXT[self.layer_alignment]}):",
        ]
        for k, name in enumerate(self.source_names):
            lm = self.layer_maps[k]
            n_s = self.source_layers[k] if self.source_layers else "?"
            if lm:
                ts = sorted(lm)
                lines.append(
                    f"  [{k}] {name} ({n_s} layers): target layers {_ranges(ts)} -> "
                    f"source layers {_ranges([lm[t] for t in ts])} ({len(ts)} pairs)")
                if len({t - lm[t] for t in ts}) > 1:  # not one shift: spell out every pair
                    lines.append("      pairs (target:source): "
                                 + ", ".join(f"{t}:{lm[t]}" for t in ts))
            else:
                lines.append(f"  [{k}] {name} ({n_s} layers): no layer pairs")
        n_fused = len(self.fused_modules)
        lines.append(f"Update mode {self.update_mode!r}: {_UPDATE_TEXT[self.update_mode]}")
        lines.append(f"Fused: {n_fused} module(s) in {len(self.groups)} group(s) "
                     "(one transfer network and one alpha per group):")
        for g in self.groups:
            mods = g.modules
            lines.append(f"  {g.name}: {len(mods)} module(s), target layers "
                         f"{_ranges([m.layer for m in mods])}")
            for b in g.buckets:
                srcs = sorted({k for m in b.modules for k, _ in m.sources})
                lines.append(
                    f"    bucket: {len(b.modules)} module(s) x (target {b.n_a} A^T + {b.n_b} B "
                    f"tokens, source {b.n_s} tokens from source(s) "
                    f"{', '.join(str(k) for k in srcs)})")
        if self.unfused:
            lines.append(f"Left unchanged: {len(self.unfused)} module(s):")
            by_reason: dict[str, list[str]] = {}
            reasons = self.unfused_reasons or ("no matching source",) * len(self.unfused)
            for n, r in zip(self.unfused, reasons, strict=True):
                by_reason.setdefault(r, []).append(n)
            for r, names in by_reason.items():
                shown = ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3
                                                 else "")
                lines.append(f"  {len(names)} x {r}: {shown}")
        else:
            lines.append("Left unchanged: none")
        if self.matches:
            lines += describe_matches(self.matches, self.source_names, self.source_layers,
                                      self._full_maps, self.layer_maps)
        return "\n".join(lines)


def parse_transfer_ratio(x: float | int | str) -> float:
    """``0.5``, ``"0.5"`` or ``"1/2"`` -> ``0.5``; must lie in (0, 1].

    The original accepts any number and keeps ``max(1, int(n_pairs * ratio))`` pairs; a ratio
    outside (0, 1] is refused here because it is almost certainly a typo. The rule is
    `hfjax.config.PlanConfig`'s; this raises its first problem as a `FusionError`.
    """
    return _checked(PlanConfig(transfer_ratio=x)).ratio


def _checked(settings: PlanConfig) -> PlanConfig:
    problems = settings.check(at="")
    if problems:
        raise FusionError(problems[0])
    return settings


# How each alignment pairs layers, for the pre-flight report.
_ALIGNMENT_TEXT = {
    "tail": "tail-aligned: the deepest layers of both models meet",
    "head": "head-aligned: layer i meets layer i from the bottom",
    "naive": "naive: layer i meets layer i from the bottom, as head",
    "uniform": "uniform: pairs spread evenly over both depths",
}


# What each update mode writes, for the pre-flight report.
_UPDATE_TEXT = {
    "b_only": "B' = B + alpha * dB, A kept (the method)",
    "a_only": "A' = A + alpha * dA, B kept",
    "ab_joint": "A' = A + alpha * dA and B' = B + alpha * dB (one alpha per group)",
}


def layer_pairs(l_t: int, l_s: int, ratio: float, alignment: str = "tail"
                ) -> list[tuple[int, int]]:
    """``(target layer, source layer)`` pairs of one source, ascending (docs/algorithm.md §2, §11).

    With ``overlap = min(L_t, L_s)`` and ``keep = min(overlap, max(1, int(overlap * ratio)))``:
    ``tail`` keeps the last ``keep`` of ``(L_t - overlap + i, L_s - overlap + i)`` (the first
    release's map); ``head`` / ``naive`` take ``(i, i)`` for ``i < keep``; ``uniform`` takes
    ``(round(i (L_t-1)/(keep-1)), round(i (L_s-1)/(keep-1)))`` (Python ``round``: half to
    even), or ``(L_t - 1, L_s - 1)`` when ``keep = 1``. E.g. ``(32, 28, 1/4, "uniform")``:
    keep 7, steps 31/6 and 27/6 -> ``[(0, 0), (5, 4), (10, 9), (16, 14), (21, 18), (26, 22),
    (31, 27)]`` (15.5 -> 16, 4.5 -> 4, 13.5 -> 14, 22.5 -> 22).
    """
    if alignment not in LAYER_ALIGNMENTS:
        raise FusionError(f"layer_alignment must be one of {', '.join(LAYER_ALIGNMENTS)}, "
                          f"got {alignment!r}")
    overlap = min(l_t, l_s)
    if overlap <= 0:
        return []
    keep = min(overlap, max(1, int(overlap * ratio)))
    if alignment == "tail":
        return [(l_t - overlap + i, l_s - overlap + i) for i in range(overlap)][-keep:]
    if alignment in ("head", "naive"):
        return [(i, i) for i in range(keep)]
    if keep == 1:
        return [(l_t - 1, l_s - 1)]
    return [(round(i * (l_t - 1) / (keep - 1)), round(i * (l_s - 1) / (keep - 1)))
            for i in range(keep)]


def _n_blocks(rows: int, block_size: int) -> int:
    return -(-rows // block_size)


def _num_tokens(m: LoraModule, block_size: int) -> int:
    return _n_blocks(m.d_in, block_size) + _n_blocks(m.d_out, block_size)


def build_plan(
    target: LoraAdapter,
    sources: Sequence[LoraAdapter],
    settings: PlanConfig | None = None,
    *,
    block_size: int = 4096,
    transfer_ratio: float | str = 1.0,
    source_names: Sequence[str] | None = None,
    layer_alignment: str = "tail",
    update_mode: str = "b_only",
) -> FusionPlan:
    """Align ``sources`` to ``target`` (docs/algorithm.md §2) and group the fusable modules.

    Args:
        target: the target LoRA adapter (its B's get updated).
        sources: source adapters, in config order (this order fixes token positions).
        settings: the plan settings (`hfjax.config.PlanConfig`: ``block_size``, rows per
            token block, the original hard-codes 4096; ``transfer_ratio``: keep
            ``max(1, int(overlap * ratio))`` layer pairs of each source, the deepest ones
            under tail alignment; ``layer_alignment``; ``update_mode``). Without it, the
            keywords below make one.
        source_names: display names; default: each adapter's path, else ``source{k}``.
        layer_alignment: how target and source layers pair (`layer_pairs`; docs/algorithm.md §11).
        update_mode: which target factors get patched (``UPDATE_MODES``; docs/algorithm.md §11).

    Raises:
        FusionError: no sources, a source module whose rank differs from the target's, or
            no target module matched by any source.
    """
    if not sources:
        raise FusionError("no source adapters given")
    settings = _checked(settings or PlanConfig(
        block_size=block_size, transfer_ratio=transfer_ratio, layer_alignment=layer_alignment,
        update_mode=update_mode))
    block_size, ratio = settings.block_size, settings.ratio
    layer_alignment, update_mode = settings.layer_alignment, settings.update_mode
    if source_names is None:
        names = tuple(s.path or f"source{k}" for k, s in enumerate(sources))
    else:
        names = tuple(str(n) for n in source_names)
        if len(names) != len(sources):
            raise FusionError(f"{len(names)} source_names for {len(sources)} sources")

    l_t = target.num_layers
    l_srcs = tuple(s.num_layers for s in sources)
    layer_maps = tuple(dict(layer_pairs(l_t, l_s, ratio, layer_alignment)) for l_s in l_srcs)
    full_maps = tuple(dict(layer_pairs(l_t, l_s, 1.0, layer_alignment)) for l_s in l_srcs)
    index = [{(m.layer, m.suffix): m for m in s.modules.values() if m.layer is not None}
             for s in sources]

    # (module_type, rank) -> modules, in first-appearance order of the target's module order.
    grouped: dict[tuple[str, int], list[ModuleEntry]] = {}
    unfused: list[str] = []
    reasons: list[str] = []
    rank_errors: list[tuple[int, LoraModule, LoraModule]] = []
    for tm in target.modules.values():
        if tm.layer is None:
            unfused.append(tm.name)
            reasons.append("no layer index in the module path")
            continue
        if tm.A.shape[0] != tm.B.shape[1]:
            raise FusionError(f"target module {tm.name}: A has rank {tm.A.shape[0]} but B has "
                              f"rank {tm.B.shape[1]}")
        matched: list[tuple[int, LoraModule]] = []
        for k, lm in enumerate(layer_maps):
            if tm.layer not in lm:
                continue
            sm = index[k].get((lm[tm.layer], tm.suffix))
            if sm is None:
                continue
            if sm.rank != tm.rank or sm.B.shape[1] != tm.rank:
                rank_errors.append((k, sm, tm))
                continue
            matched.append((k, sm))
        if not matched:
            unfused.append(tm.name)
            reasons.append(_why_unmatched(tm, layer_maps, names))
            continue
        entry = ModuleEntry(
            name=tm.name, layer=tm.layer, suffix=tm.suffix, module_type=tm.module_type,
            d_out=tm.d_out, d_in=tm.d_in, rank=tm.rank,
            sources=tuple((k, sm.name) for k, sm in matched),
            n_a=_n_blocks(tm.d_in, block_size), n_b=_n_blocks(tm.d_out, block_size),
            n_src_tokens=sum(_num_tokens(sm, block_size) for _, sm in matched),
        )
        grouped.setdefault((tm.module_type, tm.rank), []).append(entry)

    if rank_errors:
        raise FusionError(_rank_message(rank_errors, names))
    if not grouped:
        why = "; ".join(sorted(set(reasons))) or "the target adapter has no modules"
        raise FusionError(f"no target module can be fused with the given sources ({why})")

    groups = []
    for (mtype, rank), mods in grouped.items():
        mods = sorted(mods, key=lambda m: (m.layer, m.name))
        buckets: dict[tuple[int, int, int], list[ModuleEntry]] = {}
        for m in mods:
            buckets.setdefault((m.n_a, m.n_b, m.n_src_tokens), []).append(m)
        groups.append(Group(
            name=f"{mtype}_r{rank}", module_type=mtype, rank=rank,
            buckets=tuple(Bucket(modules=tuple(ms), n_a=a, n_b=b, n_t=a + b, n_s=s)
                          for (a, b, s), ms in buckets.items()),
        ))
    group_of = {m.name: g.name for g in groups for m in g.modules}
    return FusionPlan(
        block_size=block_size, groups=tuple(groups), layer_maps=layer_maps,
        source_names=names, unfused=tuple(unfused), unfused_reasons=tuple(reasons),
        target_layers=l_t, source_layers=l_srcs, transfer_ratio=ratio,
        matches=match_sources(target, sources, layer_maps, full_maps, group_of,
                              alignment=layer_alignment),
        full_layer_maps=full_maps, layer_alignment=layer_alignment, update_mode=update_mode,
    )


def _rank_message(errors: Sequence[tuple[int, LoraModule, LoraModule]],
                  names: Sequence[str]) -> str:
    """The first rank mismatch in full, then every (source, module type, ranks) that differs."""
    k, sm, tm = errors[0]
    msg = (f"source {names[k]!r} module {sm.name} has rank A {sm.rank}/B {sm.B.shape[1]} but "
           f"target module {tm.name} has rank {tm.rank}; HeteroFusion needs equal ranks")
    kinds: dict[tuple[int, str, int, int], int] = {}
    for k, sm, tm in errors:
        key = (k, sm.suffix, sm.rank, tm.rank)
        kinds[key] = kinds.get(key, 0) + 1
    if len(errors) > 1:
        msg += f" ({len(errors)} mismatched pairs: " + ", ".join(
            f"{names[k]!r} {suffix} r{rs} vs target r{rt} x{n}"
            for (k, suffix, rs, rt), n in kinds.items()) + ")"
    return msg


def _why_unmatched(tm: LoraModule, layer_maps: Sequence[dict[int, int]],
                   names: Sequence[str]) -> str:
    mapped = [k for k, lm in enumerate(layer_maps) if tm.layer in lm]
    if not mapped:
        return "no source layer maps to this target layer"
    return (f"no mapped source layer has {tm.suffix} "
            f"(source(s) {', '.join(repr(names[k]) for k in mapped)})")
