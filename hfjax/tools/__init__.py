"""Checkpoint tools: a full fine-tune as a LoRA, and a LoRA merged into its base.

    lora_from_delta(base_dir, tuned_dir, out_dir, *, rank, alpha=None,
                    target_modules=ALL_LINEAR, dtype="float32") -> report dict
    merge_full(base_dir, adapter_dir, out_dir, *, dtype=None) -> report dict

CLI: ``hfjax lora-from-delta`` and ``hfjax merge-full``. Both stream tensor by tensor and
write their output directory atomically.
"""

from hfjax.tools.lora_from_delta import format_summary, lora_from_delta
from hfjax.tools.merge_full import merge_full

__all__ = ["format_summary", "lora_from_delta", "merge_full"]
