"""The shipped ml_collections configs, imported as ``hfjax.configs`` (installed or not).

- ``fuse.py``: the fuse job's schema and defaults (the paper's shared training block), a
  comment on every field. ``--config hfjax:fuse``.
- ``paper.py``: the paper's 49 experiments, generated from a few functions
  (``list_experiments()``, ``get_config(name)``). ``--config hfjax:paper:<name>``.
- ``train_lora.py``: the train-lora job's schema and defaults. ``--config hfjax:train_lora``.
- ``original_example.yaml``: a config in the original release's YAML layout, which
  ``hfjax.config.load_config`` reads too. ``--config hfjax:original_example``.

Your own config files import the schema as ``from hfjax.configs import fuse``.
"""
