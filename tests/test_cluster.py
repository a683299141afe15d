"""`persim-bench run` on a real multi-node Ray cluster (ray.cluster_utils.Cluster): spread, node loss, resume.

The driver runs as a subprocess attached with ``--address``, as a user's would; the test
process only starts and stops the cluster's nodes.
"""
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from persim_bench import cli
from persim_bench.orchestration import tracking
from persim_bench.config import load_grid

pytestmark = pytest.mark.integration  # real multi-node Ray clusters

GRID = {
    "name": "cluster",
    "envs": ["cartpole"],
    "regimes": ["random"],
    "algos": ["persim", "true_env_mpc"],
    "seeds": [0, 1, 2],
    "max_failures": 2,
    "data": {"n_agents": 8, "agents_per_shard": 4},
    "persim": {"rank": 2, "epochs": 30, "ensemble": 2, "state_hidden": [16]},
    "planner": {"horizon": 5, "candidates": 20, "elites": 5},
    "evaluation": {"prediction_policy": "heuristic", "prediction_trajectories": 2, "prediction_steps": 10,
                   "burn_in": 2, "reward_episodes": 2, "max_steps": {"cartpole": 100}},
}
TRIALS = 6


@pytest.fixture
def cluster():
    """A head that schedules nothing plus two one-CPU worker nodes: every trial runs on a worker."""
    nodes = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    workers = [nodes.add_node(num_cpus=1) for _ in range(2)]
    nodes.wait_for_nodes()
    yield nodes, workers
    nodes.shutdown()


def start_run(grid_path, results, address, *extra):
    return subprocess.Popen([sys.executable, "-m", "persim_bench.cli", "run", "--grid", str(grid_path),
                             "--results", str(results), "--address", address, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def trial_runs(results, name="cluster"):
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"persim-bench/{name}")
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id], max_results=1000) if "trial" in r.data.tags]


def wait_for(condition, what, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def write(tmp_path, grid):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def assert_each_trial_once_and_finished(results):
    runs = trial_runs(results)
    assert Counter(r.data.tags["trial"] for r in runs) == Counter({name: 1 for name in {r.data.tags["trial"]
                                                                                        for r in runs}})
    assert len(runs) == TRIALS and all(r.info.status == "FINISHED" for r in runs)
    return runs


def test_trials_spread_over_nodes_and_survive_a_node_lost_mid_grid(cluster, tmp_path):
    """A worker node lost mid-fit: its trial restarts on the other node from its last checkpoint, in the same run."""
    nodes, workers = cluster
    results = tmp_path / "results"
    grid = {**GRID, "persim": {**GRID["persim"], "epochs": 100, "batch_size": 8},  # seconds of fit: time to kill
            "checkpoint_seconds": 0}  # a Tune checkpoint after every epoch
    driver = start_run(write(tmp_path, grid), results, nodes.address)
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")

    def fitting_persim():
        for run in trial_runs(results):
            if run.data.tags["algo"] == "persim" and run.info.status == "RUNNING":
                if len(client.get_metric_history(run.info.run_id, "fit/train_loss")) >= 10:
                    return run

    running = wait_for(fitting_persim, "a PerSim trial 10 epochs into its fit")
    doomed = next(w for w in workers if w.node_id == running.data.tags["node"])
    nodes.remove_node(doomed)
    output, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, output[-3000:]

    runs = assert_each_trial_once_and_finished(results)
    lost = next(r for r in runs if r.info.run_id == running.info.run_id)
    assert lost.data.tags["attempts"] == "2" and lost.data.tags["node"] != doomed.node_id  # retried elsewhere
    resumed_at = int(lost.data.tags["resumed_from"].removeprefix("epoch "))
    # Epoch 10's metrics are logged just before its checkpoint is saved, so the kill can land between the two:
    # the last checkpoint Tune holds is epoch 9's or later, never epoch 0.
    assert resumed_at >= 9
    steps = Counter(m.step for m in client.get_metric_history(lost.info.run_id, "fit/train_loss"))
    assert set(steps) == set(range(1, 101))  # the whole curve, in the one MLflow run
    assert all(steps[epoch] == 1 for epoch in range(1, resumed_at + 1))  # epochs before it were not trained again
    assert {r.data.tags["node"] for r in runs} <= {w.node_id for w in workers}


def test_a_killed_driver_resumes_without_rerunning_or_duplicating_trials(cluster, tmp_path):
    nodes, workers = cluster
    results = tmp_path / "results"
    grid_path = write(tmp_path, GRID)
    driver = start_run(grid_path, results, nodes.address)
    finished_before = wait_for(lambda: [r for r in trial_runs(results) if r.info.status == "FINISHED"] or None,
                               "a finished trial")
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started in its session
    driver.wait()
    assert len([r for r in trial_runs(results) if r.info.status == "FINISHED"]) < TRIALS

    resumed = start_run(grid_path, results, nodes.address, "--resume")
    output, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, output[-3000:]
    runs = assert_each_trial_once_and_finished(results)
    by_id = {r.info.run_id: r for r in runs}
    for before in finished_before:  # finished trials were not run again
        after = by_id[before.info.run_id]
        assert after.info.end_time == before.info.end_time and "attempts" not in after.data.tags
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1  # one invocation, continued
    assert len({r.data.tags["node"] for r in runs}) >= 2  # trials ran on both worker nodes


def test_resume_refuses_a_changed_grid_and_a_grid_never_run(tmp_path, write_grid, capsys):
    grid_path = write_grid(GRID)
    results = tmp_path / "results"
    grid = load_grid(grid_path)
    tracking.save_state(results, grid, tracking.new_state(grid, "sqlite:///x.db", str(results / "ray"), "1", "abc",
                                                          results))
    write_grid({**GRID, "seeds": [0, 1]})
    with pytest.raises(SystemExit, match="grid 'cluster' changed since the run being resumed"):
        cli.main(["run", "--grid", str(grid_path), "--results", str(results), "--resume"])
    with pytest.raises(SystemExit, match="nothing to resume for grid 'cluster'"):
        cli.main(["run", "--grid", str(grid_path), "--results", str(tmp_path / "other"), "--resume"])


def test_storage_workers_cannot_reach_is_refused_before_trials(ray_cluster, write_grid, tmp_path):
    results = tmp_path / "results"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit, match=r"--storage .*a-file/tune: cannot write there"):
        cli.main(["run", "--grid", str(write_grid(GRID)), "--results", str(results),
                  "--storage", str(blocker / "tune")])
    assert not (results / "mlflow.db").exists() and not (results / "datasets").exists()
