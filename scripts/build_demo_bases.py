#!/usr/bin/env python
"""Builds the default demo's three base models once and ships them in ``hfjax/demo/bases/``.

    python scripts/build_demo_bases.py                  # ~15-20 min on 2 cores
    python scripts/build_demo_bases.py --work /tmp/bb   # keep (and resume) the build here
    python scripts/build_demo_bases.py --check          # does the shipped key match DEFAULT?

It runs the demo's own data and models stages (`hfjax.demo.pipeline.run_demo` with
``until="models"`` and ``shipped_bases=False``), so the shipped bases are exactly what the
stage would pretrain on this machine, then replaces ``hfjax/demo/bases/`` with the three HF
checkpoints and ``manifest.json`` (the key, each family's models-stage info, when and where
it was built). Rerun it whenever `DEFAULT`'s models-stage settings or the tasks' held-out
inputs change: a demo whose key differs pretrains its bases itself (and says so), and
``tests/test_shipped_bases.py`` fails until the shipped bases are rebuilt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hfjax.atomic import write_json_atomic
from hfjax.demo.pipeline import DEFAULT, FAMILIES, default_models_key, run_demo
from hfjax.demo.shipped import BASES_DIR, read_manifest
from hfjax.machine import cpu_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None,
                    help="build folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--dest", type=Path, default=BASES_DIR, help="where to ship the bases")
    ap.add_argument("--check", action="store_true",
                    help="only say whether the shipped key matches DEFAULT's")
    ap.add_argument("--no_progress", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)

    key = default_models_key()
    if a.check:
        manifest = read_manifest(a.dest)
        shipped = manifest["key"] if manifest else None
        print(f"DEFAULT's bases key {key}; shipped {shipped}: "
              f"{'match' if shipped == key else 'STALE: rebuild'}")
        return 0 if shipped == key else 1

    work = a.work or Path(tempfile.mkdtemp(prefix="hfjax_bases_"))
    t0 = time.time()
    sizes = dataclasses.replace(DEFAULT, shipped_bases=False)
    run_demo(work, sizes=sizes, until="models", progress=not a.no_progress)
    marker = json.loads((work / "models.done").read_text(encoding="utf-8"))
    info = marker["info"]
    if any(info[fam].get("bases_key") != key for fam in FAMILIES):
        print(f"{work / 'models.done'}: its bases were built for another key than {key}",
              file=sys.stderr)
        return 1

    staging = a.dest.with_name(a.dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for fam in FAMILIES:
        shutil.copytree(work / "models" / fam, staging / fam)
    write_json_atomic(staging / "manifest.json", {
        "key": key,
        "info": {fam: {k: v for k, v in info[fam].items() if k != "source"}
                 for fam in FAMILIES},
        "built": {"finished_at": marker["finished_at"], "seconds": marker["seconds"],
                  "cpu": cpu_model(), "python": platform.python_version()},
    }, indent=1)
    shutil.rmtree(a.dest, ignore_errors=True)
    staging.rename(a.dest)
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in a.dest.rglob("*") if f.is_file())
    print(f"shipped {', '.join(FAMILIES)} to {a.dest} (key {key}, {size / 2**20:.1f} MiB, "
          f"built in {time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
