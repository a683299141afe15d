"""The trials of a grid and the Tune trainable that runs one, recorded in exactly one MLflow run.

``rank_cv_trials`` and ``main_trials`` expand a grid into typed ``Trial`` records with
deterministic names; ``run_trial`` is what every Tune trial executes: it looks the algorithm up
in the registry, runs it, and logs params, metrics and failures to MLflow.
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from persim_bench.algos.base import Trial, TrialContext
from persim_bench.algos.registry import ALGORITHMS
from persim_bench.config import Grid
from persim_bench.envs import get_env
from persim_bench.orchestration.provenance import dataset_input, log_dataset_input, log_trained_model, provenance_tags
from persim_bench.orchestration.tracking import find_trial_run, trial_params
from persim_bench.specs import per_env

RANK_CV = "rank_cv"
MLFLOW_BATCH = 1000  # MLflow refuses more metrics per log_batch call


def trial_name(trial: Trial) -> str:
    """persim-cartpole-random-r5-s0, bcq-p-mountaincar-pure-s1, true-env-mpc-cartpole-s0, rank-cv-...-r3-s0."""
    if trial.stage == RANK_CV:
        return f"rank-cv-{trial.env}-{trial.regime}-r{trial.rank}-s{trial.seed}"
    parts = [trial.algo.replace("_", "-"), trial.env] + ([trial.regime] if trial.regime != "none" else [])
    if trial.rank_source is not None:
        parts.append(f"r{trial.rank if trial.rank is not None else 'cv'}")
    return "-".join(parts + [f"s{trial.seed}"])


def named(**fields) -> Trial:
    trial = Trial(**fields)
    return Trial(**{**trial.as_dict(), "name": trial_name(trial)})


def rank_cv_trials(grid: Grid) -> list[Trial]:
    """The rank_cv stage: PerSim per env x regime (x seed if cv_per_seed) x rank of the rank grid."""
    if "persim" not in grid.algos or grid.persim.rank != "cv":
        return []
    seeds = grid.seeds if grid.persim.cv_per_seed else grid.seeds[:1]
    return [named(stage=RANK_CV, algo="persim", env=env, regime=regime, seed=seed, rank=rank)
            for env in grid.envs for regime in grid.regimes for seed in seeds for rank in grid.persim.rank_grid]


def cv_key(grid: Grid, env: str, regime: str, seed: int) -> tuple[str, str, int]:
    """Which rank_cv result decides a main trial's rank: its own seed's, or the first seed's."""
    return env, regime, seed if grid.persim.cv_per_seed else grid.seeds[0]


def main_trials(grid: Grid, chosen_ranks: dict[tuple[str, str, int], int] | None = None) -> list[Trial]:
    """The main stage: one trial per (algo, env, regime, seed[, rank]) the algorithm supports.

    Data-free algorithms skip the regime; an algorithm is skipped on envs whose action space it
    does not handle (IQL and TD3+BC on the discrete envs). PerSim's rank is pinned by the grid or
    comes from ``chosen_ranks`` (rank_cv's picks; a missing pick leaves rank None, which the trial
    reports as its failure); ``sweep_ranks`` adds a trial for every other rank of the rank grid.
    """
    trials = []
    for name in grid.algos:
        algo = ALGORITHMS[name]
        for env in grid.envs:
            if not algo.supports(get_env(env).discrete):
                continue
            for regime in grid.regimes if algo.needs_data else ["none"]:
                for seed in grid.seeds:
                    base = dict(stage="main", algo=name, env=env, regime=regime, seed=seed)
                    if name != "persim":
                        trials.append(named(**base))
                        continue
                    if grid.persim.rank == "cv":
                        rank, source = (chosen_ranks or {}).get(cv_key(grid, env, regime, seed)), "cv"
                    else:
                        rank, source = per_env(grid.persim.rank, env), "pinned"
                    trials.append(named(**base, rank=rank, rank_source=source))
                    if grid.persim.sweep_ranks:
                        trials += [named(**base, rank=other, rank_source="sweep")
                                   for other in grid.persim.rank_grid if other != rank]
    return trials


def resources_key(trial: Trial) -> str:
    """The ``resources:`` entry a trial reserves: its algorithm's, or rank_cv's."""
    return RANK_CV if trial.stage == RANK_CV else trial.algo


def trial_device(grid: Grid, trial: Trial) -> str:
    """The trial's GPU when the grid reserves one for it (and Ray gave it one), else the CPU."""
    import torch

    return "cuda" if grid.trial_resources(resources_key(trial)).gpu > 0 and torch.cuda.is_available() else "cpu"


