"""`persim-bench run` end to end on a real local Ray cluster, Ray Tune trials and MLflow on SQLite."""
import csv
import hashlib
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from persim_bench import cli, datasets
from persim_bench.config import GridError, load_grid

TINY = {
    "name": "tiny-pipeline",
    "seed": 0,
    "envs": ["cartpole"],
    "regimes": ["random"],
    "algos": ["persim", "cadm_pets", "bcq_a", "true_env_mpc"],
    "seeds": [0],
    "data": {"n_agents": 8, "agents_per_shard": 8},
    "policies": {"test_budget": 300, "hidden": [16], "n_envs": 2},
    "persim": {"epochs": 2, "ensemble": 2, "state_hidden": [16], "rank": 2},
    "cadm": {"hidden": [16], "context_hidden": [16], "iterations": 1, "epochs_per_iteration": 1,
             "pets_members": 2, "pets_particles": 4},
    "bcq": {"steps": 20, "steps_per_epoch": 10, "discrete_hidden": [16]},
    "planner": {"horizon": 5, "candidates": 20, "elites": 5},
    "evaluation": {"prediction_trajectories": 2, "prediction_steps": 10, "burn_in": 2, "reward_episodes": 1, "policy_reward_episodes": 2,
                   "max_steps": {"cartpole": 20}},
}


def _runs(results, name="tiny-pipeline"):
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"persim-bench/{name}")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def test_run_logs_every_trial_under_one_parent_and_writes_tables(ray_cluster, write_grid, tmp_path, monkeypatch):
    grid = write_grid(TINY)
    results = tmp_path / "results"
    user_cwd = tmp_path / "cwd"
    user_cwd.mkdir()
    monkeypatch.chdir(user_cwd)
    cli.main(["run", "--grid", str(grid), "--results", str(results)])
    assert list(user_cwd.iterdir()) == []  # no mlruns/, MUJOCO_LOG.TXT or d3rlpy_logs/ in the user's folder

    client, runs = _runs(results)
    parents = [r for r in runs if r.data.tags.get("persim_bench.parent") == "1"]
    children = [r for r in runs if "trial" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["trial"] for r in children) == [
        "bcq-a-cartpole-random-s0", "cadm-pets-cartpole-random-s0", "persim-cartpole-random-r2-s0",
        "true-env-mpc-cartpole-s0"]
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.status == "FINISHED"
        assert "reward/agent0" in run.data.metrics and run.data.params["env"] == "cartpole"
    persim = next(r for r in children if r.data.tags["algo"] == "persim")
    assert "rmse/agent4" in persim.data.metrics and persim.data.params["persim.rank"] == "2"
    assert persim.data.tags["prediction_policy"].startswith("dqn-test:test-0-")

    cadm = next(r for r in children if r.data.tags["algo"] == "cadm_pets")
    assert "rmse/agent0" in cadm.data.metrics and cadm.data.params["cadm.pets_particles"] == "4"
    bcq = next(r for r in children if r.data.tags["algo"] == "bcq_a")
    assert bcq.data.metrics["transitions"] > 0 and any(k.endswith("/agent4") and "reward" not in k for k in bcq.data.metrics)
    assert "rmse/agent0" not in bcq.data.metrics
    assert "planner.horizon" not in bcq.data.params and bcq.data.params["bcq.steps"] == "20"

    table = (results / "tiny-pipeline" / "reward_cartpole.md").read_text()
    for row in ("| random | PerSim |", "| random | PE-TS CaDM |", "| random | BCQ-A |", "| - | True env + MPC |"):
        assert row in table
    prediction = (results / "tiny-pipeline" / "prediction_cartpole.csv").read_text()
    assert "random,PerSim," in prediction and "random,PE-TS CaDM," in prediction and "BCQ" not in prediction
    for suffix in ("md", "csv", "tex"):
        assert (results / "tiny-pipeline" / f"prediction_cartpole.{suffix}").exists()
    artifacts = [a.path for a in client.list_artifacts(parents[0].info.run_id, "tables")]
    assert {"tables/reward_cartpole.md", "tables/datasets.md", "tables/policies.md"} <= set(artifacts)
    table8 = (results / "tiny-pipeline" / "datasets.csv").read_text().splitlines()
    data = datasets.load(grid, "cartpole", "random", results=results).transitions
    assert table8[1].startswith("cartpole,random,") and table8[1].endswith(f",{len(data) / 8:.1f}")
    assert "dqn" in (results / "tiny-pipeline" / "policies.md").read_text()

    # The reproduction report: our cells next to the paper's, from the same MLflow runs.
    report = results / "tiny-pipeline" / "report"
    text = (report / "report.md").read_text()
    assert "## Claims" in text and "## Aggregates" in text and "## Figure 1" in text
    assert "| seeds | all | 1 | 5 |" in text  # the protocol table: this tiny grid is not the paper's
    assert (report / "figure1_cartpole_random.png").stat().st_size > 0
    assert (report / "performance_profile.png").exists()
    with open(report / "paper_reward.csv") as f:
        rows = list(csv.DictReader(f))
    persim_cell = next(r for r in rows if r["method"] == "PerSim" and r["agent"] == "0" and r["regime"] == "random")
    assert float(persim_cell["ours"]) == pytest.approx(persim.data.metrics["reward/agent0"], rel=1e-3)
    assert persim_cell["paper"].startswith("178.4") and persim_cell["paper table"] == "6/13"  # the paper's cell
    assert {"report/report.md", "report/claims.csv"} <= {a.path for a in client.list_artifacts(
        parents[0].info.run_id, "report")}
    assert "probe_r2/length" in persim.data.metrics and "seconds/fit" in persim.data.metrics
    assert (tmp_path / "results" / "ray").is_dir()  # Tune's storage under results/
    assert (results / "mlartifacts" / "persim-bench-tiny-pipeline").is_dir()  # artifacts too, not ./mlruns


