import os

# Keep tests single-process friendly on a 2-core machine.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The CLI turns on jax's persistent compilation cache (hfjax.compile_cache); tests that call
# it must not write into the user's ~/.cache nor change jax's config mid-suite.
os.environ.setdefault("HFJAX_COMPILATION_CACHE", "off")
