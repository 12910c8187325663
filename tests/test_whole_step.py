"""A whole training run against a PyTorch reference of the original trainer's step.

The reference (written from docs/algorithm.md §6-§7, not from the release's code) runs, per
micro-batch: the transfer networks (``torch_reference.HeteroFusionTransferNet``), the dynamic patch
``B_t + α·ΔB`` through a PEFT model of a tiny transformers Llama (``torch.func.functional_call``
on the ``lora_B`` weights), ``(LM + λ·avg_rdm) / accum``, backward; the optimizer steps when
``(i + 1) % accum == 0`` with the counter ``i`` restarting every epoch and the gradients never
zeroed at an epoch boundary (AdamW + HF's ``get_cosine_schedule_with_warmup``, sized
``T = n_batches·epochs // accum``); then it exports ``B_t + α·ΔB`` in float32.

hfjax runs the same initial weights and batches through `hfjax.training.accumulation`,
`fuse_loop.stack_window` and the jitted `fuse_step`. The RDM's random draws are made in JAX
with hfjax's keys and handed to torch, so both sides see the same samples and directions.
Setting: 3 target layers, q_proj and v_proj; q_proj's group has two shape buckets (2 + 1
modules: the module mean of docs/algorithm.md §6), v_proj's one of 3 (pooled z). 3 micro-batches
per epoch, accum 2, 3 epochs: updates over e0[0,1], e0[2]+e1[0,1], e1[2]+e2[0,1]; e2[2] dropped.
Adam's eps is 1.0 here so that its first steps are not sign(g) (which would turn rounding
noise in near-zero gradients into ±lr steps); the update rule is the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridge import load_adapter
from hfjax.config.components import OptimizerConfig, RDMConfig, TransferNetConfig
from hfjax.fusion import (
    build_contexts,
    build_plan,
    init_fusion_params,
    params_to_torch_state_dict,
    torch_state_dict_to_params,
)
from hfjax.fusion.rdm import row_draws
from hfjax.models.config import ModelConfig
from hfjax.testing.adapters import random_adapter
from hfjax.testing.hf_models import load_hf_model, make_hf_model, make_peft_adapter
from hfjax.training.accumulation import windows
from hfjax.training.fuse_loop import fused_factors_numpy, stack_window
from hfjax.training.fuse_step import FuseStatics, fuse_step, loss_and_grads
from hfjax.training.fused_export import fused_adapter

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from hfjax.testing.torch_reference import HeteroFusionTransferNet  # noqa: E402
from hfjax.testing.torch_reference import rdm_from_draws as torch_rdm  # noqa: E402

pytestmark = pytest.mark.torch

BS, R, E, H, MAX_POS, MU, K = 16, 4, 32, 4, 16, 0.1, 64
LAMBDA, LR, EPS, WD, WARMUP = 0.5, 0.05, 1.0, 0.01, 0.05
N_BATCHES, ACCUM, EPOCHS, BATCH, SEQ = 3, 2, 3, 2, 10
T = (N_BATCHES * EPOCHS) // ACCUM
TOL = 1e-4
SKIP = "['attention']['k_proj']['bias']"  # softmax ignores it: its true gradient is 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("whole_step")
    base = make_hf_model("llama", root / "base", num_hidden_layers=3)
    target_dir = make_peft_adapter(base, root / "target", r=R, target_modules=["q_proj",
                                                                               "v_proj"])
    target = load_adapter(target_dir)
    sources = [random_adapter(4, 24, 48, R, modules=("q_proj", "v_proj"), kv_dim=12, seed=1),
               random_adapter(1, 40, 48, R, modules=("q_proj",), seed=2)]
    plan = build_plan(target, sources, block_size=BS, source_names=["a", "b"])
    assert [len(b.modules) for b in plan.group("q_proj_r4").buckets] == [2, 1]
    assert [len(b.modules) for b in plan.group("v_proj_r4").buckets] == [3]
    ctx = build_contexts(plan, target, sources)
    params = init_fusion_params(plan, ctx, key=jax.random.key(0), embed_dim=E, num_heads=H,
                                max_pos=MAX_POS, mu_gate=MU, gate="svd", alpha_init=0.3)
    leaves, tdef = jax.tree.flatten(params["nets"])  # every weight random, decoder_out too
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = {"nets": jax.tree.unflatten(tdef, [
        x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]),
        "alpha": params["alpha"]}
    rng = np.random.default_rng(0)
    batches = {}
    for e in range(EPOCHS):
        for i in range(N_BATCHES):
            ids = rng.integers(3, 96, (BATCH, SEQ)).astype(np.int32)
            mask = np.ones_like(ids)
            labels = ids.copy()
            labels[:, :4] = -100  # the prompt
            n_pad = int(rng.integers(1, 4))
            ids[1, -n_pad:], mask[1, -n_pad:], labels[1, -n_pad:] = 0, 0, -100
            batches[(e, i)] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return dict(base=base, target_dir=target_dir, target=target, plan=plan, ctx=ctx,
                params=params, batches=batches, rdm_key=jax.random.key(7))


def micro_key(rdm_key, update: int, i: int):
    return jax.random.fold_in(jax.random.fold_in(rdm_key, update), i)


def torch_avg_rdm(z: dict, plan, key) -> torch.Tensor:
    """docs/algorithm.md §6 per group (pooled for one bucket, module mean otherwise), JAX draws."""
    shapes = {g.name: [(zt.shape[0], zt.shape[1], zs.shape[1]) for zt, zs in z[g.name]]
              for g in plan.groups}
    draws = row_draws(key, shapes, E, num_projections=K)
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731

    def pair(zt, zs, k):
        (y_t, P_t), (y_s, P_s) = draws[k]
        return torch_rdm(zt, t(y_t), t(P_t)) + torch_rdm(zs, t(y_s), t(P_s))

    vals = []
    for g in plan.groups:
        if len(g.buckets) == 1:
            (zt, zs), = z[g.name]
            vals.append(pair(zt, zs, (g.name, 0, None)))
            continue
        per_module = [pair(zt[i], zs[i], (g.name, b, i))
                      for b, (zt, zs) in enumerate(z[g.name]) for i in range(zt.shape[0])]
        vals.append(sum(per_module) / len(per_module))
    return sum(vals) / len(vals)


def torch_run(s, db_scale: float = 1.0) -> dict:
    """The original trainer's loop, literally: per-epoch counter, no zeroing at epochs."""
    import transformers

    plan, ctx = s["plan"], s["ctx"]
    pm = peft.PeftModel.from_pretrained(load_hf_model(s["base"]), str(s["target_dir"])).eval()
    for p in pm.parameters():
        p.requires_grad_(False)
    pnames = {m.name: f"base_model.model.{m.name}.lora_B.default.weight"
              for g in plan.groups for m in g.modules}
    assert set(pnames.values()) <= dict(pm.named_parameters()).keys()
    nets = {}
    for g in plan.groups:
        net = HeteroFusionTransferNet(g.rank, BS, E, H, MAX_POS, MU)
        sd = params_to_torch_state_dict(s["params"]["nets"][g.name])
        net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
        nets[g.name] = net
    alphas = {g: torch.nn.Parameter(torch.tensor(float(a))) for g, a in
              s["params"]["alpha"].items()}
    trained = [p for n in nets.values() for p in n.parameters()] + list(alphas.values())
    opt = torch.optim.AdamW(trained, lr=LR, betas=(0.9, 0.999), eps=EPS, weight_decay=WD)
    sched = transformers.get_cosine_schedule_with_warmup(opt, int(WARMUP * T), T)
    B_t = {n: torch.from_numpy(np.asarray(s["target"].modules[n].B, np.float32))
           for n in pnames}

    def networks():
        new_B, z = {}, {}
        for g in plan.groups:
            z[g.name] = []
            for b, c in zip(g.buckets, ctx[g.name], strict=True):
                delta, _, z_t, z_s = nets[g.name](*(torch.from_numpy(np.asarray(c[k]))
                                                    for k in ("tgt", "tgt_s", "src", "src_s")))
                for i, m in enumerate(b.modules):
                    d = delta[i][m.n_a:m.n_a + m.n_b].reshape(-1, g.rank)[:m.d_out]
                    new_B[m.name] = B_t[m.name] + alphas[g.name] * (db_scale * d)
                z[g.name].append((z_t, z_s))
        return new_B, z

    def snapshot(grad: bool) -> dict:
        get = (lambda p: p.grad.clone()) if grad else (lambda p: p.detach().clone())
        return {"nets": {g: torch_state_dict_to_params(
            {k: get(p) for k, p in n.named_parameters()}, block_size=BS, rank=R,
            embed_dim=E, max_pos=MAX_POS) for g, n in nets.items()},
            "alpha": {g: get(a).numpy() for g, a in alphas.items()}}

    out = {"loss": [], "grads": [], "params": []}
    update, in_window, window_loss = 0, 0, 0.0
    opt.zero_grad()
    for e in range(EPOCHS):
        for i in range(N_BATCHES):
            new_B, z = networks()
            b = {k: torch.from_numpy(v.astype(np.int64)) for k, v in s["batches"][(e, i)].items()}
            lm = torch.func.functional_call(pm, {pnames[n]: v for n, v in new_B.items()},
                                            args=(), kwargs=b).loss
            rdm = torch_avg_rdm(z, plan, micro_key(s["rdm_key"], update, in_window))
            loss = (lm + LAMBDA * rdm) / ACCUM
            loss.backward()
            window_loss += loss.item()
            in_window += 1
            if (i + 1) % ACCUM == 0:
                out["grads"].append(snapshot(grad=True))
                opt.step()
                sched.step()
                opt.zero_grad()
                out["params"].append(snapshot(grad=False))
                out["loss"].append(window_loss)
                update, in_window, window_loss = update + 1, 0, 0.0
    with torch.no_grad():
        new_B, _ = networks()
    out["export"] = {n: v.numpy() for n, v in new_B.items()}
    return out


