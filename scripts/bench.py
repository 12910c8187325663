"""Benchmarks of hfjax (the fused training step vs the original's PyTorch way; the bridge).

    python scripts/bench.py [--only small,mid,paper] [--skip-torch] [--skip-bridge] [--repeats N]
    python scripts/bench.py --aot [--quick] [--layers 8,32,80] [--sources 1,5] [--remat both]

The same as ``hfjax bench ...`` (`hfjax.cli`); the benchmark itself is `hfjax.bench`.
"""

import sys

from hfjax.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
