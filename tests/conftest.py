import os

# Keep tests single-process friendly on a 2-core machine.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The CLI turns on jax's persistent compilation cache (hfjax.compile_cache); tests that call
# it must not write into the user's ~/.cache nor change jax's config mid-suite.
os.environ.setdefault("HFJAX_COMPILATION_CACHE", "off")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test module: one pytest process runs ~800
    tests, and the executables it would otherwise keep alive add up (a late XLA compile
    crashed once in a full run on this 2-core machine while they accumulated)."""
    yield
    import jax

    jax.clear_caches()
