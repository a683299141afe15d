"""``persim-bench``: the command line, a thin shell over ``orchestration``. Every sub-command validates its
input before Ray starts; library errors (``errors.BenchError``) become one line and exit status 1 here only."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from persim_bench import __version__
from persim_bench.config import load_grid
from persim_bench.data.dataset import data_root
from persim_bench.errors import BenchError, Interrupted

DESCRIPTION = """\
Reproduce PerSim (Agarwal et al., NeurIPS 2021: offline RL with heterogeneous agents via personalized
simulators) on Ray, Ray Tune and MLflow: train the logging policies, generate the offline datasets, run
every method of the paper as a Tune trial recorded in MLflow, and write the paper's tables and a report."""

EPILOG = """\
common commands:
  persim-bench run --grid smoke        the whole pipeline on the small grid (minutes on a laptop)
  persim-bench report --grid smoke     the reproduction report (paper vs ours) from MLflow
  persim-bench ui                      browse every run in the MLflow UI on http://127.0.0.1:5000

environment: RAY_ADDRESS (default of --address), MLFLOW_TRACKING_URI (default of --mlflow-uri),
PERSIM_BENCH_VERBOSITY=quiet|normal|verbose|debug (the default of -q/-v).
-q/-v go before or after the sub-command. `persim-bench <command> -h` for a command's options."""


def tracking_uri(args: argparse.Namespace, results: Path) -> str:
    """The MLflow tracking URI: ``--mlflow-uri``, else ``$MLFLOW_TRACKING_URI``, else sqlite:///<results>/mlflow.db."""
    from persim_bench.orchestration.tracking import default_tracking_uri

    return given_tracking_uri(args) or default_tracking_uri(results)


def stored_tracking_uri(args: argparse.Namespace, results: Path) -> str:
    """The tracking URI of runs already made (tables, report, evaluate, ui): as ``tracking_uri``, except
    that a default store that does not exist is refused instead of created empty (a mistyped --results)."""
    from persim_bench.errors import TrackingError

    if given_tracking_uri(args) is None and not (results / "mlflow.db").is_file():
        raise TrackingError(f"{results}: no mlflow.db, so no runs to read; run `persim-bench run` there first, "
                            "or pass the --results folder (or --mlflow-uri) that holds them")
    return tracking_uri(args, results)


def given_tracking_uri(args: argparse.Namespace) -> str | None:
    """``--mlflow-uri`` or ``$MLFLOW_TRACKING_URI`` (an empty value is unset); None when neither is given."""
    return getattr(args, "mlflow_uri", None) or os.environ.get("MLFLOW_TRACKING_URI") or None


def ray_address(args: argparse.Namespace) -> str:
    """The Ray address: ``--address``, else ``$RAY_ADDRESS``, else ``local`` (a new Ray of our own)."""
    return args.address or os.environ.get("RAY_ADDRESS") or "local"


