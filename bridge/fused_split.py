"""Split LoRAs on fused projections (Phi-3's ``qkv_proj``, ``gate_up_proj``) into their parts.

A fused projection stacks its parts' output rows, ``W = [W_q; W_k; W_v]``. A LoRA on it,
``ΔW = s · B @ A``, is therefore exactly a set of LoRAs on the parts that share ``A``, with
``B`` cut by rows: ``ΔW_q = s · B[:q] @ A``, ``ΔW_k = s · B[q:q+k] @ A``, ... Nothing is
approximated; the parts keep the fused module's rank and scale. Example (Phi-3-mini: hidden
3072, 32 heads, 32 KV heads, r 8)::

    model.layers.0.self_attn.qkv_proj   A (8, 3072)  B (9216, 8)
      -> self_attn.q_proj  B[0:3072]     self_attn.k_proj  B[3072:6144]
         self_attn.v_proj  B[6144:9216]  (each with the same A (8, 3072))
    model.layers.0.mlp.gate_up_proj     A (8, 3072)  B (16384, 8)
      -> mlp.gate_proj  B[0:8192]        mlp.up_proj  B[8192:16384]

Row order is Phi-3's (HF ``Phi3Attention``: q, then k, then v; ``Phi3MLP``: gate, then up).
The q / k / v sizes come from a `HeadLayout` (the source model's config.json, or head counts
given by hand): ``q = num_heads · head_dim``, ``k = v = num_kv_heads · head_dim``, with
``head_dim = d_in // num_heads`` unless given. Without one, only the unambiguous case is
split: ``d_out == 3 · d_in`` (multi-head attention with ``num_heads · head_dim = hidden``,
as Phi-3-mini); any other row count is refused, naming the module and what to give.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection
from pathlib import Path

from bridge.checkpoint import read_json
from bridge.errors import AdapterError
from bridge.lora_adapter import LoraAdapter, LoraModule

__all__ = ["FUSED_PARTS", "HeadLayout", "layout_from_hf_config", "part_rows", "split_fused"]

# Fused projection name -> its parts, in the order their rows are stacked.
FUSED_PARTS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """What fixes the split of a fused projection's rows; ``None`` = unknown."""

    num_heads: int | None = None  # attention (query) heads
    num_kv_heads: int | None = None  # key/value heads (None: = num_heads)
    head_dim: int | None = None  # per-head width (None: d_in // num_heads)
    hidden_size: int | None = None  # checked against A's columns when known
    intermediate_size: int | None = None  # gate / up rows each, when known
    origin: str = ""  # where the numbers come from, for messages ("config.json at ...")


