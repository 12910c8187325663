"""Benchmarks: the fused training step (JAX vs the original's PyTorch way) and the bridge.

::

    hfjax bench                          # small, mid, paper + bridge
    hfjax bench --only small,mid --repeats 7
    hfjax bench --skip-torch --skip-bridge

or from Python, ``run_bench(["small"], torch_side=False)``. Never a test: it prints numbers
and says whether the targets are met. It runs from an installed package (the PyTorch side
needs ``torch==2.13.0`` and ``hfjax[torch]``; it is skipped without them).

**What is timed.** One single-group configuration (``small``, ``mid``, ``paper``: see
`CONFIGS`) is one transfer network over a bucket of ``M`` modules of exactly the given token
geometry (``n_a + n_b`` target tokens, ``n_s`` source tokens, synthetic block contexts),
whose ΔB's patch ``M`` real LoRA B matrices of a tiny all-linear-LoRA Llama (each ΔB cut to
its module's ``d_out``), so the LM loss really flows back into the network. Three things are
timed on the same shapes, same weights (the torch network is loaded from the JAX init via
``params_to_torch_state_dict``, the HF model from the same safetensors) and same batches:

- ``step``: one optimizer update over ``accum`` micro-batches of ``1 x seq`` tokens.
  JAX: `hfjax.training.fuse_step.fuse_step` (networks once per update, LM gradients summed
  w.r.t. the patched B, one VJP). PyTorch, the original's way: for every micro-batch run the
  network, patch ``B + α·ΔB`` into a PEFT-wrapped transformers Llama
  (``torch.func.functional_call``), LM loss + λ·RDM, backward; then AdamW + HF's
  ``get_cosine_schedule_with_warmup``. The network is `hfjax.testing.torch_reference`'s.
  Both sides take every hyper-parameter the configuration does not fix (μ_gate, α init,
  λ, the RDM target, AdamW, warmup) from the shipped fuse config's defaults (``hfjax:fuse``,
  the paper's training block), over a schedule of `SCHEDULE_STEPS` steps.
- ``network``: one transfer-network forward + backward with the RDM (the networks' share).
- ``lm``: one micro-batch's LM loss and its gradient w.r.t. the LoRA B's (the LM's share).

**How.** Each configuration runs in a fresh worker process that holds both implementations
and interleaves them call by call (alternating which goes first); medians are reported, with
ratios ``torch / JAX``. JAX is compiled ahead of time (``compile`` is that time); torch gets
one warm-up call. The worker never calls a numpy matmul (OpenBLAS is pinned to one thread
anyway), and both sides allocate through the same glibc malloc, run with
``MALLOC_MMAP_MAX_=0`` and a large ``MALLOC_TRIM_THRESHOLD_`` so that big tensors do not
page-fault on every step (``--allocator default`` turns that off). Peak RSS comes from
separate one-implementation workers (``VmHWM``; compilation included for JAX).

**FLOPs** are counted analytically, ``2·m·n·k`` per matmul: the transfer network as the
original computes it (every target token decoded; the fast path skips some of that, so its
figure is *effective* FLOP/s) ×3 for forward + backward, plus the RDM projections; the LM's
frozen matmuls ×2 (forward + input gradient; no weight gradient). The share is of a float32
GEMM peak measured in the same worker (``2048³``: ``jnp.dot`` under jit, and ``torch.mm``).

**Bridge.** A synthetic llama-shaped bf16 checkpoint of a few GB is written in shards with
`bridge.save_checkpoint` (a temporary directory, deleted afterwards) and loaded with
`hfjax.from_pretrained` in a fresh process: peak RSS / checkpoint size (target ≤ 1.3×). An
8B-shaped r=8 all-linear adapter (32 layers) is timed through load → save → load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hfjax import machine
from hfjax.errors import UserError

#: Length of the learning-rate schedule both sides follow (warmup = warmup_ratio of it).
SCHEDULE_STEPS = 100


class BenchError(UserError):
    """An unknown benchmark configuration."""


def paper_defaults(c: BenchConfig | None = None) -> Any:
    """The shipped fuse config's defaults (the paper's), with ``c``'s network geometry."""
    from hfjax.configs.fuse import get_config

    cfg = get_config()
    if c is not None:
        cfg.fusion.block_size = c.block
        cfg.fusion.embed_dim = c.embed
        cfg.fusion.num_heads = c.heads
        cfg.rdm.num_projections = c.projections
    return cfg


