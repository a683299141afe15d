"""The one MPC planner, shared by PerSim, CaDM and the ground-truth "True env + MPC".

Several episodes are planned at once: rows are (member x episode x candidate), every horizon
step is one ``model.step`` call plus the env's batched torch reward and termination. A
candidate's score is its discounted return under each ensemble member, aggregated by the
minimum over members (the paper) or the mean (the authors' final code); optionally each imagined
step is charged for the members' disagreement about it (``disagreement_penalty``, beyond the paper).

The planner runs on its model's device: candidates are drawn there, rollouts stay there, and a
decision moves data across only twice (the observations in, the chosen actions out). Episodes
that end drop out of the batch: ``act(obs, agent, episodes=...)`` names the rows it is given,
and the per-episode state (warm-start plans, a contextual model's history) follows them.
"""
from __future__ import annotations

import numpy as np
import torch

from persim_bench.contracts import ContextualModel, DynamicsModel
from persim_bench.specs import PlannerSpec, per_env
from persim_bench.envs.base import EnvFamily


def model_device(model) -> torch.device:
    """Where a model computes: the device of its first parameter or buffer (also through a wrapper that
    forwards ``parameters``), else the CPU (the true env, whose simulators are CPU code)."""
    for attribute in ("parameters", "buffers"):
        tensors = getattr(model, attribute, None)
        if callable(tensors):
            for tensor in tensors():
                return tensor.device
    return torch.device(getattr(model, "device", "cpu"))


def data_box(model) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-dimension (low, high) of the states a learned model was fitted on (``data_low``/``data_high``,
    also through a wrapper), or None for a model that records none or was never fitted."""
    low, high = getattr(model, "data_low", None), getattr(model, "data_high", None)
    if low is None or not torch.isfinite(high - low).all():
        return None
    return low, high


def data_range(model, env: str) -> torch.Tensor:
    """Per state dimension, the width of the model's training data (its data box; 1 where the data were constant)."""
    box = data_box(model)
    if box is None:
        raise ValueError(f"planner.disagreement_penalty on {env}: the model records no data range (data_low/data_high)")
    width = (box[1] - box[0]).float()
    return torch.where(width > 0, width, torch.ones_like(width))


class TrueEnvModel:
    """The env's own dynamics as a one-member ``DynamicsModel`` over the dataset's agents.

    It computes on the CPU (HalfCheetah's true dynamics are MuJoCo), so the planner runs it there;
    inputs from another device are stepped on the CPU and returned to their device.
    """

    n_members = 1
    device = torch.device("cpu")

    def __init__(self, family: EnvFamily, covariates: np.ndarray):
        self.dynamics = family.true_dynamics(covariates)

    def step(self, obs: torch.Tensor, action: torch.Tensor, agent: torch.Tensor) -> torch.Tensor:
        if obs.device.type != "cpu":
            return self.step(obs.cpu(), action.cpu(), agent.cpu()).to(obs.device)
        return self.dynamics(obs[0], action, agent)[None]


