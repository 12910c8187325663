"""Benchmarks of hfjax (the fused training step vs the original's PyTorch way; the bridge).

    python scripts/bench.py [--only small,mid,paper] [--skip-torch] [--skip-bridge] [--repeats N]
    python scripts/bench.py --aot [--quick] [--layers 8,32,80] [--sources 1,5] [--remat both]

Everything lives in `hfjax.bench` (``python -m hfjax.bench`` is the same); see its docstring.
"""

import sys

from hfjax.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
