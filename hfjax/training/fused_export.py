"""The fused adapter to export: which dtype the fused modules' factors are written in.

The first release casts the fused modules' A and B to float32 when it groups them and saves
them so, whatever the target adapter's dtype (docs/algorithm.md §7, Export). hfjax does the same by
default (``export_dtype="float32"``); ``"target"`` keeps each tensor's stored dtype instead, which
rounds ``B + α·ΔB`` to it (a bfloat16 target then loses most of a small ``α·ΔB``). Modules
that are not fused keep their tensors (and dtype) untouched either way. Example::

    target (bf16): q_proj A (4, 32) bf16, B (32, 4) bf16; k_proj (not fused) bf16
    fused_adapter(target, {"...q_proj": B_new (float32)}, "float32")
      -> q_proj A float32 (exactly the bf16 values), B = B_new float32; k_proj bf16 as stored
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from bridge import LoraAdapter
from hfjax.errors import UserError

EXPORT_DTYPES = ("float32", "target")


class ExportDtypeError(UserError):
    """``fusion.export_dtype`` is neither "float32" nor "target"."""


def check_export_dtype(export_dtype: str) -> str:
    if export_dtype not in EXPORT_DTYPES:
        raise ExportDtypeError(f"config: fusion.export_dtype must be one of {EXPORT_DTYPES}, "
                               f"got {export_dtype!r}")
    return export_dtype


def fused_adapter(target: LoraAdapter, new_B: Mapping[str, Any], export_dtype: str
                  ) -> LoraAdapter:
    """``target`` with ``B`` replaced on the fused modules, their factors in the export dtype."""
    if check_export_dtype(export_dtype) == "target":
        fused = target.with_B(new_B, keep_dtype=True)
    else:
        fused = target.with_B({k: np.asarray(v, np.float32) for k, v in new_B.items()},
                              keep_dtype=False)
        mods = dict(fused.modules)
        for name in new_B:
            mods[name] = dataclasses.replace(mods[name], A=np.asarray(mods[name].A, np.float32))
        fused = LoraAdapter(config=dict(fused.config), modules=mods, path=None)
    fused.config = {**target.config, "inference_mode": True}
    return fused
