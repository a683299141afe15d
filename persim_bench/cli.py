"""``persim-bench``: the command line, a thin shell over ``orchestration``. Every sub-command validates its
input before Ray starts; library errors (``errors.BenchError``) become one line and exit status 1 here only."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from persim_bench.config import load_grid
from persim_bench.errors import BenchError, Interrupted


def grid_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", required=True, help="grid name in tune_configs/ (smoke, paper, full) or a YAML path")
    parser.add_argument("--env", action="append", help="only this env (repeatable)")
    parser.add_argument("--regime", action="append", help="only this data regime (repeatable)")
    parser.add_argument("--results", default="results", help="results folder (default: ./results)")
    parser.add_argument("--address", default="local",
                        help="Ray address: local (default), auto, host:port or ray://host:port")


def cmd_data(args) -> None:
    from persim_bench.orchestration.cluster import connect_ray
    from persim_bench.orchestration.stages import prepare_data

    from persim_bench.orchestration.estimate import check_memory
    from persim_bench.orchestration.guard import RunLock

    grid = load_grid(args.grid).narrowed(args.env, args.regime)
    results = Path(args.results).resolve()
    if not args.yes:
        check_memory(grid, results / "datasets" / grid.name)
    with RunLock(results, grid.name, f"persim-bench data --grid {args.grid}"):
        connect_ray(args.address)
        prepare_data(grid, results, args.workers)


def cmd_export(args) -> None:
    from persim_bench import datasets

    data = datasets.load(args.grid, args.env, args.regime, results=args.results)
    out = Path(args.out) if args.out else Path(args.results) / "exports" / args.format
    path = datasets.export(data, args.format, out, force=args.force)
    print(f"{args.format} export of {data.grid}/{data.env}/{data.regime} ({len(data.transitions):,} transitions, "
          f"{data.transitions.n_agents} agents) in {path}")


def cmd_run(args) -> None:
    grid = load_grid(args.grid).narrowed(args.env, args.regime, args.algo, args.seed)
    results = Path(args.results).resolve()
    if args.dry_run:
        from persim_bench.costmodel import measure_rate
        from persim_bench.orchestration.estimate import estimate, format_estimate

        rate = measure_rate()
        stages = estimate(grid, rate=rate, data_root=results / "datasets" / grid.name, gpu_rate=args.gpu_rate)
        print(format_estimate(grid, stages, rate, args.gpu_rate))
        return
    from persim_bench.orchestration.estimate import check_cost, check_memory
    from persim_bench.orchestration.stages import run_grid

    if not args.yes:
        check_memory(grid, results / "datasets" / grid.name)
        check_cost(grid, results / "datasets" / grid.name, args.max_cpu_hours)
    storage = args.storage and (args.storage if "://" in args.storage else str(Path(args.storage).resolve()))
    outcome = run_grid(grid, results, source=str(args.grid), address=args.address, storage=storage,
                       mlflow_uri=args.mlflow_uri, resume=args.resume)
    print((outcome.tables_dir / "tables.md").read_text())
    print(f"{outcome.trials - len(outcome.failed)} trials finished, {len(outcome.failed)} failed; tables in "
          f"{outcome.tables_dir}; browse with `persim-bench ui --results {args.results}`")
    if outcome.failed:
        sys.exit(1)


def cmd_tables(args) -> None:
    from persim_bench.orchestration.tables import write_tables
    from persim_bench.orchestration.tracking import default_tracking_uri

    from persim_bench.orchestration.guard import check_tracking_store

    grid = load_grid(args.grid)
    results = Path(args.results).resolve()
    uri = args.mlflow_uri or default_tracking_uri(results)
    check_tracking_store(uri)
    out = write_tables(grid, uri, results, results / "datasets" / grid.name)
    print((out / "tables.md").read_text())


def cmd_report(args) -> None:
    from persim_bench.orchestration.report import write_report
    from persim_bench.orchestration.tracking import default_tracking_uri

    from persim_bench.orchestration.guard import check_tracking_store

    grid = load_grid(args.grid)
    results = Path(args.results).resolve()
    uri = args.mlflow_uri or default_tracking_uri(results)
    check_tracking_store(uri)
    path = write_report(grid, uri, results, results / "datasets" / grid.name)
    print(path.read_text())
    print(f"report in {path}")


def cmd_ui(args) -> None:
    import subprocess

    from persim_bench.orchestration.tracking import default_tracking_uri

    uri = args.mlflow_uri or default_tracking_uri(Path(args.results).resolve())
    print(f"MLflow UI on http://127.0.0.1:{args.port} over {uri}")
    subprocess.run([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                    "--host", "127.0.0.1", "--port", str(args.port)], check=False)


def cmd_bench(args) -> None:
    from persim_bench import bench

    bench.main(args.what, quick=args.quick, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persim-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="generate the grid's offline datasets (Parquet) with Ray actors")
    grid_args(data)
    data.add_argument("--workers", type=int, help="Ray actors (default: the grid's data.num_workers, else all CPUs)")
    data.add_argument("--yes", action="store_true", help="generate even when the data exceed this machine's memory")
    data.set_defaults(func=cmd_data)

    export = commands.add_parser("export", help="one dataset as a Minari dataset or a D4RL-style HDF5 file")
    export.add_argument("--grid", required=True, help="grid name in tune_configs/ or a YAML path")
    export.add_argument("--env", required=True, help="the env of the dataset")
    export.add_argument("--regime", required=True, help="the data regime of the dataset")
    export.add_argument("--format", required=True, choices=["minari", "d4rl"], help="minari or d4rl (HDF5)")
    export.add_argument("--results", default="results", help="results folder holding the datasets (default: ./results)")
    export.add_argument("--out", help="where to write (default: <results>/exports/<format>); for minari a "
                                      "datasets root to load with MINARI_DATASETS_PATH")
    export.add_argument("--force", action="store_true", help="replace an existing export")
    export.set_defaults(func=cmd_export)

    run = commands.add_parser("run", help="the whole grid: datasets -> Tune trials -> MLflow -> tables")
    grid_args(run)
    run.add_argument("--algo", action="append", help="only this algorithm (repeatable)")
    run.add_argument("--seed", action="append", type=int, help="only this seed (repeatable)")
    run.add_argument("--storage", help="Tune storage path or URI (default: <results>/ray)")
    run.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite:///<results>/mlflow.db)")
    run.add_argument("--resume", action="store_true",
                     help="continue the last interrupted run of this grid: finished trials are not rerun")
    run.add_argument("--dry-run", action="store_true",
                     help="print trials per stage and an estimate of the CPU-hours, without starting Ray")
    run.add_argument("--yes", action="store_true",
                     help="run even when the estimate exceeds --max-cpu-hours or this machine's memory")
    run.add_argument("--max-cpu-hours", type=float, default=1000.0,
                     help="refuse a grid estimated above this many CPU-hours unless --yes (default 1000)")
    run.add_argument("--gpu-rate", type=float, default=4e12,
                     help="--dry-run: multiply-adds/s of a trial on a reserved GPU (default 4e12, see README)")
    run.set_defaults(func=cmd_run)

    tables = commands.add_parser("tables", help="write the paper's tables from MLflow to results/<grid>/")
    tables.add_argument("--grid", required=True)
    tables.add_argument("--results", default="results")
    tables.add_argument("--mlflow-uri")
    tables.set_defaults(func=cmd_tables)

    report = commands.add_parser("report", help="the reproduction report: paper vs ours cell by cell, claims, "
                                                 "aggregates, Figure 1 (results/<grid>/report/)")
    report.add_argument("--grid", required=True)
    report.add_argument("--results", default="results")
    report.add_argument("--mlflow-uri")
    report.set_defaults(func=cmd_report)

    ui = commands.add_parser("ui", help="the MLflow UI on 127.0.0.1 over the results database")
    ui.add_argument("--results", default="results")
    ui.add_argument("--mlflow-uri")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)

    bench = commands.add_parser("bench", help="speed benchmarks (ratios against a baseline measured in the same run)")
    bench.add_argument("what", choices=["data", "model", "mpc"], help="which benchmark")
    bench.add_argument("--quick", action="store_true", help="small sizes, for a fast check")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the mpc benchmark")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        # A second Ctrl-C (or one outside Tune): what finished is kept (policies, shards, trials' runs).
        sys.stderr.write("persim-bench: interrupted; rerun the same command to continue (`run` takes --resume)\n")
        sys.exit(130)
    except Interrupted as err:
        print(f"persim-bench: {err}", file=sys.stderr)
        sys.exit(130)
    except BenchError as err:
        sys.exit(f"persim-bench: {err}")
    except OSError as err:  # a folder that cannot be written, a file that cannot be read: name it
        where = f"{err.filename}: " if err.filename else ""
        sys.exit(f"persim-bench: {where}{err.strerror or err}")


if __name__ == "__main__":
    main()
