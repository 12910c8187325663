"""One line naming the machine a figure was measured on (CPU model, cores, jax backend).

Benchmarks and the demo report print it: timings, and on XLA:CPU even float rounding (and so
the demo's trained scores), depend on the CPU's vector units, so a figure without its machine
cannot be compared.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe() -> str:
    """E.g. ``AMD EPYC, 2 CPUs (x86_64); jax 0.10.2 on cpu``."""
    import jax

    return (f"{cpu_model()}, {os.cpu_count()} CPUs ({platform.machine()}); "
            f"jax {jax.__version__} on {jax.default_backend()}")


def peak_rss_mb(status: Path = Path("/proc/self/status")) -> float:
    """This process's own peak resident set size so far, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``. Not ``ru_maxrss``: Linux carries it over
    ``execve``, so a worker started by a large parent would report the parent's peak.
    Elsewhere: ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 1024 if sys.platform != "darwin" else kib / 2**20, 1)


_MALLOC_TRIM: Any = None


def release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc's ``malloc_trim(0)``; a no-op elsewhere).

    glibc keeps freed memory inside the process, and a thread's arena is not reused by
    another thread: host copies freed during setup (checkpoint reads, numpy -> device
    conversions) would otherwise stay resident while the step's buffers come from fresh pages
    (docs/performance.md §4.5, §7). It walks the whole heap, so call it after large frees,
    not in a hot loop."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)
