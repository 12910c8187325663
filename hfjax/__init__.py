"""hfjax: HeteroFusion (cross-family LoRA fusion) in JAX/Flax.

Public surface::

    model = hfjax.from_pretrained("path/to/hf_checkpoint", dtype="float32")
    logits = model(input_ids, attention_mask, adapter=bridge.load_adapter("path/to/lora"))
    tokens = model.generate(input_ids, max_new_tokens=32, adapter=...)
"""

from hfjax.loading import from_pretrained, save_pretrained
from hfjax.models import Decoder, ModelConfig

__version__ = "0.1.0"
__all__ = ["Decoder", "ModelConfig", "from_pretrained", "save_pretrained"]
