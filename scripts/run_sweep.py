#!/usr/bin/env python
"""Runs a list of fuse experiments, one ``hfjax fuse`` subprocess each, and sums them up.

    python scripts/run_sweep.py 'sensitivity_alpha/*'              # paper names or globs
    python scripts/run_sweep.py noise_robustness ablation/no_rdm
    python scripts/run_sweep.py run1.yaml configs/fuse.py:arg      # config files
    DRY_RUN=1 python scripts/run_sweep.py '*'                      # every experiment, --dry_run
    SKIP_FINISHED=1 python scripts/run_sweep.py 'glue_cross_family/*' -o train.max_steps=10

Each experiment runs ``<cmd> --config SPEC [--config.FIELD=VALUE ...] [--dry_run]`` with
``<cmd>`` = ``<python> -m hfjax.cli fuse`` (``--python`` or ``--cmd`` replace it), where
SPEC is ``configs/paper.py:<name>`` for a paper experiment or the file as given. Its output
goes to ``<log_dir>/<NN>_<name>.log``.

Environment (the original runner's switches), each also a flag:
- ``DRY_RUN=1`` / ``--dry_run``: pass ``--dry_run`` to every run (the CLI validates the config
  and prints its plan, without training). ``--plan`` prints this script's plan and runs nothing.
- ``SKIP_FINISHED=1`` / ``--skip_finished``: skip an experiment whose last task's
  ``<output_dir>/<task_name>/COMPLETE.json`` exists (written last, after every output).
- The sweep stops at the first failure (non-zero exit) unless ``--keep_going``; the exit
  status is 1 when anything failed.

Unlike the original's runner there is no GPU pool: one JAX process uses every device it sees,
so experiments run one after another (run several sweeps with disjoint
``CUDA_VISIBLE_DEVICES`` to share a machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import fnmatch
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # so `hfjax` (and its configs) import from a plain checkout too
    sys.path.insert(0, str(REPO))

from hfjax.configs import paper  # noqa: E402

PAPER_PY = Path(paper.__file__)  # the shipped configs/paper.py (hfjax:paper)


@dataclasses.dataclass
class Experiment:
    """One entry of the sweep."""

    name: str  # what the summary shows
    spec: str  # the --config argument
    status: str = "pending"  # pending | ok | failed | skipped | dry-run | not run
    seconds: float = 0.0
    log: str = ""
    note: str = ""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def resolve(items: Sequence[str]) -> list[Experiment]:
    """Paper names, globs over them, and config files -> experiments, in the order given."""
    names = paper.list_experiments()
    out: list[Experiment] = []
    for item in items:
        file = item.split(":", 1)[0] if re.search(r"\.py(:|$)", item) else item
        if item in names:
            out.append(Experiment(name=item, spec=f"{PAPER_PY}:{item}"))
        elif file.endswith((".py", ".yaml", ".yml")) or os.path.exists(file):
            out.append(Experiment(name=item, spec=item))
        elif any(c in item for c in "*?["):
            matched = fnmatch.filter(names, item)
            if not matched:
                raise SystemExit(f"run_sweep: no paper experiment matches {item!r}")
            out.extend(Experiment(name=n, spec=f"{PAPER_PY}:{n}") for n in matched)
        else:
            close = difflib.get_close_matches(item, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SystemExit(f"run_sweep: {item!r} is neither a config file nor a paper "
                             f"experiment{hint}")
    return out


def finished(exp: Experiment, overrides: Sequence[str]) -> bool:
    """Whether the experiment's last task has exported its fused adapter."""
    from hfjax.config import is_finished, load_config  # imported here: `hfjax` pulls in JAX

    configs = load_config(exp.spec, overrides)
    return is_finished(configs[-1])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def print_summary(experiments: Sequence[Experiment]) -> None:
    """A table: experiment | status | seconds | log (or note)."""
    header = ("experiment", "status", "time", "log / note")
    rows = [(e.name, e.status, f"{e.seconds:.0f}s" if e.seconds else "-", e.note or e.log)
            for e in experiments]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    print()
    for row in [header, tuple("-" * w for w in widths) + ("-" * 10,), *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)]
        print("  ".join([*cells, row[3]]))
    counts = {s: sum(e.status == s for e in experiments)
              for s in ("ok", "dry-run", "skipped", "failed", "not run")}
    print("\n" + ", ".join(f"{k}: {v}" for k, v in counts.items() if v or k in ("ok", "failed")))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="*", default=["*"],
                        help="paper experiment names or globs (default: all), or config files")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override passed to every run as --config.FIELD=VALUE")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for the default command (python -m hfjax.cli fuse)")
    parser.add_argument("--cmd", default=None,
                        help="the fuse command, shell-split (default: PYTHON -m hfjax.cli fuse)")
    parser.add_argument("--log_dir", default=None, help="default: runs/sweep_<timestamp>")
    parser.add_argument("--keep_going", action="store_true", help="do not stop at a failure")
    parser.add_argument("--dry_run", action="store_true", default=_env_flag("DRY_RUN"),
                        help="pass --dry_run to every run (env DRY_RUN=1)")
    parser.add_argument("--skip_finished", action="store_true",
                        default=_env_flag("SKIP_FINISHED"),
                        help="skip experiments whose export exists (env SKIP_FINISHED=1)")
    parser.add_argument("--plan", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)

    experiments = resolve(args.experiments)
    cmd = shlex.split(args.cmd) if args.cmd else [args.python, "-m", "hfjax.cli", "fuse"]
    log_dir = Path(args.log_dir or REPO / "runs" / time.strftime("sweep_%Y%m%d_%H%M%S"))
    flags = [f"--config.{o}" for o in args.override] + (["--dry_run"] if args.dry_run else [])
    print(f"run_sweep: {len(experiments)} experiment(s); dry_run={int(args.dry_run)} "
          f"skip_finished={int(args.skip_finished)} keep_going={int(args.keep_going)}; "
          f"logs in {log_dir}")

    if args.plan:
        for exp in experiments:
            print(shlex.join([*cmd, "--config", exp.spec, *flags]))
        return 0

    log_dir.mkdir(parents=True, exist_ok=True)
    stop = False
    for i, exp in enumerate(experiments, 1):
        if stop:
            exp.status = "not run"
            continue
        tag = f"[{i}/{len(experiments)}] {exp.name}"
        if args.skip_finished:
            try:
                done = finished(exp, args.override)
            except ValueError as e:  # hfjax.config.ConfigError
                exp.status, exp.note = "failed", f"config error: {str(e).splitlines()[0]}"
                print(f"{tag}: FAILED ({exp.note})")
                stop = not args.keep_going
                continue
            if done:
                exp.status, exp.note = "skipped", "already finished"
                print(f"{tag}: skipped (already finished)")
                continue
        exp.log = str(log_dir / f"{i:02d}_{_safe(exp.name)}.log")
        command = [*cmd, "--config", exp.spec, *flags]
        print(f"{tag}: {shlex.join(command)}", flush=True)
        start = time.monotonic()
        with open(exp.log, "w") as log:
            rc = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        exp.seconds = time.monotonic() - start
        if rc == 0:
            exp.status = "dry-run" if args.dry_run else "ok"
            print(f"{tag}: {exp.status} ({exp.seconds:.0f}s)")
        else:
            exp.status, exp.note = "failed", f"exit {rc}; see {exp.log}"
            print(f"{tag}: FAILED with exit {rc} ({exp.seconds:.0f}s); last lines of {exp.log}:")
            print(_tail(exp.log), end="")
            stop = not args.keep_going

    print_summary(experiments)
    return 1 if any(e.status == "failed" for e in experiments) else 0


if __name__ == "__main__":
    sys.exit(main())
