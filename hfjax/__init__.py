"""hfjax: HeteroFusion (cross-family LoRA fusion) in JAX/Flax.

Public surface::

    model = hfjax.from_pretrained("path/to/hf_checkpoint", dtype="float32")
    logits = model(input_ids, attention_mask, adapter=bridge.load_adapter("path/to/lora"))
    tokens = model.generate(input_ids, max_new_tokens=32, adapter=...)

Names are imported lazily, so light tools (config loading, the sweep runner) do not pay for
importing JAX.

The shipped configs are the package ``hfjax.configs``: installed, setuptools puts the
repository's top-level ``configs/`` there (``package-dir`` in pyproject.toml); in a checkout
(editable install or the checkout on ``PYTHONPATH``) ``hfjax.configs`` is that ``configs/``
folder beside this package, registered below.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def _register_checkout_configs() -> None:
    """In a checkout, make ``hfjax.configs`` the ``configs/`` folder next to ``hfjax/``."""
    here = Path(__file__).resolve().parent
    beside = here.parent / "configs"
    if "hfjax.configs" in sys.modules or (here / "configs").is_dir():
        return  # installed from a wheel: hfjax/configs/ is a real subpackage
    if not (beside / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "hfjax.configs", beside / "__init__.py", submodule_search_locations=[str(beside)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["hfjax.configs"] = module
    spec.loader.exec_module(module)
    globals()["configs"] = module  # as the import system does for a found subpackage


_register_checkout_configs()
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
