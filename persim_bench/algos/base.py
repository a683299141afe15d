"""The contract between learned dynamics models, the shared MPC planner and the shared evaluation."""
from __future__ import annotations

from typing import Protocol

import torch


class DynamicsModel(Protocol):
    """A (possibly ensembled) one-step model over the dataset's agents.

    ``step`` advances M member-specific batches of states at once: the planner rolls every
    ensemble member over every candidate in one call per horizon step.
    """

    n_members: int

    def step(self, obs: torch.Tensor, action: torch.Tensor, agent: torch.Tensor) -> torch.Tensor:
        """obs [M, B, D] (float32), action [B] long or [B, A] float, agent [B] long -> next obs [M, B, D]."""
