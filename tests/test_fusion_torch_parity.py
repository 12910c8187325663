"""Parity with a PyTorch model of the original transfer network (tests/torch_reference.py).

The contract: the same weights give the same ``(delta, attn, z_t, z_s)`` (≤ 1e-5), through
the line-by-line port (``from_torch_state_dict``) and through the fast ``TransferNet``
(on the B tokens, which are the only ones it decodes), forward and backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hfjax.fusion import (
    FusionError,
    TransferNet,
    build_contexts,
    build_plan,
    from_torch_state_dict,
    init_fusion_params,
    params_to_torch_state_dict,
    predict_delta_B,
    predict_deltas,
    svd_descriptor,
    torch_state_dict_to_params,
)
from hfjax.fusion.torch_compat import TORCH_TABLE
from hfjax.testing.adapters import random_adapter

torch = pytest.importorskip("torch")
from hfjax.testing.torch_reference import HeteroFusionTransferNet  # noqa: E402

pytestmark = pytest.mark.torch
torch.set_num_threads(1)

BS, R, E, H, MAX_POS, MU = 16, 4, 32, 4, 64, 0.1
CFG = {"block_size": BS, "rank": R, "embed_dim": E, "num_heads": H, "max_pos": MAX_POS,
       "mu_gate": MU}
TOL = {"rtol": 1e-5, "atol": 1e-5}


def random_torch_net(seed: int = 0) -> HeteroFusionTransferNet:
    """The original module with every weight random (the decoder's last layer included)."""
    torch.manual_seed(seed)
    net = HeteroFusionTransferNet(R, BS, E, H, MAX_POS, MU)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.startswith("pos_embed"):
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 + 0.05))
    return net


def random_inputs(M: int = 3, n_t: int = 5, n_s: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    tgt = rng.standard_normal((M, n_t, BS * R)).astype(np.float32)
    src = rng.standard_normal((M, n_s, BS * R)).astype(np.float32)
    tgt_s = np.stack([svd_descriptor(t, BS, R) for t in tgt])
    src_s = np.stack([svd_descriptor(s, BS, R) for s in src])
    return tgt, tgt_s, src, src_s


def torch_forward(net, xs):
    with torch.no_grad():
        return [o.numpy() for o in net(*(torch.from_numpy(x) for x in xs))]


@pytest.fixture(scope="module")
def net_and_fn():
    net = random_torch_net()
    return net, from_torch_state_dict(net.state_dict(), **CFG)


def test_port_matches_torch_batched_and_unbatched(net_and_fn):
    net, fn = net_and_fn
    xs = random_inputs()
    want = torch_forward(net, xs)
    got = fn(*xs)
    for name, w, g in zip(("delta", "attn", "z_t", "z_s"), want, got, strict=True):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, **TOL, err_msg=name)
    # The gate is neither all-open nor all-closed on these inputs.
    gate_logits = net.encoder.gate_net(torch.from_numpy(xs[1])) + MU
    assert (gate_logits < 0).any() and (gate_logits > 1).any()
    one = fn(*(x[1] for x in xs))
    for w, g in zip(want, one, strict=True):
        assert g.shape == w.shape[1:]
        np.testing.assert_allclose(g, w[1], **TOL)


@pytest.mark.parametrize("col_view", ["kernel", "input"])
def test_fast_transfer_net_matches_port_on_B_tokens(net_and_fn, col_view):
    _, fn = net_and_fn
    xs = random_inputs()
    n_a = 2
    delta, attn, z_t, z_s = fn(*xs)
    fast = TransferNet(BS, R, embed_dim=E, num_heads=H, max_pos=MAX_POS, mu_gate=MU,
                       col_view=col_view)
    f_delta, f_attn, f_z_t, f_z_s = jax.jit(
        lambda p, *x: fast.apply({"params": p}, *x, n_a=n_a))(fn.params, *xs)
    assert f_delta.shape == (3, 3, BS * R) and f_attn.shape == (3, 3, 7)
    np.testing.assert_allclose(f_delta, delta[:, n_a:], **TOL)
    np.testing.assert_allclose(f_attn, attn[:, n_a:], **TOL)
    np.testing.assert_allclose(f_z_t, z_t, **TOL)
    np.testing.assert_allclose(f_z_s, z_s, **TOL)


