"""The jitted HeteroFusion optimizer step ("dynamic patching" through a pure forward).

One call = one optimizer update over an accumulation window of ``accum`` micro-batches::

    micro_batches: {"input_ids", "attention_mask", "labels"}  each (n, B, L)
    weights:       (n,)  each micro-batch's loss scale (0 for filler)
    loss = Σ_i w_i (LM_i + λ · avg_rdm_i)

The scales come from `hfjax.training.windows`: ``1/accum`` per micro-batch in the original's
windows (a window that holds more than ``accum`` micro-batches sums to more than one mean),
``1/n_real`` in the continuous ones.

The transfer networks' parameters change only at an update and their inputs (the block
contexts) are constant, so ΔB and z are identical for every micro-batch of a window. We
therefore run the networks ONCE per step (docs/performance.md trick 5), keep their VJP, sum the LM
gradients with respect to the patched B matrices (and A matrices, under the later release's
``update_mode`` a_only / ab_joint) over the micro-batches (a `lax.scan`), draw a
fresh RDM sample per micro-batch on the same z, and backpropagate through the networks once.
This is exactly the gradient of the per-micro-batch loop the original runs, at a fraction of
its cost.

The step's arrays are few and large, so that its compiled size does not grow with the model's
depth (docs/performance.md §6): the patched factors are one ``(M_g, ...)`` array per group
(`group_factors`; with a scanned base they are set straight into the stacked adapter), the
RDM draws one normal sample per ``L(z_t) + L(z_s)`` pair, and `hfjax.training.fuse_loop`
keeps same-shaped groups' networks stacked (``{"clusters"}``, `pack_nets`), so the optimizer
and the gradient norm see one array per leaf and cluster. ``{"nets"}`` (one tree per group)
works too. Only the networks and the α's are trained; the base model and the target adapter
are frozen arguments.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from hfjax.config.components import OptimizerConfig, RDMConfig, TransferNetConfig
from hfjax.fusion import average_rdm
from hfjax.fusion.network import fused_group, predict_group_deltas, split_groups, stack_groups
from hfjax.fusion.plan import FusionPlan
from hfjax.models.config import ModelConfig
from hfjax.models.decoder import is_stacked, set_stacked, stack_adapter
from hfjax.training.objective import lm_loss


@dataclasses.dataclass(frozen=True)
class FuseStatics:
    """Everything static about a fusion step (hashable: a jit static argument).

    Runs with the same shapes and settings share one compilation (the optimizer settings
    and total ``steps`` fix the schedule, so they are part of the key).
    """

    plan: FusionPlan
    model: ModelConfig
    net: TransferNetConfig
    rdm: RDMConfig
    optim: OptimizerConfig
    steps: int = 1  # optimizer steps the schedule spans
    remat: bool = False  # rematerialise the base model's decoder layers

    @property
    def optimizer(self) -> optax.GradientTransformation:
        return self.optim.build(self.steps)

    @property
    def net_kwargs(self) -> dict[str, Any]:
        return self.net.network_kwargs()

    @property
    def rdm_kwargs(self) -> dict[str, Any]:
        return self.rdm.loss_kwargs()


def patched_adapter(adapter: dict[str, Any], new_B: dict[str, jax.Array],
                    new_A: dict[str, jax.Array] | None = None) -> dict[str, Any]:
    """The target adapter pytree with ``B`` (and ``A``, if given) replaced on the fused
    modules."""
    new_A = new_A or {}
    out = {}
    for name, p in adapter.items():
        if name in new_B or name in new_A:
            p = {**p, **({"A": new_A[name]} if name in new_A else {}),
                 **({"B": new_B[name]} if name in new_B else {})}
        out[name] = p
    return out


def patch_factors(adapter: dict[str, Any], factors: dict[str, dict[str, jax.Array]]
                  ) -> dict[str, Any]:
    """`patched_adapter` from `run_networks`'s ``{"A"?: {...}, "B"?: {...}}``."""
    return patched_adapter(adapter, factors.get("B", {}), factors.get("A"))


def group_factors(params: dict[str, Any], frozen: dict[str, Any], st: FuseStatics
                  ) -> tuple[dict[str, dict[str, jax.Array]], dict[str, Any], dict[str, Any]]:
    """`run_networks` with each group's factors stacked: ``{"B"?: {group: (M_g, d_out, r)},
    "A"?: {group: (M_g, r, d_in)}}`` (module ``i`` = ``group.modules[i]``), the z's and the
    attention. The step works on these: a few arrays per group, however deep the model."""
    plan = st.plan
    delta_A, delta_B, aux = predict_group_deltas(params, frozen["contexts"], plan,
                                                 **st.net_kwargs)
    factors: dict[str, dict[str, jax.Array]] = {}
    for f, delta in (("B", delta_B), ("A", delta_A)):
        if delta:
            target = stack_groups({n: frozen["adapter"][n][f] for n in plan.fused_modules}, plan)
            factors[f] = fused_group(target, delta, params["alpha"], plan)
    zs = {g: [{"z_t": a["z_t"], "z_s": a["z_s"]} for a in buckets] for g, buckets in aux.items()}
    attn = {g: [a["attn"] for a in buckets] for g, buckets in aux.items()}
    return factors, zs, attn


