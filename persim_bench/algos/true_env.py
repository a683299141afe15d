""""True env + MPC": the shared planner on the ground-truth dynamics, the planner's upper bound."""
from __future__ import annotations

import numpy as np
import torch

from persim_bench.envs.base import EnvFamily


class TrueEnvModel:
    """The env's own dynamics as a one-member ``DynamicsModel`` over the dataset's agents."""

    n_members = 1

    def __init__(self, family: EnvFamily, covariates: np.ndarray):
        self.dynamics = family.true_dynamics(covariates)

    def step(self, obs: torch.Tensor, action: torch.Tensor, agent: torch.Tensor) -> torch.Tensor:
        return self.dynamics(obs[0], action, agent)[None]
