"""The shared MPC planner and evaluation on ground-truth dynamics (no learning involved)."""
import numpy as np
import pytest
import torch

from persim_bench.algos.true_env import TrueEnvModel
from persim_bench.config import PlannerSpec
from persim_bench.data.behaviour import RandomPolicy, prediction_policy
from persim_bench.envs import get_env
from persim_bench.evaluate import episode_rewards, prediction_error
from persim_bench.planning import MPCPlanner


def _planner(env, **spec):
    family = get_env(env)
    covariates = np.asarray(family.test_agents)
    return family, covariates, MPCPlanner(family, TrueEnvModel(family, covariates), PlannerSpec(**spec), seed=0)


def test_true_env_mpc_balances_cartpole_far_better_than_random():
    family, covariates, planner = _planner("cartpole", horizon={"cartpole": 15}, candidates={"cartpole": 100}, elites=10)
    planned = episode_rewards(planner.act, family, covariates, [1, 3], episodes=2, max_steps=100, seed=0)
    random_policy = RandomPolicy(family)
    rng = np.random.default_rng(0)
    baseline = episode_rewards(lambda obs, agent: random_policy.act(obs, rng), family, covariates, [1, 3], 2, 100, 0)
    assert planned["reward_mean"] >= 95 and baseline["reward_mean"] < 40


def test_true_env_mpc_climbs_the_mountain():
    family, covariates, planner = _planner("mountaincar", horizon={"mountaincar": 30}, candidates={"mountaincar": 100}, elites=10)
    result = episode_rewards(planner.act, family, covariates, [0, 1], episodes=1, max_steps=400, seed=0)
    assert result["length_agent0"] < 150 and result["length_agent1"] < 150  # reached the goal
    random_policy, rng = RandomPolicy(family), np.random.default_rng(0)
    baseline = episode_rewards(lambda obs, agent: random_policy.act(obs, rng), family, covariates, [0, 1], 4, 400, 0)
    assert baseline["length_agent1"] == 400


def test_cem_moves_the_cheetah_forward():
    family, covariates, planner = _planner("halfcheetah", horizon={"halfcheetah": 8}, candidates={"halfcheetah": 40},
                                           elites=8, iterations=2)
    planned = episode_rewards(planner.act, family, covariates, [4], episodes=1, max_steps=40, seed=0)
    assert planned["reward_agent4"] > 5  # random actions give about -0.2 * 40


class _Lookup:
    """A two-member model whose position change depends on (member, action) through a table."""

    n_members = 2

    def __init__(self, table):
        self.table = torch.tensor(table, dtype=torch.float32)  # [members, actions]

    def step(self, obs, action, agent):
        moved = obs.clone()
        moved[..., 0] += self.table[:, action]
        return moved


@pytest.mark.parametrize("aggregate, expected_best", [("min", 1), ("mean", 0)])
def test_members_are_aggregated_by_min_or_mean(aggregate, expected_best):
    # MountainCar's planning bonus rewards the furthest x. Action 1 is great under member 0 and
    # slightly bad under member 1; action 0 is mildly good under both: min picks the safe one.
    family = get_env("mountaincar")
    model = _Lookup([[0.1, 1.0, 0.0], [0.1, -0.05, 0.0]])
    planner = MPCPlanner(family, model, PlannerSpec(aggregate=aggregate, elites=2, candidates=2), seed=0)
    candidates = torch.tensor([1, 0]).reshape(1, 2, 1)  # E=1 episode, K=2 candidates, H=1 step
    scores = planner.score(torch.tensor([[-0.5, 0.0]]), torch.tensor([0]), candidates)
    assert scores.shape == (1, 2)
    assert int(scores.argmax()) == expected_best


def test_prediction_error_of_the_true_model_is_zero_and_of_a_wrong_agent_is_not():
    family = get_env("cartpole")
    covariates = np.asarray(family.test_agents)
    policy = prediction_policy(family)
    exact = prediction_error(TrueEnvModel(family, covariates), family, covariates, [0, 4], policy, 6, 30, 5, seed=1)
    assert exact["rmse_agent0"] < 1e-5 and exact["r2_agent0"] > 0.999
    swapped = covariates[[4, 1, 2, 3, 0]]  # the model believes agent 0 is agent 4 and vice versa
    wrong = prediction_error(TrueEnvModel(family, swapped), family, covariates, [0, 4], policy, 6, 30, 5, seed=1)
    assert wrong["rmse_agent0"] > 1e-2 and wrong["r2_agent0"] < exact["r2_agent0"]
    assert exact["pred_trajectories_agent0"] == 6