@pytest.mark.parametrize("col_view", ["kernel", "input"])
def test_fast_transfer_net_gradients_match_torch(net_and_fn, col_view):
    net, fn = net_and_fn
    xs = random_inputs(M=2, n_t=4, n_s=5, seed=1)
    n_a = 1
    rng = np.random.default_rng(2)
    w_d = rng.standard_normal((2, 3, BS * R)).astype(np.float32)
    w_t = rng.standard_normal((2, 4, E)).astype(np.float32)
    w_s = rng.standard_normal((2, 5, E)).astype(np.float32)

    net.zero_grad()
    delta, _, z_t, z_s = net(*(torch.from_numpy(x) for x in xs))
    loss = ((delta[:, n_a:] * torch.from_numpy(w_d)).sum() + (z_t * torch.from_numpy(w_t)).sum()
            + (z_s * torch.from_numpy(w_s)).sum())
    loss.backward()
    want = torch_state_dict_to_params(
        {k: p.grad for k, p in net.named_parameters()}, block_size=BS, rank=R, embed_dim=E,
        max_pos=MAX_POS)

    fast = TransferNet(BS, R, embed_dim=E, num_heads=H, max_pos=MAX_POS, mu_gate=MU,
                       col_view=col_view)

    def jloss(p):
        d, _, zt, zs = fast.apply({"params": p}, *xs, n_a=n_a)
        return jnp.sum(d * w_d) + jnp.sum(zt * w_t) + jnp.sum(zs * w_s)

    got = jax.jit(jax.grad(jloss))(fn.params)
    flat_w = jax.tree_util.tree_leaves_with_path(want)
    flat_g = jax.tree_util.tree_leaves(got)
    for (path, w), g in zip(flat_w, flat_g, strict=True):
        if jax.tree_util.keystr(path) == "['attention']['k_proj']['bias']":
            continue  # softmax ignores a per-query constant: its true gradient is 0 (noise)
        scale = float(np.abs(w).max()) + 1e-6
        np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(w) / scale, atol=2e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_state_dict_round_trip_and_torch_init_layout():
    t = random_adapter(2, 20, 24, R, modules=("q_proj",), seed=0)
    s = random_adapter(2, 12, 18, R, modules=("q_proj",), seed=1)
    plan = build_plan(t, [s], block_size=BS)
    ctx = build_contexts(plan, t, [s])
    params = init_fusion_params(plan, ctx, key=jax.random.key(0), embed_dim=E, num_heads=H,
                                max_pos=MAX_POS, mu_gate=MU)
    p = params["nets"]["q_proj_r4"]
    sd = params_to_torch_state_dict(p)
    net = HeteroFusionTransferNet(R, BS, E, H, MAX_POS, MU)
    assert set(sd) == set(net.state_dict())  # same layout as the original module
    for k, v in net.state_dict().items():
        assert tuple(v.shape) == sd[k].shape, k
    net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    back = torch_state_dict_to_params(sd, block_size=BS, rank=R, embed_dim=E, max_pos=MAX_POS)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(p), strict=True):
        np.testing.assert_array_equal(a, b)
    # Our init matches the original's init rules, so its ΔB is zero there too.
    c = ctx["q_proj_r4"][0]
    delta = torch_forward(net, (c["tgt"], c["tgt_s"], c["src"], c["src_s"]))[0]
    assert not np.any(delta)
    assert len(TORCH_TABLE) == 13


