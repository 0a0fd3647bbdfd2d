"""`python -m distrt.server serve ...` / `python -m distrt.server bench serve ...`: the same commands
as `distrt serve` and `distrt bench serve` (one parser: distrt.cli)."""

from __future__ import annotations

import sys

from distrt.cli import main

if __name__ == "__main__":
    sys.exit(main())
