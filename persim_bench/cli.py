"""``persim-bench``: the command line. Every sub-command validates its input before Ray starts."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from persim_bench.cluster import check_shared_storage, connect_ray
from persim_bench.config import GridError, load_grid
from persim_bench.data.dataset import DatasetError
from persim_bench.data.policies import PolicyError


def grid_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", required=True, help="grid name in tune_configs/ (smoke, paper, full) or a YAML path")
    parser.add_argument("--env", action="append", help="only this env (repeatable)")
    parser.add_argument("--regime", action="append", help="only this data regime (repeatable)")
    parser.add_argument("--results", default="results", help="results folder (default: ./results)")
    parser.add_argument("--address", default="local",
                        help="Ray address: local (default), auto, host:port or ray://host:port")


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
    """datasets -> rank_cv -> main (Tune) -> tables, under one MLflow parent run (continued by --resume)."""
    from mlflow.tracking import MlflowClient

    from persim_bench import orchestrate as orc
    from persim_bench.tables import write_tables
    from persim_bench.trials import rank_cv_configs, trial_configs

    grid = load_grid(args.grid).narrowed(args.env, args.regime, args.algo, args.seed)
    results = Path(args.results).resolve()
    if args.dry_run:
        from persim_bench.estimate import estimate, format_estimate, measure_rate

        rate = measure_rate()
        print(format_estimate(grid, estimate(grid, rate=rate, data_root=results / "datasets" / grid.name), rate))
        return
    given_storage = args.storage and (args.storage if "://" in args.storage else str(Path(args.storage).resolve()))
    state = orc.resume_state(results, grid, args.mlflow_uri, given_storage) if args.resume else None
    tracking_uri = state["tracking_uri"] if state else args.mlflow_uri or orc.default_tracking_uri(results)
    storage = state["storage"] if state else given_storage or str(results / "ray")
    connect_ray(args.address)
    check_shared_storage({"--results": str(results), "--storage": storage})
    policy_root, data_root = prepare_data(grid, results)

    client = MlflowClient(tracking_uri)
    if state:
        client.update_run(state["parent_run_id"], status="RUNNING")
    else:
        artifact_root = None if args.mlflow_uri else results / "mlartifacts"
        experiment_id, parent_run_id = orc.start_parent_run(grid, tracking_uri, str(args.grid), artifact_root)
        state = orc.new_state(grid, tracking_uri, storage, experiment_id, parent_run_id)
        orc.save_state(results, grid, state)
    parent_run_id = state["parent_run_id"]
    context = orc.RunContext(grid.model_dump(), str(data_root), str(policy_root), tracking_uri,
                             state["experiment_id"], parent_run_id)
    print(f"[main] MLflow {tracking_uri} (parent run {parent_run_id}); Tune storage {storage}")
    failed, chosen = [], None
    cv_trials = rank_cv_configs(grid)
    if cv_trials:
        print(f"[rank_cv] {len(cv_trials)} trials: ranks {grid.persim.rank_grid}, "
              f"{grid.persim.cv_holdout:.0%} of transitions held out")
        failed += orc.run_stage(grid, cv_trials, context, storage, orc.stage_name(grid, "rank_cv", parent_run_id))
        chosen = orc.choose_ranks(grid, context)
        print("[rank_cv] chosen: " + ", ".join(f"{e}/{r}/s{s}: {k}" for (e, r, s), k in sorted(chosen.items())))
    main_trials = trial_configs(grid, chosen)
    failed += orc.run_stage(grid, main_trials, context, storage, orc.stage_name(grid, "main", parent_run_id))

    client.set_terminated(parent_run_id, "FAILED" if failed else "FINISHED")
    out = write_tables(grid, tracking_uri, results, data_root)
    print((out / "tables.md").read_text())
    total = len(cv_trials) + len(main_trials)
    print(f"{total - len(failed)} trials finished, {len(failed)} failed; tables in {out}; "
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
    run.add_argument("--resume", action="store_true",
                     help="continue the last interrupted run of this grid: finished trials are not rerun")
    run.add_argument("--dry-run", action="store_true",
                     help="print trials per stage and an estimate of the CPU-hours, without starting Ray")
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
