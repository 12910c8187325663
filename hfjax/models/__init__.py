"""The llama-like decoder (Llama, Qwen2, Mistral as deltas), its config and key tables."""

from hfjax.models.config import ModelConfig, ModelConfigError
from hfjax.models.decoder import forward, init_cache
from hfjax.models.model import Decoder

__all__ = ["Decoder", "ModelConfig", "ModelConfigError", "forward", "init_cache"]
