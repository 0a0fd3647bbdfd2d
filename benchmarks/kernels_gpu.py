"""Kernel benchmarks on one GPU (the implementation lives in distrt/bench/kernels.py, also run as
`distrt bench kernels`).

    python benchmarks/kernels_gpu.py [--quick] [--tune] [--out PATH]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distrt.bench.kernels import *  # noqa: F401,F403,E402  (gpu_e2e.py imports helpers from here)
from distrt.bench.kernels import main  # noqa: E402

if __name__ == "__main__":
    main()
