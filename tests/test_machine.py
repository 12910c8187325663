"""The machine line printed by the bench and the demo report."""

from __future__ import annotations

import os
from pathlib import Path

import jax

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
