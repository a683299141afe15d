"""The stages of ``persim-bench run``: datasets -> rank_cv -> main (Ray Tune) -> tables, all in MLflow.

One MLflow parent run per grid invocation; every Tune trial opens a child run (tag
``mlflow.parentRunId``), logs its flattened config as params and its final numbers as metrics,
and ends FINISHED or FAILED with the error as a tag. A failed trial never stops the grid.
``--resume`` continues an interrupted invocation: same parent run, Tune state restored, and a
trial that already finished is never run again (its MLflow run is the one record of it).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from persim_bench.config import Grid, GridError

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
    sections = {"data": grid["data"]}
    if trial["stage"] == "main":
        sections["evaluation"] = grid["evaluation"]
        if family != "bcq":
            sections["planner"] = grid["planner"]
    if family in ("persim", "cadm", "bcq"):
        sections[family] = grid[family]
    params = flatten("", {**{k: v for k, v in trial.items() if k != "name"}, **sections}, {})
    return {k: str(v)[:500] for k, v in params.items()}


def find_trial_run(client, context: RunContext, name: str):
    """This invocation's MLflow run of a trial, if an earlier attempt created one."""
    runs = client.search_runs([context.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.trial = '{name}' and "
                                            f"tags.`mlflow.parentRunId` = '{context.parent_run_id}'")
    return runs[0] if runs else None


def run_trial(config: dict, context: RunContext) -> None:
    """The Tune trainable: one experiment, recorded in exactly one MLflow run per grid invocation.

    A retried or resumed trial reuses its earlier run (and, if that run finished, its result);
    an error of the trial's own code is recorded once and not raised, so Tune's retries are
    left for what they are for: a worker or node that died.
    """
    import ray
    import torch
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    from ray import tune

    from persim_bench.trials import RUNNERS, TrialPaths, runner_key

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    trial = config["trial"]
    grid = Grid.model_validate(context.grid)
    client = MlflowClient(context.tracking_uri)
    earlier = find_trial_run(client, context, trial["name"])
    if earlier is not None and earlier.info.status == "FINISHED":
        tune.report({**earlier.data.metrics, "stage": "done", "reused": 1, "mlflow_run_id": earlier.info.run_id})
        return
    if earlier is None:
        run_id = client.create_run(
            context.experiment_id, run_name=trial["name"],
            tags={"mlflow.parentRunId": context.parent_run_id, "trial": trial["name"], "stage": trial["stage"],
                  "algo": trial["algo"], "env": trial["env"], "regime": trial["regime"],
                  "seed": str(trial["seed"])}).info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in trial_params(context.grid, trial).items()])
    else:  # a restart after the worker died, or a resumed invocation
        run_id = earlier.info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "attempts", str(int(earlier.data.tags.get("attempts", "1")) + 1))
    client.set_tag(run_id, "node", ray.get_runtime_context().get_node_id())
    paths = TrialPaths(Path(context.data_root), Path(context.policy_root), Path(tune.get_context().get_trial_dir()))
    try:
        metrics = RUNNERS[runner_key(trial)](grid, trial, paths, tune.report)
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        client.set_tag(run_id, "error", error[:5000])
        client.log_text(run_id, traceback.format_exc(), "error.txt")
        client.set_terminated(run_id, "FAILED")
        tune.report({"stage": "failed", "error": error[:500], "mlflow_run_id": run_id})
        return
    now = int(time.time() * 1000)
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    history = [Metric(k, float(v), now, step) for k, values in metrics.items() if isinstance(values, list)
               for step, v in enumerate(values)]  # curves, e.g. rank_cv's validation loss per epoch
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in numbers.items()] + history)
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