def cost_metrics(costs: dict, total: float) -> dict:
    """Seconds by phase: load, prediction and reward as timed by the shared helpers; fit is the rest of the trial."""
    timed = sum(v for k, v in costs.items() if k.startswith("seconds_"))
    return {**costs, "seconds_total": total, "seconds_fit": max(0.0, total - timed)}


@dataclass(frozen=True)
class RunContext:
    """What every trial needs from the driver; all paths absolute (trials run in their own cwd)."""

    grid: dict
    data_root: str
    policy_root: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    session: str = ""  # one id per driver process: a trial's error is not retried within it, only on --resume


class TrialError(RuntimeError):
    """A trial's own code failed (recorded in MLflow): Tune shows the trial as ERROR, with this message."""


def run_trial(config: dict, context: RunContext) -> None:
    """The Tune trainable: one experiment, recorded in exactly one MLflow run per grid invocation.

    A retried or resumed trial reuses its earlier run (and, if that run finished, its result).
    An error of the trial's own code is recorded in MLflow and raised to Tune (the trial ends
    ERROR); Tune's restart of it in the same driver session raises it again at once, so only a
    worker or node that died gets a real retry. ``--resume`` (a new session) runs it again.
    """
    import ray
    import torch
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    from ray import tune

    from persim_bench.algos.persim import cross_validate_rank

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    trial = Trial.from_dict(config["trial"])
    grid = Grid.model_validate(context.grid)
    client = MlflowClient(context.tracking_uri)
    earlier = find_trial_run(client, context.experiment_id, context.parent_run_id, trial.name)
    if earlier is not None and earlier.info.status == "FINISHED":
        tune.report({**earlier.data.metrics, "stage": "done", "reused": 1, "mlflow_run_id": earlier.info.run_id})
        return
    if earlier is not None and earlier.info.status == "FAILED" and earlier.data.tags.get("session") == context.session:
        # Tune restarts an errored trial as if its node were lost: our own code's error stays an error.
        raise TrialError(earlier.data.tags.get("error", "failed"))
    device = trial_device(grid, trial)
    where = {"node": ray.get_runtime_context().get_node_id(), "device": device}
    if earlier is None:  # where it runs is tagged with the run's creation: a watcher never sees it without
        run_id = client.create_run(
            context.experiment_id, run_name=trial.name,
            tags={"mlflow.parentRunId": context.parent_run_id, "trial": trial.name, "stage": trial.stage,
                  "algo": trial.algo, "env": trial.env, "regime": trial.regime, "seed": str(trial.seed),
                  **where, **provenance_tags()}).info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in trial_params(context.grid, trial).items()])
        read = dataset_input(Path(context.data_root), grid.name, trial.env, trial.regime)
        if read is not None and ALGORITHMS[trial.algo].needs_data:
            log_dataset_input(client, run_id, read)
    else:  # a restart after the worker died, or a resumed invocation
        run_id = earlier.info.run_id
        client.set_tag(run_id, "attempts", str(int(earlier.data.tags.get("attempts", "1")) + 1))
        for key, value in where.items():
            client.set_tag(run_id, key, value)
        client.update_run(run_id, status="RUNNING")
    ctx = TrialContext(grid, Path(context.data_root), Path(context.policy_root),
                       Path(tune.get_context().get_trial_dir()), device, tune.report)
    run = cross_validate_rank if trial.stage == RANK_CV else ALGORITHMS[trial.algo].run
    started = time.perf_counter()
    try:
        metrics = run(trial, ctx)
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        client.set_tag(run_id, "error", error[:5000])
        client.set_tag(run_id, "session", context.session)
        client.log_text(run_id, traceback.format_exc(), "error.txt")
        client.set_terminated(run_id, "FAILED")
        raise TrialError(error) from None  # Tune records the trial as ERROR (ResultGrid.errors)
    metrics = {**metrics, **cost_metrics(ctx.costs, time.perf_counter() - started)}
    now = int(time.time() * 1000)
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    history = [Metric(k, float(v), now, step) for k, values in metrics.items() if isinstance(values, list)
               for step, v in enumerate(values)]  # curves and per-episode returns, e.g. rank_cv's loss per epoch
    logged = [Metric(k, v, now, 0) for k, v in numbers.items()] + history
    for start in range(0, len(logged), MLFLOW_BATCH):
        client.log_batch(run_id, metrics=logged[start:start + MLFLOW_BATCH])
    for key, value in metrics.items():
        if isinstance(value, str):
            client.set_tag(run_id, key, value)
    for path in ctx.artifacts:
        client.log_artifact(run_id, str(path))
    if ctx.models:
        log_trained_model(client, context.experiment_id, run_id, trial.name, trial.algo, ctx.models)
    client.set_terminated(run_id, "FINISHED")
    tune.report({**numbers, "stage": "done", "mlflow_run_id": run_id})