def verbosity_args(parser: argparse.ArgumentParser, *, suffix: str = "") -> None:
    """-q/-v; on a sub-command they land in their own fields (``quiet_after``...), added to the top level's."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", dest=f"quiet{suffix}",
                       help="warnings and the one-line result only: no progress bars, no per-trial lines")
    group.add_argument("-v", "--verbose", action="count", default=0, dest=f"verbose{suffix}",
                       help="more output: -v adds Ray's INFO logs and Tune's per-trial and status tables, "
                            "-vv every intermediate result Tune sees")


def grid_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", required=True, help="grid name in tune_configs/ (smoke, paper, full) or a YAML path")
    parser.add_argument("--env", action="append", help="only this env (repeatable)")
    parser.add_argument("--regime", action="append", help="only this data regime (repeatable)")
    parser.add_argument("--results", default="results", help="results folder (default: ./results)")
    parser.add_argument("--address",
                        help="Ray address: local (a new Ray on this machine), auto, host:port or ray://host:port "
                             "(default: $RAY_ADDRESS if set, else local)")


def cmd_data(args) -> None:
    from persim_bench.orchestration.cluster import connect_ray
    from persim_bench.orchestration.estimate import check_memory
    from persim_bench.orchestration.guard import RunLock
    from persim_bench.orchestration.stages import prepare_data

    grid = load_grid(args.grid).narrowed(args.env, args.regime)
    results = Path(args.results).resolve()
    if not args.yes:
        check_memory(grid, data_root(results, grid.name))
    with RunLock(results, grid.name, f"persim-bench data --grid {args.grid}"):
        connect_ray(ray_address(args))
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
        stages = estimate(grid, rate=rate, data_root=data_root(results, grid.name), gpu_rate=args.gpu_rate)
        print(format_estimate(grid, stages, rate, args.gpu_rate))
        return
    from persim_bench.orchestration.estimate import check_cost, check_memory
    from persim_bench.orchestration.stages import run_grid

    if not args.yes:
        check_memory(grid, data_root(results, grid.name))
        check_cost(grid, data_root(results, grid.name), args.max_cpu_hours)
    storage = args.storage and (args.storage if "://" in args.storage else str(Path(args.storage).resolve()))
    outcome = run_grid(grid, results, source=str(args.grid), address=ray_address(args), storage=storage,
                       mlflow_uri=given_tracking_uri(args), resume=args.resume)
    if not args.quiet:
        print((outcome.tables_dir / "tables.md").read_text())
    print(f"{outcome.trials - len(outcome.failed)} trials finished, {len(outcome.failed)} failed; tables in "
          f"{outcome.tables_dir}; browse with `persim-bench ui --results {args.results}`")
    if outcome.failed:
        sys.exit(1)


def cmd_tables(args) -> None:
    from persim_bench.orchestration.guard import check_tracking_store
    from persim_bench.orchestration.tables import write_tables

    grid = load_grid(args.grid)
    results = Path(args.results).resolve()
    uri = stored_tracking_uri(args, results)
    check_tracking_store(uri)
    out = write_tables(grid, uri, results, data_root(results, grid.name))
    if not args.quiet:
        print((out / "tables.md").read_text())
    print(f"tables in {out}")


def cmd_report(args) -> None:
    from persim_bench.orchestration.guard import check_tracking_store
    from persim_bench.orchestration.report import write_report

    grid = load_grid(args.grid)
    results = Path(args.results).resolve()
    uri = stored_tracking_uri(args, results)
    check_tracking_store(uri)
    path = write_report(grid, uri, results, data_root(results, grid.name))
    if not args.quiet:
        print(path.read_text())
    print(f"report in {path}")


def cmd_evaluate(args) -> None:
    from persim_bench.orchestration.guard import check_tracking_store
    from persim_bench.orchestration.reevaluate import evaluate_run

    results = Path(args.results).resolve()
    uri = stored_tracking_uri(args, results)
    check_tracking_store(uri)
    run_id, metrics = evaluate_run(args.run, results, uri, episodes=args.episodes, agents=args.agents,
                                   prediction_policy=args.prediction_policy, data_box=args.data_box,
                                   plan_ranking=args.plan_ranking)
    shown = {k: v for k, v in sorted(metrics.items())
             if k.startswith(("reward_agent", "rmse_agent", "r2_agent", "plan_rank_agent", "plan_regret_agent"))}
    print("\n".join(f"{key:>16}  {value:.4g}" for key, value in shown.items()))
    print(f"evaluation of run {args.run} recorded as MLflow run {run_id}")


def cmd_ui(args) -> None:
    uri = stored_tracking_uri(args, Path(args.results).resolve())
    # One web worker and no job runner (MLflow's GenAI jobs; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true brings it
    # back): a browser on this machine needs no more, and it starts and stops in seconds.
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(args.port), "--workers", "1"]
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(f"MLflow UI on http://127.0.0.1:{args.port} over {uri}", flush=True)
    sys.stderr.flush()
    # This process becomes the MLflow server (same pid): a SIGTERM or Ctrl-C reaches it, and it stops its worker.
    os.execv(sys.executable, command)


def cmd_bench(args) -> None:
    from persim_bench import bench

    bench.main(args.what, quick=args.quick, device=args.device)


MLFLOW_URI_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI if set, else sqlite:///<results>/mlflow.db)"


def stored_run_args(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that read a finished run back from MLflow (tables, report)."""
    parser.add_argument("--grid", required=True, help="grid name in tune_configs/ (smoke, paper, full) or a YAML path")
    parser.add_argument("--results", default="results", help="results folder of the run (default: ./results)")
    parser.add_argument("--mlflow-uri", help=MLFLOW_URI_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persim-bench", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"persim-bench {__version__}",
                        help="print persim-bench's version and exit")
    verbosity_args(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="one of the commands below; `persim-bench COMMAND -h` for its options")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=description)
        verbosity_args(sub, suffix="_after")
        return sub

    data = command("data", "generate the grid's offline datasets (Parquet) with Ray actors",
                   "Train the grid's logging policies (Ray tasks, cached under <results>/policies) and generate "
                   "its offline datasets (Parquet shards and a manifest per env x regime, Ray actors) under "
                   "<results>/datasets/<grid>. Existing shards are verified and only missing or damaged ones are "
                   "made again. Progress bars only on a terminal (none with -q).")
    grid_args(data)
    data.add_argument("--workers", type=int, help="Ray actors (default: the grid's data.num_workers, else all CPUs)")
    data.add_argument("--yes", action="store_true", help="generate even when the data exceed this machine's memory")
    data.set_defaults(func=cmd_data)

    export = command("export", "one dataset as a Minari dataset or a D4RL-style HDF5 file",
                     "Write one generated dataset (grid x env x regime) as a Minari dataset or a D4RL-style HDF5 "
                     "file. Needs the dataset made by `persim-bench data` (or `run`); starts no Ray.")
    export.add_argument("--grid", required=True, help="grid name in tune_configs/ or a YAML path")
    export.add_argument("--env", required=True, help="the env of the dataset")
    export.add_argument("--regime", required=True, help="the data regime of the dataset")
    export.add_argument("--format", required=True, choices=["minari", "d4rl"], help="minari or d4rl (HDF5)")
    export.add_argument("--results", default="results", help="results folder holding the datasets (default: ./results)")
    export.add_argument("--out", help="where to write (default: <results>/exports/<format>); for minari a "
                                      "datasets root to load with MINARI_DATASETS_PATH")
    export.add_argument("--force", action="store_true", help="replace an existing export")
    export.set_defaults(func=cmd_export)

    run = command("run", "the whole grid: datasets -> Tune trials -> MLflow -> tables",
                  "Run a grid end to end: policies -> datasets -> rank_cv (Tune) -> main (Tune), every trial a "
                  "child run of one MLflow parent run, then the paper's tables and the reproduction report under "
                  "<results>/<grid>/. Prints one line per finished trial (-q: none, -v: Tune's tables too).")
    grid_args(run)
    run.add_argument("--algo", action="append", help="only this algorithm (repeatable)")
    run.add_argument("--seed", action="append", type=int, help="only this seed (repeatable)")
    run.add_argument("--storage", help="Tune storage path or URI (default: <results>/ray)")
    run.add_argument("--mlflow-uri", help=MLFLOW_URI_HELP)
    run.add_argument("--resume", action="store_true",
                     help="continue the last interrupted run of this grid: finished trials are not rerun")
    run.add_argument("--dry-run", action="store_true",
                     help="print trials per stage and an estimate of the CPU-hours, without starting Ray")
    run.add_argument("--yes", action="store_true",
                     help="run even when the estimate exceeds --max-cpu-hours or this machine's memory")
    run.add_argument("--max-cpu-hours", type=float, default=1000.0,
                     help="refuse a grid estimated above this many CPU-hours unless --yes (default 1000)")
    run.add_argument("--gpu-rate", type=float, default=4e12,
                     help="--dry-run: multiply-adds/s of a trial on a reserved GPU (default 4e12, see docs/cluster.md)")
    run.set_defaults(func=cmd_run)

    tables = command("tables", "write the paper's tables from MLflow to results/<grid>/",
                     "Rebuild the paper's tables (Markdown, CSV, LaTeX) and the cost table of a grid from its MLflow "
                     "runs (the latest run of every trial) into <results>/<grid>/. Starts no Ray.")
    stored_run_args(tables)
    tables.set_defaults(func=cmd_tables)

    report = command("report", "the reproduction report: paper vs ours cell by cell, claims, aggregates, "
                               "Figure 1 (results/<grid>/report/)",
                     "Write the reproduction report of a grid from its MLflow runs: every paper cell the grid "
                     "covers next to ours (95 % CI, ratio, verdict), the paper's claims, IQM and optimality gap, "
                     "Figure 1; into <results>/<grid>/report/. Starts no Ray.")
    stored_run_args(report)
    report.set_defaults(func=cmd_report)

    evaluate = command("evaluate", "reload a trial's saved model and evaluate it again, without training",
                       "Reload the model an MLflow trial run saved (its LoggedModel), rebuild the trial from that run "
                       "and the resolved grid on its parent run, and evaluate it again: the prediction test and the "
                       "reward episodes. The numbers go to a new MLflow run tagged persim_bench.evaluates=<run>. "
                       "PerSim and CaDM runs save models.")
    evaluate.add_argument("--run", required=True, help="MLflow run id of the trial (the MLflow UI shows it)")
    evaluate.add_argument("--episodes", type=int, help="reward episodes per test agent (default: the grid's); given, rewards "
                          "are scored also for a prediction-only grid's model (evaluation.rewards: false)")
    evaluate.add_argument("--agents", type=int, nargs="+", help="test agents to evaluate, 0-4 (default: the grid's)")
    evaluate.add_argument("--prediction-policy", choices=["trained", "heuristic"],
                          help="actions of the prediction test (default: the grid's); 'trained' scores a model "
                               "fitted under a heuristic-policy grid with the paper's test policy")
    evaluate.add_argument("--no-data-box", dest="data_box", action="store_const", const=False,
                          help="hold no prediction to the model's training-data box (evaluation.clip_to_data_box: "
                               "false, the paper's behaviour)")
    evaluate.add_argument("--plan-ranking", type=int, metavar="STATES",
                          help="also score how well the model ranks the planner's candidate plans from this many real "
                               "states per test agent (evaluation.plan_ranking; beyond the paper)")
    evaluate.add_argument("--results", default="results",
                          help="results folder holding the policies for the prediction test (default: ./results)")
    evaluate.add_argument("--mlflow-uri", help=MLFLOW_URI_HELP)
    evaluate.set_defaults(func=cmd_evaluate)

    ui = command("ui", "the MLflow UI on 127.0.0.1 over the results database",
                 "Serve the MLflow UI on http://127.0.0.1:PORT over the tracking store of --results (or "
                 "--mlflow-uri). This process becomes the MLflow server: stop it with Ctrl-C or SIGTERM.")
    ui.add_argument("--results", default="results",
                    help="results folder whose mlflow.db to browse (default: ./results)")
    ui.add_argument("--mlflow-uri", help="tracking store to browse (default: $MLFLOW_TRACKING_URI if set, else "
                                         "sqlite:///<results>/mlflow.db)")
    ui.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")
    ui.set_defaults(func=cmd_ui)

    bench = command("bench", "speed benchmarks (ratios against a baseline measured in the same run)",
                    "Speed benchmarks of the data generation, the models and the MPC planner, each reported as a "
                    "ratio against a baseline measured in the same run (see docs/benchmarks.md).")
    bench.add_argument("what", choices=["data", "model", "mpc", "small"],
                       help="which benchmark: data, model, mpc or small (MountainCar/CartPole models vs the roofline)")
    bench.add_argument("--quick", action="store_true", help="small sizes, for a fast check")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the mpc benchmark")
    bench.set_defaults(func=cmd_bench)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, merging -q/-v given before and after the sub-command into ``args.quiet`` / ``args.verbose``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.quiet = args.quiet or args.quiet_after
    args.verbose += args.verbose_after
    if args.quiet and args.verbose:
        parser.error("-q/--quiet and -v/--verbose exclude each other")
    return args


def main(argv: list[str] | None = None) -> None:
    from persim_bench.orchestration import reporting

    args = parse_args(argv)
    given = args.quiet or args.verbose
    # No -q/-v: $PERSIM_BENCH_VERBOSITY if set, else normal.
    level = reporting.configure(reporting.level_of(args.quiet, args.verbose) if given else None)
    args.quiet = level == "quiet"
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
