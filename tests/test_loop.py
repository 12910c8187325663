"""The shared training loop: resume, identity, restart, non-finite stops, log_every, in flight."""

from __future__ import annotations

import itertools
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hfjax.atomic import write_json_atomic
from hfjax.errors import RunDiverged, UserError
from hfjax.testing.zoo import SMALL
from hfjax.training import checkpointing
from hfjax.training.loop import LoopSettings, ResumeRefused, all_finite, run_loop

T = 8
IDENTITY = {"task_name": "toy", "steps": T, "seed": 0}


@partial(jax.jit, donate_argnums=(0,))
def toy_step(state, x):
    w = state["params"]["w"]
    loss, g = jax.value_and_grad(lambda w: jnp.mean((w - x) ** 2))(w)
    new = {"params": {"w": w - 0.3 * g}, "step": state["step"] + 1}
    return new, {"loss": loss, "grad_norm": jnp.linalg.norm(g)}


def fresh():
    return {"params": {"w": jnp.arange(4, dtype=jnp.float32)}, "step": jnp.zeros((), jnp.int32)}


def toy_batches(start: int):
    return (np.full(4, np.sin(i), np.float32) for i in range(start, T))


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def saved_steps(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*"))}


def settings(**kw) -> LoopSettings:
    return LoopSettings(**{"total_steps": T, "keep_checkpoints": 10, **kw})


class Crash(Exception):
    pass


def crashing(at_call: int):
    calls = {"n": 0}

    def step(state, x):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise Crash
        return toy_step(state, x)
    return step


def test_resume_trims_metrics_and_matches_a_full_run(tmp_path):
    full = run_loop(toy_step, fresh(), toy_batches, settings(), tmp_path / "full", IDENTITY,
                    progress=False)
    out = tmp_path / "run"
    with pytest.raises(Crash):  # rows 1..4 written, last checkpoint at 3
        run_loop(crashing(6), fresh(), toy_batches, settings(checkpoint_every=3), out,
                 IDENTITY, progress=False)
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4] and saved_steps(out) == [3]
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a row torn by the crash
    res = run_loop(toy_step, fresh(), toy_batches, settings(checkpoint_every=3), out,
                   IDENTITY, progress=False)
    assert res.start_step == 3 and res.finished
    assert [r["step"] for r in rows(out)] == list(range(1, T + 1))  # each step exactly once
    assert [r["loss"] for r in rows(out)] == [r["loss"] for r in rows(tmp_path / "full")]
    np.testing.assert_array_equal(res.state["params"]["w"], full.state["params"]["w"])


def test_identity_mismatch_refused_before_restore(tmp_path):
    run_loop(toy_step, fresh(), toy_batches, settings(stop_after=3), tmp_path, IDENTITY,
             progress=False)
    before = snapshot(tmp_path / "checkpoints")
    metrics_before = (tmp_path / "metrics.jsonl").read_text()
    # A state of another shape: restoring it first would fail with another error.
    other = {"params": {"w": jnp.zeros(7, jnp.float32)}, "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(ResumeRefused, match=r"checkpoint was made for seed=0, this run gives "
                                            r"seed=1; start over with --restart") as e:
        run_loop(toy_step, other, toy_batches, settings(), tmp_path, {**IDENTITY, "seed": 1},
                 progress=False)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    assert str(tmp_path / "checkpoints") in str(e.value)
    assert snapshot(tmp_path / "checkpoints") == before
    assert (tmp_path / "metrics.jsonl").read_text() == metrics_before


def test_restart_starts_over(tmp_path):
    run_loop(toy_step, fresh(), toy_batches, settings(stop_after=3), tmp_path, IDENTITY,
             progress=False)
    new_id = {**IDENTITY, "seed": 1}
    res = run_loop(toy_step, fresh(), toy_batches, settings(restart=True), tmp_path, new_id,
                   progress=False)
    assert res.start_step == 0 and res.finished
    assert [r["step"] for r in rows(tmp_path)] == list(range(1, T + 1))
    assert saved_steps(tmp_path) == [T]
    assert checkpointing.Checkpointer(tmp_path / "checkpoints").read_meta()["seed"] == 1


