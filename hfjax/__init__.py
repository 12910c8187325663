"""hfjax: HeteroFusion (cross-family LoRA fusion) in JAX/Flax.

Public surface::

    model = hfjax.from_pretrained("path/to/hf_checkpoint", dtype="float32")
    logits = model(input_ids, attention_mask, adapter=bridge.load_adapter("path/to/lora"))
    tokens = model.generate(input_ids, max_new_tokens=32, adapter=...)

Names are imported lazily, so light tools (config loading, the sweep runner) do not pay for
importing JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_LAZY = {
    "from_pretrained": "hfjax.loading",
    "save_pretrained": "hfjax.loading",
    "Decoder": "hfjax.models",
    "ModelConfig": "hfjax.models",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hfjax' has no attribute {name!r}")