def test_end_to_end_delta_B_matches_original_unblocking(net_and_fn):
    """Contexts from adapters -> torch module -> the original's un-blocking, vs predict_delta_B."""
    net, fn = net_and_fn
    t = random_adapter(3, 20, 24, R, modules=("q_proj",), seed=0)
    s = random_adapter(3, 36, 18, R, modules=("q_proj",), seed=1)
    plan = build_plan(t, [s], block_size=BS)
    ctx = build_contexts(plan, t, [s])
    params = {"nets": {"q_proj_r4": fn.params}, "alpha": {"q_proj_r4": jnp.float32(0.3)}}
    dB, aux = jax.jit(lambda p, c: predict_delta_B(p, c, plan, embed_dim=E, num_heads=H,
                                                   max_pos=MAX_POS, mu_gate=MU))(params, ctx)
    (bucket,) = plan.group("q_proj_r4").buckets
    c = ctx["q_proj_r4"][0]
    delta, attn, z_t, z_s = torch_forward(net, (c["tgt"], c["tgt_s"], c["src"], c["src_s"]))
    for i, m in enumerate(bucket.modules):
        want = delta[i][m.n_a:m.n_a + m.n_b].reshape(-1, BS, R).reshape(-1, R)[:m.d_out]
        np.testing.assert_allclose(dB[m.name], want, **TOL)
    np.testing.assert_allclose(aux["q_proj_r4"][0]["attn"], attn[:, bucket.n_a:], **TOL)
    np.testing.assert_allclose(aux["q_proj_r4"][0]["z_s"], z_s, **TOL)


@pytest.mark.parametrize("mode", ["a_only", "ab_joint"])
def test_end_to_end_delta_A_matches_original_unblocking(net_and_fn, mode):
    """update_mode (docs/algorithm.md §11): the torch module's A^T-token outputs, un-blocked and
    transposed as the later release does, vs predict_deltas' ΔA (and ΔB under ab_joint)."""
    net, fn = net_and_fn
    t = random_adapter(3, 20, 24, R, modules=("q_proj",), seed=0)  # d_in 20: 2 A^T tokens
    s = random_adapter(3, 36, 18, R, modules=("q_proj",), seed=1)
    plan = build_plan(t, [s], block_size=BS, update_mode=mode)
    ctx = build_contexts(plan, t, [s])
    params = {"nets": {"q_proj_r4": fn.params}, "alpha": {"q_proj_r4": jnp.float32(0.3)}}
    dA, dB, _ = jax.jit(lambda p, c: predict_deltas(p, c, plan, embed_dim=E, num_heads=H,
                                                    max_pos=MAX_POS, mu_gate=MU))(params, ctx)
    (bucket,) = plan.group("q_proj_r4").buckets
    c = ctx["q_proj_r4"][0]
    delta = torch_forward(net, (c["tgt"], c["tgt_s"], c["src"], c["src_s"]))[0]
    assert set(dA) == {m.name for m in bucket.modules}
    assert set(dB) == (set(dA) if mode == "ab_joint" else set())
    for i, m in enumerate(bucket.modules):
        rows = torch.from_numpy(delta[i][:m.n_a]).view(-1, BS, R).view(-1, R)
        want = rows[:m.d_in, :].t().contiguous().numpy()  # (r, d_in)
        assert dA[m.name].shape == (R, m.d_in)
        np.testing.assert_allclose(dA[m.name], want, **TOL)
        if mode == "ab_joint":
            want_b = delta[i][m.n_a:m.n_a + m.n_b].reshape(-1, R)[:m.d_out]
            np.testing.assert_allclose(dB[m.name], want_b, **TOL)


def test_bad_state_dicts_are_refused(net_and_fn):
    net, _ = net_and_fn
    sd = dict(net.state_dict())
    del sd["encoder.gate_net.2.bias"]
    with pytest.raises(FusionError, match="gate_net.2.bias"):
        from_torch_state_dict(sd, **CFG)
    with pytest.raises(FusionError, match="shape"):
        from_torch_state_dict(net.state_dict(), **{**CFG, "max_pos": 32})