def test_non_finite_loss_raises_run_diverged(tmp_path):
    calls = {"n": 0}

    def step(state, x):
        state, m = toy_step(state, x)
        calls["n"] += 1
        return state, ({**m, "loss": jnp.float32(jnp.nan)} if calls["n"] == 3 else m)

    with pytest.raises(RunDiverged, match=r"non-finite loss nan at step 3 \(grad_norm .*\); "
                                          r"stopped, the last good checkpoint \(step 2\)"):
        run_loop(step, fresh(), toy_batches, settings(checkpoint_every=1), tmp_path, IDENTITY,
                 progress=False)
    assert saved_steps(tmp_path) == [1, 2]
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_parameters_never_checkpointed(tmp_path, bad):
    calls = {"n": 0}

    def step(state, x):  # a finite loss, then an update that explodes
        state, m = toy_step(state, x)
        calls["n"] += 1
        if calls["n"] == 3:
            state = {**state, "params": {"w": state["params"]["w"] * bad}}
        return state, m

    with pytest.raises(RunDiverged, match=r"non-finite parameters after step 3 .*without "
                                          r"saving them, the last good checkpoint \(step 2\)"):
        run_loop(step, fresh(), toy_batches, settings(checkpoint_every=1), tmp_path, IDENTITY,
                 progress=False)
    assert saved_steps(tmp_path) == [1, 2]
    restored, _ = checkpointing.Checkpointer(tmp_path / "checkpoints").restore(fresh())
    assert all_finite(restored) and not all_finite({"w": jnp.asarray([1.0, bad])})


def test_log_every_honoured(tmp_path):
    res = run_loop(toy_step, fresh(), toy_batches, settings(log_every=3), tmp_path, IDENTITY,
                   progress=False)
    got = rows(tmp_path)
    assert [r["step"] for r in got] == [3, 6, 8]
    for r, window in zip(got, (res.losses[0:3], res.losses[3:6], res.losses[6:8]), strict=True):
        assert r["loss"] == pytest.approx(float(np.mean(window)), rel=1e-6)
    assert len(res.losses) == T and res.history == got


def test_one_step_in_flight_equals_syncing_every_step(tmp_path):
    a = run_loop(toy_step, fresh(), toy_batches, settings(checkpoint_every=3), tmp_path / "a",
                 IDENTITY, progress=False)
    b = run_loop(toy_step, fresh(), toy_batches, settings(checkpoint_every=3,
                                                          sync_every_step=True),
                 tmp_path / "b", IDENTITY, progress=False)
    assert a.losses == b.losses
    np.testing.assert_array_equal(a.state["params"]["w"], b.state["params"]["w"])
    strip = [{k: v for k, v in r.items() if k != "time"} for r in rows(tmp_path / "a")]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in rows(tmp_path / "b")]
    assert saved_steps(tmp_path / "a") == saved_steps(tmp_path / "b") == [3, 6, 8]


def test_no_out_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run_loop(toy_step, fresh(), toy_batches, settings(), None, progress=False)
    assert res.finished and len(res.losses) == T and res.checkpoint_dir is None
    assert not any(tmp_path.iterdir())


def test_atomic_json_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_pretrain_runs_through_the_loop(tmp_path):
    import optax

    from hfjax.demo import pretrain as pt
    from hfjax.loading import init_params
    from hfjax.testing import tasks
    from hfjax.testing.models import model_config
    from hfjax.testing.tokenizer import train_tokenizer

    corpus = tasks.pretraining_corpus(60, seed=0)
    tok = train_tokenizer(corpus, "llama", 320, tmp_path / "tok")
    cfg = model_config(SMALL["llama"], tok)
    pcfg = pt.PretrainConfig(steps=4, batch_size=2, seq_len=16, lr=1e-2)
    tokens = pt.pack_corpus(corpus, tok, pcfg.seq_len)
    params, losses = pt.pretrain(cfg, init_params(cfg, jax.random.PRNGKey(0)), tokens, pcfg,
                                 progress=False)
    # The same steps by hand, syncing every step.
    opt = optax.adamw(pt.wsd_schedule(pcfg.lr, pcfg.steps, pcfg.warmup_ratio,
                                      pcfg.decay_ratio), weight_decay=pcfg.weight_decay)
    p = init_params(cfg, jax.random.PRNGKey(0))
    o = opt.init(p)
    want = []
    for rows_ in itertools.islice(pt._batches(tokens.shape[0], 2, pcfg.seed), pcfg.steps):
        p, o, loss = pt._step(p, o, jnp.asarray(tokens[rows_]), cfg=cfg, optimizer=opt)
        want.append(float(loss))
    assert losses == want and all(np.isfinite(losses))
    np.testing.assert_array_equal(jax.tree.leaves(params)[0], jax.tree.leaves(p)[0])
