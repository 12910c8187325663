"""One training loop: resume, one step in flight, finite checks, metrics, checkpoints.

Fuse, train-lora and the demo's pretraining plug in a step, their batches and an identity::

    def step_fn(state, window):                       # jitted inside; may donate ``state``
        return fuse_step(state, frozen, window.batch, window.weights, key, st=st)

    res = run_loop(step_fn, state, lambda start: windows_from(start), LoopSettings(
                       total_steps=40, log_every=5, checkpoint_every=10),
                   out_dir=run_dir, identity={"task_name": "t", "steps": 40, "seed": 0})
    res.state, res.step, res.finished, res.history     # rows written by this call

Under ``out_dir`` the loop owns ``checkpoints/`` (orbax, the identity as metadata) and
``metrics.jsonl`` (one row per ``log_every`` steps, the last step and a stop; ``loss`` is
the mean over the steps since the previous row).

- **Resume.** With a checkpoint in ``out_dir``, its metadata is compared with ``identity``
  *before* anything is restored: a difference raises `ResumeRefused` naming the first
  differing keys (old and new value); ``restart=True`` (CLI ``--restart``) deletes the old
  checkpoints and metrics and starts over. Then the state is restored, ``metrics.jsonl`` is
  cut back to the restored step (every step appears once after a resume), and
  ``batches(start)`` must yield the batches of steps ``start+1, start+2, ...``.
- **One step in flight.** Step ``t+1`` is dispatched before step ``t``'s loss is read, so
  the host prepares the next batch while the device computes (jax async dispatch). The
  results equal syncing every step (``sync_every_step=True``).
- **Non-finite.** A non-finite loss raises `hfjax.errors.RunDiverged`. Before a checkpoint
  is written the updated trained tree goes through a jitted all-finite reduction; if it
  fails nothing is written and `RunDiverged` names the last checkpoint that is good (a
  step's loss is computed before its update, so a finite loss does not prove the update).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hfjax import distributed as dist
from hfjax.atomic import write_text_atomic
from hfjax.config import ConfigError
from hfjax.errors import RunDiverged
from hfjax.training import checkpointing

__all__ = ["LoopResult", "LoopSettings", "ResumeRefused", "all_finite", "run_loop",
           "trim_metrics"]

CHECKPOINT_SUBDIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"

StepFn = Callable[[Any, Any], tuple[Any, Mapping[str, Any]]]


class ResumeRefused(ConfigError):
    """The checkpoint in the output directory was made by another run (or cannot be read)."""


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How long to train and how often to log and checkpoint."""

    total_steps: int  # optimizer steps of the whole run (a resumed run counts from 0 too)
    log_every: int = 1  # a metrics row every N steps (and at the last step and at a stop)
    checkpoint_every: int = 0  # a checkpoint every N steps; 0: only at the end or a stop
    keep_checkpoints: int = 2  # checkpoints kept on disk (the newest ones)
    stop_after: int | None = None  # stop after this many steps in this call (checkpointed)
    restart: bool = False  # delete out_dir's checkpoints and metrics, start from step 0
    sync_every_step: bool = False  # read each loss before the next dispatch (same results)
    desc: str = "train"  # the progress bar's label

    def __post_init__(self) -> None:
        if self.total_steps < 0:  # 0: nothing to train (e.g. fewer micro-batches than accum)
            raise ValueError(f"LoopSettings.total_steps={self.total_steps}: must be >= 0")
        for name in ("log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoopSettings.{name}={getattr(self, name)}: must be >= 1")
        if self.checkpoint_every < 0:
            raise ValueError(f"LoopSettings.checkpoint_every={self.checkpoint_every}: "
                             "must be >= 0")


@dataclasses.dataclass
class LoopResult:
    """What one `run_loop` call did."""

    state: Any  # the state after the last step of this call
    start_step: int  # the step this call resumed from (0 for a fresh run)
    step: int  # the step reached
    finished: bool  # step == total_steps (False after stop_after or a short stream)
    history: list[dict[str, Any]]  # the metrics rows this call wrote
    losses: list[float]  # every step's loss, this call
    tokens: int  # tokens counted by tokens_of over this call's batches
    train_seconds: float  # wall time of the loop, compilation included
    first_step_seconds: float | None  # dispatch to the first loss (includes the compile)
    seconds_per_step: float | None  # median time between later steps' losses
    checkpoint_dir: Path | None  # where the checkpoints are (None without out_dir)

    def timings(self) -> dict[str, Any]:
        """The run's figures for a report."""
        return {"resumed_from_step": self.start_step,
                "steps_this_call": self.step - self.start_step,
                "train_seconds": round(self.train_seconds, 3),
                "first_step_seconds": (None if self.first_step_seconds is None
                                       else round(self.first_step_seconds, 4)),
                "seconds_per_step": (None if self.seconds_per_step is None
                                     else round(self.seconds_per_step, 5)),
                "tokens_this_call": self.tokens,
                "tokens_per_second": round(self.tokens / max(self.train_seconds, 1e-9), 2)}


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def all_finite(tree: Any) -> bool:
    """Whether every floating leaf of ``tree`` is finite (one jitted reduction)."""
    return bool(_all_finite(tree))


