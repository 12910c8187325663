"""A full fine-tune as a PEFT LoRA: the truncated SVD of (tuned - base), per linear module.

For every targeted linear weight of every decoder layer, ``ΔW = W_tuned - W_base`` of shape
``(d_out, d_in)`` is factored ``ΔW = U S Vᵀ`` and cut to its top ``r`` singular values
(Eckart-Young: the best rank-r approximation in Frobenius norm). PEFT computes
``scale · B @ A`` with ``scale = lora_alpha / r``, so the factors absorb ``1 / scale``::

    B = U_r · sqrt(S_r / scale)          (d_out, r)
    A = sqrt(S_r / scale) · V_rᵀ         (r, d_in)       scale · B @ A = U_r S_r V_rᵀ

    >>> report = lora_from_delta("llama-base", "llama-sft", "sft-lora", rank=16)
    >>> report["modules"]["model.layers.0.self_attn.q_proj"]
    {"shape": [2048, 2048], "rank": 16, "rel_error": 0.41, "energy_kept": 0.83, ...}

``rel_error`` is ``‖ΔW - scale·B@A‖_F / ‖ΔW‖_F`` of the factors as stored (so it includes the
cast to ``dtype``); ``energy_kept`` is ``Σ_{i<r} s_i² / Σ s_i²`` (``rel_error² ≈ 1 -
energy_kept``). A module whose smaller side is below ``r`` gets zero rows/columns beyond it.
Tensors a LoRA cannot carry (embeddings, norms, biases, lm_head) are compared too, and any that
changed are listed under ``not_captured`` with their relative change.

The checkpoints are read one tensor at a time (two weights and their delta in memory at once);
the adapter, with the report as ``lora_from_delta_report.json`` beside it, is written
atomically: an error leaves nothing at ``out_dir``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from bridge.checkpoint import atomic_directory, open_checkpoint, write_json
from bridge.errors import CheckpointError
from bridge.lora_adapter import LoraAdapter, LoraModule
from bridge.peft_io import make_adapter_config, save_adapter
from hfjax.models.config import ModelConfig
from hfjax.models.families import ALL_LINEAR
from hfjax.tools._shared import ToolError, check_shapes, check_targets, linear_modules, model_config

__all__ = ["REPORT_NAME", "format_summary", "lora_from_delta", "svd_factors"]

REPORT_NAME = "lora_from_delta_report.json"
_ADAPTER_DTYPES = ("float32", "bfloat16", "float16")
# ModelConfig fields that fix tensor shapes: base and tuned must agree on all of them.
_SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias")


def svd_factors(delta: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray,
                                                                      np.ndarray]:
    """``(A (r, d_in), B (d_out, r), singular values)`` with ``scale·B@A`` = rank-r truncation."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[0])
    root = np.sqrt(s[:k] / scale).astype(delta.dtype)
    A = np.zeros((rank, delta.shape[1]), delta.dtype)
    B = np.zeros((delta.shape[0], rank), delta.dtype)
    A[:k] = root[:, None] * vt[:k]
    B[:, :k] = u[:, :k] * root[None, :]
    return A, B, s


def _compare_configs(base: ModelConfig, tuned: ModelConfig, tuned_file: Path) -> None:
    for field in _SHAPE_FIELDS:
        b, t = getattr(base, field), getattr(tuned, field)
        if b != t:
            raise CheckpointError(tuned_file, f"{field}={t!r}, but the base has {b!r}: "
                                  "not a fine-tune of this base")


