"""Data-size axes (grid ``data_sizes``): nested seeded subsets, the trials they make, the ablation, end to end."""
import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from persim_bench import cli
from persim_bench.algos.persim import PersimSpec, fit_persim, rank_cv_trials
from persim_bench.algos.registry import ALGORITHMS
from persim_bench.config import Grid, load_grid
from persim_bench.data.dataset import Transitions
from persim_bench.data.generate import DatasetPlan
from persim_bench.data.subsets import subset_agents, subset_record, take_subset
from persim_bench.errors import GridError
from persim_bench.orchestration.estimate import trial_rows
from persim_bench.orchestration.trials import main_trials, pre_stages

BASE = {"name": "sizes", "envs": ["cartpole"], "regimes": ["random"], "seeds": [0, 1],
        "algos": ["persim", "persim_no_factors", "bcq_p", "true_env_mpc"], "data": {"n_agents": 40},
        "persim": {"rank": 2}, "data_sizes": {"agents": [10, 20], "steps_per_agent": [5, None]}}


def plan(env="cartpole", regime="random", seed=0, n_agents=40) -> DatasetPlan:
    return DatasetPlan(env, regime, "g", seed, n_agents, 200, 10)


def test_subsets_are_nested_hold_the_test_agents_and_ignore_the_regime():
    sizes = [5, 6, 10, 25, 40]
    subsets = [set(subset_agents(plan(), n).tolist()) for n in sizes]
    for n, ids in zip(sizes, subsets):
        assert len(ids) == n and set(range(5)) <= ids
    assert all(small <= large for small, large in zip(subsets, subsets[1:]))
    assert np.array_equal(subset_agents(plan(regime="pure"), 10), subset_agents(plan(), 10))
    assert np.array_equal(subset_agents(plan(), 10), subset_agents(plan(), 10))
    assert not np.array_equal(subset_agents(plan(seed=1), 10), subset_agents(plan(), 10))
    assert np.array_equal(subset_agents(plan(), None), np.arange(40))
    with pytest.raises(ValueError, match="needs 5 <= agents <= 40"):
        subset_agents(plan(), 41)


def transitions(n_agents=8, length=6) -> Transitions:
    agent = np.repeat(np.arange(n_agents), length)
    t = np.tile(np.arange(length), n_agents)
    obs = np.stack([agent, t, agent * 10 + t, np.zeros_like(t)], 1).astype(np.float32)
    terminated = (t == length - 1) & (agent % 2 == 0)
    truncated = (t == length - 1) & ~terminated
    return Transitions("cartpole", "random", agent, t, obs, agent % 2, np.ones(len(t), np.float32), obs + 1,
                       terminated, truncated, np.arange(n_agents, dtype=np.float64)[:, None].repeat(2, 1))


def test_a_subset_keeps_its_agents_first_steps_renumbered_and_marks_the_cut():
    data = transitions()
    ids = np.array([0, 1, 2, 3, 4, 7])
    sub = take_subset(data, ids, 3)
    assert len(sub) == 6 * 3 and sub.n_agents == 6
    assert np.array_equal(np.unique(sub.agent), np.arange(6))
    assert np.array_equal(sub.obs[sub.agent == 5][:, 0], [7, 7, 7])  # agent 7 became 5, rows intact
    assert np.array_equal(sub.covariates[:, 0], ids)
    assert sub.t.max() == 2 and np.array_equal(sub.truncated, sub.t == 2) and not sub.terminated.any()
    whole = take_subset(data, ids, None)
    assert len(whole) == 36 and np.array_equal(whole.terminated, data.terminated[np.isin(data.agent, ids)])
    assert np.array_equal(take_subset(data, np.arange(8), None).obs, data.obs)


def test_the_subset_record_names_the_ids_and_a_fingerprint_of_them():
    record = subset_record(plan(), 10, 5)
    assert record["agents"] == 10 and record["agent_ids"] == subset_agents(plan(), 10).tolist()
    assert record["dataset_fingerprint"] == plan().fingerprint
    assert record["fingerprint"] != subset_record(plan(), 10, None)["fingerprint"]
    assert record["fingerprint"] == subset_record(plan(regime="random"), 10, 5)["fingerprint"]


