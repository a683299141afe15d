"""``persim-bench``: the command line. Every sub-command validates its input before Ray starts."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from persim_bench.config import GridError, load_grid
from persim_bench.data.dataset import DatasetError
from persim_bench.data.policies import PolicyError


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a host:port nobody answers (ray.init would wait minutes for the GCS)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"persim-bench: --address {address}: expected local, auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise SystemExit(f"persim-bench: cannot reach Ray at --address {address}: {err}") from None


def connect_ray(address: str) -> None:
    """``local`` starts Ray on this machine; anything else (``auto``, ``ray://...``) attaches."""
    import logging

    import ray

    if ray.is_initialized():
        return
    if address not in ("local", "auto"):
        check_reachable(address)
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


def prepare_data(grid, results: Path, workers: int | None = None) -> tuple[Path, Path]:
    """The stages before the trials: policies (Ray tasks, cached) -> datasets (Ray actors)."""
    from persim_bench.data.generate import generate_datasets
    from persim_bench.data.policies import train_policies
    from persim_bench.tables import write_policy_table

    policy_root, data_root = results / "policies", results / "datasets" / grid.name
    print(f"[policies] {policy_root}")
    headers = train_policies(grid, policy_root)
    if headers:
        write_policy_table(headers, results / grid.name)
    print(f"[datasets] {data_root}")
    generate_datasets(grid, data_root, policy_root, num_workers=workers)
    return policy_root, data_root


def cmd_data(args) -> None:
    grid = load_grid(args.grid).narrowed(args.env, args.regime)
    connect_ray(args.address)
    prepare_data(grid, Path(args.results).resolve(), args.workers)


def cmd_run(args) -> None:
    """datasets -> main (Tune) -> tables, with one MLflow parent run for the invocation."""
    from persim_bench.orchestrate import RunContext, default_tracking_uri, run_main_stage, start_parent_run
    from persim_bench.tables import write_tables

    grid = load_grid(args.grid).narrowed(args.env, args.regime, args.algo, args.seed)
    results = Path(args.results).resolve()
    tracking_uri = args.mlflow_uri or default_tracking_uri(results)
    storage = args.storage or str(results / "ray")
    connect_ray(args.address)
    policy_root, data_root = prepare_data(grid, results)

    artifact_root = None if args.mlflow_uri else results / "mlartifacts"
    experiment_id, parent_run_id = start_parent_run(grid, tracking_uri, str(args.grid), artifact_root)
    context = RunContext(grid.model_dump(), str(data_root), str(policy_root), tracking_uri, experiment_id,
                         parent_run_id)
    print(f"[main] MLflow {tracking_uri} (parent run {parent_run_id}); Tune storage {storage}")
    outcome = run_main_stage(grid, context, storage, name=f"{grid.name}-{parent_run_id[:8]}")
    failed = [r for r in outcome if r.error is not None]

    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_terminated(parent_run_id, "FAILED" if failed else "FINISHED")
    out = write_tables(grid, tracking_uri, results, data_root)
    print((out / "tables.md").read_text())
    print(f"{len(outcome) - len(failed)} trials finished, {len(failed)} failed; tables in {out}; "
          f"browse with `persim-bench ui --results {args.results}`")
    if failed:
        sys.exit(1)


def cmd_tables(args) -> None:
    from persim_bench.orchestrate import default_tracking_uri
    from persim_bench.tables import write_tables

    grid = load_grid(args.grid)
    results = Path(args.results).resolve()
    out = write_tables(grid, args.mlflow_uri or default_tracking_uri(results), results,
                       results / "datasets" / grid.name)
    print((out / "tables.md").read_text())


def cmd_ui(args) -> None:
    import subprocess

    from persim_bench.orchestrate import default_tracking_uri

    uri = args.mlflow_uri or default_tracking_uri(Path(args.results).resolve())
    print(f"MLflow UI on http://127.0.0.1:{args.port} over {uri}")
    subprocess.run([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                    "--host", "127.0.0.1", "--port", str(args.port)], check=False)


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

    run = commands.add_parser("run", help="the whole grid: datasets -> Tune trials -> MLflow -> tables")
    grid_args(run)
    run.add_argument("--algo", action="append", help="only this algorithm (repeatable)")
    run.add_argument("--seed", action="append", type=int, help="only this seed (repeatable)")
    run.add_argument("--storage", help="Tune storage path or URI (default: <results>/ray)")
    run.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite:///<results>/mlflow.db)")
    run.set_defaults(func=cmd_run)

    tables = commands.add_parser("tables", help="write the paper's tables from MLflow to results/<grid>/")
    tables.add_argument("--grid", required=True)
    tables.add_argument("--results", default="results")
    tables.add_argument("--mlflow-uri")
    tables.set_defaults(func=cmd_tables)

    ui = commands.add_parser("ui", help="the MLflow UI on 127.0.0.1 over the results database")
    ui.add_argument("--results", default="results")
    ui.add_argument("--mlflow-uri")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)

    bench = commands.add_parser("bench", help="speed benchmarks (ratios against a baseline measured in the same run)")
    bench.add_argument("what", choices=["data", "model", "mpc"], help="which benchmark")
    bench.add_argument("--quick", action="store_true", help="small sizes, for a fast check")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (GridError, DatasetError, PolicyError) as err:
        sys.exit(f"persim-bench: {err}")


if __name__ == "__main__":
    main()
