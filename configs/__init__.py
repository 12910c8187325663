"""ml_collections configs.

- ``configs/fuse.py``: the fuse job's schema and defaults (the paper's shared training block),
  a comment on every field.
- ``configs/paper.py``: the paper's 49 experiments, generated from a few functions
  (``list_experiments()``, ``get_config(name)``).
- ``configs/original_example.yaml``: a config in the original release's YAML layout, which
  ``hfjax.config.load_config`` reads too.
"""
