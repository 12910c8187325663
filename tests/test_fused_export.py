"""Export dtype of the fused modules (docs/algorithm.md §7, Export): float32 as the original by
default, the target's own dtype on request; untouched modules keep theirs."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

from bridge import LoraAdapter, load_adapter, save_adapter
from hfjax.testing.adapters import random_adapter
from hfjax.training.fused_export import ExportDtypeError, fused_adapter

BF16 = np.dtype(ml_dtypes.bfloat16)


def bf16_target() -> LoraAdapter:
    t = random_adapter(2, 32, 48, 4, modules=("q_proj", "v_proj"), seed=0)
    mods = {n: dataclasses.replace(m, A=m.A.astype(BF16), B=m.B.astype(BF16))
            for n, m in t.modules.items()}
    return LoraAdapter(config=dict(t.config), modules=mods, path=None)


def new_Bs(target: LoraAdapter, names: list[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)  # alpha * dB small next to B, as early in training
    return {n: target.modules[n].B.astype(np.float32)
            + 1e-3 * rng.standard_normal(target.modules[n].B.shape).astype(np.float32)
            for n in names}


def rel_err_of_delta(got: np.ndarray, want: np.ndarray, b0: np.ndarray) -> float:
    d_want = want - b0.astype(np.float32)
    d_got = got.astype(np.float32) - b0.astype(np.float32)
    return float(np.linalg.norm(d_got - d_want) / np.linalg.norm(d_want))


def test_float32_export_keeps_alpha_delta_B_of_a_bf16_target(tmp_path):
    target = bf16_target()
    names = [n for n in target.modules if "q_proj" in n]
    new_B = new_Bs(target, names)
    fused = fused_adapter(target, new_B, "float32")
    for n, m in target.modules.items():
        f = fused.modules[n]
        if n in new_B:
            assert f.A.dtype == np.float32 and f.B.dtype == np.float32
            np.testing.assert_array_equal(f.B, new_B[n])
            np.testing.assert_array_equal(f.A, m.A.astype(np.float32))
        else:  # untouched: same tensors, same dtype
            assert f.A.dtype == BF16 and f.B.dtype == BF16
            np.testing.assert_array_equal(f.B, m.B)
    assert fused.config["inference_mode"] is True
    back = load_adapter(save_adapter(fused, tmp_path / "merged_lora"))
    for n in new_B:
        assert back.modules[n].B.dtype == np.float32
        assert rel_err_of_delta(back.modules[n].B, new_B[n], target.modules[n].B) == 0.0


def test_target_option_rounds_to_the_target_dtype():
    target = bf16_target()
    names = [n for n in target.modules if "q_proj" in n]
    new_B = new_Bs(target, names)
    fused = fused_adapter(target, new_B, "target")
    errs = []
    for n in names:
        assert fused.modules[n].B.dtype == BF16 and fused.modules[n].A.dtype == BF16
        errs.append(rel_err_of_delta(fused.modules[n].B, new_B[n], target.modules[n].B))
    assert max(errs) > 0.05  # bf16 loses much of a small alpha * dB


def test_bad_export_dtype_is_refused():
    target = bf16_target()
    with pytest.raises(ExportDtypeError, match="fusion.export_dtype"):
        fused_adapter(target, {}, "bfloat16")
