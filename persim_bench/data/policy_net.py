"""The network of every trained policy (and of TD3's critics): a plain MLP, nothing else imported.

A module of its own so the trainers (``data/rl.py``) and the policy files (``data/policies.py``)
both import it without importing each other: the ``data`` package's import graph is acyclic
(``tests/test_policies.py`` checks it, imports inside functions included).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class PolicyNet(nn.Module):
    """An MLP acting for a batch of agents: Q-values -> argmax (DQN) or tanh action (TD3 actor)."""

    def __init__(self, obs_dim: int, out_dim: int, hidden: list[int], discrete: bool):
        super().__init__()
        sizes = [obs_dim, *hidden, out_dim]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.body = nn.Sequential(*layers[:-1])
        self.discrete = discrete

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.body(obs)
        return out if self.discrete else torch.tanh(out)

    @torch.no_grad()
    def act(self, obs: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Greedy actions for numpy observations [N, D]: int64 [N] or float32 [N, A], on the CPU.

        The net may live on any device (a trainer's GPU): observations go there and actions come
        back. (``rng`` unused: deterministic.)
        """
        device = next(self.parameters()).device
        out = self(torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device))
        return out.argmax(dim=1).cpu().numpy() if self.discrete else out.cpu().numpy().astype(np.float32)
