import os
import sys
from pathlib import Path

# Keep tests single-process friendly on a 2-core machine.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
