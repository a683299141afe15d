"""The one MPC planner, shared by PerSim, CaDM and the ground-truth "True env + MPC".

Several episodes are planned at once: rows are (member x episode x candidate), every horizon
step is one ``model.step`` call plus the env's batched torch reward and termination. A
candidate's score is its discounted return under each ensemble member, aggregated by the
minimum over members (the paper) or the mean (the authors' final code).
"""
from __future__ import annotations

import numpy as np
import torch

from persim_bench.algos.base import ContextualModel, DynamicsModel
from persim_bench.specs import PlannerSpec, per_env
from persim_bench.envs.base import EnvFamily


class MPCPlanner:
    """Random shooting (discrete actions) or CEM (continuous), replanned at every step."""

    def __init__(self, family: EnvFamily, model: DynamicsModel, spec: PlannerSpec, seed: int):
        self.family, self.model, self.spec = family, model, spec
        self.horizon = per_env(spec.horizon, family.name)
        self.candidates = per_env(spec.candidates, family.name)
        self.generator = torch.Generator().manual_seed(seed)
        self.previous: torch.Tensor | None = None  # last plan per episode, for warm starts
        # A contextual model's real recent past per episode: states seen and actions taken.
        self.seen: list[torch.Tensor] = []
        self.taken: list[torch.Tensor] = []

    def reset(self) -> None:
        self.previous = None
        self.seen, self.taken = [], []

    @torch.no_grad()
    def act(self, obs: np.ndarray, agent: np.ndarray) -> np.ndarray:
        """One decision for each of E episodes: obs [E, D], agent [E] (dataset agent ids)."""
        obs_t = torch.as_tensor(obs, dtype=torch.float32)
        agent_t = torch.as_tensor(agent, dtype=torch.long)
        contextual = isinstance(self.model, ContextualModel)
        if contextual:  # condition on each episode's last K real transitions; rows are then episodes
            k = self.model.history
            self.seen, self.taken = (self.seen + [obs_t])[-(k + 1):], self.taken[-k:]
            action_shape = () if self.family.discrete else (self.family.action_dim,)
            self.model.condition(torch.stack(self.seen, 1), torch.stack(self.taken, 1) if self.taken
                                 else torch.zeros(len(obs_t), 0, *action_shape))
            agent_t = torch.arange(len(obs_t))
        chunk = max(1, self.spec.max_rows // (self.model.n_members * self.candidates))
        plans = [self._plan(obs_t[i:i + chunk], agent_t[i:i + chunk],
                            None if self.previous is None else self.previous[i:i + chunk])
                 for i in range(0, len(obs_t), chunk)]
        self.previous = torch.cat(plans)
        first = self.previous[:, 0]
        if contextual:
            self.taken.append(first)
        return first.numpy().astype(np.int64 if self.family.discrete else np.float32)

    def _plan(self, obs, agent, previous):
        return self._shoot(obs, agent, previous) if self.family.discrete else self._cem(obs, agent, previous)

    def _shoot(self, obs, agent, previous):
        """Random shooting; candidate 0 is last step's best plan shifted by one (authors' warm start)."""
        e, k, h = len(obs), self.candidates, self.horizon
        actions = torch.randint(0, self.family.n_actions, (e, k, h), generator=self.generator)
        if previous is not None:
            actions[:, 0, :-1] = previous[:, 1:]
        best = self.score(obs, agent, actions).argmax(dim=1)
        return actions[torch.arange(e), best]

    def _cem(self, obs, agent, previous):
        """Cross-entropy method over action sequences in [-1, 1], warm-started from the shifted last mean."""
        e, k, h, a = len(obs), self.candidates, self.horizon, self.family.action_dim
        mean = torch.zeros(e, h, a)
        if previous is not None:
            mean[:, :-1] = previous[:, 1:]
        std = torch.full((e, h, a), self.spec.init_std)
        alpha = self.spec.smoothing
        for _ in range(self.spec.iterations + 1):
            noise = torch.randn((e, k, h, a), generator=self.generator)
            actions = (mean[:, None] + std[:, None] * noise).clamp(-1.0, 1.0)
            elite_index = self.score(obs, agent, actions).topk(self.spec.elites, dim=1).indices
            elites = actions[torch.arange(e)[:, None], elite_index]
            mean = alpha * mean + (1 - alpha) * elites.mean(dim=1)
            std = alpha * std + (1 - alpha) * elites.std(dim=1)
        return mean

    def score(self, obs: torch.Tensor, agent: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Aggregated discounted return of every candidate: obs [E, D], actions [E, K, H(, A)] -> [E, K]."""
        family, m = self.family, self.model.n_members
        e, k, h = actions.shape[:3]
        rows = e * k
        state = obs[None, :, None, :].expand(m, e, k, obs.shape[-1]).reshape(m, rows, -1)
        row_agent = agent.repeat_interleave(k)
        plan = actions.reshape(rows, h, *actions.shape[3:])
        total = torch.zeros(m, rows)
        alive = torch.ones(m, rows, dtype=torch.bool)
        furthest = torch.full((m, rows), -torch.inf)
        discount = 1.0
        for t in range(h):
            action = plan[:, t]
            next_state = self.model.step(state, action, row_agent)
            flat_action = action.repeat(m, *([1] * (action.dim() - 1)))
            flat = (state.reshape(m * rows, -1), flat_action, next_state.reshape(m * rows, -1))
            reward = family.reward(*flat).view(m, rows)
            total += discount * reward * alive
            if family.shaping_weight:
                furthest = torch.maximum(furthest, torch.where(alive, family.shaping_value(next_state), furthest))
            alive &= ~family.terminated(*flat).view(m, rows)
            discount *= self.spec.gamma
            state = next_state
        if family.shaping_weight:
            total += family.shaping_weight * furthest
        per_member = total.view(m, e, k)
        return per_member.min(dim=0).values if self.spec.aggregate == "min" else per_member.mean(dim=0)
