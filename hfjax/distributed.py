"""Multi-host helpers: who writes shared files, and bringing sharded results to the host.

In a multi-process run (`hfjax.sharding.maybe_initialize_distributed`) every process runs the
same program over one global mesh; a global array is then *not fully addressable*: each
process holds only the shards on its own devices, so ``np.asarray(x)`` fails. Two rules keep
a run correct::

    new_B = gather_to_host(new_B)       # every process: the full numpy arrays (a collective:
                                        # all processes must call it, in the same order)
    if is_primary():                    # process 0 only: merged_lora/, fusion_report.json,
        save_adapter(...)               # metrics.jsonl (one writer per shared file)
    barrier("export")                   # the others wait until it is on disk

Orbax checkpoints are the exception: every process calls save/restore (each writes its own
shards, orbax's primary writes the metadata and commits). In a single process all three are
cheap no-ops (`gather_to_host` is ``np.asarray``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def is_primary() -> bool:
    """Whether this process writes the run's shared outputs (process 0)."""
    return jax.process_index() == 0


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def gather_to_host(tree: Any) -> Any:
    """``tree`` with every array as a full host numpy array, on every process.

    A leaf that is not fully addressable (sharded across processes) is all-gathered
    (`jax.experimental.multihost_utils.process_allgather`); other leaves are just copied to
    the host. Multi-process, every process must call this with the same tree."""
    def one(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def barrier(name: str) -> None:
    """Wait until every process reaches ``barrier(name)`` (no-op in a single process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"hfjax:{name}")


__all__ = ["barrier", "gather_to_host", "is_multiprocess", "is_primary"]