def _rel(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def lora_from_delta(
    base_dir: str | os.PathLike[str],
    tuned_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    rank: int,
    alpha: float | None = None,
    target_modules: Iterable[str] | str = ALL_LINEAR,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Write the rank-``rank`` PEFT LoRA of ``tuned_dir - base_dir`` to ``out_dir``; the report.

    ``alpha`` defaults to ``rank`` (PEFT scale 1). ``target_modules`` are projection names
    (``q_proj`` ... ``down_proj``, a list or a comma-separated string). ``dtype`` is the
    stored dtype of A and B (the SVD runs in float32).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ToolError(f"rank: must be a positive integer, got {rank!r}")
    lora_alpha = float(rank) if alpha is None else alpha
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) \
            or not math.isfinite(lora_alpha) or lora_alpha <= 0:
        raise ToolError(f"alpha: must be a positive number, got {alpha!r}")
    if dtype not in _ADAPTER_DTYPES:
        raise ToolError(f"dtype: {dtype!r} is not one of {', '.join(_ADAPTER_DTYPES)}")
    targets = check_targets(target_modules)
    scale = lora_alpha / rank
    out = Path(out_dir)
    store = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)

    with open_checkpoint(base_dir) as base, open_checkpoint(tuned_dir) as tuned:
        cfg = model_config(base)
        _compare_configs(cfg, model_config(tuned), tuned.path / "config.json")
        check_shapes(base, cfg)
        check_shapes(tuned, cfg)
        modules = linear_modules(cfg, targets)
        report_modules: dict[str, dict[str, Any]] = {}
        lora: dict[str, LoraModule] = {}
        for name, spec in modules.items():
            delta = tuned.get(spec.hf, np.float32)
            delta -= base.get(spec.hf, np.float32)
            if not np.isfinite(delta).all():
                raise CheckpointError(tuned.file_of(spec.hf),
                                      f"{spec.hf}: the delta has NaN or Inf")
            A, B, s = svd_factors(delta, rank, scale)
            A, B = A.astype(store), B.astype(store)
            norm = float(np.linalg.norm(delta))
            resid = delta - scale * (B.astype(np.float32) @ A.astype(np.float32))
            energy = float(np.sum(s[:rank].astype(np.float64) ** 2))
            total = float(np.sum(s.astype(np.float64) ** 2))
            report_modules[name] = {
                "shape": list(delta.shape),
                "rank": int(min(rank, s.shape[0])),
                "delta_norm": norm,
                "rel_error": _rel(float(np.linalg.norm(resid)), norm),
                "energy_kept": _rel(energy, total) if total > 0 else 1.0,
            }
            lora[name] = LoraModule(name=name, A=A, B=B, scale=scale)
            del delta, resid, A, B, s
        not_captured = {}
        for key in base.keys():
            if key.removesuffix(".weight") in modules or key not in tuned:
                continue
            b = base.get(key, np.float32) if base.dtype(key).kind == "f" else base.get(key)
            t = tuned.get(key, b.dtype)
            if b.shape != t.shape:
                raise CheckpointError(tuned.file_of(key), f"tensor {key!r} has shape {t.shape}, "
                                      f"the base has {b.shape}")
            if not np.array_equal(b, t):
                t -= b
                not_captured[key] = _rel(float(np.linalg.norm(t)), float(np.linalg.norm(b)))
            del b, t
        base_path, tuned_path = str(base.path), str(tuned.path)

    errors = [m["rel_error"] for m in report_modules.values()]
    worst = max(report_modules, key=lambda n: report_modules[n]["rel_error"])
    report = {
        "base": base_path,
        "tuned": tuned_path,
        "model_type": cfg.model_type,
        "rank": rank,
        "lora_alpha": lora_alpha,
        "scale": scale,
        "dtype": dtype,
        "target_modules": list(targets),
        "summary": {
            "modules": len(report_modules),
            "mean_rel_error": float(np.mean(errors)),
            "max_rel_error": max(errors),
            "worst_module": worst,
            "min_energy_kept": min(m["energy_kept"] for m in report_modules.values()),
            "not_captured": len(not_captured),
        },
        "modules": report_modules,
        "not_captured": not_captured,
    }
    config = make_adapter_config(r=rank, lora_alpha=_plain(lora_alpha),
                                 target_modules=list(targets), base_model_name_or_path=base_path)
    adapter = LoraAdapter(config=config, modules=lora)
    with atomic_directory(out) as tmp:
        save_adapter(adapter, tmp / "adapter")
        for f in (tmp / "adapter").iterdir():
            f.rename(tmp / f.name)
        (tmp / "adapter").rmdir()
        write_json(tmp / REPORT_NAME, report, sort_keys=False)
    return report


def _plain(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: the rank, the error spread, what a LoRA cannot carry."""
    s = report["summary"]
    lines = [
        f"{s['modules']} modules -> rank {report['rank']} LoRA (alpha {report['lora_alpha']:g}, "
        f"{report['dtype']})",
        f"relative error: mean {s['mean_rel_error']:.4f}, max {s['max_rel_error']:.4f} "
        f"({s['worst_module']}); min energy kept {s['min_energy_kept']:.4f}",
    ]
    if report["not_captured"]:
        top = sorted(report["not_captured"].items(), key=lambda kv: -kv[1])[:3]
        shown = ", ".join(f"{k} ({v:.2e})" for k, v in top)
        lines.append(f"{s['not_captured']} changed tensors a LoRA cannot carry: {shown}")
    return "\n".join(lines)

