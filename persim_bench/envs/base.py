"""What every heterogeneous environment provides.

An environment family (MountainCar, CartPole, HalfCheetah) is a set of agents that share
state and action spaces but differ in hidden covariates (gravity, pole length, masses...).
Everything hot is batched over agents: ``BatchSim`` steps N agents with N different
covariates at once, and the reward/termination functions take batched torch tensors so the
MPC planner can score thousands of imagined rollouts in one call.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Protocol

import gymnasium
import numpy as np
import torch

from persim_bench.errors import BenchError

# (obs [B, D], action [B] long or [B, A] float, agent [B] long) -> next_obs [B, D]; all torch.
# ``agent`` indexes the covariate table the function was built for, so one call can serve rows
# of several agents (the planner batches episodes of all test agents together).
TorchDynamics = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# The bound of an unbounded observation dimension: the largest finite float32, as gymnasium's
# CartPole-v1 bounds its velocities. gymnasium's check_env warns about infinite Box bounds, and
# no float32 observation other than inf (which the passive checker rejects anyway) lies beyond it.
UNBOUNDED = float(np.finfo(np.float32).max)


class CovariateError(BenchError, ValueError):
    """Covariates a family refuses: not numbers, not finite, outside ``covariate_valid`` or not [N, C].

    The message is one line naming the env, the covariate, the bad value and the accepted range.
    """


class Renderer(Protocol):
    """Draws one agent of a BatchSim in its current state; what ``EnvFamily.renderer`` returns."""

    def render(self) -> Any: ...

    def close(self) -> None: ...


class BatchSim(ABC):
    """N agents stepped together; agent i uses covariates[i]. numpy in, numpy out.

    The covariates pass ``family.check_covariates`` first (CovariateError otherwise): every
    simulator (data generation, evaluation, the gymnasium view) refuses agents outside the range.
    """

    def __init__(self, covariates: np.ndarray, family: EnvFamily):
        self.family = family
        self.covariates = family.check_covariates(covariates)
        self.n = len(self.covariates)
        # Agents whose physics diverged since the last reset: the engine restarted them at rest (MuJoCo
        # does, mid-step), so their episodes ended there and their returns measure no behaviour.
        self.diverged = np.zeros(self.n, dtype=bool)

    @abstractmethod
    def reset(self, rng: np.random.Generator) -> np.ndarray:
        """Draw start states for all agents; return float32 observations [N, D]."""

    @abstractmethod
    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance every agent one step: (next_obs float32 [N, D], reward [N], terminated [N])."""

    def _require_finite(self, obs: np.ndarray) -> np.ndarray:
        """``obs``, or FloatingPointError naming the first agent whose state is no longer finite.

        Accepted covariates keep every family finite (tests/test_env_covariates.py), so this only
        fires on a state made non-finite from outside; data with NaN in it is never returned.
        """
        finite = np.isfinite(obs).all(axis=1)
        if not finite.all():
            agent = int(np.flatnonzero(~finite)[0])
            covariates = ", ".join(f"{name}={value:g}" for name, value in
                                   zip(self.family.covariate_names, self.covariates[agent]))
            raise FloatingPointError(f"{self.family.gym_id}: agent {agent} ({covariates}) reached a non-finite state")
        return obs

    # The gymnasium info dicts. Only SingleAgentEnv asks for them, after the fact, so the data
    # generator's hot loop never pays for them.
    def reset_info(self) -> dict[str, np.ndarray]:
        """Per-agent info after reset: each value an array [N]."""
        return {}

    def step_info(self, actions: np.ndarray, next_obs: np.ndarray, reward: np.ndarray) -> dict[str, np.ndarray]:
        """Per-agent info of the step just taken with ``actions`` that returned (next_obs, reward)."""
        return {}


