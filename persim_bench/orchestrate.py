"""The stages of ``persim-bench run``: datasets -> main (Ray Tune) -> tables, all logged to MLflow.

One MLflow parent run per grid invocation; every Tune trial opens a child run (tag
``mlflow.parentRunId``), logs its flattened config as params and its final numbers as metrics,
and ends FINISHED or FAILED with the error as a tag. A failed trial never stops the grid.
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from persim_bench.config import Grid

EXPERIMENT_PREFIX = "persim-bench"


@dataclass(frozen=True)
class RunContext:
    """What every trial needs from the driver; all paths absolute (trials run in their own cwd)."""

    grid: dict
    data_root: str
    policy_root: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def default_tracking_uri(results: Path) -> str:
    """SQLite under results/: MLflow's relative default would follow each trial's cwd."""
    results.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(results / 'mlflow.db').resolve()}"


def experiment_name(grid: Grid) -> str:
    return f"{EXPERIMENT_PREFIX}/{grid.name}"


def flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, inner in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value
    return out


def trial_params(grid: dict, trial: dict) -> dict:
    """The trial's own keys plus the grid sections its algorithm reads, flattened for MLflow."""
    family = trial["algo"].split("_")[0]  # persim, cadm, bcq, true
    sections = {"evaluation": grid["evaluation"], "data": grid["data"]}
    if family != "bcq":
        sections["planner"] = grid["planner"]
    if family in ("persim", "cadm", "bcq"):
        sections[family] = grid[family]
    params = flatten("", {**{k: v for k, v in trial.items() if k != "name"}, **sections}, {})
    return {k: str(v)[:500] for k, v in params.items()}


def run_trial(config: dict, context: RunContext) -> None:
    """The Tune trainable: one (algo, env, regime, seed) experiment, recorded in MLflow."""
    import torch
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    from ray import tune

    from persim_bench.trials import RUNNERS, TrialPaths

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    trial = config["trial"]
    grid = Grid.model_validate(context.grid)
    client = MlflowClient(context.tracking_uri)
    run = client.create_run(
        context.experiment_id, run_name=trial["name"],
        tags={"mlflow.parentRunId": context.parent_run_id, "trial": trial["name"], "algo": trial["algo"],
              "env": trial["env"], "regime": trial["regime"], "seed": str(trial["seed"])})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in trial_params(context.grid, trial).items()])
    try:
        paths = TrialPaths(Path(context.data_root), Path(context.policy_root), Path(tune.get_context().get_trial_dir()))
        metrics = RUNNERS[trial["algo"]](grid, trial, paths, tune.report)
    except Exception as err:
        client.set_tag(run_id, "error", f"{type(err).__name__}: {err}"[:5000])
        client.log_text(run_id, traceback.format_exc(), "error.txt")
        client.set_terminated(run_id, "FAILED")
        raise
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in numbers.items()])
    for key, value in metrics.items():
        if isinstance(value, str):
            client.set_tag(run_id, key, value)
    client.set_terminated(run_id, "FINISHED")
    tune.report({**numbers, "stage": "done", "mlflow_run_id": run_id})


def start_parent_run(grid: Grid, tracking_uri: str, source: str, artifact_root: Path | None) -> tuple[str, str]:
    """Create the experiment (on the driver, before trials race to) and this invocation's parent run.

    ``artifact_root`` keeps artifacts beside the SQLite database (MLflow's default is ./mlruns in
    the cwd); None leaves the choice to a tracking server.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    name = experiment_name(grid)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = (artifact_root / name.replace("/", "-")).as_uri() if artifact_root else None
        experiment_id = client.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    parent = client.create_run(experiment_id, run_name=f"{grid.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                               tags={"grid": grid.name, "grid_source": source, "persim_bench.parent": "1"})
    return experiment_id, parent.info.run_id


def run_main_stage(grid: Grid, context: RunContext, storage: str, name: str, cpus_per_trial: float = 1.0):
    """Schedule every trial with Ray Tune; returns Tune's ResultGrid (failed trials included)."""
    from ray import tune

    from persim_bench.trials import trial_configs

    trials = trial_configs(grid)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": cpus_per_trial}),
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(
            trial_name_creator=lambda t: t.config["trial"]["name"],
            trial_dirname_creator=lambda t: t.config["trial"]["name"]),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, verbose=1,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )
    return tuner.fit()
