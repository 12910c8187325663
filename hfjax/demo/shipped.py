"""Prebuilt demo base models that ship with the package, and the key that says when they apply.

A base that can copy spans out of its prompt needs a copy circuit, and on 2 CPU cores one
takes minutes of pretraining per family and is not born in every run (docs/demo.md). So the
default demo's three bases are built once, by ``scripts/build_demo_bases.py`` (which runs the
demo's own data and models stages), and shipped in ``hfjax/demo/bases/``::

    bases/manifest.json     {"key": ..., "info": {family: models-stage info}, "built": {...}}
    bases/<family>/         an HF checkpoint (config, safetensors, tokenizer), as the stage
                            writes it

The models stage copies them instead of pretraining when their key equals the run's:
:func:`bases_key` digests the stage's parameters and the held-out (val and test) inputs
that its corpus excludes, so changed settings or data never pick up stale weights, and a
shipped base never saw the inputs it is scored on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hfjax.errors import UserError

__all__ = ["BASES_DIR", "bases_key", "copy_shipped", "read_manifest"]

#: Where the shipped bases live (package data).
BASES_DIR = Path(__file__).with_name("bases")
_MANIFEST = "manifest.json"


def bases_key(models_params: Mapping[str, Any], held_out_inputs: Iterable[str]) -> str:
    """Digest of the models stage's parameters and the held-out inputs its corpus excludes."""
    held = hashlib.sha256("\n".join(sorted(set(held_out_inputs))).encode()).hexdigest()
    blob = json.dumps({"params": models_params, "held_out": held}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(root: Path | None = None) -> dict[str, Any] | None:
    """The manifest of the bases shipped in ``root`` (default `BASES_DIR`), or None.

    Raises:
        UserError: a manifest that does not parse or lacks ``key`` / ``info`` (one line
            naming the file; the CLI prints it and exits 2).
    """
    path = (root or BASES_DIR) / _MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not {"key", "info"} <= manifest.keys():
        raise UserError(f"{path}: a shipped-bases manifest needs 'key' and 'info'")
    return manifest


def copy_shipped(key: str, families: Iterable[str], dest: Path,
                 root: Path | None = None) -> dict[str, Any] | None:
    """Copy the bases of ``families`` shipped in ``root`` (default `BASES_DIR`) into
    ``dest/<family>`` if their key is ``key``.

    Returns:
        Each family's models-stage info as recorded when the bases were built (plus
        ``source``), or None (nothing copied) when no bases are shipped, the key differs or
        a family is missing.
    """
    root = root or BASES_DIR
    manifest = read_manifest(root)
    families = list(families)
    if manifest is None or manifest["key"] != key:
        return None
    if not all(fam in manifest["info"] and (root / fam / "config.json").is_file()
               for fam in families):
        return None
    built = manifest.get("built", {})
    out = {}
    for fam in families:
        shutil.copytree(root / fam, dest / fam, dirs_exist_ok=True)
        out[fam] = {**manifest["info"][fam],
                    "source": f"shipped (built by scripts/build_demo_bases.py on "
                              f"{built.get('finished_at', '?')}, key {key})"}
    return out
