"""Behaviour policies that act for many agents at once while a dataset is recorded."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from persim_bench.data.policies import NearestAgentPolicy  # policies never imports behaviour
from persim_bench.envs.base import EnvFamily
from persim_bench.specs import REGIME_EPSILON


class BehaviourPolicy(Protocol):
    def act(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Actions for a batch of observations [N, D]: int64 [N] or float32 [N, A]."""


class RandomPolicy:
    """Uniform random actions: the paper's ``random`` regime."""

    def __init__(self, family: EnvFamily):
        self.family = family

    def act(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.family.random_actions(rng, len(obs))


class EpsilonMixture:
    """With probability ``epsilon`` a uniform random action, else the base policy's (``pure-eps-*``).

    The coin is tossed per agent and step (``EnvFamily.epsilon_actions``).
    """

    def __init__(self, base: BehaviourPolicy, family: EnvFamily, epsilon: float):
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.base, self.family, self.epsilon = base, family, epsilon

    def act(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.family.epsilon_actions(np.asarray(self.base.act(obs, rng)), self.epsilon, rng)


class HeuristicController:
    """A fixed hand-written feedback controller, different from every data policy.

    MountainCar pushes along its velocity (pumps energy), CartPole leans against the pole's
    fall, HalfCheetah applies a fixed random linear feedback tanh(W s) with W from ``seed``.
    """

    def __init__(self, family: EnvFamily, seed: int = 0):
        self.family = family
        self.gain = np.random.default_rng(seed).normal(0, 0.5, size=(family.obs_dim, family.action_dim))

    def act(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.family.name == "mountaincar":
            return np.where(obs[:, 1] >= 0, 2, 0).astype(np.int64)
        if self.family.name == "cartpole":
            return (obs[:, 2] + 0.3 * obs[:, 3] + 0.01 * obs[:, 0] + 0.05 * obs[:, 1] > 0).astype(np.int64)
        return np.tanh(obs @ self.gain).astype(np.float32)


# With `evaluation.prediction_policy: heuristic` the prediction test uses this; its name goes to every output.
PREDICTION_POLICY_NAME = "heuristic-eps10"


def prediction_policy(family: EnvFamily, seed: int = 0) -> BehaviourPolicy:
    """The policy whose actions drive the prediction-error test (never used to make training data)."""
    return EpsilonMixture(HeuristicController(family, seed), family, 0.1)


def random_action_prob(regime: str, logging_epsilon: float = 0.0) -> float:
    """How often the regime's behaviour policy acts uniformly at random, its logging policies' own epsilon included."""
    if regime not in REGIME_EPSILON:
        return 1.0
    return REGIME_EPSILON[regime] + (1 - REGIME_EPSILON[regime]) * logging_epsilon


def regime_policy(family: EnvFamily, regime: str, covariates: np.ndarray, logging_nets: list,
                  logging_epsilon: float = 0.0) -> BehaviourPolicy:
    """The behaviour policy of a regime for a block of agents with these covariates.

    ``logging_nets`` are the trained policies of the env's policy-training agents (pure* regimes);
    they act at random with probability ``logging_epsilon`` themselves (``data.logging_epsilon``).
    """
    if regime == "random":
        return RandomPolicy(family)
    if regime in REGIME_EPSILON:
        if len(logging_nets) != len(family.policy_agents):
            raise ValueError(f"regime {regime!r} needs {len(family.policy_agents)} logging policies, got {len(logging_nets)}")
        pure = NearestAgentPolicy(family, logging_nets, covariates)
        if logging_epsilon:
            pure = EpsilonMixture(pure, family, logging_epsilon)
        epsilon = REGIME_EPSILON[regime]
        return EpsilonMixture(pure, family, epsilon) if epsilon else pure
    raise ValueError(f"unknown regime {regime!r}")