def run_networks(params: dict[str, Any], frozen: dict[str, Any], st: FuseStatics
                 ) -> tuple[dict[str, dict[str, jax.Array]], dict[str, Any], dict[str, Any]]:
    """(patched factors, z's per group/bucket for the RDM, attention per group).

    The patched factors are ``{"B": {module: B'}}`` under ``update_mode`` b_only,
    ``{"A": {module: A'}}`` under a_only and both under ab_joint (``st.plan.update_mode``,
    static): only the patched factors are computed, and only they carry gradients.
    """
    factors, zs, attn = group_factors(params, frozen, st)
    return {f: split_groups(v, st.plan) for f, v in factors.items()}, zs, attn


def stacked_patch(stacked: dict[str, Any], factors: dict[str, dict[str, jax.Array]],
                  plan: FusionPlan) -> dict[str, Any]:
    """`stack_adapter`'s layout of the target adapter with `group_factors`' factors in place
    (the scanned forward's ``stacked_lora``)."""
    for f, per_group in factors.items():
        for g in plan.groups:
            mods, v = g.modules, per_group.get(g.name)
            if isinstance(v, tuple):  # modules of several shapes: one at a time
                for m, x in zip(mods, v, strict=True):
                    stacked = set_stacked(stacked, m.suffix, f, [m.layer], x[None])
            elif v is not None:
                stacked = set_stacked(stacked, mods[0].suffix, f, [m.layer for m in mods], v)
    return stacked


def loss_and_grads(params: dict[str, Any], frozen: dict[str, Any], micro_batches: dict,
                   weights: jax.Array, key: jax.Array, st: FuseStatics
                   ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """Window loss ``Σ w_i (LM_i + λ·avg_rdm_i)`` and its gradient w.r.t. the trained params
    (networks + α's)."""
    (new_f, zs), vjp_fn = jax.vjp(lambda p: group_factors(p, frozen, st)[:2], params)
    adapter = frozen["adapter"]  # new_f: the patched factors, {"B"?: ..., "A"?: ...} per group
    if is_stacked(frozen["base"]):  # scanned layers: the factors go in as a few stacked arrays
        target = stack_adapter(adapter, st.model)

        def lm(f: dict[str, dict[str, jax.Array]], batch: dict) -> jax.Array:
            return lm_loss(frozen["base"], st.model, batch, None, remat=st.remat,
                           stacked_lora=stacked_patch(target, f, st.plan))
    else:
        def lm(f: dict[str, dict[str, jax.Array]], batch: dict) -> jax.Array:
            split = {k: split_groups(v, st.plan) for k, v in f.items()}
            return lm_loss(frozen["base"], st.model, batch, patch_factors(adapter, split),
                           remat=st.remat)

    def rdm(z: dict[str, Any], k: jax.Array) -> jax.Array:
        return average_rdm(z, k, **st.rdm_kwargs)

    def micro(carry, xs):
        lm_sum, rdm_sum, g_b, g_z = carry
        batch, w, i = xs
        lm_i, gb_i = jax.value_and_grad(lm)(new_f, batch)
        rdm_i, gz_i = jax.value_and_grad(rdm)(zs, jax.random.fold_in(key, i))
        g_b = jax.tree.map(lambda a, b: a + w * b, g_b, gb_i)
        g_z = jax.tree.map(lambda a, b: a + w * b, g_z, gz_i)
        return (lm_sum + w * lm_i, rdm_sum + w * rdm_i, g_b, g_z), None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
             jax.tree.map(jnp.zeros_like, new_f), jax.tree.map(jnp.zeros_like, zs))
    n_micro = weights.shape[0]
    (lm_sum, rdm_sum, g_b, g_z), _ = jax.lax.scan(
        micro, zeros, (micro_batches, weights, jnp.arange(n_micro)))
    (grads,) = vjp_fn((g_b, jax.tree.map(lambda g: g * st.rdm.lambda_reg, g_z)))
    w_sum = jnp.maximum(jnp.sum(weights), 1e-30)
    metrics = {"lm_loss": lm_sum / w_sum, "rdm": rdm_sum / w_sum,  # weighted means (logs)
               "loss": lm_sum + st.rdm.lambda_reg * rdm_sum}  # the objective of this update
    return grads, metrics


@partial(jax.jit, static_argnames=("st",), donate_argnums=(0,))
def fuse_step(state: dict[str, Any], frozen: dict[str, Any], micro_batches: dict,
              weights: jax.Array, key: jax.Array, *, st: FuseStatics
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One optimizer update (jitted; ``state`` is donated). ``state`` = {"params", "opt_state",
    "step"}; compiles once per (statics, padded length bucket)."""
    optimizer = st.optimizer
    step_key = jax.random.fold_in(key, state["step"])
    grads, metrics = loss_and_grads(state["params"], frozen, micro_batches, weights, step_key, st)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["alpha"] = params["alpha"]
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics
