"""JAX's persistent compilation cache for the `hfjax` commands.

Compiling a fused step takes seconds to minutes (CPU figures: docs/performance.md §6); with
the cache a rerun of the same shapes (a resumed job, the next config of a sweep, ``hfjax eval``
on a new adapter) loads the executable from disk instead. The commands turn it on unless told
not to::

    HFJAX_COMPILATION_CACHE=DIR    # cache here
    HFJAX_COMPILATION_CACHE=off    # no persistent cache
    (unset)                        # $XDG_CACHE_HOME/hfjax/xla, i.e. ~/.cache/hfjax/xla

``JAX_COMPILATION_CACHE_DIR`` set by the user wins (jax reads it itself). Limitation: jax
does not cache executables that contain host callbacks, which is the case of the fuse step on
CPU with ``rdm.sort = "host"`` (the default there, as ``auto``); on a GPU (``xla`` sort), and
for LoRA training and evaluation everywhere, the cache applies.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV = "HFJAX_COMPILATION_CACHE"
_OFF = {"0", "off", "false", "no", "none", ""}


def cache_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """Where the commands cache compiled executables (None: disabled or left to jax)."""
    env = os.environ if environ is None else environ
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return None  # the user configured jax directly
    value = env.get(ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "hfjax" / "xla"


def enable(environ: Mapping[str, str] | None = None, *, min_compile_secs: float = 1.0
           ) -> Path | None:
    """Turn on the persistent cache (see the module doc); returns the directory used.

    Only executables that took at least ``min_compile_secs`` to compile are written. A
    directory that cannot be created leaves the cache off (compiling still works)."""
    import jax

    path = cache_dir(environ)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    return path