def default_trained(state: Any) -> Any:
    """The part of a state that is checked for finiteness: ``state["params"]`` if any."""
    return state["params"] if isinstance(state, Mapping) and "params" in state else state


def default_row(step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics row from a step's host metrics: every scalar as a float (mappings kept)."""
    def conv(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        a = np.asarray(v)
        return float(a) if a.ndim == 0 else None

    row = {str(k): conv(v) for k, v in metrics.items()}
    return {k: v for k, v in row.items() if v is not None}


def trim_metrics(path: Path, keep_through: int) -> None:
    """Drop ``metrics.jsonl`` rows past step ``keep_through`` and any torn line (the file
    goes at 0)."""
    if not path.exists():
        return
    if keep_through == 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if isinstance(row, dict) and row.get("step", 0) <= keep_through:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _json_normal(identity: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(identity), default=str))


def _check_identity(ckpt: checkpointing.Checkpointer, step: int,
                    identity: dict[str, Any]) -> None:
    how = "start over with --restart (restart=True) or use another output_dir"
    try:
        saved = ckpt.read_meta(step)
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds on a damaged checkpoint
        raise ResumeRefused(f"{ckpt.directory}: cannot read checkpoint {step}'s metadata "
                            f"({type(e).__name__}); {how}") from None
    absent = "(absent)"
    diff = [k for k in identity if saved.get(k, absent) != identity[k]][:3]
    if diff:
        old = ", ".join(f"{k}={saved.get(k, absent)!r}" if k in saved else f"{k}={absent}"
                        for k in diff)
        new = ", ".join(f"{k}={identity[k]!r}" for k in diff)
        raise ResumeRefused(f"{ckpt.directory}: checkpoint was made for {old}, this run "
                            f"gives {new}; {how}")


def _progress(total: int, initial: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step",
                file=sys.stderr, dynamic_ncols=True)


def _postfix(row: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in row.items():
        if k in ("step", "time"):
            continue
        if isinstance(v, float):
            out[k] = f"{v:.4g}"
        elif isinstance(v, Mapping):
            out[k] = ",".join(f"{x:.3f}" for x in v.values() if isinstance(x, float))
    return out


def run_loop(step_fn: StepFn, state: Any, batches: Callable[[int], Iterable[Any]],
             settings: LoopSettings, out_dir: str | Path | None,
             identity: Mapping[str, Any] | None = None, *,
             on_metrics: Callable[[int, Mapping[str, Any]], dict[str, Any]] = default_row,
             tokens_of: Callable[[Any], int] | None = None,
             trained: Callable[[Any], Any] = default_trained,
             progress: bool = True) -> LoopResult:
    """Train ``state`` with ``step_fn`` up to ``settings.total_steps``; see the module doc.

    Args:
        step_fn: ``(state, batch) -> (state, metrics)``; ``metrics["loss"]`` a scalar.
            It may donate ``state`` (checkpoints are taken before the next dispatch).
        state: A fresh state; on resume it is the restore target (structure, shardings).
        batches: ``start -> iterable`` of the batches of steps ``start+1, ...``.
        settings: Length, logging, checkpoint cadence, stop, restart.
        out_dir: Where ``checkpoints/`` and ``metrics.jsonl`` live; ``None``: neither
            (no resume, nothing written).
        identity: JSON-able facts a checkpoint must share to be resumed (saved with it).
        on_metrics: ``(step, host metrics) -> row fields`` (``loss`` is then replaced by the
            mean since the last row, ``step`` and ``time`` are added).
        tokens_of: Tokens in a batch (default: its ``tokens`` attribute, else 0).
        trained: The part of the state checked for finiteness before a checkpoint.
        progress: Show a tqdm bar on stderr.

    Raises:
        ResumeRefused: the checkpoint in ``out_dir`` belongs to another run (a `UserError`).
        RunDiverged: a non-finite loss, or non-finite parameters before a checkpoint.
    """
    s = settings
    ident = _json_normal(identity or {})
    count = tokens_of or (lambda b: int(getattr(b, "tokens", 0)))
    ckpt: checkpointing.Checkpointer | None = None
    metrics_file: Path | None = None
    start = 0
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = out_dir / METRICS_FILE
        if s.restart and dist.is_primary():
            shutil.rmtree(out_dir / CHECKPOINT_SUBDIR, ignore_errors=True)
            metrics_file.unlink(missing_ok=True)
        dist.barrier("loop-restart")
        ckpt = checkpointing.Checkpointer(out_dir / CHECKPOINT_SUBDIR,
                                          keep=s.keep_checkpoints)
        latest = ckpt.latest_step()
        if latest is not None:
            _check_identity(ckpt, latest, ident)
            try:
                state, _ = ckpt.restore(state, latest)
            except Exception as e:  # noqa: BLE001 - orbax raises many kinds on a mismatch
                raise ResumeRefused(
                    f"{ckpt.directory}: cannot restore step {latest} into this run's state "
                    f"({type(e).__name__}); start over with --restart (restart=True) or use "
                    "another output_dir") from e
            start = latest
        if dist.is_primary():  # multi-host: one writer per shared file (process 0)
            trim_metrics(metrics_file, start)
        else:
            metrics_file = None

    last_good = start if ckpt is not None and ckpt.latest_step() is not None else None
    where = f" in {ckpt.directory}" if ckpt is not None else ""

    def kept() -> str:
        return (f"the last good checkpoint (step {last_good}) is kept{where}"
                if last_good is not None else "no checkpoint was saved")

    history: list[dict[str, Any]] = []
    losses: list[float] = []
    window: list[float] = []  # losses since the last row
    read_times: list[float] = []
    tokens = 0
    t0 = time.time()

    def finish(pending: tuple[int, Mapping[str, Any], int], mf: Any,
               force_row: bool = False) -> None:
        nonlocal tokens
        n, m, n_tokens = pending
        host = jax.device_get(m)
        loss = float(np.asarray(host["loss"]))
        read_times.append(time.time())
        row = {"step": n, **on_metrics(n, host)}
        if not math.isfinite(loss):
            details = ", ".join(f"{k} {v}" for k, v in row.items()
                                if k not in ("step", "loss") and isinstance(v, float))
            raise RunDiverged(f"non-finite loss {loss} at step {n}"
                              + (f" ({details})" if details else "")
                              + f"; stopped, {kept()}")
        losses.append(loss)
        window.append(loss)
        tokens += n_tokens
        if force_row or n % s.log_every == 0 or n == s.total_steps:
            row["loss"] = float(np.mean(window))
            row["time"] = round(time.time() - t0, 3)
            window.clear()
            history.append(row)
            if mf is not None:
                mf.write(json.dumps(row) + "\n")
                mf.flush()
        bar.update(1)
        bar.set_postfix(_postfix(row))

    def save(n: int) -> None:
        nonlocal last_good
        if not all_finite(trained(state)):
            raise RunDiverged(f"non-finite parameters after step {n} (its loss was finite: "
                              f"the update diverged); stopped without saving them, {kept()}")
        if ckpt is not None:
            ckpt.save(n, state, ident)
            last_good = n

    step = start
    bar = _progress(s.total_steps, start, progress and dist.is_primary(), s.desc)
    pending: tuple[int, Mapping[str, Any], int] | None = None
    opener = metrics_file.open("a") if metrics_file is not None else nullcontext(None)
    try:
        with opener as mf:
            it = iter(batches(start))
            while step < s.total_steps:
                try:
                    batch = next(it)
                except StopIteration:
                    break
                if not read_times:
                    read_times.append(time.time())
                state, m = step_fn(state, batch)  # dispatched: runs while we read the last
                step += 1
                if pending is not None:
                    finish(pending, mf)
                pending = (step, m, count(batch))
                stop = s.stop_after is not None and step - start >= s.stop_after
                boundary = (stop or step == s.total_steps
                            or (s.checkpoint_every > 0 and step % s.checkpoint_every == 0))
                if s.sync_every_step or boundary:
                    finish(pending, mf, force_row=stop)
                    pending = None
                if boundary and ckpt is not None:
                    save(step)
                if stop:
                    break
            if pending is not None:
                finish(pending, mf, force_row=True)
            if step > start and last_good != step:
                save(step)
    finally:
        bar.close()
        if ckpt is not None:
            try:
                ckpt.wait()
            finally:
                ckpt.close()
    train_seconds = time.time() - t0
    gaps = np.diff(read_times[1:]) if len(read_times) > 2 else np.array([])
    return LoopResult(
        state=state, start_step=start, step=step, finished=step >= s.total_steps,
        history=history, losses=losses, tokens=tokens, train_seconds=train_seconds,
        first_step_seconds=(read_times[1] - read_times[0]) if len(read_times) > 1 else None,
        seconds_per_step=float(np.median(gaps)) if gaps.size else None,
        checkpoint_dir=ckpt.directory if ckpt is not None else None)
