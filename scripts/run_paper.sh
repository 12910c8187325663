#!/usr/bin/env bash
# Runs the paper's experiments (configs/paper.py) through scripts/run_sweep.py.
#
#   scripts/run_paper.sh                          # all 49
#   scripts/run_paper.sh 'sensitivity_alpha/*'    # a group (quote the glob)
#   DRY_RUN=1 scripts/run_paper.sh                # validate every config, train nothing
#   SKIP_FINISHED=1 scripts/run_paper.sh --keep_going
#
# Paths: MODEL_ROOT, ADAPTER_ROOT, DATA_ROOT, OUTPUT_ROOT (see configs/paper.py).
# PYTHON picks the interpreter (default: python3). Every other option is run_sweep.py's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" scripts/run_sweep.py "$@"