def run_stage(grid: Grid, trials: list[dict], context: RunContext, storage: str, name: str) -> list[str]:
    """Schedule trials with Ray Tune (resuming its saved state under storage/name if there is one).

    Returns the names of trials that failed: recorded FAILED in MLflow, or given up by Tune
    after ``grid.max_failures`` restarts (their MLflow run is then marked FAILED here).
    """
    from mlflow.tracking import MlflowClient
    from ray import tune

    from persim_bench.trials import runner_key

    def resources(config: dict) -> dict:
        wanted = grid.trial_resources(runner_key(config["trial"]))
        return {"cpu": wanted.cpu, "gpu": wanted.gpu}

    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), resources)
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(
                # A new worker per trial paid ~6 s of process start and imports (median gap between
                # trials in the smoke grid); trials keep no state in their process beyond caches.
                reuse_actors=True,
                trial_name_creator=lambda t: t.config["trial"]["name"],
                trial_dirname_creator=lambda t: t.config["trial"]["name"]),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, verbose=1,
                failure_config=tune.FailureConfig(max_failures=grid.max_failures, fail_fast=False)),
        )
    outcome = tuner.fit()
    client = MlflowClient(context.tracking_uri)
    failed = []
    for result in outcome:
        trial_name = result.config["trial"]["name"]
        if result.error is not None:
            run = find_trial_run(client, context, trial_name)
            if run is not None and run.info.status != "FAILED":
                client.set_tag(run.info.run_id, "error", f"gave up after {grid.max_failures} restarts: "
                                                         f"{str(result.error).splitlines()[0]}"[:5000])
                client.set_terminated(run.info.run_id, "FAILED")
            failed.append(trial_name)
        elif (result.metrics or {}).get("stage") == "failed":
            failed.append(trial_name)
    return failed


def grid_fingerprint(grid: Grid) -> str:
    return hashlib.sha256(json.dumps(grid.model_dump(), sort_keys=True).encode()).hexdigest()


def state_path(results: Path, grid: Grid) -> Path:
    """Where ``run`` records what ``--resume`` needs: the grid's fingerprint, parent run, stores."""
    return results / "state" / f"{grid.name}.json"


def resume_state(results: Path, grid: Grid, tracking_uri: str | None, storage: str | None) -> dict:
    """The interrupted invocation to continue; refused if the grid or its stores changed since."""
    path = state_path(results, grid)
    if not path.exists():
        raise GridError(f"{path}: nothing to resume for grid {grid.name!r} (no earlier `run` under {results})")
    state = json.loads(path.read_text())
    if state["fingerprint"] != grid_fingerprint(grid):
        raise GridError(f"grid {grid.name!r} changed since the run being resumed (started {state['started']}); "
                        f"restore its definition and narrowing options, or run without --resume")
    for key, given in (("tracking_uri", tracking_uri), ("storage", storage)):
        if given and given != state[key]:
            raise GridError(f"--resume: {key} {given!r} differs from the interrupted run's {state[key]!r}")
    return state


def save_state(results: Path, grid: Grid, state: dict) -> None:
    from persim_bench.data.dataset import write_json

    path = state_path(results, grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(state, path)


def new_state(grid: Grid, tracking_uri: str, storage: str, experiment_id: str, parent_run_id: str) -> dict:
    return {"grid": grid.name, "fingerprint": grid_fingerprint(grid), "tracking_uri": tracking_uri,
            "storage": storage, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def stage_name(grid: Grid, stage: str, parent_run_id: str) -> str:
    """The Tune experiment of one stage of one invocation (what --resume restores)."""
    return f"{grid.name}-{stage.replace('_', '-')}-{parent_run_id[:8]}"


def choose_ranks(grid: Grid, context: RunContext) -> dict[tuple[str, str, int], int]:
    """rank_cv's picks for this invocation, logged on the parent run (params ``rank.<env>.<regime>.s<seed>``)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from persim_bench.tables import best_ranks

    client = MlflowClient(context.tracking_uri)
    runs = client.search_runs([context.experiment_id], max_results=50000,
                              filter_string=f"tags.stage = 'rank_cv' and "
                                            f"tags.`mlflow.parentRunId` = '{context.parent_run_id}'")
    chosen = best_ranks(runs, grid.persim.cv_tolerance)
    params = [Param(f"rank.{env}.{regime}.s{seed}", str(rank)) for (env, regime, seed), rank in chosen.items()]
    existing = client.get_run(context.parent_run_id).data.params
    client.log_batch(context.parent_run_id, params=[p for p in params if p.key not in existing])
    return chosen
