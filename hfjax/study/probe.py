"""The study's probe: does a finished fuse run's network read its sources at all?

For the networks a fuse run saved (``<run>/transfer_nets``) and its learned α's, perturb the
source side of the block contexts (zero, noise, swap between experts, roll across layers;
`hfjax.fusion.probe`) and measure how much ΔB and the fused adapter's **test** NLL move::

    rows = probe_fuse_run(cfg, run_dir, alpha, {"movie": "data/movie_test.json"})
    print(probe_markdown(rows))

The NLL is the mean token cross-entropy of the answers of every test record (the same
template and cutoff as the replay), batched into the replay's length buckets.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["probe_fuse_run"]


def probe_fuse_run(cfg: Any, run_dir: Path, alpha: Mapping[str, float],
                   test_files: Mapping[str, str], *, batch_size: int = 8,
                   seed: int = 0) -> list[dict[str, Any]]:
    """`hfjax.fusion.probe.probe_sources` rows for the fuse run in ``run_dir``.

    ``cfg`` is the run's fuse config (its contexts are rebuilt from it, control included),
    ``alpha`` its report's learned α per group, ``test_files`` task -> Alpaca test file.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hfjax.fusion import init_fusion_params, probe_sources
    from hfjax.loading import from_pretrained
    from hfjax.training.data import encode_dataset, iterate_batches, length_buckets, load_alpaca
    from hfjax.training.fuse_loop import prepare, reuse_networks, statics_from
    from hfjax.training.fuse_step import patched_adapter
    from hfjax.training.objective import lm_loss
    from hfjax.training.windows import pad_id_of

    inp = prepare(cfg)
    st = statics_from(cfg, inp.plan, inp.model_cfg)
    params = init_fusion_params(inp.plan, inp.contexts, key=jax.random.PRNGKey(0),
                                **st.net_kwargs)
    params = reuse_networks(params, run_dir)
    params["alpha"] = {g: jnp.float32(a) for g, a in alpha.items()}
    base = from_pretrained(cfg.target.model_path, dtype="float32").params
    adapter = inp.target.to_jax(jnp.float32)
    examples = [ex for task, file in test_files.items()
                for ex in encode_dataset(load_alpaca(file), inp.tokenizer, inp.template,
                                         int(cfg.data.cutoff_len), name=task)]
    batches = list(iterate_batches(examples, batch_size=batch_size, epoch=0, seed=seed,
                                   buckets=length_buckets(int(cfg.data.cutoff_len),
                                                          int(cfg.data.min_bucket)),
                                   pad_id=pad_id_of(inp.tokenizer)))
    nll = jax.jit(lambda b, B: lm_loss(base, inp.model_cfg, b, patched_adapter(adapter, B)))

    def test_nll(new_B: Mapping[str, np.ndarray]) -> float:
        B = {k: jnp.asarray(v) for k, v in new_B.items()}
        return float(np.mean([float(nll(b, B)) for b in batches]))

    return probe_sources(params, inp.contexts, inp.plan, net_kwargs=st.net_kwargs,
                         sources=inp.sources, seed=seed, nll_fn=test_nll,
                         target_B={n: inp.target.modules[n].B for n in inp.plan.fused_modules})