def _poison_rewards(folder):
    """NaN rewards in a shard, with a manifest that vouches for them: the data stage keeps the shard (its
    sha256 matches), PerSim's reader refuses it, and True env + MPC needs no data."""
    manifest = json.loads((folder / "_manifest.json").read_text())
    entry = manifest["files"][0]
    table = pq.read_table(folder / entry["name"])
    rewards = pa.array(np.full(table.num_rows, np.nan, np.float32))
    pq.write_table(table.set_column(table.schema.get_field_index("reward"), "reward", rewards), folder / entry["name"])
    entry["sha256"] = hashlib.sha256((folder / entry["name"]).read_bytes()).hexdigest()
    (folder / "_manifest.json").write_text(json.dumps(manifest))


def test_a_failed_trial_is_recorded_and_the_grid_goes_on(ray_cluster, write_grid, tmp_path):
    grid = write_grid({**TINY, "name": "tiny-failing", "max_failures": 1})  # one restart: it must raise at once
    results = tmp_path / "results"
    cli.main(["run", "--grid", str(grid), "--results", str(results), "--algo", "true_env_mpc"])
    _poison_rewards(results / "datasets" / "tiny-failing" / "cartpole" / "regime=random")

    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--grid", str(grid), "--results", str(results)])
    assert exit_.value.code == 1
    _, runs = _runs(results, "tiny-failing")
    latest = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        if "trial" in run.data.tags:
            latest[run.data.tags["trial"]] = run
    failed = latest["persim-cartpole-random-r2-s0"]
    assert failed.info.status == "FAILED"
    assert "non-finite values in column 'reward'" in failed.data.tags["error"]
    assert "attempts" not in failed.data.tags  # our code's error is not retried as if its node were lost
    assert any("persim-cartpole-random" in str(p) for p in (results / "ray").rglob("error.txt"))  # Tune: ERROR
    assert latest["true-env-mpc-cartpole-s0"].info.status == "FINISHED"
    tables = (results / "tiny-failing" / "tables.md").read_text()
    assert "Failed trials" in tables and "persim-cartpole-random-r2-s0: DatasetError" in tables
    assert "| cartpole | random | unreadable: " in tables  # Table 8 says why its row is missing


@pytest.mark.parametrize("change, message", [
    ({"algos": ["persim", "dreamer"]}, "algos: unknown algorithm 'dreamer'"),
    ({"persim": {"rank": 0}}, "persim.rank"),
    ({"persim": {"rank": {"cartpole": -3}}}, "persim.rank"),
    ({"persim": {"rank_grid": [3, 0]}}, "persim.rank_grid.1: Input should be greater than 0"),
    ({"resources": {"dreamer": {"cpu": 1}}}, "resources: unknown algorithm or stage 'dreamer'"),
    ({"cadm": {"pets_particles": 7}}, "cadm: pets_particles \\(7\\) must be a multiple"),
    ({"extends": "no-such-grid"}, "unknown grid 'no-such-grid'"),
])
def test_bad_grids_fail_before_ray(write_grid, change, message):
    with pytest.raises(GridError, match=message):
        load_grid(write_grid({**TINY, **change}))


def test_unreachable_address_and_missing_dataset_give_one_line(tmp_path, write_grid):
    grid = write_grid(TINY)
    done = subprocess.run([sys.executable, "-m", "persim_bench.cli", "run", "--grid", str(grid),
                           "--results", str(tmp_path / "r"), "--address", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("persim-bench: cannot reach Ray at --address 127.0.0.1:1")
    done = subprocess.run([sys.executable, "-m", "persim_bench.cli", "tables", "--grid", str(grid),
                           "--results", str(tmp_path / "empty")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "empty: no mlflow.db, so no runs to read" in done.stderr
    (tmp_path / "empty").mkdir()
    MlflowClient(f"sqlite:///{tmp_path / 'empty' / 'mlflow.db'}").create_experiment("persim-bench/another-grid")
    done = subprocess.run([sys.executable, "-m", "persim_bench.cli", "tables", "--grid", str(grid),
                           "--results", str(tmp_path / "empty")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no MLflow experiment" in done.stderr