# ----------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class LMShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One group: ``modules`` x (``n_a`` + ``n_b`` target tokens, ``sources`` x as many).

    The group's modules are the ``patch`` projections of every layer of the tiny Llama
    ``lm`` (so ``modules == lm.layers * len(patch)``), each with ``d_out <= n_b * block``.
    """

    name: str
    block: int
    embed: int
    modules: int
    n_a: int
    n_b: int
    sources: int
    patch: tuple[str, ...]
    lm: LMShape
    rank: int = 8
    heads: int = 8
    seq: int = 256
    accum: int = 8
    projections: int = 2048
    repeats: int = 5

    @property
    def n_t(self) -> int:
        return self.n_a + self.n_b

    @property
    def n_s(self) -> int:
        return self.sources * self.n_t

    def describe(self) -> str:
        lm = self.lm
        what = "all-linear" if len(self.patch) == 7 else "+".join(self.patch)
        return (f"block {self.block}, E {self.embed}, r {self.rank}, {self.modules} modules x "
                f"({self.n_t}+{self.n_s}) tokens, K {self.projections}; LM: Llama hidden "
                f"{lm.hidden}, {lm.layers} layers, vocab {lm.vocab} ({what} B's patched); "
                f"batch 1 x seq {self.seq}, accum {self.accum}")


_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# docs/performance.md §2's tiny Llama of the LM step: hidden 256, 4 layers, seq 256.
_TINY = LMShape(hidden=256, intermediate=1024, layers=4, heads=4, kv_heads=2, vocab=1024)
CONFIGS = {
    "small": BenchConfig("small", block=64, embed=64, modules=4, n_a=1, n_b=2, sources=3,
                         patch=("gate_proj",), lm=LMShape(64, 128, 4, 4, 2, 512)),
    "mid": BenchConfig("mid", block=512, embed=256, modules=8, n_a=1, n_b=3, sources=5,
                       patch=("gate_proj", "up_proj"), lm=_TINY),
    "paper": BenchConfig("paper", block=4096, embed=1024, modules=28, n_a=1, n_b=1,
                         sources=5, patch=_ALL, lm=_TINY, repeats=2),
}


# ----------------------------------------------------------------------------- FLOPs
def network_flops(c: BenchConfig) -> float:
    """Forward + backward of the original network on one group (+ RDM), analytically."""
    M, E, F, K, r = c.modules, c.embed, c.block * c.rank, c.projections, c.rank
    G = E // 4
    Tt, Ts = M * c.n_t, M * c.n_s
    T = Tt + Ts
    enc = 2 * T * F * E * 2 + 2 * T * r * G + 2 * T * G * E
    att = 2 * Tt * E * E + 2 * 2 * Ts * E * E + 2 * 2 * M * c.n_t * c.n_s * E + 2 * Tt * E * E
    dec = 2 * Tt * E * E + 2 * Tt * E * F
    rdm_z = 2 * T * E * K
    return 3.0 * (enc + att + dec + rdm_z) + 2 * T * E * K  # y @ P needs no gradient


def lm_flops(c: BenchConfig) -> float:
    """One micro-batch: frozen matmuls x2 (forward + input gradient), LoRA ignored."""
    lm = c.lm
    D, hd = lm.hidden, lm.hidden // lm.heads
    Dq, Dkv, L = lm.heads * hd, lm.kv_heads * hd, c.seq
    per_tok_layer = 2 * (D * Dq + 2 * D * Dkv + Dq * D + 3 * D * lm.intermediate) + 4 * L * Dq
    return 2.0 * L * (lm.layers * per_tok_layer + 2 * D * lm.vocab)


# ----------------------------------------------------------------------------- fixture
def _model_cfg(c: BenchConfig) -> Any:
    from hfjax.models.config import ModelConfig

    lm = c.lm
    return ModelConfig(model_type="llama", vocab_size=lm.vocab, hidden_size=lm.hidden,
                       intermediate_size=lm.intermediate, num_hidden_layers=lm.layers,
                       num_attention_heads=lm.heads, num_key_value_heads=lm.kv_heads,
                       head_dim=lm.hidden // lm.heads, rms_norm_eps=1e-6, rope_theta=10000.0,
                       max_position_embeddings=max(2048, c.seq), bos_token_id=1,
                       eos_token_id=2, pad_token_id=0)


def bench_plan(c: BenchConfig, geo: list[dict[str, Any]]) -> Any:
    """A one-group, one-bucket `FusionPlan` of ``c``'s geometry over the modules ``geo``."""
    from hfjax.fusion.plan import Bucket, FusionPlan, Group, ModuleEntry

    mods = tuple(ModuleEntry(
        name=m["name"], layer=m["layer"], suffix=m["name"].split(f"layers.{m['layer']}.")[1],
        module_type=m["name"].rsplit(".", 1)[-1], d_out=m["d_out"], d_in=m["d_in"],
        rank=c.rank, sources=tuple((k, m["name"]) for k in range(c.sources)), n_a=c.n_a,
        n_b=c.n_b, n_src_tokens=c.n_s) for m in geo)
    group = Group(f"bench_r{c.rank}", "mixed", c.rank,
                  (Bucket(mods, c.n_a, c.n_b, c.n_t, c.n_s),))
    return FusionPlan(block_size=c.block, groups=(group,),
                      layer_maps=tuple({i: i for i in range(c.lm.layers)}
                                       for _ in range(c.sources)),
                      source_names=tuple(f"source{k}" for k in range(c.sources)),
                      unfused=(), target_layers=c.lm.layers,
                      source_layers=(c.lm.layers,) * c.sources)


