"""``persim-bench``: the command line. Every sub-command validates its input before Ray starts."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from persim_bench.config import GridError, load_grid
from persim_bench.data.dataset import DatasetError


def connect_ray(address: str) -> None:
    """``local`` starts Ray on this machine; anything else (``auto``, ``ray://...``) attaches."""
    import logging

    import ray

    if ray.is_initialized():
        return
    try:
        if address == "local":
            ray.init(include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SystemExit(f"persim-bench: cannot reach Ray at --address {address}: {str(err).splitlines()[0]}")


def grid_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", required=True, help="grid name in tune_configs/ (smoke, paper, full) or a YAML path")
    parser.add_argument("--env", action="append", help="only this env (repeatable)")
    parser.add_argument("--regime", action="append", help="only this data regime (repeatable)")
    parser.add_argument("--results", default="results", help="results folder (default: ./results)")
    parser.add_argument("--address", default="local", help="Ray address: local (default), auto or ray://host:port")


def cmd_data(args) -> None:
    from persim_bench.data.generate import generate_datasets

    grid = load_grid(args.grid).narrowed(args.env, args.regime)
    root = Path(args.results).resolve() / "datasets" / grid.name
    connect_ray(args.address)
    for folder in generate_datasets(grid, root, num_workers=args.workers):
        print(folder)


def cmd_bench(args) -> None:
    from persim_bench import bench

    bench.main(args.what, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persim-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="generate the grid's offline datasets (Parquet) with Ray actors")
    grid_args(data)
    data.add_argument("--workers", type=int, help="Ray actors (default: the grid's data.num_workers, else all CPUs)")
    data.set_defaults(func=cmd_data)

    bench = commands.add_parser("bench", help="speed benchmarks (ratios against a baseline measured in the same run)")
    bench.add_argument("what", choices=["data"], help="which benchmark")
    bench.add_argument("--quick", action="store_true", help="small sizes, for a fast check")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (GridError, DatasetError) as err:
        sys.exit(f"persim-bench: {err}")


if __name__ == "__main__":
    main()