class EnvFamily(ABC):
    """Static description of one environment family plus its batched simulator."""

    name: str                      # short name used in configs and file paths
    gym_id: str                    # registered gymnasium id
    obs_dim: int
    n_actions: int | None          # number of discrete actions, None when continuous
    action_dim: int                # 1 for discrete (stored as an int), else the vector size
    horizon: int                   # episode cap of the paper
    covariate_names: tuple[str, ...]
    # The paper's sampling box: agents beyond the test agents are drawn uniformly from it.
    covariate_low: tuple[float, ...]
    covariate_high: tuple[float, ...]
    # The covariates the simulators accept, one (low, high) per covariate, CLOSED on both ends:
    # low <= value <= high, finite. Wider than the sampling box (users may probe agents outside
    # the paper's range) but physically meaningful and numerically sane: every corner of the box
    # runs 1000 steps without a NaN/inf (tests/test_env_covariates.py). Each family says why.
    covariate_valid: tuple[tuple[float, float], ...]
    default_covariates: tuple[float, ...]
    test_agents: tuple[tuple[float, ...], ...]     # agents 0-4 of every dataset
    policy_agents: tuple[tuple[float, ...], ...]   # agents the logging policies are trained on
    # Planning-only bonus: weight * the largest shaping_value(s) along an imagined rollout, its
    # start state included. The authors' MountainCar planner adds 0.01 * the furthest position of
    # the trajectory, without which a 50-step horizon rarely sees the sparse goal; 0 for the other
    # envs. Counting the start matters: with future states only, a plan that holds the car high
    # on the right slope beats one that swings it back to gain energy.
    shaping_weight: float = 0.0
    # The box the env itself keeps its states in (gym's MountainCar clips position and velocity);
    # None where states are unbounded. Learned models may be held to it (``evaluate.as_simulator``).
    state_low: tuple[float, ...] | None = None
    state_high: tuple[float, ...] | None = None
    # The observation space's box where it is not the state box (gym's CartPole-v1 declares x and
    # theta at twice their termination thresholds, so a failing state still lies inside); with
    # neither box, observations are unbounded. Use UNBOUNDED, not inf, for an open dimension.
    observation_low: tuple[float, ...] | None = None
    observation_high: tuple[float, ...] | None = None
    # gymnasium render metadata: the modes ``renderer`` supports and the frame rate (1 / step time).
    render_modes: tuple[str, ...] = ()
    render_fps: int | None = None

    @property
    def discrete(self) -> bool:
        return self.n_actions is not None

    @abstractmethod
    def batch(self, covariates: np.ndarray) -> BatchSim:
        """A simulator stepping len(covariates) agents at once."""

    @abstractmethod
    def reward(self, obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        """Batched reward r(s, a, s'), the same numbers ``BatchSim.step`` returns."""

    @abstractmethod
    def terminated(self, obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        """Batched bool: does the transition s -> s' end the episode."""

    @abstractmethod
    def true_dynamics(self, covariates: np.ndarray) -> TorchDynamics:
        """Ground-truth next-observation function for agents with covariates [N, C] (True env + MPC)."""

    def check_covariates(self, covariates: Any, *, flat_is_one_agent: bool = False) -> np.ndarray:
        """``covariates`` as a float64 [N, C] array (a copy), or CovariateError (one line).

        Refused: anything not numbers, a shape other than [N, C] (C = len(covariate_names)), and
        any value that is not finite or lies outside its closed ``covariate_valid`` range.
        ``flat_is_one_agent`` also takes a flat [C] as one agent (``true_dynamics`` does).
        """
        names = self.covariate_names
        try:
            table = np.array(covariates, dtype=np.float64)
        except (TypeError, ValueError):
            raise CovariateError(
                f"{self.gym_id}: covariates must be numbers ({', '.join(names)}) per agent, "
                f"got {_one_line(covariates)}") from None
        if flat_is_one_agent and table.ndim <= 1 and table.size == len(names):
            table = table.reshape(1, len(names))
        if table.ndim != 2 or table.shape[1] != len(names):
            raise CovariateError(
                f"{self.gym_id}: covariates must be an array [N, {len(names)}] of ({', '.join(names)}), "
                f"got shape {table.shape}")
        for column, name, (low, high) in zip(table.T, names, self.covariate_valid):
            bad = np.flatnonzero(~((column >= low) & (column <= high)))  # NaN fails both comparisons
            if len(bad):
                value = float(column[bad[0]])
                problem = "is out of range" if np.isfinite(value) else "is not finite"
                where = f" (agent {bad[0]} of {len(table)})" if len(table) > 1 else ""
                raise CovariateError(f"{self.gym_id}: {name}={value!r} {problem}{where}; "
                                     f"accepted: {low:g} <= {name} <= {high:g}")
        return table

    def shaping_value(self, next_obs: torch.Tensor) -> torch.Tensor:
        return next_obs[..., 0]

    def random_actions(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n uniform random actions: int64 [n] when discrete, float32 [n, A] in [-1, 1] otherwise."""
        if self.discrete:
            return rng.integers(0, self.n_actions, size=n, dtype=np.int64)
        return rng.uniform(-1.0, 1.0, size=(n, self.action_dim)).astype(np.float32)

    def epsilon_actions(self, chosen: np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
        """``chosen`` with each row replaced by a uniform random action with probability ``epsilon``.

        The coin and the random action are drawn for every row, so the random stream does not
        depend on ``chosen``: the pure-eps-* regimes and the checkpoints scored under them.
        """
        explore = rng.random(len(chosen)) < epsilon
        random = self.random_actions(rng, len(chosen))
        mask = explore if chosen.ndim == 1 else explore[:, None]
        return np.where(mask, random, chosen).astype(chosen.dtype)

    def sample_covariates(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n agents drawn uniformly from the covariate box, float64 [n, C]."""
        return rng.uniform(self.covariate_low, self.covariate_high, size=(n, len(self.covariate_names)))

    def agent_covariates(self, rng: np.random.Generator, n_agents: int) -> np.ndarray:
        """The dataset's agents: the test agents first (paper order), then uniform draws."""
        n_test = len(self.test_agents)
        if n_agents < n_test:
            raise ValueError(f"{self.name}: n_agents must be >= {n_test} (the test agents)")
        fixed = np.asarray(self.test_agents, dtype=np.float64)
        return np.concatenate([fixed, self.sample_covariates(rng, n_agents - n_test)])

    def action_space(self) -> gymnasium.Space:
        if self.discrete:
            return gymnasium.spaces.Discrete(self.n_actions)
        return gymnasium.spaces.Box(-1.0, 1.0, (self.action_dim,), np.float32)

    def observation_space(self) -> gymnasium.spaces.Box:
        """float32 Box of one agent's observations: observation_low/high, else the state box, else unbounded."""
        low = self.observation_low if self.observation_low is not None else self.state_low
        high = self.observation_high if self.observation_high is not None else self.state_high
        if low is None or high is None:
            low, high = (-UNBOUNDED,) * self.obs_dim, (UNBOUNDED,) * self.obs_dim
        return gymnasium.spaces.Box(np.array(low, dtype=np.float32), np.array(high, dtype=np.float32), dtype=np.float32)

    @property
    def covariate_kwargs(self) -> dict[str, float]:
        """The default agent as the keyword arguments of the family's ``make_env``."""
        return dict(zip(self.covariate_names, self.default_covariates))

    @property
    def metadata(self) -> dict[str, Any]:
        """gymnasium's env metadata for this family."""
        return {"render_modes": list(self.render_modes), "render_fps": self.render_fps}

    def renderer(self, sim: BatchSim, agent: int, render_mode: str) -> Renderer:
        """Something that draws agent ``agent`` of ``sim`` in ``render_mode`` (one of render_modes)."""
        raise NotImplementedError(f"{self.name} does not render")


class SingleAgentEnv(gymnasium.Env):
    """gymnasium view of one agent of a family: a BatchSim of size one.

    Sharing the batched code path means the registered env and the data generator can
    never disagree about the dynamics.
    """

    metadata: dict[str, Any] = {"render_modes": [], "render_fps": None}  # each instance: its family's

    def __init__(self, family: EnvFamily, covariates: tuple[float, ...], render_mode: str | None = None):
        self.metadata = family.metadata
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"{family.gym_id}: render_mode {render_mode!r} is not one of {self.metadata['render_modes']}")
        self.family = family
        self.covariates = _scalar_covariates(family, covariates)
        self.render_mode = render_mode
        self.sim = family.batch(np.asarray([self.covariates]))  # checks the range
        self.action_space = family.action_space()
        self.observation_space = family.observation_space()
        self._renderer: Renderer | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        obs = self.sim.reset(self.np_random)
        return obs[0], _first(self.sim.reset_info())

    def step(self, action):
        batched = np.asarray(action).reshape((1,) if self.family.discrete else (1, -1))
        obs, reward, terminated = self.sim.step(batched)
        info = _first(self.sim.step_info(batched, obs, reward))
        return obs[0], float(reward[0]), bool(terminated[0]), False, info

    def render(self):
        if self.render_mode is None:
            gymnasium.logger.warn(
                f"{self.family.gym_id}: render() without a render_mode; make the env with one of "
                f"{self.metadata['render_modes']}, e.g. gymnasium.make(id, render_mode=...)")
            return None
        if self._renderer is None:
            self._renderer = self.family.renderer(self.sim, 0, self.render_mode)
        return self._renderer.render()

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def _scalar_covariates(family: EnvFamily, values: tuple) -> tuple[float, ...]:
    """One agent's covariates (the keyword arguments of ``make_env``) as floats, or CovariateError."""
    values = tuple(values)
    if len(values) != len(family.covariate_names):
        raise CovariateError(f"{family.gym_id}: expected {len(family.covariate_names)} covariates "
                             f"({', '.join(family.covariate_names)}), got {len(values)}")
    floats = []
    for name, value in zip(family.covariate_names, values):
        try:
            if np.ndim(value) != 0:
                raise TypeError
            floats.append(float(value))
        except (TypeError, ValueError):
            raise CovariateError(f"{family.gym_id}: {name} must be a single number, got {_one_line(value)}") from None
    return tuple(floats)


def _one_line(value: Any, limit: int = 80) -> str:
    """repr(value) on one line, cut to ``limit`` characters (error messages are one line)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first(info: dict[str, np.ndarray]) -> dict[str, Any]:
    """Agent 0's entries of a per-agent info dict, as Python scalars."""
    return {key: np.asarray(value)[0].item() for key, value in info.items()}
