"""`python -m distrt.server serve ...` / `python -m distrt.server bench serve ...`: the same commands as
`distrt serve` and `distrt bench serve`, usable without distrt/cli.py registering them."""

from __future__ import annotations

import argparse
import sys

from distrt.server.cli_serve import add_bench_serve_parser, add_serve_parser


def main(argv: list[str] | None = None) -> int:
    from distrt.executor.mpi_executor import is_launched_worker_rank, launched_worker_main

    if is_launched_worker_rank():  # under mpirun/srun, ranks 1..N-1 serve rank 0's engine
        launched_worker_main()
        return 0
    parser = argparse.ArgumentParser(prog="python -m distrt.server")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_serve_parser(sub)
    add_bench_serve_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"distrt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
