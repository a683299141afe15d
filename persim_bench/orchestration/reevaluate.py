"""``persim-bench evaluate --run <id>``: reload a trial's saved model and evaluate it again, without training.

The trial is rebuilt from its MLflow run (tags and params) and the resolved grid on its parent
run; the model is the run's LoggedModel. The new numbers go to a new MLflow run in the same
experiment, tagged ``persim_bench.evaluates`` with the original run's id (and without the
``trial`` tag, so the tables keep reading the trial's own run).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import yaml

from persim_bench.algos.registry import ALGORITHMS
from persim_bench.config import Grid, with_evaluation
from persim_bench.data.dataset import data_root, policy_root
from persim_bench.errors import TrackingError
from persim_bench.orchestration.provenance import provenance_tags
from persim_bench.orchestration.tracking import GRID_ARTIFACT, mlflow_metric_name, trial_of_run
from persim_bench.orchestration.trials import algorithm_spec, trial_context, trial_numerics


def evaluation_overrides(episodes: int | None, agents: list[int] | None, prediction_policy: str | None = None,
                         data_box: bool | None = None, plan_ranking: int | None = None) -> dict:
    """The grid's evaluation settings the user replaces. Asking for episodes scores rewards, also with
    the model of a prediction-only grid (``evaluation.rewards: false``, e.g. trained at paper size on a CPU).
    ``prediction_policy: trained`` scores a model fitted before the test policy existed (its grid
    said ``heuristic``) with the paper's test policy, once that policy is in the results folder.
    ``data_box: False`` scores the same model without the data box, as the paper did. ``plan_ranking``:
    states per test agent of the candidate-ranking test (``evaluation.plan_ranking``)."""
    overrides = {k: v for k, v in (("reward_episodes", episodes), ("test_agents", agents),
                                   ("prediction_policy", prediction_policy), ("clip_to_data_box", data_box),
                                   ("plan_ranking", plan_ranking))
                 if v is not None}
    if episodes is not None:
        overrides["rewards"] = True
    return overrides


def evaluate_run(run_id: str, results: Path, tracking_uri: str, episodes: int | None = None,
                 agents: list[int] | None = None, prediction_policy: str | None = None,
                 data_box: bool | None = None, plan_ranking: int | None = None) -> tuple[str, dict]:
    """Evaluate the saved model of MLflow run ``run_id`` again; returns (the new run's id, its metrics)."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"no MLflow run {run_id!r} at {tracking_uri}") from None
    if "trial" not in run.data.tags:
        raise TrackingError(f"run {run_id}: not a persim-bench trial run (no 'trial' tag)")
    trial = trial_of_run(run)
    algo = ALGORITHMS.get(trial.algo)
    if algo is None or algo.reload is None or algo.evaluate is None:
        raise TrackingError(f"run {run_id} ({trial.algo}): this algorithm saves no model that `evaluate` can reload")
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    if not models:
        raise TrackingError(f"run {run_id} ({trial.name}): no saved model (runs before models were saved have none)")
    saved = max(models, key=lambda model: model.creation_timestamp)
    with tempfile.TemporaryDirectory(prefix="persim-evaluate-") as scratch:
        scratch = Path(scratch)
        grid_file = mlflow.artifacts.download_artifacts(run_id=run.data.tags["mlflow.parentRunId"],
                                                        artifact_path=GRID_ARTIFACT, dst_path=str(scratch),
                                                        tracking_uri=tracking_uri)
        grid = Grid.model_validate(yaml.safe_load(Path(grid_file).read_text()))
        overrides = evaluation_overrides(episodes, agents, prediction_policy, data_box, plan_ranking)
        grid = with_evaluation(grid, overrides, f"evaluate --run {run_id}")
        model_dir = mlflow.artifacts.download_artifacts(artifact_uri=saved.artifact_location,
                                                        dst_path=str(scratch / "model"), tracking_uri=tracking_uri)
        model = algo.reload(Path(model_dir), "cpu")
        ctx = trial_context(grid, trial, data_root(results, grid.name), policy_root(results), scratch / "work")
        started = time.perf_counter()
        with trial_numerics():  # as the trial computed: the same model scores the same
            output = algo.evaluate(model, trial, algorithm_spec(grid, trial), ctx)
    new = client.create_run(run.info.experiment_id, run_name=f"{trial.name}-evaluate",
                            tags={"persim_bench.evaluates": run_id, "evaluated_trial": trial.name,
                                  "algo": trial.algo, "env": trial.env, "regime": trial.regime,
                                  "seed": str(trial.seed), "logged_model": saved.model_id, **provenance_tags()})
    for key, value in overrides.items():
        client.log_param(new.info.run_id, f"evaluation.{key}", str(value))
    now = int(time.time() * 1000)
    numbers = {k: float(v) for k, v in {**output.metrics, **output.costs}.items() if isinstance(v, (int, float))}
    numbers["seconds_total"] = time.perf_counter() - started
    client.log_batch(new.info.run_id, metrics=[Metric(mlflow_metric_name(k), v, now, 0) for k, v in numbers.items()])
    client.set_terminated(new.info.run_id, "FINISHED")
    return new.info.run_id, numbers
