"""Runs carry their provenance and their trained models; a model reloads and evaluates again; trial errors are Tune ERRORs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from persim_bench import cli
from persim_bench.orchestration.reevaluate import evaluate_run
from persim_bench.orchestration.tracking import latest_trial_runs

pytestmark = pytest.mark.integration

TINY = {
    "name": "tiny-provenance", "seed": 0, "envs": ["cartpole"], "regimes": ["random"],
    "algos": ["persim", "cadm_vanilla", "true_env_mpc"], "seeds": [0],
    "data": {"n_agents": 6, "agents_per_shard": 6},
    "persim": {"rank": 2, "epochs": 2, "ensemble": 2, "state_hidden": [8], "action_hidden": [8]},
    "cadm": {"hidden": [8], "context_hidden": [8], "iterations": 1, "epochs_per_iteration": 1},
    "planner": {"horizon": 3, "candidates": 8, "elites": 2, "iterations": 1},
    "evaluation": {"prediction_policy": "heuristic", "prediction_trajectories": 2, "prediction_steps": 4,
                   "burn_in": 2, "reward_episodes": 1, "max_steps": {"cartpole": 10}},
}


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("provenance")
    (root / "grid.yaml").write_text(yaml.safe_dump(TINY))
    results = root / "results"
    cli.main(["run", "--grid", str(root / "grid.yaml"), "--results", str(results)])
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("persim-bench/tiny-provenance")
    runs = {r.data.tags["trial"]: r for r in latest_trial_runs(client, experiment.experiment_id)}
    parent = client.get_run(runs["persim-cartpole-random-r2-s0"].data.tags["mlflow.parentRunId"])
    return results, client, experiment, runs, parent


def test_every_run_carries_version_commit_grid_and_dataset(finished):
    results, client, experiment, runs, parent = finished
    import persim_bench

    for run in [parent, *runs.values()]:
        assert run.data.tags["persim_bench.version"] == persim_bench.__version__
        assert len(run.data.tags["persim_bench.git_commit"]) == 40  # the tests run from a git checkout
    assert {run.data.tags["denormals"] for run in runs.values()} == {"flushed"}  # measured in each trial's thread
    grid = mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/grid.yaml")
    assert "name: tiny-provenance" in grid and "rank_grid:" in grid  # resolved: defaults filled in
    manifest = json.loads((results / "datasets" / "tiny-provenance" / "cartpole" / "regime=random"
                           / "_manifest.json").read_text())
    persim = client.get_run(runs["persim-cartpole-random-r2-s0"].info.run_id)
    (read,) = persim.inputs.dataset_inputs
    assert read.dataset.digest == manifest["fingerprint"] and read.dataset.name == "tiny-provenance/cartpole/random"
    assert not client.get_run(runs["true-env-mpc-cartpole-s0"].info.run_id).inputs.dataset_inputs  # reads no data


def test_trained_models_are_logged_models_that_evaluate_again(finished):
    results, client, experiment, runs, _ = finished
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert {m.source_run_id for m in models} == {runs["persim-cartpole-random-r2-s0"].info.run_id,
                                                 runs["cadm-vanilla-cartpole-random-s0"].info.run_id}
    original = runs["persim-cartpole-random-r2-s0"]
    new_id, metrics = evaluate_run(original.info.run_id, results, f"sqlite:///{results / 'mlflow.db'}", episodes=1)
    # the same model, seed and settings: the same numbers as the trial measured
    assert metrics["reward_agent0"] == original.data.metrics["reward/agent0"]
    assert metrics["rmse_agent0"] == pytest.approx(original.data.metrics["rmse/agent0"], rel=1e-5)
    again = client.get_run(new_id)
    assert again.data.tags["persim_bench.evaluates"] == original.info.run_id and "trial" not in again.data.tags
    _, narrowed = evaluate_run(runs["cadm-vanilla-cartpole-random-s0"].info.run_id, results,
                               f"sqlite:///{results / 'mlflow.db'}", episodes=2, agents=[1], plan_ranking=2)
    assert math.isfinite(narrowed["reward_agent1"]) and "reward_agent0" not in narrowed
    # CaDM (conditioned on each state's real past) through the ranking test; a 3-step horizon ties every
    # CartPole plan (all stay up), so there is nothing to rank: NaN, not an error
    assert math.isnan(narrowed["plan_rank_agent1"]) and math.isnan(narrowed["plan_regret_agent1"])
    # the tables keep reading the trial's own run
    assert {r.info.run_id for r in latest_trial_runs(client, experiment.experiment_id)} == {
        r.info.run_id for r in runs.values()}


def test_a_model_fitted_under_the_heuristic_is_scored_with_the_trained_test_policy(finished, tmp_path):
    """A model fitted before the test policy existed (a heuristic-policy grid) is scored as the paper scores it."""
    from persim_bench.config import load_grid
    from persim_bench.data.dataset import policy_root
    from persim_bench.data.policies import PolicyError, prediction_policy_path, train_policies

    results, client, experiment, runs, _ = finished
    original = runs["persim-cartpole-random-r2-s0"]
    uri = f"sqlite:///{results / 'mlflow.db'}"
    with pytest.raises(PolicyError, match="missing policy file"):  # the test policy is not trained yet
        evaluate_run(original.info.run_id, results, uri, prediction_policy="trained")
    (tmp_path / "trained.yaml").write_text(yaml.safe_dump({**TINY, "evaluation": {**TINY["evaluation"],
                                                                                  "prediction_policy": "trained"}}))
    grid = load_grid(tmp_path / "trained.yaml")
    train_policies(grid, policy_root(results), progress=False)
    assert prediction_policy_path(policy_root(results), grid, "cartpole").exists()
    new_id, metrics = evaluate_run(original.info.run_id, results, uri, prediction_policy="trained")
    # other actions, other open-loop windows: the heuristic's numbers do not come back
    assert math.isfinite(metrics["rmse_agent0"]) and metrics["rmse_agent0"] != original.data.metrics["rmse/agent0"]
    assert client.get_run(new_id).data.params["evaluation.prediction_policy"] == "trained"
    unboxed_id, _ = evaluate_run(original.info.run_id, results, uri, data_box=False)
    assert client.get_run(unboxed_id).data.params["evaluation.clip_to_data_box"] == "False"


def test_the_evaluate_command_prints_and_records(finished, capsys):
    results, client, experiment, runs, _ = finished
    original = runs["persim-cartpole-random-r2-s0"].info.run_id
    cli.main(["evaluate", "--run", original, "--results", str(results), "--episodes", "1", "--agents", "0",
              "--plan-ranking", "2"])
    out = capsys.readouterr().out
    assert "reward_agent0" in out and f"evaluation of run {original} recorded as MLflow run" in out
    assert "plan_rank_agent0" in out and "plan_regret_agent0" in out
    with pytest.raises(SystemExit, match="evaluation.plan_ranking: Input should be greater than or equal to 0"):
        cli.main(["evaluate", "--run", original, "--results", str(results), "--plan-ranking", "-1"])
    with pytest.raises(SystemExit, match="persim-bench: no MLflow run 'nope'"):
        cli.main(["evaluate", "--run", "nope", "--results", str(results)])
    with pytest.raises(SystemExit, match="saves no model that `evaluate` can reload"):
        cli.main(["evaluate", "--run", runs["true-env-mpc-cartpole-s0"].info.run_id, "--results", str(results)])


@pytest.mark.parametrize("attempt", range(3))
def test_trials_starting_together_all_log_their_shared_dataset(tmp_path, attempt):
    """MLflow inserts a dataset row on first use; concurrent trials race for it (a UNIQUE constraint error)."""
    import threading

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from persim_bench.orchestration.provenance import log_dataset_input

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = MlflowClient(uri).create_experiment("race")
    run_ids = [MlflowClient(uri).create_run(experiment).info.run_id for _ in range(8)]
    read = DatasetInput(Dataset(name="grid/cartpole/random", digest="d7efb22967a0", source_type="local",
                                source="/data", schema=None, profile="{}"),
                        tags=[InputTag("mlflow.data.context", "training")])
    start, errors = threading.Barrier(len(run_ids)), []

    def log(run_id):
        client = MlflowClient(uri)
        start.wait()
        try:
            log_dataset_input(client, run_id, read)
        except Exception as err:  # noqa: BLE001 - every error is the failure this test looks for
            errors.append(err)

    threads = [threading.Thread(target=log, args=(run_id,)) for run_id in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    client = MlflowClient(uri)
    assert all(client.get_run(r).inputs.dataset_inputs[0].dataset.digest == "d7efb22967a0" for r in run_ids)


def test_metric_names_are_grouped_in_mlflow_and_read_back_under_either_naming():
    from types import SimpleNamespace

    from persim_bench.orchestration.tracking import metric_name, mlflow_metric_name, run_metrics

    grouped = {"reward_agent0": "reward/agent0", "reward_std_agent3": "reward_std/agent3", "rmse_mean": "rmse/mean",
               "reward_mean": "reward/mean", "r2_agent4": "r2/agent4", "episode_returns_agent1": "episode_returns/agent1",
               "seconds_fit": "seconds/fit", "seconds_total": "seconds/total", "model_macs_per_second":
               "model/macs_per_second", "probe_r2_gravity": "probe_r2/gravity", "train_loss": "loss/train",
               "val_loss": "loss/val", "critic_loss_agent2": "critic_loss/agent2", "loss": "loss", "lr": "lr",
               "fit_seconds": "fit_seconds", "transitions": "transitions", "agent_loss": "loss/agent"}
    assert {name: mlflow_metric_name(name) for name in grouped} == grouped
    assert {key: metric_name(key) for key in grouped.values()} == {key: name for name, key in grouped.items()}
    assert metric_name("fit/train_loss") == "fit/train_loss"  # live curves keep their key
    new = SimpleNamespace(data=SimpleNamespace(metrics={"reward/agent0": 1.0, "loss/val": 0.5}))
    old = SimpleNamespace(data=SimpleNamespace(metrics={"reward_agent0": 1.0, "val_loss": 0.5}))
    assert run_metrics(new) == run_metrics(old) == {"reward_agent0": 1.0, "val_loss": 0.5}


def test_a_run_left_without_params_by_a_killed_driver_gets_them_when_reused(finished):
    """Creating a run and logging its params are two MLflow calls; a driver killed between them left a run
    without ``rank``, and the resumed grid's tables failed reading it (CI, 2026-12-02)."""
    from persim_bench.config import Grid
    from persim_bench.orchestration.provenance import provenance_tags
    from persim_bench.orchestration.tables import cost_records
    from persim_bench.data.dataset import data_root, policy_root
    from persim_bench.orchestration.tracking import trial_of_run, trial_params
    from persim_bench.orchestration.trials import RunContext, main_trials, open_trial_run

    results, client, experiment, runs, parent = finished
    grid = Grid.model_validate(TINY)
    trial = next(t for t in main_trials(grid) if t.algo == "persim")
    context = RunContext(grid.model_dump(), str(data_root(results, grid.name)), str(policy_root(results)),
                         f"sqlite:///{results / 'mlflow.db'}", experiment.experiment_id, parent.info.run_id)
    half = client.create_run(experiment.experiment_id, run_name=trial.name,  # what the kill left behind
                             tags={"trial": trial.name, "stage": trial.stage, "algo": trial.algo, "env": trial.env,
                                   "regime": trial.regime, "seed": str(trial.seed), **provenance_tags()})
    run_id = open_trial_run(client, context, grid, trial, client.get_run(half.info.run_id), {"node": "n"})
    reused = client.get_run(run_id)
    assert run_id == half.info.run_id and reused.data.tags["attempts"] == "2"
    assert reused.data.params == trial_params(context.grid, trial)
    assert trial_of_run(reused).rank == trial.rank == 2
    finished_input = runs[trial.name].inputs.dataset_inputs[0].dataset
    assert [i.dataset.digest for i in reused.inputs.dataset_inputs] == [finished_input.digest]
    open_trial_run(client, context, grid, trial, client.get_run(run_id), {"node": "m"})  # complete: nothing added
    assert len(client.get_run(run_id).inputs.dataset_inputs) == 1

    # A run that finished without params before this fix: the tables price it as unknown, not a traceback.
    old = client.create_run(experiment.experiment_id, tags={"trial": trial.name, "stage": "main", "algo": "persim",
                                                            "env": trial.env, "regime": trial.regime, "seed": "0"})
    client.log_metric(old.info.run_id, "seconds_total", 3.0)
    client.set_terminated(old.info.run_id, "FINISHED")
    [record] = cost_records([client.get_run(old.info.run_id)], grid, Path(context.data_root), 1e9)
    assert record.estimated_seconds is None and record.algo == "persim"
