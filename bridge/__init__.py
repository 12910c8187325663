"""bridge: the file-format layer between Hugging Face / PEFT files and numpy/JAX pytrees.

It imports nothing from ``hfjax``.
"""

from bridge.lora_adapter import LoraAdapter, LoraModule

__all__ = ["LoraAdapter", "LoraModule"]
