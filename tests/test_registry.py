"""Every registered algorithm honours the same contract: it fits on a tiny shard and scores on every test agent,
deterministically; and the registry is what the grid, the trials, MLflow params, tables and estimates use."""
from __future__ import annotations

import math

import pytest

from persim_bench.algos.d3rlpy_common import OfflinePolicySpec
from persim_bench.algos.registry import ALGORITHMS, spec_sections
from persim_bench.config import Grid, load_grid
from persim_bench.contracts import Algorithm, Trial
from persim_bench.data.generate import dataset_plans, write_manifest, write_shard
from persim_bench.envs import get_env
from persim_bench.errors import GridError
from persim_bench.orchestration.estimate import estimate
from persim_bench.orchestration.trials import algorithm_spec, main_trials, trial_context
from persim_bench.orchestration.tracking import trial_params
from persim_bench.analysis.tabular import method_label
from persim_bench.orchestration.tables import method_labels

TEST_AGENTS = [0, 3]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_grid(algo: str, env: str) -> Grid:
    smoke = load_grid("smoke")  # the d3rlpy baselines at smoke size (their fields differ; smoke sizes are valid)
    sections = {key: getattr(smoke, key).model_dump() for key, spec in spec_sections().items()
                if issubclass(spec, OfflinePolicySpec)}
    return Grid.model_validate({
        "name": "contract", "envs": [env], "regimes": ["random"], "algos": [algo], "seeds": [0],
        "data": {"n_agents": 6, "agents_per_shard": 6, "max_steps": {env: 30}},
        "persim": {"rank": 2, "epochs": 2, "ensemble": 2, "state_hidden": [16], "action_hidden": [16]},
        "cadm": {"context_hidden": [8], "hidden": [16, 16], "iterations": 1, "epochs_per_iteration": 1,
                 "pets_members": 2, "pets_particles": 2},
        **sections,
        "planner": {"horizon": 3, "candidates": 6, "elites": 2, "iterations": 1},
        "evaluation": {"test_agents": TEST_AGENTS, "prediction_policy": "heuristic", "prediction_trajectories": 2,
                       "prediction_steps": 4, "burn_in": 2, "reward_episodes": 1, "policy_reward_episodes": 2,
                       "max_steps": {env: 8}},
    })


def write_tiny_dataset(grid: Grid, root) -> None:
    """The generator's own shard and manifest code, without Ray: real Parquet for the one reader."""
    for plan in dataset_plans(grid, None):
        write_manifest(plan, root, {shard: write_shard(plan, shard, root) for shard in range(plan.n_shards)})


def contract_env(algo: Algorithm) -> str:
    return "cartpole" if algo.supports(discrete=True) else "halfcheetah"


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_fits_and_scores_every_test_agent_and_repeats_itself(name, tmp_path):
    algo = ALGORITHMS[name]
    env = contract_env(algo)
    grid = tiny_grid(name, env)
    if algo.needs_data:
        write_tiny_dataset(grid, tmp_path / "data")
    (trial,) = main_trials(grid)
    runs = []
    for attempt in range(2):
        ctx = trial_context(grid, trial, tmp_path / "data", tmp_path / "policies", tmp_path / f"work{attempt}")
        runs.append(algo.run(trial, algorithm_spec(grid, trial), ctx))
    first, again = (output.metrics for output in runs)
    costs = runs[-1].costs
    assert costs["seconds_reward"] > 0 and ("seconds_load" in costs) == algo.needs_data
    if algo.plans:  # the planner's model rows are counted, and learned nets' multiply-adds measured
        assert costs["model_rows"] > 0
        assert (costs.get("model_macs_per_second", 0) > 0) == algo.learns_dynamics
    if algo.reload:  # what it saved reloads and evaluates to the same numbers
        folder = runs[-1].models[0].parent
        assert {path.parent for path in runs[-1].models} == {folder}
        again = algo.evaluate(algo.reload(folder, "cpu"), trial, algorithm_spec(grid, trial), ctx).metrics
    for a in TEST_AGENTS:
        assert math.isfinite(first[f"reward_agent{a}"])
        if algo.learns_dynamics:
            assert math.isfinite(first[f"rmse_agent{a}"])
    assert bool(algo.reload) == (algo.learns_dynamics or algo.needs_data)  # every trained model can be reloaded
    scores = sorted(k for k in first if k.startswith(("reward_agent", "rmse_agent", "r2_agent")))
    assert [first[k] for k in scores] == [again[k] for k in scores]  # same seed, same result


