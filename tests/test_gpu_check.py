"""scripts/gpu_check.sh: the peak table, and the whole check on CPU with tiny shapes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from hfjax.gpu_check import peak_for

ROOT = Path(__file__).resolve().parent.parent


def test_peak_table_matches_device_kinds():
    assert peak_for("NVIDIA H100 80GB HBM3")[0] == "H100"
    assert peak_for("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert peak_for("NVIDIA H200")[:2] == ("H200", 989.4)
    assert peak_for("NVIDIA A100-SXM4-80GB")[0] == "A100"
    assert peak_for("NVIDIA L40S")[0] == "L40S"  # not L4
    assert peak_for("NVIDIA L4")[0] == "L4"
    assert peak_for("NVIDIA A10")[0] == "A10"
    assert peak_for("NVIDIA A10G") is None and peak_for("cpu") is None


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_small():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HFJAX_GPU_CHECK_INSTALL": "0"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--small"], env=env,
                          cwd=str(ROOT), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "device: cpu x 2" in out and "peak: unknown" in out
    assert re.search(r"fuse step, tiny Llama .*\n  compile [\d.]+ s, step [\d.]+ ms", out)
    assert "planned" in out and "compile cache" in out and ": HIT" in out, out
    m = re.search(r"sharded step over 2 device\(s\).*\|diff\| vs unsharded ([\d.e+-]+)\)", out)
    assert m and float(m.group(1)) <= 1e-3, out  # bf16 base: reductions split in two
    assert re.search(r"network fwd\+bwd\+RDM [\d.]+ ms = [\d.]+ [GT]FLOP/s", out), out
