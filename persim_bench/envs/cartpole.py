"""CartPole with pole half-length and push force as hidden covariates (paper Table 1).

gymnasium's ``CartPole-v1`` dynamics (Euler integrator) in torch over a batch of agents;
the paper caps episodes at 200 steps (CartPole-v0's limit).
"""
from __future__ import annotations

import math

import gymnasium
import numpy as np
import torch

from persim_bench.envs.base import UNBOUNDED, BatchSim, EnvFamily, SingleAgentEnv, TorchDynamics

GRAVITY = 9.8
MASS_CART, MASS_POLE = 1.0, 0.1
TOTAL_MASS = MASS_CART + MASS_POLE
TAU = 0.02
X_THRESHOLD = 2.4
THETA_THRESHOLD = 12 * 2 * math.pi / 360


def cartpole_step(state: torch.Tensor, action: torch.Tensor, length: torch.Tensor, force_mag: torch.Tensor) -> torch.Tensor:
    """gym's CartPole update for a batch: state [B, 4], action [B] in {0,1}, length/force_mag [B]."""
    x, x_dot, theta, theta_dot = state.unbind(1)
    force = torch.where(action == 1, force_mag, -force_mag)
    cos_theta, sin_theta = torch.cos(theta), torch.sin(theta)
    polemass_length = MASS_POLE * length
    temp = (force + polemass_length * theta_dot**2 * sin_theta) / TOTAL_MASS
    theta_acc = (GRAVITY * sin_theta - cos_theta * temp) / (
        length * (4.0 / 3.0 - MASS_POLE * cos_theta**2 / TOTAL_MASS)
    )
    x_acc = temp - polemass_length * theta_acc * cos_theta / TOTAL_MASS
    return torch.stack(
        [x + TAU * x_dot, x_dot + TAU * x_acc, theta + TAU * theta_dot, theta_dot + TAU * theta_acc], dim=1
    )


def cartpole_failed(next_obs: torch.Tensor) -> torch.Tensor:
    return (next_obs[:, 0].abs() > X_THRESHOLD) | (next_obs[:, 2].abs() > THETA_THRESHOLD)


class CartPoleBatch(BatchSim):
    def __init__(self, covariates: np.ndarray, family: EnvFamily | None = None):
        super().__init__(covariates, FAMILY if family is None else family)
        self.length = torch.from_numpy(self.covariates[:, 0].copy())
        self.force_mag = torch.from_numpy(self.covariates[:, 1].copy())
        self.state: torch.Tensor | None = None

    def reset(self, rng: np.random.Generator) -> np.ndarray:
        self.state = torch.from_numpy(rng.uniform(-0.05, 0.05, size=(self.n, 4)))
        return self.state.numpy().astype(np.float32)

    def step(self, actions: np.ndarray):
        action = torch.as_tensor(np.asarray(actions).reshape(self.n))
        self.state = cartpole_step(self.state, action, self.length, self.force_mag)
        terminated = cartpole_failed(self.state).numpy()
        # float32 overflow becomes inf, which _require_finite refuses, so silence numpy's own warning
        with np.errstate(over="ignore"):
            obs = self._require_finite(self.state.numpy().astype(np.float32))
        # gym pays 1 for every step, the failing one included.
        return obs, np.ones(self.n), terminated


class CartPole(EnvFamily):
    name = "cartpole"
    gym_id = "persim/CartPole-v0"
    obs_dim = 4
    n_actions = 2
    action_dim = 1
    horizon = 200
    covariate_names = ("length", "force")
    covariate_low = (0.15, 2.0)
    covariate_high = (0.85, 18.0)
    # Accepted (closed): 0.05 <= length <= 5 (m, the pole's half-length), 0.1 <= force <= 100 (N).
    # A length of 0 divides by zero in theta_acc and a negative one flips the pole's physics; a force
    # of 0 never pushes and a negative one swaps the two actions. gym's Euler step (TAU = 0.02 s) gets
    # stiff for short poles and large forces: length 0.01 with force 100 overflows float32 within
    # ~100 steps, while every corner of this box (5x that length; 10x gym's 0.5 m and 10 N at the top)
    # stays finite for 1000 steps even stepped on past termination (largest |obs| ~2e4).
    covariate_valid = ((0.05, 5.0), (0.1, 100.0))
    default_covariates = (0.5, 10.0)
    # The paper lists (force, length); we store (length, force) to match the gym keyword order.
    test_agents = ((0.5, 2.0), (0.5, 10.0), (0.5, 18.0), (0.85, 10.0), (0.15, 10.0))
    policy_agents = ((0.5, 6.0), (0.5, 14.0), (0.5, 10.0), (0.675, 10.0), (0.325, 10.0))
    # gym's CartPole-v1 box: x and theta at twice the thresholds (a failing state still lies inside),
    # velocities open. No state box: the env does not clip, it terminates.
    observation_high = (2 * X_THRESHOLD, UNBOUNDED, 2 * THETA_THRESHOLD, UNBOUNDED)
    observation_low = tuple(-h for h in observation_high)
    render_fps = 50  # gym's: 1 / TAU

    def batch(self, covariates):
        return CartPoleBatch(covariates, self)

    def reward(self, obs, action, next_obs):
        return torch.ones(next_obs.shape[:1], dtype=next_obs.dtype, device=next_obs.device)

    def terminated(self, obs, action, next_obs):
        return cartpole_failed(next_obs)

    def true_dynamics(self, covariates) -> TorchDynamics:
        table = torch.as_tensor(self.check_covariates(covariates, flat_is_one_agent=True))
        return lambda obs, action, agent: cartpole_step(obs, action, table[agent, 0].to(obs), table[agent, 1].to(obs))


FAMILY = CartPole()


def make_env(length: float = 0.5, force: float = 10.0, render_mode: str | None = None) -> SingleAgentEnv:
    """gymnasium entry point: the agent with these covariates. No render modes (render_mode=None only)."""
    return SingleAgentEnv(FAMILY, (length, force), render_mode=render_mode)


make_env.metadata = FAMILY.metadata  # gymnasium.make reads an entry point's render modes here

# A string entry point, so the spec (Minari stores it with a dataset) serialises and re-makes the
# env in a fresh process; the default covariates are explicit kwargs of the stored spec.
if FAMILY.gym_id not in gymnasium.registry:
    gymnasium.register(id=FAMILY.gym_id, entry_point="persim_bench.envs.cartpole:make_env",
                       max_episode_steps=FAMILY.horizon, kwargs=FAMILY.covariate_kwargs)
