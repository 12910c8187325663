#!/usr/bin/env bash
# One-command accelerator check (<= 5 min on one GPU): device, paper-shape bench, a 1B-shaped
# bf16 fuse step with its peak memory vs the planner, the compile cache, a sharded step.
#   bash scripts/gpu_check.sh            # GPU (installs the project with its cuda12 extra)
#   JAX_PLATFORMS=cpu bash scripts/gpu_check.sh --small    # tiny shapes, ~2 min on 2 cores
# HFJAX_GPU_CHECK_INSTALL=0 skips the install (an environment that already has hfjax).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false
if [[ "${HFJAX_GPU_CHECK_INSTALL:-1}" != 0 && "${JAX_PLATFORMS:-}" != cpu ]] \
    && command -v nvidia-smi >/dev/null; then
  python -m pip install -q -e ".[cuda12]"
fi
# Two host devices, so that the sharded step has a mesh to span on a CPU-only machine.
if [[ "${XLA_FLAGS:-}" != *xla_force_host_platform_device_count* ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=2"
fi
exec python -m hfjax.gpu_check "$@"
