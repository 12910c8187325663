"""Does the network read its sources? Perturb them and measure how ΔB (and test NLL) move.

For trained networks and the block contexts they were trained on, each perturbation of the
source side (target tokens untouched) gives new ΔB's; the probe reports, per group and over
all fused modules, the relative Frobenius change ``||ΔB' - ΔB||_F / ||ΔB||_F`` (sums over
the modules), and, when the caller passes ``nll_fn``, the change in test NLL of the fused
adapter. A network that ignores its sources shows ~0 everywhere.

Perturbations (names; see :mod:`hfjax.fusion.controls`):

- ``zero``: every source token zero;  ``noise``: Gaussian noise of each token's norm;
- ``swap``: each module's expert segments rotated (needs >= 2 sources and the adapters);
- ``roll``: layer i's source tokens given to layer i + 1 within a bucket;
- ``mismatch``, ``none``: as the controls (``none`` is the identity: a sanity row).

Example::

    rows = probe_sources(params, ctx, plan, net_kwargs=st.net_kwargs, sources=sources,
                         target_B=target_B, nll_fn=lambda new_B: test_nll(new_B))
    print(probe_markdown(rows))
    # | perturbation | all | q_proj_r8 | v_proj_r8 | NLL | ΔNLL |
    # | zero         | 0.93 | 0.91     | 0.95      | 1.42 | +0.03 |

Each row of the table is ``{"perturbation", "group" (a group name or "all"),
"rel_dB_change", "dB_fro" (reference ||ΔB||_F)}``; the ``"all"`` rows also carry
``"nll"``, ``"nll_ref"`` and ``"nll_change"`` (None without ``nll_fn``). A relative change
is NaN where the reference ΔB is zero (e.g. untrained networks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bridge.lora_adapter import LoraAdapter
from hfjax.fusion.controls import (
    Contexts,
    ControlError,
    apply_source_control,
    rolled_sources,
    source_segments,
    swapped_sources,
)
from hfjax.fusion.network import fused_B, predict_delta_B
from hfjax.fusion.plan import FusionPlan

Perturbation = Callable[[Contexts], Contexts]
NllFn = Callable[[dict[str, np.ndarray]], float]

BUILTIN = ("none", "zero", "noise", "mismatch", "swap", "roll")


def default_perturbations(plan: FusionPlan) -> tuple[str, ...]:
    """``zero, noise, swap, roll``; ``swap`` only with two or more sources."""
    swap = ("swap",) if len(plan.source_names) >= 2 else ()
    return ("zero", "noise", *swap, "roll")


def _builtin(name: str, plan: FusionPlan, seed: int,
             sources: Sequence[LoraAdapter] | None) -> Perturbation:
    if name in ("none", "zero", "noise", "mismatch"):
        return lambda c: apply_source_control(c, plan, name, seed=seed)
    if name == "roll":
        return lambda c: rolled_sources(c, plan)
    if name == "swap":
        if sources is None:
            raise ControlError("probe: the 'swap' perturbation needs the source adapters "
                               "(sources=...)")
        segments = source_segments(plan, sources)
        return lambda c: swapped_sources(c, plan, segments)
    raise ControlError(f"probe: unknown perturbation {name!r}; one of {', '.join(BUILTIN)} "
                       "or a (name, callable) pair")


def _fro2(arrays: Sequence[np.ndarray]) -> float:
    return float(sum(np.sum(np.square(np.asarray(a, np.float64))) for a in arrays))


def _rel(diff2: float, ref2: float) -> float:
    return math.sqrt(diff2 / ref2) if ref2 > 0 else math.nan


def probe_sources(
    params: Mapping[str, Any],
    contexts: Contexts,
    plan: FusionPlan,
    *,
    net_kwargs: Mapping[str, Any],
    perturbations: Sequence[str | tuple[str, Perturbation]] | None = None,
    sources: Sequence[LoraAdapter] | None = None,
    target_B: Mapping[str, Any] | None = None,
    nll_fn: NllFn | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The probe table: one row per (perturbation, group) and one ``"all"`` row each.

    Args:
        params: the trained ``{"nets", "alpha"}`` tree (``init_fusion_params``'s layout).
        contexts: the block contexts the networks read (``build_contexts``, after any
            control); the reference ΔB is computed from them.
        plan: the plan of those contexts.
        net_kwargs: the network settings (``FuseStatics.net_kwargs``: embed_dim, num_heads,
            max_pos, mu_gate, gate).
        perturbations: names (see the module docstring) or ``(name, contexts -> contexts)``
            pairs; default :func:`default_perturbations`.
        sources: the source adapters, in plan order (``swap`` needs their token counts).
        target_B: the target's B per fused module (needed with ``nll_fn``).
        nll_fn: ``{module: fused B (d_out, r)} -> test NLL``, the fused adapter's B's
            (``B_t + alpha * ΔB``) on every fused module; supplied by the caller.
        seed: seeds ``noise`` and ``mismatch``.
    """
    if nll_fn is not None and target_B is None:
        raise ControlError("probe: nll_fn needs target_B (the target's B per fused module)")
    items: list[tuple[str, Perturbation]] = []
    for p in default_perturbations(plan) if perturbations is None else perturbations:
        items.append((p, _builtin(p, plan, seed, sources)) if isinstance(p, str) else
                     (str(p[0]), p[1]))

    delta_fn = jax.jit(lambda prm, ctx: predict_delta_B(prm, ctx, plan, **net_kwargs)[0])
    alpha = params["alpha"]

    def run(ctx: Contexts) -> tuple[dict[str, np.ndarray], float | None]:
        d = {k: np.asarray(v) for k, v in delta_fn(params, ctx).items()}
        if nll_fn is None:
            return d, None
        new_B = fused_B(target_B, {k: jnp.asarray(v) for k, v in d.items()}, alpha, plan)
        return d, float(nll_fn({k: np.asarray(v) for k, v in new_B.items()}))

    ref, nll_ref = run(contexts)
    ref2 = {g.name: _fro2([ref[m.name] for m in g.modules]) for g in plan.groups}
    rows: list[dict[str, Any]] = []
    for name, fn in items:
        new, nll = run(fn(contexts))
        diff2 = {g.name: _fro2([new[m.name] - ref[m.name] for m in g.modules])
                 for g in plan.groups}
        for g in plan.groups:
            rows.append({"perturbation": name, "group": g.name,
                         "rel_dB_change": _rel(diff2[g.name], ref2[g.name]),
                         "dB_fro": math.sqrt(ref2[g.name])})
        total_ref = sum(ref2.values())
        rows.append({"perturbation": name, "group": "all",
                     "rel_dB_change": _rel(sum(diff2.values()), total_ref),
                     "dB_fro": math.sqrt(total_ref), "nll": nll, "nll_ref": nll_ref,
                     "nll_change": None if nll is None else nll - nll_ref})
    return rows


def probe_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The probe table as markdown: one line per perturbation, relative ΔB change per group."""
    perts = list(dict.fromkeys(r["perturbation"] for r in rows))
    groups = [g for g in dict.fromkeys(r["group"] for r in rows) if g != "all"]
    cell = {(r["perturbation"], r["group"]): r for r in rows}
    has_nll = any(r.get("nll") is not None for r in rows)
    head = ["perturbation", "rel. ΔB change (all)", *groups] + (["NLL", "ΔNLL"] if has_nll
                                                                 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in perts:
        allrow = cell.get((p, "all"), {})
        vals = [p, _fmt(allrow.get("rel_dB_change"))]
        vals += [_fmt(cell.get((p, g), {}).get("rel_dB_change")) for g in groups]
        if has_nll:
            vals += [_fmt(allrow.get("nll")), _fmt(allrow.get("nll_change"), signed=True)]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _fmt(x: float | None, *, signed: bool = False) -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "n/a"
    return f"{x:+.4f}" if signed else f"{x:.4f}"
