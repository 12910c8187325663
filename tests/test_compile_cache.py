"""The commands' persistent compilation cache: where it goes, how it is turned off, and that
a second process reuses what the first compiled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hfjax.compile_cache import cache_dir

ROOT = Path(__file__).resolve().parent.parent


def test_cache_dir_follows_the_environment(tmp_path):
    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "hfjax" / "xla"
    assert cache_dir({"HFJAX_COMPILATION_CACHE": str(tmp_path / "c")}) == tmp_path / "c"
    for off in ("off", "0", "false", "", "None"):
        assert cache_dir({"HFJAX_COMPILATION_CACHE": off}) is None
    # a user who configured jax directly keeps their setting
    assert cache_dir({"JAX_COMPILATION_CACHE_DIR": "/x", "HFJAX_COMPILATION_CACHE": "/y"}) is None
    assert cache_dir({}).parts[-2:] == ("hfjax", "xla")


_CHILD = """
import sys, jax, jax.numpy as jnp
from jax._src import monitoring
from hfjax import compile_cache
hits = []
monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
print("dir", compile_cache.enable(min_compile_secs=0.0))
f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + 3.0)
print("value", float(f(jnp.ones((4, 4))).sum()))
print("hits", len(hits))
"""


def _child(env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=ROOT, text=True,
                         capture_output=True, timeout=300, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def test_second_process_loads_from_the_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(HFJAX_COMPILATION_CACHE=str(tmp_path / "xla"), JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    first = _child(env)
    assert first["dir"] == str(tmp_path / "xla")
    assert any((tmp_path / "xla").iterdir()), "nothing was written to the cache"
    second = _child(env)
    assert second["value"] == first["value"]
    assert int(first["hits"]) == 0 and int(second["hits"]) >= 1
    off = _child({**env, "HFJAX_COMPILATION_CACHE": "off"})
    assert off["dir"] == "None" and int(off["hits"]) == 0
