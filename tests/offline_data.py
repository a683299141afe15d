"""Shared by the offline-RL baseline tests: tiny datasets through the generator's own code, and a learning check."""
from __future__ import annotations

import numpy as np

from persim_bench.data import generate
from persim_bench.data.behaviour import EpsilonMixture, HeuristicController, RandomPolicy
from persim_bench.data.dataset import Transitions
from persim_bench.data.generate import DatasetPlan, record_shard
from persim_bench.envs import get_env
from persim_bench.evaluate import episode_rewards


ROW_FIELDS = ("agent", "t", "obs", "action", "reward", "next_obs", "terminated", "truncated")


def take_rows(data: Transitions, keep: np.ndarray) -> Transitions:
    """The transitions where ``keep`` (a row mask or index) holds, every agent's covariates kept."""
    return Transitions(**{**data.__dict__, **{name: getattr(data, name)[keep] for name in ROW_FIELDS}})


def recorded(env: str, n_agents: int, steps: int, seed: int = 0, regime: str = "random") -> Transitions:
    plan = DatasetPlan(env=env, regime=regime, grid="test", seed=seed, n_agents=n_agents, episode_steps=steps,
                       agents_per_shard=n_agents)
    return record_shard(plan, 0)  # the dataset generator's own code path, one shard for all agents


def noisy_controller_cartpole(monkeypatch, seed: int) -> Transitions:
    """10 CartPole agents x 200 steps of the heuristic balancer with 20 % random actions (a pure-eps-20 stand-in)."""
    family = get_env("cartpole")
    noisy_heuristic = EpsilonMixture(HeuristicController(family), family, 0.2)
    monkeypatch.setattr(generate, "regime_policy", lambda family, regime, covariates, nets, logging_epsilon: noisy_heuristic)
    return recorded("cartpole", n_agents=10, steps=200, seed=seed, regime="pure-eps-20")


def returns_vs_random(act, data: Transitions, seed: int) -> tuple[float, float]:
    """(mean return of ``act``, of uniform random actions) over 10 episodes of test agents 0-4."""
    family, agents, rng = get_env(data.env), [0, 1, 2, 3, 4], np.random.default_rng(seed)
    random_policy = RandomPolicy(family)
    score = lambda policy: episode_rewards(policy, family, data.covariates, agents, episodes=10, max_steps=200,
                                           seed=seed)["reward_mean"]
    return score(act), score(lambda obs, agent: random_policy.act(obs, rng))
