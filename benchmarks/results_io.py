"""Re-export: benchmark scripts here write results through distrt.bench.results."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distrt.bench.results import commit, device_name, write_result  # noqa: E402,F401
