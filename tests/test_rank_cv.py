"""The rank_cv stage through Ray Tune picks PerSim's rank where the answer is known."""
import csv

from mlflow.tracking import MlflowClient

from persim_bench import cli

RANKS = [1, 2, 3, 4, 16]
MOUNTAINCAR = {
    "name": "rank-cv-mountaincar",
    "envs": ["mountaincar"],
    "regimes": ["random"],
    "algos": ["persim"],
    "seeds": [0],
    "data": {"n_agents": 30, "agents_per_shard": 15, "max_steps": {"mountaincar": 200}},
    "persim": {"rank": "cv", "rank_grid": RANKS, "epochs": 80, "ensemble": 1, "state_hidden": [64]},
    "planner": {"horizon": 5, "candidates": 20, "elites": 5},
    "evaluation": {"prediction_policy": "heuristic", "prediction_trajectories": 2, "prediction_steps": 10,
                   "burn_in": 2, "reward_episodes": 1, "max_steps": {"mountaincar": 20}},
}


def test_rank_cv_finds_mountaincars_rank_three_and_main_uses_it(ray_cluster, write_grid, tmp_path):
    """MountainCar's dynamics have rank 3 (paper, Proposition 1): the loss falls sharply up to 3, then is flat."""
    results = tmp_path / "results"
    cli.main(["run", "--grid", str(write_grid(MOUNTAINCAR)), "--results", str(results)])

    with open(results / "rank-cv-mountaincar" / "rank_cv.csv") as f:
        header, row = list(csv.reader(f))
    losses = {int(column.removeprefix("rank ")): float(value.rstrip("*")) for column, value in zip(header[4:], row[4:])}
    assert losses[1] > 5 * losses[3] and losses[2] > 5 * losses[3], losses
    assert min(losses[4], losses[16]) > losses[3] / 3, losses  # no further big gain past the true rank
    chosen = int(row[3])
    assert 3 <= chosen <= 4, losses
    assert (results / "rank-cv-mountaincar" / "rank_cv.png").stat().st_size > 0

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("persim-bench/rank-cv-mountaincar")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("persim_bench.parent") == "1")
    assert parent.data.params["rank.mountaincar.random.s0"] == str(chosen)
    cv_runs = [r for r in runs if r.data.tags.get("stage") == "rank_cv"]
    assert sorted(int(r.data.params["rank"]) for r in cv_runs) == RANKS
    curve = client.get_metric_history(cv_runs[0].info.run_id, "fit/val_loss")  # logged live, step = epoch
    assert [m.step for m in curve] == list(range(1, 81)) and curve[-1].value < curve[0].value
    main = next(r for r in runs if r.data.tags.get("stage") == "main")
    assert main.data.params["rank"] == str(chosen) and main.data.params["rank_source"] == "cv"
    assert main.data.tags["trial"] == f"persim-mountaincar-random-r{chosen}-s0" and main.info.status == "FINISHED"
