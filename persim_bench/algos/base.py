"""The contract between learned dynamics models, the shared MPC planner and the shared evaluation."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


class DynamicsModel(Protocol):
    """A (possibly ensembled) one-step model over the dataset's agents.

    ``step`` advances M member-specific batches of states at once: the planner rolls every
    ensemble member over every candidate in one call per horizon step.
    """

    n_members: int

    def step(self, obs: torch.Tensor, action: torch.Tensor, agent: torch.Tensor) -> torch.Tensor:
        """obs [M, B, D] (float32), action [B] long or [B, A] float, agent [B] long -> next obs [M, B, D]."""


@runtime_checkable
class ContextualModel(DynamicsModel, Protocol):
    """A model that identifies agents by their recent real transitions (CaDM), not by agent id.

    After ``condition`` on E real episodes, ``step``'s third argument holds episode indices
    into those E (the planner and the prediction test pass ``arange(E)``).
    """

    history: int  # how many past transitions ``condition`` reads

    def condition(self, obs: torch.Tensor, action: torch.Tensor) -> None:
        """obs [E, T+1, D] and actions [E, T(, A)] of each episode so far, oldest first; T may be 0."""