@pytest.fixture(scope="module")
def hfjax_run(setup):
    import hfjax

    s = setup
    plan = s["plan"]
    model_cfg = ModelConfig.from_hf(s["base"])
    st = FuseStatics(
        plan=plan, model=model_cfg,
        net=TransferNetConfig(embed_dim=E, num_heads=H, max_pos=MAX_POS, mu_gate=MU,
                              gate="svd"),
        rdm=RDMConfig(lambda_reg=LAMBDA, mu_target=0.0, sigma_target=1.0, num_projections=K,
                      activation="relu", sort="auto"),
        optim=OptimizerConfig(lr=LR, warmup_ratio=WARMUP, b1=0.9, b2=0.999, eps=EPS,
                              weight_decay=WD),
        steps=T)
    frozen = {"base": hfjax.from_pretrained(s["base"], dtype="float32").params,
              "adapter": s["target"].to_jax(jnp.float32),
              "contexts": jax.tree.map(jnp.asarray, s["ctx"])}
    params = jax.tree.map(jnp.array, s["params"])
    state = {"params": params, "opt_state": st.optimizer.init(params),
             "step": jnp.zeros((), jnp.int32)}
    grad_fn = jax.jit(loss_and_grads, static_argnames="st")
    out = {"loss": [], "grads": [], "params": []}
    ws = windows(N_BATCHES, ACCUM, EPOCHS, "original")
    assert [len(w) for w in ws] == [2, 3, 3]
    slots = max(len(w) for w in ws)  # one shape for all: one compilation (filler weighs 0)
    for u, w in enumerate(ws):
        batch, weights = stack_window([s["batches"][it] for it in w.items], slots, BATCH, 0)
        weights = weights * np.float32(w.scale)
        grads, _ = grad_fn(state["params"], frozen, batch, weights,
                           jax.random.fold_in(s["rdm_key"], u), st=st)
        state, m = fuse_step(state, frozen, batch, weights, s["rdm_key"], st=st)
        out["grads"].append(jax.device_get(grads))
        out["params"].append(jax.device_get(state["params"]))
        out["loss"].append(float(m["loss"]))
    new_B = fused_factors_numpy(state["params"], frozen, st)[0]["B"]
    out["export"] = {n: m.B for n, m in fused_adapter(s["target"], new_B, "float32")
                     .modules.items() if n in new_B}
    return out


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def worst_differences(ours: dict, ref: dict, target) -> dict[str, float]:
    """Worst scale-relative difference of each kind (losses, gradients, parameters, export)."""
    out = {"loss": max(rel(a, b) for a, b in zip(ours["loss"], ref["loss"], strict=True))}
    for kind in ("grads", "params"):
        worst = 0.0
        for a_tree, b_tree in zip(ours[kind], ref[kind], strict=True):
            for (path, b), a in zip(jax.tree_util.tree_leaves_with_path(b_tree),
                                    jax.tree_util.tree_leaves(a_tree), strict=True):
                if kind == "grads" and jax.tree_util.keystr(path).endswith(SKIP):
                    continue
                worst = max(worst, rel(a, b))
        out[kind] = worst
    b0 = {n: np.asarray(target.modules[n].B, np.float32) for n in ref["export"]}
    out["export_B"] = max(rel(ours["export"][n], ref["export"][n]) for n in b0)
    out["export_alpha_dB"] = max(rel(ours["export"][n] - b0[n], ref["export"][n] - b0[n])
                                 for n in b0)
    return out


def test_whole_run_matches_the_original_trainer(setup, hfjax_run):
    ref = torch_run(setup)
    assert len(ref["loss"]) == len(hfjax_run["loss"]) == 3
    worst = worst_differences(hfjax_run, ref, setup["target"])
    print("worst relative differences:", worst)
    assert max(worst.values()) <= TOL, worst
    # The run did something: parameters moved, the export differs from the target.
    first = setup["params"]["alpha"]
    assert any(abs(float(hfjax_run["params"][-1]["alpha"][g]) - float(first[g])) > 1e-4
               for g in first)
    assert all(rel(v, np.asarray(setup["target"].modules[n].B)) > 1e-3
               for n, v in hfjax_run["export"].items())
    # ... and the comparison can fail: dB scaled by 1.001 in the reference is caught.
    off = worst_differences(hfjax_run, torch_run(setup, db_scale=1.001), setup["target"])
    print("with dB x 1.001:", off)
    assert off["export_alpha_dB"] > TOL and max(off.values()) > TOL