def layout_from_hf_config(path: str | os.PathLike[str]) -> HeadLayout:
    """The head layout in a Hugging Face ``config.json`` (or the folder holding one)."""
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    cfg = read_json(file, AdapterError)
    fields = {}
    for ours, hf in (("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
                     ("head_dim", "head_dim"), ("hidden_size", "hidden_size"),
                     ("intermediate_size", "intermediate_size")):
        value = cfg.get(hf)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise AdapterError(file, f"{hf} is {value!r}; expected a positive integer")
        fields[ours] = value
    return HeadLayout(**fields, origin=str(file))


def _layout_text(layout: HeadLayout) -> str:
    given = [f"{f.name} {getattr(layout, f.name)}" for f in dataclasses.fields(layout)
             if f.name != "origin" and getattr(layout, f.name) is not None]
    return ", ".join(given) + (f" (from {layout.origin})" if layout.origin else "")


def part_rows(module: LoraModule, layout: HeadLayout, *, file: str | os.PathLike[str] = "",
              hint: str = "") -> tuple[int, ...]:
    """Rows of ``module.B`` that belong to each part, in `FUSED_PARTS` order.

    Raises `AdapterError` (``file``: the adapter) when the split cannot be determined or the
    layout contradicts the shapes; ``hint`` says how to give the missing layout.
    """
    file = file or "adapter"
    fused, d_in, d_out = module.module_type, module.d_in, module.d_out
    if fused not in FUSED_PARTS:
        raise AdapterError(file, f"{module.name} is not a fused projection")
    if fused == "gate_up_proj":
        inter = layout.intermediate_size
        if inter is not None:
            if 2 * inter != d_out:
                raise AdapterError(
                    file, f"{module.name}: lora_B has {d_out} rows but intermediate_size {inter} "
                    f"gives gate + up = {2 * inter} ({_layout_text(layout)})")
            return inter, inter
        if d_out % 2:
            raise AdapterError(
                file, f"{module.name}: lora_B has an odd number of rows ({d_out}); cannot split "
                f"it into gate_proj and up_proj halves{hint and '; ' + hint}")
        return d_out // 2, d_out // 2

    if layout.hidden_size is not None and layout.hidden_size != d_in:
        raise AdapterError(
            file, f"{module.name}: lora_A has {d_in} columns but hidden_size is "
            f"{layout.hidden_size} ({_layout_text(layout)}): a config of another model?")
    nh = layout.num_heads
    if nh is None:
        if layout.num_kv_heads is not None or layout.head_dim is not None:
            raise AdapterError(file, f"{module.name}: num_kv_heads / head_dim given without "
                                     f"num_heads{hint and '; ' + hint}")
        if d_out == 3 * d_in:  # MHA with num_heads * head_dim == hidden: equal thirds
            return d_in, d_in, d_in
        raise AdapterError(
            file, f"{module.name}: cannot split qkv_proj's {d_out} lora_B rows into q/k/v "
            f"without the head layout (q = num_heads*head_dim, k = v = num_kv_heads*head_dim, "
            f"hidden {d_in}){hint and '; ' + hint}")
    hd = layout.head_dim
    if hd is None:
        if d_in % nh:
            raise AdapterError(
                file, f"{module.name}: hidden {d_in} is not divisible by num_heads {nh}; give "
                f"head_dim{hint and ' (' + hint + ')'}")
        hd = d_in // nh
    nkv = layout.num_kv_heads if layout.num_kv_heads is not None else nh
    q, kv = nh * hd, nkv * hd
    if q + 2 * kv != d_out:
        raise AdapterError(
            file, f"{module.name}: lora_B has {d_out} rows but the head layout "
            f"({_layout_text(layout)}; head_dim {hd}) gives q + k + v = {q} + {kv} + {kv} = "
            f"{q + 2 * kv}")
    return q, kv, kv


def split_fused(adapter: LoraAdapter, *, types: Collection[str] = tuple(FUSED_PARTS),
                layout: HeadLayout | None = None, hint: str = "") -> LoraAdapter:
    """A copy of ``adapter`` whose fused modules of the given ``types`` are replaced by parts.

    Part modules are named by swapping the last path component
    (``model.layers.0.self_attn.qkv_proj`` -> ``model.layers.0.self_attn.q_proj``, ...), share
    the fused module's ``A`` (the same array) and scale, take ``B``'s rows in order, and record
    where they came from in ``LoraModule.origin``. The config is kept as read (it describes
    the file, not the split modules), so the result is for fusion, not for `save_adapter`.
    """
    unknown = set(types) - set(FUSED_PARTS)
    if unknown:
        raise ValueError(f"not fused projection types: {sorted(unknown)}")
    file = adapter.path or "adapter"
    layout = layout or HeadLayout()
    mods: dict[str, LoraModule] = {}
    for name, m in adapter.modules.items():
        if m.module_type not in types:
            mods[name] = m
            continue
        rows = part_rows(m, layout, file=file, hint=hint)
        stem, fused_suffix = name.rsplit(".", 1)[0], m.suffix
        start = 0
        for part, n in zip(FUSED_PARTS[m.module_type], rows, strict=True):
            part_name = f"{stem}.{part}"
            if part_name in adapter.modules:
                raise AdapterError(file, f"{name} and {part_name} are both adapted; splitting "
                                         "the fused one would give two LoRAs on one module")
            mods[part_name] = LoraModule(name=part_name, A=m.A, B=m.B[start:start + n],
                                         scale=m.scale,
                                         origin=f"{fused_suffix} rows {start}:{start + n}")
            start += n
    return LoraAdapter(config=dict(adapter.config), modules=mods, path=adapter.path)
