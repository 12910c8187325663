"""A run's fingerprint: everything that determines its result, as one flat dict.

The loop stores it with every checkpoint and refuses to resume under another one::

    fingerprint(job.to_dict(), {"target.adapter": dir, "data.movie": file, ...})
    -> {"task_name": "tiny", "seed": 0, "optim.lr": 0.003, "net.alpha_init": 0.1, ...,
        "input.target.adapter": "sha256:9f2c...", "input.data.movie": "sha256:51aa..."}

Config fields that do not change the math (logging and checkpoint cadence, labels, the
output location, paths whose *contents* are fingerprinted instead) are left out, so they
never block a resume. File digests are sha256 of the contents, cached per process by
(path, size, mtime) so a rerun does not reread big files that did not change.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["NOT_MATH", "digest", "fingerprint"]

# Last path components of config fields that never change the result.
NOT_MATH = frozenset({"log_every", "checkpoint_every", "keep_checkpoints", "progress",
                      "output_dir", "experiment_name", "remat", "mesh", "data_root",
                      "model_path", "adapter_path", "init_adapter", "from_task",
                      "reuse_from"})

_CACHE: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _CACHE[key] = h.hexdigest()
    return _CACHE[key]


def digest(path: str | os.PathLike[str]) -> str:
    """``sha256:...`` of a file, or of a folder's files (names and contents, sorted)."""
    p = Path(path)
    if p.is_file():
        return "sha256:" + _file_digest(p)
    if not p.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")):
        h.update(str(f.relative_to(p)).encode() + b"\0" + _file_digest(f).encode() + b"\0")
    return "sha256:" + h.hexdigest()


def _flat(tree: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            if str(k) in NOT_MATH:
                continue
            _flat(v, f"{prefix}{k}.", out)
    elif isinstance(tree, (list, tuple)) and any(isinstance(x, Mapping) for x in tree):
        for i, v in enumerate(tree):
            _flat(v, f"{prefix}{i}.", out)
    else:
        out[prefix[:-1]] = list(tree) if isinstance(tree, tuple) else tree


def fingerprint(config: Mapping[str, Any], inputs: Mapping[str, str | os.PathLike[str]],
                **extra: Any) -> dict[str, Any]:
    """The flat identity of a run: the math fields of ``config``, ``input.<name>`` digests
    of ``inputs`` (files or folders), then ``extra`` (e.g. ``steps``)."""
    out: dict[str, Any] = {}
    _flat(config, "", out)
    for name, path in inputs.items():
        out[f"input.{name}"] = digest(path)
    out.update(extra)
    return out
