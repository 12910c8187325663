import os
import sys
from pathlib import Path

# Keep tests single-process friendly on a 2-core machine.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The CLI turns on jax's persistent compilation cache (hfjax.compile_cache); tests that call
# it must not write into the user's ~/.cache nor change jax's config mid-suite.
os.environ.setdefault("HFJAX_COMPILATION_CACHE", "off")
