"""Benchmarks of hfjax (the fused training step vs the original's PyTorch way; the bridge).

    python scripts/bench.py [--only small,mid,paper] [--skip-torch] [--skip-bridge] [--repeats N]

Everything lives in `hfjax.bench` (``python -m hfjax.bench`` is the same); see its docstring.
"""

import sys

from hfjax.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
