"""Test helpers for hfjax users and hfjax's own tests: tiny models, LoRAs, data and references.

Every module is small and imports only what it needs (nothing is imported here):

- `hfjax.testing.adapters`: random LoRA adapters with real module names, numpy only
  (``random_adapter(num_layers, hidden, intermediate, rank, modules=...)``).
- `hfjax.testing.models`: tiny Llama / Qwen2 / Mistral base models built in JAX and saved as
  HF checkpoints (``build_base_model``), and PEFT-like random LoRAs for them
  (``random_lora(model_config, r=..., alpha=...)``).
- `hfjax.testing.tokenizer`: per-family byte-level BPE tokenizers (``train_tokenizer``).
- `hfjax.testing.tasks`: deterministic synthetic UIE-style tasks (Alpaca records, replay files).
- `hfjax.testing.zoo`: a whole tiny heterogeneous zoo on disk (``build_zoo``; with
  ``modules=QV, target_modules=QKV`` a fuse step compiles ~3x faster) and a fuse config sized
  for it (``tiny_fuse_config``; ``hfjax tiny-zoo DIR`` on the command line).
- `hfjax.testing.hf_models`: tiny random transformers models and PEFT adapters, and their
  logits (needs torch + peft: ``pip install torch==2.13.0 'hfjax[torch]'``).
- `hfjax.testing.torch_reference`: a PyTorch model of the original transfer network and RDM
  (needs torch; importing it without torch raises one ImportError line).
"""