def test_cells_make_one_trial_each_and_the_full_cell_is_the_main_trial():
    grid = Grid.model_validate(BASE)
    assert grid.data_size_cells() == [(None, None), (10, 5), (10, None), (20, 5), (20, None), (None, 5)]  # + full N
    names = [t.name for t in main_trials(grid)]
    assert len(names) == len(set(names)) == 3 * 6 * 2 + 2  # 3 swept algorithms x 6 cells x 2 seeds + true env
    assert "persim-cartpole-random-r2-n10-k5-s0" in names and "bcq-p-cartpole-random-k5-s1" in names
    assert "persim-no-factors-cartpole-random-r2-n20-s0" in names and "true-env-mpc-cartpole-s0" in names
    one_at_a_time = Grid.model_validate({**BASE, "data_sizes": {**BASE["data_sizes"], "cross": False}})
    assert one_at_a_time.data_size_cells() == [(None, None), (10, None), (20, None), (None, 5)]
    only_persim = Grid.model_validate({**BASE, "data_sizes": {**BASE["data_sizes"], "algos": ["persim"]}})
    assert sum(t.algo == "bcq_p" for t in main_trials(only_persim)) == 2  # full data only
    # --algo narrowing keeps the sweep of what is left
    assert {t.algo for t in main_trials(grid.narrowed(algos=["bcq_p"]))} == {"bcq_p"}


def test_a_rank_sweep_runs_on_the_full_data_only():
    grid = Grid.model_validate({**BASE, "algos": ["persim"], "persim": {"rank": 2, "sweep_ranks": True,
                                                                        "rank_grid": [2, 4]}})
    sized = [t for t in main_trials(grid) if t.agents or t.steps_per_agent]
    assert sized and all(t.rank_source == "pinned" for t in sized)
    assert sum(t.rank_source == "sweep" for t in main_trials(grid)) == 2


@pytest.mark.parametrize("sizes, field, message", [
    ({"agents": [41]}, "data_sizes.agents", "more than the dataset's 40"),
    ({"agents": []}, "data_sizes.agents", "at least one entry"),
    ({"agents": [10, 10]}, "data_sizes.agents", "more than once"),
    ({"agents": [4]}, "data_sizes.agents.0", "greater than or equal to 5"),
    ({"steps_per_agent": [201]}, "data_sizes.steps_per_agent", "cartpole's episodes hold (200 steps)"),
    ({"algos": ["true_env_mpc"]}, "data_sizes.algos", "reads no data"),
    ({"algos": ["cadm_vanilla"]}, "data_sizes.algos", "not in the grid's algos"),
    ({"agents": [40]}, "data_sizes", "every cell is the full dataset"),
    ({"agents": [10], "bogus": 1}, "data_sizes.bogus", "Extra inputs"),
])
def test_bad_axes_are_one_error_naming_file_and_field(write_grid, sizes, field, message):
    path = write_grid({**BASE, "data_sizes": sizes})
    with pytest.raises(GridError) as err:
        load_grid(path)
    assert str(err.value).startswith(f"{path}: {field}: ") and message in str(err.value)


def test_axes_on_a_grid_of_data_free_algorithms_only_are_refused(write_grid):
    path = write_grid({**BASE, "algos": ["true_env_mpc"]})
    with pytest.raises(GridError, match="none of the grid's algorithms reads data"):
        load_grid(path)


def test_dry_run_prices_a_cell_by_its_share_of_the_data():
    grid = Grid.model_validate(BASE)
    by_name = {t.name: t for t in main_trials(grid)}
    assert trial_rows(grid, by_name["persim-cartpole-random-r2-s0"], 4000) == 4000
    assert trial_rows(grid, by_name["persim-cartpole-random-r2-n10-s0"], 4000) == 1000
    assert trial_rows(grid, by_name["persim-cartpole-random-r2-n10-k5-s0"], 4000) == 50
    assert trial_rows(grid, by_name["persim-cartpole-random-r2-k5-s0"], 4000) == 200