def prepare_fixture(c: BenchConfig, out: Path) -> None:
    """Everything both implementations read, on disk: the HF base model, the target adapter,
    the block contexts, the network init (torch layout), the batches and the group's module
    list. Runs in the orchestrator (the numpy SVDs of the contexts happen here)."""
    import jax

    from bridge import save_adapter
    from hfjax.fusion import init_fusion_params, params_to_torch_state_dict
    from hfjax.loading import init_params, save_pretrained
    from hfjax.models import Decoder
    from hfjax.testing.models import random_lora

    mc = _model_cfg(c)
    out.mkdir(parents=True, exist_ok=True)
    params = init_params(mc, jax.random.PRNGKey(0))
    save_pretrained(Decoder(config=mc, params=params), out / "base")
    target = random_lora(mc, r=c.rank, alpha=2 * c.rank, seed=1)  # all-linear, as the paper's
    save_adapter(target, out / "target")
    geo = [{"name": m.name, "layer": m.layer, "d_in": m.d_in, "d_out": m.d_out}
           for m in target.modules.values() if m.module_type in c.patch]
    assert len(geo) == c.modules, (len(geo), c.modules)
    assert all(m["d_out"] <= c.n_b * c.block for m in geo), "a B needs more tokens than n_b"
    plan = bench_plan(c, geo)
    rng = np.random.default_rng(2)
    F = c.block * c.rank
    ctx = {}
    for side, n in (("tgt", c.n_t), ("src", c.n_s)):
        x = (0.02 * rng.standard_normal((c.modules, n, F))).astype(np.float32)
        ctx[side] = x
        ctx[side + "_s"] = np.linalg.svd(x.reshape(c.modules, n, c.block, c.rank),
                                         compute_uv=False).astype(np.float32)
    np.savez(out / "contexts.npz", **ctx)
    net = init_fusion_params(plan, None, key=jax.random.PRNGKey(3), embed_dim=c.embed,
                             num_heads=c.heads, max_pos=paper_defaults(c).fusion.max_pos)
    net = net["nets"][plan.groups[0].name]
    np.savez(out / "net_torch.npz", **params_to_torch_state_dict(net))
    ids = rng.integers(3, mc.vocab_size, size=(c.accum, 1, c.seq)).astype(np.int32)
    labels = ids.copy()
    labels[:, :, : c.seq // 4] = -100  # the prompt quarter is not supervised
    np.savez(out / "batches.npz", input_ids=ids, attention_mask=np.ones_like(ids),
             labels=labels)
    (out / "plan.json").write_text(json.dumps(geo))


# ----------------------------------------------------------------------------- JAX side
class JaxSide:
    """The hfjax step, network and LM calls, compiled ahead of time (``step_only``: the step
    alone, as a user's run holds it: what the peak-RSS worker measures)."""

    def __init__(self, c: BenchConfig, fx: Path, step_only: bool = False) -> None:
        import jax
        import jax.numpy as jnp

        from bridge import load_adapter
        from hfjax.config.jobs import fuse_job_from
        from hfjax.fusion import average_rdm, torch_state_dict_to_params
        from hfjax.loading import from_pretrained
        from hfjax.training import fuse_step as fs
        from hfjax.training.fuse_loop import statics_from
        from hfjax.training.objective import lm_loss

        self.c = c
        paper = paper_defaults(c)
        target = load_adapter(fx / "target")
        plan = bench_plan(c, json.loads((fx / "plan.json").read_text()))
        model = from_pretrained(fx / "base", dtype=jnp.float32)
        ctx = dict(np.load(fx / "contexts.npz"))
        g = plan.groups[0].name
        with np.load(fx / "net_torch.npz") as z:
            net = torch_state_dict_to_params({k: z[k] for k in z.files}, block_size=c.block,
                                             rank=c.rank, embed_dim=c.embed,
                                             max_pos=paper.fusion.max_pos)
        alpha0 = jnp.asarray(paper.fusion.alpha_init, jnp.float32)
        params = {"nets": {g: net}, "alpha": {g: alpha0}}
        self.st = statics_from(fuse_job_from(paper)[0], plan, model.config, steps=SCHEDULE_STEPS)
        opt = self.st.optimizer
        self.frozen = {"base": model.params, "adapter": target.to_jax(jnp.float32),
                       "contexts": {g: [jax.tree.map(jnp.asarray, ctx)]}}
        self.state = {"params": params, "opt_state": opt.init(params),
                      "step": jnp.zeros((), jnp.int32)}
        with np.load(fx / "batches.npz") as z:
            self.batch = {k: jnp.asarray(z[k]) for k in z.files}
        self.weights = jnp.ones((c.accum,), jnp.float32)
        self.key = jax.random.PRNGKey(5)
        st = self.st

        t0 = time.perf_counter()
        self.step_c = fs.fuse_step.lower(self.state, self.frozen, self.batch, self.weights,
                                         self.key, st=st).compile()
        self.compile_s = time.perf_counter() - t0
        self.first_lm_loss: float | None = None
        if step_only:  # no network / LM executables and no second copy of the networks
            del net, params, ctx
            machine.release_free_heap()  # what the fuse loop does after its setup
            return

        cot = {n: jnp.ones_like(self.frozen["adapter"][n]["B"]) for n in plan.fused_modules}

        def net_loss(p: Any, frozen: Any, key: Any) -> Any:  # frozen arrays as arguments,
            factors, zs, _ = fs.run_networks(p, frozen, st)  # not compile-time constants
            new_B = factors["B"]  # b_only
            lin = sum(jnp.sum(new_B[n] * cot[n]) for n in new_B)
            return lin + average_rdm(zs, key, **st.rdm_kwargs)

        t0 = time.perf_counter()
        self.net_c = jax.jit(jax.value_and_grad(net_loss)).lower(
            params, self.frozen, self.key).compile()
        self.net_compile_s = time.perf_counter() - t0
        self.params = jax.tree.map(jnp.copy, params)  # the step donates (deletes) its state
        B = {n: self.frozen["adapter"][n]["B"] for n in plan.fused_modules}
        self.mb = jax.tree.map(lambda x: x[0], self.batch)

        def lm(b: Any, frozen: Any, mb: Any) -> Any:
            return lm_loss(frozen["base"], model.config, mb,
                           fs.patched_adapter(frozen["adapter"], b))

        t0 = time.perf_counter()
        self.lm_c = jax.jit(jax.value_and_grad(lm)).lower(B, self.frozen, self.mb).compile()
        self.lm_compile_s = time.perf_counter() - t0
        self.B = B

    def step(self) -> None:
        import jax

        self.state, m = self.step_c(self.state, self.frozen, self.batch, self.weights, self.key)
        jax.block_until_ready(self.state)
        if self.first_lm_loss is None:
            self.first_lm_loss = float(m["lm_loss"])

    def network(self) -> None:
        import jax

        jax.block_until_ready(self.net_c(self.params, self.frozen, self.key))

    def lm(self) -> None:
        import jax

        jax.block_until_ready(self.lm_c(self.B, self.frozen, self.mb))


# ----------------------------------------------------------------------------- torch side
class TorchSide:
    """The original's way: networks on every micro-batch inside a PEFT-patched forward."""

    def __init__(self, c: BenchConfig, fx: Path) -> None:
        import peft
        import torch
        import transformers
        from torch.func import functional_call

        from hfjax.testing.torch_reference import HeteroFusionTransferNet, compute_rdm_reg

        paper = paper_defaults(c)
        f, r, tr = paper.fusion, paper.rdm, paper.train
        self.torch, self.functional_call = torch, functional_call
        self.rdm = lambda z: compute_rdm_reg(z, r.mu_target, r.sigma_target, c.projections)
        self.lambda_reg = r.lambda_reg
        self.c = c
        geo = json.loads((fx / "plan.json").read_text())
        base = transformers.AutoModelForCausalLM.from_pretrained(fx / "base",
                                                                 dtype=torch.float32)
        self.model = peft.PeftModel.from_pretrained(base, str(fx / "target")).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.net = HeteroFusionTransferNet(c.rank, c.block, c.embed, c.heads, f.max_pos,
                                           f.mu_gate)
        with np.load(fx / "net_torch.npz") as z:
            self.net.load_state_dict({k: torch.from_numpy(z[k].copy()) for k in z.files})
        self.alpha = torch.nn.Parameter(torch.tensor(f.alpha_init))
        with np.load(fx / "contexts.npz") as z:
            self.ctx = {k: torch.from_numpy(z[k].copy()) for k in z.files}
        with np.load(fx / "batches.npz") as z:
            self.batch = {k: torch.from_numpy(z[k].astype(np.int64)) for k in z.files}
        self.opt = torch.optim.AdamW(list(self.net.parameters()) + [self.alpha], lr=tr.lr,
                                     betas=(tr.b1, tr.b2), eps=tr.eps,
                                     weight_decay=tr.weight_decay)
        self.sched = transformers.get_cosine_schedule_with_warmup(
            self.opt, int(tr.warmup_ratio * SCHEDULE_STEPS), SCHEDULE_STEPS)
        names = dict(self.model.named_parameters())
        self.keys, self.B0, self.d_out = [], [], []
        for m in geo:
            key = f"base_model.model.{m['name']}.lora_B.default.weight"
            assert key in names, key
            self.keys.append(key)
            self.B0.append(names[key].detach().clone())
            self.d_out.append(m["d_out"])
        self.cot = [torch.ones_like(b) for b in self.B0]
        self.first_lm_loss: float | None = None

    def _new_B(self, delta: Any) -> dict[str, Any]:
        c, out = self.c, {}
        for i, key in enumerate(self.keys):
            dB = delta[i, c.n_a:].reshape(-1, c.rank)[: self.d_out[i]]
            out[key] = self.B0[i] + self.alpha * dB
        return out

    def _lm_loss(self, new_B: dict[str, Any], i: int) -> Any:
        mb = {k: v[i] for k, v in self.batch.items()}
        return self.functional_call(self.model, new_B, args=(), kwargs=mb).loss

    def step(self) -> None:
        c, ctx = self.c, self.ctx
        lms = []
        for i in range(c.accum):
            delta, _, z_t, z_s = self.net(ctx["tgt"], ctx["tgt_s"], ctx["src"], ctx["src_s"])
            lm = self._lm_loss(self._new_B(delta), i)
            reg = self.rdm(z_t) + self.rdm(z_s)
            ((lm + self.lambda_reg * reg) / c.accum).backward()
            lms.append(float(lm.detach()))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.first_lm_loss is None:
            self.first_lm_loss = float(np.mean(lms))

    def network(self) -> None:
        ctx = self.ctx
        delta, _, z_t, z_s = self.net(ctx["tgt"], ctx["tgt_s"], ctx["src"], ctx["src_s"])
        new_B = self._new_B(delta)
        lin = sum((new_B[k] * cot).sum() for k, cot in zip(self.keys, self.cot, strict=True))
        loss = lin + self.rdm(z_t) + self.rdm(z_s)
        loss.backward()
        self.net.zero_grad(set_to_none=True)
        self.alpha.grad = None

    def lm(self) -> None:
        Bs = {k: b.clone().requires_grad_(True) for k, b in zip(self.keys, self.B0, strict=True)}
        self._lm_loss(Bs, 0).backward()


# ----------------------------------------------------------------------------- workers
def _rss_mb() -> float:
    return machine.peak_rss_mb()  # VmHWM: ru_maxrss would carry this parent's peak into the worker


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Gemm:
    """A ``2048³`` float32 GEMM of one implementation (``jnp.dot`` under jit / ``torch.mm``)."""

    N = 2048
    FLOPS = 2.0 * N ** 3

    def __init__(self, impl: str) -> None:
        if impl == "jax":
            import jax
            import jax.numpy as jnp

            a = jax.random.normal(jax.random.PRNGKey(0), (self.N, self.N), jnp.float32)
            f = jax.jit(jnp.dot)
            self._fn = lambda: f(a, a).block_until_ready()
        else:
            import torch

            a = torch.randn(self.N, self.N)
            self._fn = lambda: torch.mm(a, a)
        self._fn()

    def __call__(self) -> None:
        self._fn()


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def worker_time(c: BenchConfig, fx: Path, torch_too: bool) -> dict[str, Any]:
    """Both implementations in this process, interleaved call by call; the GEMM peak of each
    is re-measured in every round (the machine may be shared)."""
    out: dict[str, Any] = {"config": c.name, "load_before": os.getloadavg()[0]}
    jx = JaxSide(c, fx)
    out["compile_s"] = {"step": jx.compile_s, "network": jx.net_compile_s, "lm": jx.lm_compile_s}
    sides: dict[str, Any] = {"jax": jx}
    gemm = {"jax": _Gemm("jax")}
    if torch_too:
        th = TorchSide(c, fx)
        t0 = time.perf_counter()
        th.step()  # warm-up (also the first-step parity figure)
        out["torch_first_step_s"] = time.perf_counter() - t0
        th.network()
        th.lm()
        sides["torch"] = th
        gemm["torch"] = _Gemm("torch")
    jx.step()  # first run of the compiled step (parity figure)
    jx.network()
    jx.lm()
    what_all = ("gemm", "network", "lm", "step")
    times: dict[str, dict[str, list[float]]] = {k: {w: [] for w in what_all} for k in sides}
    order = list(sides)
    for rep in range(c.repeats):
        for what in what_all:
            for name in (order if rep % 2 == 0 else order[::-1]):
                fn = gemm[name] if what == "gemm" else getattr(sides[name], what)
                times[name][what].append(_timed(fn))
    out["times"] = times
    out["median"] = {k: {w: statistics.median(v) for w, v in d.items()} for k, d in times.items()}
    out["peak"] = {k: _Gemm.FLOPS / d["gemm"] for k, d in out["median"].items()}
    out["first_lm_loss"] = {k: s.first_lm_loss for k, s in sides.items()}
    out["load_after"] = os.getloadavg()[0]
    return out


def worker_rss(c: BenchConfig, fx: Path, impl: str, steps: int = 2) -> dict[str, Any]:
    """One implementation alone: peak RSS over setup, compile and ``steps`` steps."""
    base = _current_rss_mb()
    # The step alone on both sides (the torch side keeps nothing beyond its step either).
    side = JaxSide(c, fx, step_only=True) if impl == "jax" else TorchSide(c, fx)
    for _ in range(steps):
        side.step()
    return {"impl": impl, "peak_rss_mb": _rss_mb(), "rss_after_imports_mb": base}


LLAMA_3B_LIKE = dict(model_type="llama", vocab_size=32000, hidden_size=2048,
                     intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=16, head_dim=128, bos_token_id=1, eos_token_id=2,
                     tie_word_embeddings=False)


def write_checkpoint(path: Path, max_shard_bytes: int = 1 << 30) -> int:
    """A llama-shaped bf16 checkpoint (≈2.4 GB, 1.2 B params) through bridge.save_checkpoint;
    returns the bytes of tensor data written."""
    import ml_dtypes

    from bridge import save_checkpoint
    from hfjax.models.config import ModelConfig
    from hfjax.models.key_tables import hf_shape, key_table

    cfg = ModelConfig(**LLAMA_3B_LIKE)
    rng = np.random.default_rng(0)
    tile = (0.02 * rng.standard_normal(1 << 20)).astype(ml_dtypes.bfloat16)
    total = 0

    def tensors():
        nonlocal total
        for spec in key_table(cfg):
            shape = hf_shape(spec, cfg)
            n = int(np.prod(shape))
            x = (np.ones(n, ml_dtypes.bfloat16) if spec.axes == ("norm",)
                 else np.resize(tile, n)).reshape(shape)
            total += x.nbytes
            yield spec.hf, x

    save_checkpoint(path, tensors(), cfg.to_hf_dict() | {"dtype": "bfloat16"},
                    max_shard_bytes=max_shard_bytes)
    return total


def worker_load(path: Path) -> dict[str, Any]:
    """``from_pretrained`` of ``path``; the baseline RSS is taken after everything loading
    imports (jax, hfjax, and transformers, which ``ModelConfig.from_hf`` pulls in)."""
    import jax
    import jax.numpy as jnp

    import hfjax
    from hfjax.models.config import ModelConfig

    jnp.zeros(1).block_until_ready()  # start the CPU client
    import_only = _current_rss_mb()
    ModelConfig.from_hf(path)  # reads config.json only; imports transformers
    base = _current_rss_mb()
    t0 = time.perf_counter()
    model = hfjax.from_pretrained(path)
    jax.block_until_ready(model.params)
    dt = time.perf_counter() - t0
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
    return {"load_s": dt, "peak_rss_mb": _rss_mb(), "rss_before_load_mb": base,
            "rss_jax_hfjax_mb": import_only, "params_bytes": n_bytes}


def worker_adapter(tmp: Path) -> dict[str, Any]:
    """An 8B-shaped r=8 all-linear adapter: load -> save -> load, timed and compared."""
    from bridge import load_adapter, save_adapter
    from hfjax.memory import LLAMA31_8B
    from hfjax.models.config import ModelConfig
    from hfjax.testing.models import random_lora

    ad = random_lora(ModelConfig(**LLAMA31_8B), r=8, alpha=16, seed=0)
    first = save_adapter(ad, tmp / "a0")
    t0 = time.perf_counter()
    a = load_adapter(first)
    t1 = time.perf_counter()
    second = save_adapter(a, tmp / "a1")
    t2 = time.perf_counter()
    b = load_adapter(second)
    t3 = time.perf_counter()
    same = all(np.array_equal(a.modules[n].A, b.modules[n].A)
               and np.array_equal(a.modules[n].B, b.modules[n].B) for n in a.modules)
    size = sum(f.stat().st_size for f in second.iterdir())
    return {"modules": len(a.modules), "bytes": size, "load_s": t1 - t0, "save_s": t2 - t1,
            "reload_s": t3 - t2, "bit_exact": same}


# ----------------------------------------------------------------------------- orchestration
#: The folder that holds the ``hfjax`` package in use (site-packages or a checkout).
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
#: What a worker process runs: `run_worker` on its arguments, JSON on the last stdout line.
_WORKER_MAIN = "import sys; from hfjax.bench import run_worker; sys.exit(run_worker(sys.argv[1:]))"

def _env(allocator: str) -> dict[str, str]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu",
           # torch's OpenMP threads otherwise busy-wait at every barrier, which is slow on a
           # shared CPU (docs/performance.md §1), so give it its best case.
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           # the workers import this very hfjax (a checkout or an installed package)
           "PYTHONPATH": os.pathsep.join([_PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")])}
    if allocator == "glibc-tuned":
        env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40),
                   MALLOC_TOP_PAD_=str(64 << 20))
    return env


def _spawn(args: Sequence[str], allocator: str, timeout: float = 3600) -> dict[str, Any]:
    cmd = [sys.executable, "-c", _WORKER_MAIN, *args]
    proc = subprocess.run(cmd, env=_env(allocator), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _torch_available() -> bool:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:10.1f}"


def report_config(c: BenchConfig, t: dict[str, Any], rss: dict[str, Any]) -> list[str]:
    med, peak = t["median"], t["peak"]
    jx, th = med["jax"], med.get("torch")
    f_net, f_lm = network_flops(c), lm_flops(c)
    flops = {"step": (f_net + c.accum * f_lm, c.accum * (f_net + f_lm)),
             "network": (f_net, f_net), "lm": (f_lm, f_lm)}
    tokens = c.accum * c.seq
    lines = [f"== {c.name}: {c.describe()}",
             f"   f32 GEMM peak, 2048^3, median of the rounds: jax.jit "
             f"{peak['jax'] / 1e9:.0f} GFLOP/s" + (f", torch.mm {peak['torch'] / 1e9:.0f} "
                                                  f"GFLOP/s" if th else "")
             + f"; load average {t['load_before']:.1f} -> {t['load_after']:.1f} on "
               f"{os.cpu_count()} CPUs",
             f"   JAX compile: step {t['compile_s']['step']:.1f} s, network "
             f"{t['compile_s']['network']:.1f} s, lm {t['compile_s']['lm']:.1f} s"
             + (f"; torch first step {t['torch_first_step_s']:.2f} s" if th else ""),
             f"   {'':26}{'JAX ms':>9}" + (f"{'torch ms':>10}{'torch/JAX':>10}" if th else "")
             + "   GFLOP/s (share of that side's GEMM peak)"]
    labels = {"step": "step (1 update, accum 8)", "network": "network fwd+bwd +RDM",
              "lm": "LM step (1 micro-batch)"}
    for k in ("step", "network", "lm"):
        fj, ft = flops[k]
        line = f"   {labels[k]:<26}{jx[k] * 1e3:9.1f}"
        if th:
            line += f"{th[k] * 1e3:10.1f}{th[k] / jx[k]:9.2f}x"
        line += f"   JAX {fj / jx[k] / 1e9:5.1f} ({100 * fj / jx[k] / peak['jax']:3.0f}%)"
        if th:
            line += f", torch {ft / th[k] / 1e9:5.1f} ({100 * ft / th[k] / peak['torch']:3.0f}%)"
        lines.append(line)
    lines.append(f"   tokens/s (LM tokens per update / step time): JAX {tokens / jx['step']:.0f}"
                 + (f", torch {tokens / th['step']:.0f}" if th else ""))
    fl = t["first_lm_loss"]
    if th:
        lines.append(f"   first-update LM loss: JAX {fl['jax']:.6f}, torch {fl['torch']:.6f} "
                     f"(|diff| {abs(fl['jax'] - fl['torch']):.1e}; same weights and batches)")
    if rss:
        lines.append("   peak RSS, each alone in its own process (setup + compile + 2 steps): "
                     + ", ".join(f"{k} {v['peak_rss_mb']:.0f} MB" for k, v in rss.items()))
    return lines


def run_bench(names: Sequence[str] = ("small", "mid", "paper"), *, torch_side: bool = True,
              bridge: bool = True, repeats: int | None = None,
              allocator: str = "glibc-tuned", rss: bool = True,
              log: Callable[[str], None] = print) -> list[str]:
    """Run the configurations ``names`` (then the bridge bench), reporting through ``log``.

    ``torch_side``: also time the original's PyTorch way (skipped when torch/peft are not
    installed). ``repeats``: interleaved repetitions (default: each configuration's own).
    ``allocator``: ``"glibc-tuned"`` (no mmap/trim for both sides) or ``"default"``.
    ``rss``: also measure each side's peak RSS alone. Returns the targets' verdict lines.
    Raises `BenchError` for an unknown configuration name.
    """
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        raise BenchError(f"hfjax bench: unknown configuration(s) {', '.join(bad)}; known: "
                         f"{', '.join(CONFIGS)}")
    if allocator not in ("glibc-tuned", "default"):
        raise BenchError(f"hfjax bench: unknown allocator {allocator!r}")
    torch_too = torch_side and _torch_available()
    log(f"hfjax bench: {machine.describe()}; allocator: {allocator} glibc malloc "
        "for both sides" + ("" if torch_too else "; torch side skipped"))
    met: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hfjax_bench_") as tmp:
        for name in names:
            c = CONFIGS[name]
            if repeats is not None:
                c = dataclasses.replace(c, repeats=repeats)
            fx = Path(tmp) / name
            prepare_fixture(c, fx)
            t = _spawn(["time", name, str(fx), str(int(torch_too)), str(c.repeats)], allocator)
            peaks = {}
            if rss:
                for impl in ("jax", "torch") if torch_too else ("jax",):
                    peaks[impl] = _spawn(["rss", name, str(fx), impl], allocator)
            log("\n".join(report_config(c, t, peaks)))
            med = t["median"]
            if torch_too and name == "mid":
                r = med["torch"]["step"] / med["jax"]["step"]
                met.append(f"JAX step >= 2x faster than PyTorch at mid size: "
                           f"{'MET' if r >= 2 else 'NOT met'} ({r:.2f}x)")
            if name == "paper":
                share = network_flops(c) / med["jax"]["network"] / t["peak"]["jax"]
                met.append(f"transfer network at paper block size > 50% of the measured "
                           f"matmul peak: {'MET' if share > 0.5 else 'NOT met'} "
                           f"({100 * share:.0f}% of jax.jit's 2048^3 f32 GEMM)")
            shutil.rmtree(fx, ignore_errors=True)
        if bridge:
            log("\n".join(bench_bridge(Path(tmp), allocator, met)))
    if met:
        log("\ntargets (reported, not asserted):\n" + "\n".join(f"  - {m}" for m in met))
    return met


def bench_bridge(tmp: Path, allocator: str, met: list[str]) -> list[str]:
    ck = tmp / "ckpt"
    t0 = time.perf_counter()
    n = write_checkpoint(ck)
    wt = time.perf_counter() - t0
    files = sorted(ck.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    r = _spawn(["load", str(ck)], "default")  # the tuned allocator keeps freed memory
    shutil.rmtree(ck, ignore_errors=True)
    ratio = r["peak_rss_mb"] * 2**20 / size
    over = (r["peak_rss_mb"] - r["rss_before_load_mb"]) * 2**20 / size
    lines = [f"== bridge: llama-shaped bf16 checkpoint, {n / 1e9:.2f} GB of tensors in "
             f"{len(files)} shards (written in {wt:.1f} s, {n / wt / 1e9:.2f} GB/s)",
             f"   from_pretrained (fresh process, default glibc malloc): {r['load_s']:.1f} s "
             f"({size / r['load_s'] / 1e9:.2f} GB/s), peak RSS {r['peak_rss_mb']:.0f} MB = "
             f"{ratio:.2f}x the checkpoint; {over:.2f}x counting only what loading added to "
             f"the {r['rss_before_load_mb']:.0f} MB of the imports (jax + hfjax "
             f"{r['rss_jax_hfjax_mb']:.0f} MB, then transformers via ModelConfig.from_hf)"]
    met.append(f"checkpoint load peak RSS <= 1.3x its size: whole process "
               f"{'MET' if ratio <= 1.3 else 'NOT met'} ({ratio:.2f}x); added by loading "
               f"{'MET' if over <= 1.3 else 'NOT met'} ({over:.2f}x)")
    a = _spawn(["adapter", str(tmp)], allocator)
    lines.append(f"== bridge: 8B-shaped r=8 all-linear adapter ({a['modules']} modules, "
                 f"{a['bytes'] / 1e6:.0f} MB): load {a['load_s'] * 1e3:.0f} ms, save "
                 f"{a['save_s'] * 1e3:.0f} ms, load again {a['reload_s'] * 1e3:.0f} ms, "
                 f"bit-exact: {a['bit_exact']}")
    return lines


def run_worker(argv: Sequence[str]) -> int:
    """A worker process's body: ``KIND ARGS...``; prints its result as one JSON line."""
    kind = argv[0]
    if kind == "time":
        name, fx, torch_too, repeats = argv[1], Path(argv[2]), argv[3] == "1", int(argv[4])
        c = dataclasses.replace(CONFIGS[name], repeats=repeats)
        out = worker_time(c, fx, torch_too)
    elif kind == "rss":
        out = worker_rss(CONFIGS[argv[1]], Path(argv[2]), argv[3])
    elif kind == "load":
        out = worker_load(Path(argv[1]))
    elif kind == "adapter":
        out = worker_adapter(Path(argv[1]))
    else:
        raise SystemExit(f"unknown worker {kind!r}")
    print(json.dumps(out))
    return 0
