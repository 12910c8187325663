"""bridge: the file-format layer between Hugging Face / PEFT files and numpy/JAX pytrees.

It imports nothing from ``hfjax``. The public surface::

    load_adapter(path) -> LoraAdapter            # PEFT LoRA dir, validated, dtypes kept
    save_adapter(adapter, path, *, dtype=None)   # PEFT-loadable dir, written atomically
    make_adapter_config(r=..., lora_alpha=..., target_modules=...)
    module_rank_scale(config, module_name) -> (r, scale)   # as PEFT resolves it
    open_checkpoint(path) -> CheckpointReader    # HF checkpoint, lazy per-tensor reads
    save_checkpoint(path, tensors, config, *, max_shard_bytes=None)
    split_fused(adapter, types=..., layout=HeadLayout(...)) -> LoraAdapter  # Phi-3 qkv/gate_up

Bad files raise `AdapterError` / `CheckpointError` (``ValueError``s, one line: "file: problem").
"""

from bridge.checkpoint import CheckpointReader, open_checkpoint, save_checkpoint
from bridge.errors import AdapterError, CheckpointError
from bridge.fused_split import FUSED_PARTS, HeadLayout, layout_from_hf_config, split_fused
from bridge.lora_adapter import LoraAdapter, LoraModule
from bridge.peft_io import load_adapter, make_adapter_config, module_rank_scale, save_adapter

__all__ = [
    "AdapterError",
    "CheckpointError",
    "CheckpointReader",
    "FUSED_PARTS",
    "HeadLayout",
    "LoraAdapter",
    "LoraModule",
    "layout_from_hf_config",
    "load_adapter",
    "make_adapter_config",
    "module_rank_scale",
    "open_checkpoint",
    "save_adapter",
    "save_checkpoint",
    "split_fused",
]