def test_the_ablation_shares_one_factor_vector_and_persims_rank_cv():
    assert ALGORITHMS["persim_no_factors"].spec_key == "persim" and ALGORITHMS["persim_no_factors"].learns_dynamics
    data = transitions(n_agents=8, length=6)
    spec = PersimSpec(rank=2, epochs=2, ensemble=2, state_hidden=[8], action_hidden=[8])
    shared, _ = fit_persim(data, spec, 0, agent_factor=False)
    factors = shared.agent_factors()
    assert factors.shape[1] == 1 or np.allclose(factors, factors[:, :1])
    personal, _ = fit_persim(data, spec, 0)
    assert not np.allclose(personal.agent_factors(), personal.agent_factors()[:, :1])
    cv = Grid.model_validate({**BASE, "algos": ["persim_no_factors"], "persim": {"rank": "cv", "rank_grid": [2, 3]}})
    assert [stage.name for stage in pre_stages(cv)] == ["rank_cv"] and len(rank_cv_trials(cv)) == 2
    both = Grid.model_validate({**BASE, "persim": {"rank": "cv", "rank_grid": [2, 3]}})
    assert len(pre_stages(both)) == 1  # one stage for PerSim and its ablation
    picked = main_trials(both, {("cartpole", "random", 0): 3})
    assert {t.rank for t in picked if t.algo.startswith("persim")} == {3}


TINY = {"name": "tiny-sizes", "envs": ["cartpole"], "regimes": ["random"], "seeds": [0],
        "algos": ["persim", "persim_no_factors", "true_env_mpc"],
        "data": {"n_agents": 10, "agents_per_shard": 10},
        "policies": {"test_budget": 300, "hidden": [16], "n_envs": 2},
        "persim": {"epochs": 2, "ensemble": 2, "state_hidden": [16], "rank": 2},
        "planner": {"horizon": 5, "candidates": 20, "elites": 5},
        "data_sizes": {"agents": [6], "steps_per_agent": [4], "cross": False, "algos": ["persim", "persim_no_factors"]},
        "evaluation": {"rewards": False, "prediction_trajectories": 2, "prediction_steps": 10, "burn_in": 2,
                       "reward_episodes": 1, "max_steps": {"cartpole": 20}}}


def test_a_grid_with_axes_records_each_subset_and_reports_the_curves(ray_cluster, write_grid, tmp_path):
    grid, results = write_grid(TINY), tmp_path / "results"
    cli.main(["run", "--grid", str(grid), "--results", str(results)])
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("persim-bench/tiny-sizes")
    runs = {r.data.tags["trial"]: r for r in client.search_runs([experiment.experiment_id]) if "trial" in r.data.tags}
    assert len(runs) == 2 * 3 + 1 and all(r.info.status == "FINISHED" for r in runs.values())
    sized = runs["persim-cartpole-random-r2-n6-s0"]
    assert sized.data.params["agents"] == "6" and "steps_per_agent" not in sized.data.params
    subset = json.loads(open(client.download_artifacts(sized.info.run_id, "data_subset.json", str(tmp_path))).read())
    assert subset["agents"] == 6 and subset["agent_ids"][:5] == [0, 1, 2, 3, 4]
    assert sized.data.tags["data_subset"] == subset["fingerprint"]
    assert "data_subset" not in runs["persim-cartpole-random-r2-s0"].data.tags  # the full dataset
    assert "rmse/agent0" in runs["persim-no-factors-cartpole-random-r2-k4-s0"].data.metrics

    # tables show the full data only; the report adds the curves
    prediction = (results / "tiny-sizes" / "prediction_cartpole.csv").read_text().splitlines()
    assert len(prediction) == 1 + 2  # PerSim and the ablation, once each
    cli.main(["report", "--grid", str(grid), "--results", str(results)])
    report = results / "tiny-sizes" / "report"
    text = (report / "report.md").read_text()
    assert "## Data efficiency" in text and "PerSim w/o agent factors" in text
    assert (report / "efficiency_cartpole_random.png").exists() and (report / "efficiency_cartpole_random.pdf").exists()
    rows = (report / "efficiency.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3  # two methods x (N=6, k=4, full)
