"""The study's plan: rows (what is evaluated) x training seeds (how often it is retrained).

A row is a name, a kind and a set of config overrides, so a control is just overrides::

    Row("zero_sources", "control: zero sources", "fuse", {"fusion.zero_sources": True})

Kinds: ``base`` (the target base model, no adapter), ``target`` (the target LoRA as given),
``fuse`` (`run_fusion` with the overrides), ``tune`` (the target LoRA trained further on the
fused run's replay for the fused run's number of optimizer updates), ``merge`` (a homogeneous
PEFT merge of the target and the same-base sources) and ``project`` (the target plus one
same-base source written in the target's A). ``fuse`` and ``tune`` rows, and the DARE merges,
depend on the seed and run once per seed; the others run once.

A row whose override names a config field the fuse config does not have (e.g.
``fusion.source_control`` before it exists) is skipped with a note, as is a merge row when no
source shares the target's base.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from hfjax.errors import UserError

__all__ = ["DEFAULT_ROWS", "MERGE_TYPES", "PlanError", "Row", "StudyError", "Unit", "field_exists",
           "make_plan", "select_rows"]

#: The homogeneous merges compared with (`hfjax.merges.merge_adapters` combination types).
MERGE_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
KINDS = ("base", "target", "fuse", "tune", "merge", "project")


class StudyError(UserError):
    """Bad study input: a missing test file, an unknown row, a folder made with other settings."""


class PlanError(StudyError):
    """A study request that cannot be planned (unknown row, empty seeds, ...)."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the study's table.

    Attributes:
        name: Key in files and on the command line (``--rows fused,zero_sources``).
        label: The table's label.
        kind: One of `KINDS` (see the module docstring).
        overrides: Dotted fuse-config fields set for this row (``{"fusion.gate": "open"}``).
        merge: The combination type of a ``merge`` row.
        source: The source name of a ``project`` row.
    """

    name: str
    label: str
    kind: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    merge: str | None = None
    source: str | None = None

    @property
    def seeded(self) -> bool:
        """Whether the row is rerun per training seed."""
        return self.kind in ("fuse", "tune") or (self.merge or "").startswith("dare")


DEFAULT_ROWS: tuple[Row, ...] = (
    Row("base", "target base, no adapter", "base"),
    Row("target", "target LoRA", "target"),
    Row("fused", "HeteroFusion (fused LoRA)", "fuse"),
    Row("zero_sources", "control: zero sources", "fuse", {"fusion.zero_sources": True}),
    Row("noise_sources", "control: noise sources", "fuse", {"fusion.source_control": "noise"}),
    Row("mismatch_sources", "control: mismatched sources", "fuse",
        {"fusion.source_control": "mismatch"}),
    Row("tuned_target", "target LoRA tuned on the replay (same updates)", "tune"),
    *(Row(f"merge_{m}", f"merge: {m} (target + same-base sources)", "merge", merge=m)
      for m in MERGE_TYPES),
)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One run of the plan: a row at a seed (``seed`` None for seed-independent rows)."""

    row: Row
    seed: int | None

    @property
    def key(self) -> str:
        """``<row>/seed<k>`` or ``<row>/once``: the unit's folder below the study's runs."""
        return f"{self.row.name}/{'once' if self.seed is None else f'seed{self.seed}'}"


def field_exists(cfg: Any, dotted: str) -> bool:
    """Whether the ConfigDict ``cfg`` has the (nested) field ``dotted``."""
    node = cfg
    for part in dotted.split("."):
        try:
            if part not in node:
                return False
        except TypeError:
            return False
        node = node[part]
    return True


def select_rows(names: Sequence[str] | str | None, sources: Sequence[str] = (),
                rows: Sequence[Row] = DEFAULT_ROWS) -> list[Row]:
    """The rows to run: all of ``rows`` plus one ``project_<source>`` per source, or those
    named in ``names`` (a list or ``"a,b"``; ``project`` selects every projection row)."""
    table = [*rows, *(Row(f"project_{s}", f"target + {s} projected into the target's A",
                          "project", source=s) for s in sources)]
    if names is None or names == "" or names == ():
        return table
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)
              if n.strip()]
    known = {r.name for r in table}
    chosen = []
    for n in wanted:
        if n == "project":
            chosen += [r for r in table if r.kind == "project"]
        elif n not in known:
            raise PlanError(f"--rows: unknown row {n!r}; choose from "
                            f"{', '.join(sorted(known | {'project'}))}")
        else:
            chosen.append(next(r for r in table if r.name == n))
    return list({r.name: r for r in chosen}.values())


def make_plan(rows: Sequence[Row], seeds: Sequence[int]) -> list[Unit]:
    """Every (row, seed) unit in run order: seed-independent rows once, the others per seed.

    A ``tune`` row needs the fused row's step count, so ``fused`` units come first.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise PlanError("--seeds: at least one training seed is needed")
    if len(set(seeds)) != len(seeds):
        raise PlanError(f"--seeds: seed listed twice in {seeds}")
    for r in rows:
        if r.kind not in KINDS:
            raise PlanError(f"row {r.name}: unknown kind {r.kind!r}")
    first = [r for r in rows if r.name == "fused"]  # the table's order, the fused row first
    order = first + [r for r in rows if r.name != "fused"]
    return [Unit(r, s) for r in order for s in (seeds if r.seeded else [None])]
