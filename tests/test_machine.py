"""The machine line printed by the bench and the demo report; the heap release."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from hfjax import machine


def test_cpu_model_reads_the_model_name(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n")
    assert machine.cpu_model(info) == "AMD EPYC 7B13"


def test_cpu_model_falls_back_without_cpuinfo(tmp_path: Path) -> None:
    name = machine.cpu_model(tmp_path / "missing")
    assert isinstance(name, str) and name


def test_describe_names_cores_and_backend() -> None:
    line = machine.describe()
    assert f"{os.cpu_count()} CPUs" in line
    assert f"jax {jax.__version__} on {jax.default_backend()}" in line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc only")
def test_release_free_heap_returns_freed_pages() -> None:
    """With glibc's trimming off (as the bench runs both sides), freed memory stays resident
    until `release_free_heap` hands it back."""
    code = (
        "import numpy as np\n"
        "from hfjax import machine\n"
        "def cur():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
        "x = np.ones(50_000_000, np.float32); del x\n"
        "before = cur(); machine.release_free_heap(); print(before - cur())\n")
    env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert float(out.stdout.split()[-1]) > 150  # of the 191 MiB freed