class MPCPlanner:
    """Random shooting (discrete actions) or CEM (continuous), replanned at every step.

    ``device`` defaults to the model's (see ``model_device``); the random draws come from a
    generator on that device, so a seed fixes the plans for a given device (CPU and CUDA streams
    differ). One planner serves one set of episodes at a time: ``reset()`` before the next set.
    """

    def __init__(self, family: EnvFamily, model: DynamicsModel, spec: PlannerSpec, seed: int,
                 device: str | torch.device | None = None):
        self.family, self.model, self.spec = family, model, spec
        self.horizon = per_env(spec.horizon, family.name)
        self.candidates = per_env(spec.candidates, family.name)
        self.device = model_device(model) if device is None else torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # as tensors report it
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.penalty = per_env(spec.disagreement_penalty, family.name) if model.n_members > 1 else 0.0
        if self.penalty:
            self.disagreement_scale = data_range(model, family.name).to(self.device)
        # Per-episode state, one row per episode of ``self.episodes`` (their indices, as ``act`` got them).
        self.episodes: np.ndarray | None = None
        self.previous: torch.Tensor | None = None  # last plan per episode, for warm starts
        # A contextual model's real recent past per episode: states seen and actions taken.
        self.seen: list[torch.Tensor] = []
        self.taken: list[torch.Tensor] = []

    def reset(self) -> None:
        """Forget every episode: the next ``act`` starts a new set."""
        self.episodes, self.previous = None, None
        self.seen, self.taken = [], []

    @torch.no_grad()
    def act(self, obs: np.ndarray, agent: np.ndarray, episodes: np.ndarray | None = None) -> np.ndarray:
        """One decision for each of E episodes: obs [E, D], agent [E] (dataset agent ids) -> actions [E(, A)].

        ``episodes`` [E] (default ``arange(E)``) says which episodes these rows are, as indices
        into the set the planner first saw after ``reset``: once some have ended, pass only the
        running ones (any subset, any order) and their state follows them.
        """
        self._follow(episodes, len(obs))
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        agent_t = torch.as_tensor(agent, dtype=torch.long, device=self.device)
        contextual = isinstance(self.model, ContextualModel)
        if contextual:  # condition on each episode's last K real transitions; rows are then episodes
            k = self.model.history
            self.seen, self.taken = (self.seen + [obs_t])[-(k + 1):], self.taken[-k:]
            action_shape = () if self.family.discrete else (self.family.action_dim,)
            self.model.condition(torch.stack(self.seen, 1), torch.stack(self.taken, 1) if self.taken
                                 else torch.zeros(len(obs_t), 0, *action_shape, device=self.device))
            agent_t = torch.arange(len(obs_t), device=self.device)
        chunk = max(1, self.spec.max_rows // (self.model.n_members * self.candidates))
        plans = [self._plan(obs_t[i:i + chunk], agent_t[i:i + chunk],
                            None if self.previous is None else self.previous[i:i + chunk])
                 for i in range(0, len(obs_t), chunk)]
        self.previous = plans[0] if len(plans) == 1 else torch.cat(plans)
        first = self.previous[:, 0]
        if contextual:
            self.taken.append(first)
        return first.cpu().numpy().astype(np.int64 if self.family.discrete else np.float32, copy=False)

    def _follow(self, episodes: np.ndarray | None, rows: int) -> None:
        """Point the per-episode state at the episodes of this call's rows (a subset of the current set)."""
        ids = np.arange(rows) if episodes is None else np.asarray(episodes, dtype=np.int64).reshape(-1)
        if len(ids) != rows:
            raise ValueError(f"episodes names {len(ids)} episodes for {rows} rows of obs")
        known = self.episodes
        if known is None:
            if len(np.unique(ids)) != rows:
                raise ValueError("episodes must not repeat an episode")
            self.episodes = ids
            return
        if len(ids) == len(known) and np.array_equal(ids, known):
            return
        if episodes is None:
            raise ValueError(f"act got {rows} rows but plans for {len(known)} episodes: pass episodes= "
                             "(which of them these rows are) or reset() for a new set")
        order = np.argsort(known, kind="stable")
        where = order[np.minimum(np.searchsorted(known, ids, sorter=order), len(known) - 1)]
        if not np.array_equal(known[where], ids) or len(np.unique(ids)) != rows:
            missing = sorted(set(ids.tolist()) - set(known.tolist()))
            raise ValueError(f"episodes {missing or 'repeated'}: the planner holds no (single) state for them; "
                             "reset() before planning a new set of episodes")
        index = torch.as_tensor(where, device=self.device)  # one small copy, only when the set changes
        if self.previous is not None:
            self.previous = self.previous[index]
        self.seen = [state[index] for state in self.seen]
        self.taken = [action[index] for action in self.taken]
        self.episodes = ids

    def _plan(self, obs, agent, previous):
        return self._shoot(obs, agent, previous) if self.family.discrete else self._cem(obs, agent, previous)

    def _shoot(self, obs, agent, previous):
        """Random shooting; candidate 0 is last step's best plan shifted by one (authors' warm start)."""
        e = len(obs)
        actions = self.first_candidates(e)
        if previous is not None:
            actions[:, 0, :-1] = previous[:, 1:]
        best = self.score(obs, agent, actions).argmax(dim=1)
        return actions[torch.arange(e, device=self.device), best]

    def _cem(self, obs, agent, previous):
        """Cross-entropy method over action sequences in [-1, 1], warm-started from the shifted last mean."""
        e = len(obs)
        mean, std = self._prior(e)
        if previous is not None:
            mean[:, :-1] = previous[:, 1:]
        alpha = self.spec.smoothing
        rows = torch.arange(e, device=self.device)[:, None]
        for _ in range(self.spec.iterations + 1):
            actions = self._gaussian_plans(mean, std)
            elite_index = self.score(obs, agent, actions).topk(self.spec.elites, dim=1).indices
            elites = actions[rows, elite_index]
            mean = alpha * mean + (1 - alpha) * elites.mean(dim=1)
            std = alpha * std + (1 - alpha) * elites.std(dim=1)
        return mean

    def first_candidates(self, episodes: int) -> torch.Tensor:
        """The plans the planner scores first for each of ``episodes`` states, before any warm start or
        refinement: [E, K, H] uniform discrete actions (random shooting) or [E, K, H, A] draws from
        N(0, init_std) clipped to [-1, 1] (CEM's first sample)."""
        if self.family.discrete:
            return torch.randint(0, self.family.n_actions, (episodes, self.candidates, self.horizon),
                                 generator=self.generator, device=self.device)
        return self._gaussian_plans(*self._prior(episodes))

    def _prior(self, episodes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CEM's starting mean (0) and std (init_std) per episode, step and action dimension: [E, H, A] each."""
        mean = torch.zeros(episodes, self.horizon, self.family.action_dim, device=self.device)
        return mean, torch.full_like(mean, self.spec.init_std)

    def _gaussian_plans(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """K plans per row around mean [E, H, A] with spread std, clipped to the action box."""
        noise = torch.randn((*mean.shape[:1], self.candidates, *mean.shape[1:]), generator=self.generator,
                            device=self.device)
        return (mean[:, None] + std[:, None] * noise).clamp(-1.0, 1.0)

    def score(self, obs: torch.Tensor, agent: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Aggregated discounted return of every candidate: obs [E, D], actions [E, K, H(, A)] -> [E, K]."""
        family, m = self.family, self.model.n_members
        e, k, h = actions.shape[:3]
        rows = e * k
        state = obs[None, :, None, :].expand(m, e, k, obs.shape[-1]).reshape(m, rows, -1)
        row_agent = agent.repeat_interleave(k)
        plan = actions.reshape(rows, h, *actions.shape[3:])
        total = torch.zeros(m, rows, device=obs.device)
        alive = torch.ones(m, rows, dtype=torch.bool, device=obs.device)
        # The furthest position of the imagined trajectory, its start included (authors' code).
        furthest = family.shaping_value(state) if family.shaping_weight else None
        discount = 1.0
        for t in range(h):
            action = plan[:, t]
            next_state = self.model.step(state, action, row_agent)
            flat_action = action.repeat(m, *([1] * (action.dim() - 1)))
            flat = (state.reshape(m * rows, -1), flat_action, next_state.reshape(m * rows, -1))
            reward = family.reward(*flat).view(m, rows)
            if self.penalty:
                reward = reward - self.penalty * (next_state.std(dim=0) / self.disagreement_scale).mean(dim=-1)
            total += discount * reward * alive
            if family.shaping_weight:
                furthest = torch.maximum(furthest, torch.where(alive, family.shaping_value(next_state), furthest))
            alive &= ~family.terminated(*flat).view(m, rows)
            discount *= self.spec.gamma
            state = next_state
        if family.shaping_weight:
            total += family.shaping_weight * furthest
        # A plan whose imagined return is not a finite number (the true dynamics diverged, or a learned
        # model overflowed) is no plan: NaN would be picked first by topk, and +inf always.
        per_member = total.masked_fill(~total.isfinite(), float("-inf")).view(m, e, k)
        return per_member.min(dim=0).values if self.spec.aggregate == "min" else per_member.mean(dim=0)