def test_entries_are_complete_and_their_sections_are_grid_fields():
    for name, algo in ALGORITHMS.items():
        assert algo.name == name and algo.label and callable(algo.run)
        assert algo.cost is not None, f"{name} has no --dry-run cost"
        assert set(algo.action_spaces) <= {"discrete", "continuous"} and algo.action_spaces
        if algo.spec_key:
            assert algo.spec_key in Grid.model_fields
    assert {"persim", "cadm_vanilla", "cadm_pets", "bcq_p", "bcq_a", "true_env_mpc"} <= set(ALGORITHMS)


def test_params_labels_and_trials_follow_the_registry():
    grid = load_grid("smoke")
    for trial in main_trials(grid):
        algo = ALGORITHMS[trial.algo]
        params = trial_params(grid.model_dump(), trial)
        assert ("planner.gamma" in params) == algo.plans
        if algo.spec_key:
            assert any(key.startswith(f"{algo.spec_key}.") for key in params)
        assert algo.supports(get_env(trial.env).discrete)
        assert (trial.regime == "none") == (not algo.needs_data)
    labels = method_labels()
    assert method_label("bcq_a", labels) == "BCQ-A" and method_label("persim@r5", labels) == "PerSim (rank 5)"


def test_an_algorithm_without_a_cost_is_refused_by_the_dry_run_not_costed_as_another(monkeypatch):
    import dataclasses

    grid = tiny_grid("bcq_p", "cartpole")
    monkeypatch.setitem(ALGORITHMS, "bcq_p", dataclasses.replace(ALGORITHMS["bcq_p"], cost=None))
    with pytest.raises(GridError, match="no cost function for bcq_p"):
        estimate(grid, rate=5e10)


def test_a_trial_record_survives_the_tune_boundary():
    trial = Trial.named(stage="main", algo="persim", env="cartpole", regime="pure", seed=3, rank=5, rank_source="cv")
    assert trial.name == "persim-cartpole-pure-r5-s3"
    assert type(trial).from_dict(trial.as_dict()) == trial
    with pytest.raises(dataclasses_error()):
        trial.seed = 4  # frozen


def dataclasses_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.integration
@pytest.mark.parametrize("name", ["persim", "cadm_vanilla"])
def test_a_prediction_only_grid_skips_the_reward_phase(name, tmp_path):
    base = tiny_grid(name, "cartpole")
    grid = base.model_copy(update={"evaluation": base.evaluation.model_copy(update={"rewards": False})})
    write_tiny_dataset(grid, tmp_path / "data")
    (trial,) = main_trials(grid)
    ctx = trial_context(grid, trial, tmp_path / "data", tmp_path / "policies", tmp_path / "work")
    output = ALGORITHMS[name].run(trial, algorithm_spec(grid, trial), ctx)
    assert all(math.isfinite(output.metrics[f"rmse_agent{a}"]) for a in TEST_AGENTS)
    assert not any(key.startswith("reward_agent") for key in output.metrics) and "seconds_reward" not in output.costs
    assert output.costs["model_rows"] > 0  # the prediction test's rows still counted


def test_the_documented_baseline_runs(tmp_path, monkeypatch):
    """docs/algorithms.md's whole-baseline example registers, expands to trials and scores every test agent."""
    import re
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "algorithms.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "ALGORITHMS = [" in b]
    namespace: dict = {}
    exec(compile(block, "docs/algorithms.md", "exec"), namespace)
    (entry,) = namespace["ALGORITHMS"]
    monkeypatch.setitem(ALGORITHMS, entry.name, entry)
    grid = tiny_grid("true_env_mpc", "cartpole").model_copy(update={"algos": [entry.name]})
    (trial,) = main_trials(grid)
    assert trial.regime == "none" and trial.name == "random-cartpole-s0"
    output = entry.run(trial, algorithm_spec(grid, trial), trial_context(grid, trial, tmp_path, tmp_path, tmp_path))
    assert all(math.isfinite(output.metrics[f"reward_agent{a}"]) for a in TEST_AGENTS)
    assert output.costs["seconds_reward"] > 0
    assert estimate(grid, rate=5e10)[-1].by_algo["random"] == pytest.approx(1 / 3600)
