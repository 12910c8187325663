"""Orbax checkpoints of a training state (params, optimizer state, step) plus JSON metadata.

A thin layer over `orbax.checkpoint.CheckpointManager` done the standard way: atomic commits
(orbax writes into a temporary directory and renames it), ``max_to_keep`` preservation,
resume from ``latest_step()``. Restoring takes the freshly initialised state as the target,
so the restored tree has exactly its structure, dtypes and shardings.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from hfjax.errors import EnvironmentFailure, machine_error


def _guard(directory: Path, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:
        code = machine_error(e)
        if code is None:
            raise
        raise EnvironmentFailure(f"{directory}: {os.strerror(code)} while {what}; free it "
                                 "and rerun to resume from the last complete checkpoint"
                                 ) from e


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2) -> None:
        self.directory = Path(directory).absolute()
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True),
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        if self._mngr.latest_step() == step:
            return
        _guard(self.directory, f"writing checkpoint {step}", lambda: self._mngr.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta))))

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore ``step`` (default: latest) into the structure of ``like``."""
        step = self._mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        restored = jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(out["state"]))
        return restored, dict(out["meta"] or {})

    def steps(self) -> list[int]:
        """The steps that have a committed checkpoint, ascending."""
        return sorted(self._mngr.all_steps())

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of ``step`` (default: latest) without restoring its state."""
        step = self._mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to read")
        out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"] or {})

    def wait(self) -> None:
        _guard(self.directory, "writing a checkpoint", self._mngr.wait_until_finished)

    def close(self) -> None:
        self._mngr.close()
