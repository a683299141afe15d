"""Online RL that makes the logging and test policies: Double DQN (discrete envs) and TD3 (HalfCheetah).

The paper trains its data policies online on single agents (Sec. 6.1, App. E.2). Both algorithms
here share one collection loop: ``n_envs`` copies of the agent in one ``BatchSim``, episodes cut at
the env's horizon, and a time-major replay buffer. Every random draw comes from ``seed``.

Checkpoints: every ``eval_every`` env steps (and at the end) the greedy policy is scored on its own
agent (``eval_episodes`` episodes stepped as one batch; with ``score_epsilon`` > 0 acting as a
pure-eps-* regime does, a uniform random action with that probability) and its weights are kept
in memory; the policy returned is the checkpoint whose score is nearest ``target_return`` or, with
``target_rule="first"``, the first to reach it (early stopping: the paper's logging policies are
"trained to achieve" a return and are not optimal, Table 8), or with ``"first-held"`` the first
to reach it right after a checkpoint that reached it too; the best one without a target.

Devices: networks, the replay buffer, its sampling and every update live on ``device`` (``"cuda"``
when there is a GPU); the envs step on the CPU, observations go over and actions come back.
"""
from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F

from persim_bench.data.policy_net import PolicyNet
from persim_bench.envs import get_env
from persim_bench.envs.base import BatchSim, EnvFamily
from persim_bench.specs import TargetRule

GAMMA = 0.99
BUFFER_SIZE = 1_000_000        # transitions kept, summed over the parallel envs (TD3 paper: every one)

# Double DQN. Close to rl-baselines3-zoo's tuned CartPole/MountainCar DQN ([256, 256] Q-net, half a
# gradient update per env step, epsilon decayed over the first 20% of the budget, batch 128), with
# gamma 0.99, 3-step returns (carry MountainCar's sparse goal back faster: Rainbow/Ape-X practice) and
# temporally-extended epsilon-greedy exploration (see _DQN.act). The reward is never shaped.
DQN_LR = 1e-3
DQN_BATCH = 128
DQN_UPDATES_PER_STEP = 0.5     # rl-zoo: 128 updates per 256 env steps (CartPole), 8 per 16 (MountainCar)
DQN_TARGET_EVERY = 250         # hard target copy, in gradient updates
DQN_N_STEP = 3
DQN_LEARNING_STARTS = 1_000
DQN_EPS_FINAL = 0.05
DQN_EXPLORATION_FRACTION = 0.2  # share of the budget over which epsilon decays linearly from 1
DQN_MAX_GRAD_NORM = 10.0
DQN_EZ_ZETA = 2.0              # exploration option lengths ~ zeta(2), capped (Dabney et al. 2021)
DQN_EZ_MAX = 10_000

# TD3, as in Fujimoto et al. (2018) and their reference code.
TD3_LR = 3e-4
TD3_BATCH = 256
TD3_TAU = 0.005
TD3_POLICY_NOISE = 0.2
TD3_NOISE_CLIP = 0.5
TD3_POLICY_DELAY = 2
TD3_EXPLORATION_NOISE = 0.1
TD3_RANDOM_STEPS = 10_000      # uniform-random actions first (capped at a tenth of the budget)


class _Replay:
    """Ring buffer laid out [time, env] so an n-step return can be read down one env's column.

    The storage is torch tensors on ``device``: a sampled batch is gathered where the updates run,
    and only the row indices (drawn from the numpy ``rng``, the same stream on every device) travel.
    """

    def __init__(self, capacity: int, n_envs: int, obs_dim: int, action_shape: tuple, action_dtype,
                 device: str | torch.device = "cpu"):
        self.capacity, self.n_envs = max(capacity // n_envs, 2), n_envs
        self.device = torch.device(device)
        shape = (self.capacity, n_envs)

        def zeros(*size, dtype=torch.float32):
            return torch.zeros(size, dtype=dtype, device=self.device)

        self.obs = zeros(*shape, obs_dim)
        self.next_obs = zeros(*shape, obs_dim)
        self.action = zeros(*shape, *action_shape, dtype=torch.from_numpy(np.zeros(0, action_dtype)).dtype)
        self.reward = zeros(*shape)
        self.terminated = zeros(*shape, dtype=torch.bool)
        self.ended = zeros(*shape, dtype=torch.bool)   # terminated or cut at the horizon: an n-step sum stops here
        self.pos = self.size = 0

    def add(self, obs, action, reward, next_obs, terminated, ended) -> None:
        i = self.pos
        for store, value in ((self.obs, obs), (self.action, action), (self.reward, reward),
                             (self.next_obs, next_obs), (self.terminated, terminated), (self.ended, ended)):
            store[i] = torch.as_tensor(np.asarray(value)).to(self.device, store.dtype)
        self.pos, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, batch: int, n_step: int):
        """(obs, action, n-step discounted reward, bootstrap obs, bootstrap discount), tensors on the device.

        Rows are drawn from those at least n_step - 1 steps old, so every window lies in written
        data; the discount is gamma^k (k steps summed) and 0 when the window ends in termination.
        """
        age = rng.integers(n_step - 1, self.size, size=batch)
        t = torch.from_numpy((self.pos - 1 - age) % self.capacity).to(self.device)
        env = torch.from_numpy(rng.integers(0, self.n_envs, size=batch)).to(self.device)
        ret = torch.zeros(batch, device=self.device)
        discount = torch.ones(batch, device=self.device)
        last = t.clone()
        active = torch.ones(batch, dtype=torch.bool, device=self.device)
        for k in range(n_step):
            i = (t + k) % self.capacity
            ret += torch.where(active, discount * self.reward[i, env], 0.0)
            discount = torch.where(active, discount * GAMMA, discount)
            last = torch.where(active, i, last)
            active &= ~self.ended[i, env]
        discount = discount * ~self.terminated[last, env]
        return self.obs[t, env], self.action[t, env], ret, self.next_obs[last, env], discount


def _reset_finished(sim: BatchSim, done: np.ndarray, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Start new episodes in the ``done`` rows only; the other rows carry on.

    ``BatchSim.reset`` resets every row, so reset all of them (start states drawn exactly as the
    sim draws them) and then put the unfinished rows' states back through the public state.
    """
    if done.all():
        return sim.reset(rng)
    if isinstance(sim.state, torch.Tensor):        # classic control: state [N, D] float64
        keep = sim.state.clone()
        fresh = sim.reset(rng)
        sim.state[~done] = keep[~done]
    else:                                           # HalfCheetah: restore (qpos, qvel) rows
        qpos, qvel = sim.qpos.copy(), sim.qvel.copy()
        fresh = sim.reset(rng)
        rows = done[:, None]
        sim.set_state(np.where(rows, sim.qpos, qpos), np.where(rows, sim.qvel, qvel))
    return np.where(done[:, None], fresh, obs)


class _DQN:
    """Double DQN with n-step returns, Huber loss, a hard-copied target net and ez-greedy exploration."""

    updates_per_step = DQN_UPDATES_PER_STEP
    n_step = DQN_N_STEP
    batch = DQN_BATCH

    def __init__(self, family: EnvFamily, hidden: list[int], budget: int, n_envs: int, device: torch.device):
        self.family = family
        self.q = PolicyNet(family.obs_dim, family.n_actions, hidden, discrete=True).to(device)
        self.target = copy.deepcopy(self.q)
        self.optimizer = torch.optim.Adam(self.q.parameters(), lr=DQN_LR)
        self.learning_starts = min(DQN_LEARNING_STARTS, budget // 10)
        self.decay_steps = max(DQN_EXPLORATION_FRACTION * budget, 1.0)
        self.updates = 0
        self.explore_action = self.explore_left = np.zeros(n_envs, np.int64)

    def epsilon(self, steps: int) -> float:
        return max(DQN_EPS_FINAL, 1.0 - (1.0 - DQN_EPS_FINAL) * steps / self.decay_steps)

    def act(self, obs: np.ndarray, steps: int, rng: np.random.Generator) -> np.ndarray:
        """Temporally-extended epsilon-greedy (ez-greedy, Dabney et al. 2021).

        With probability epsilon a row starts repeating one random action for a zeta(2)-distributed
        number of steps. Single-step dithering never reaches MountainCar's goal within 500 steps at
        gravity >= 0.0025 (0 of 2000 random episodes); repeated actions pump energy and do.
        """
        n = len(obs)
        start = (self.explore_left <= 0) & (rng.random(n) < self.epsilon(steps))
        self.explore_action = np.where(start, self.family.random_actions(rng, n), self.explore_action)
        self.explore_left = np.where(start, np.minimum(rng.zipf(DQN_EZ_ZETA, n), DQN_EZ_MAX), self.explore_left)
        exploring = self.explore_left > 0
        self.explore_left = self.explore_left - exploring
        return np.where(exploring, self.explore_action, self.q.act(obs))

    def update(self, replay: _Replay, rng: np.random.Generator, gen: torch.Generator) -> float:
        obs, action, ret, next_obs, discount = replay.sample(rng, self.batch, self.n_step)
        with torch.no_grad():
            best = self.q(next_obs).argmax(dim=1, keepdim=True)       # online net picks, target net scores
            target = ret + discount * self.target(next_obs).gather(1, best).squeeze(1)
        predicted = self.q(obs).gather(1, action.long()[:, None]).squeeze(1)
        loss = F.smooth_l1_loss(predicted, target)
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.q.parameters(), DQN_MAX_GRAD_NORM)
        self.optimizer.step()
        self.updates += 1
        if self.updates % DQN_TARGET_EVERY == 0:
            self.target.load_state_dict(self.q.state_dict())
        return loss.item()

    def policy(self) -> PolicyNet:
        return self.q


class _TD3:
    """TD3: twin critics with clipped double-Q, target policy smoothing, delayed actor updates."""

    updates_per_step = 1.0
    n_step = 1
    batch = TD3_BATCH

    def __init__(self, family: EnvFamily, hidden: list[int], budget: int, n_envs: int, device: torch.device):
        self.family = family
        obs_dim, action_dim = family.obs_dim, family.action_dim
        self.actor = PolicyNet(obs_dim, action_dim, hidden, discrete=False).to(device)
        # A critic is a plain MLP on [obs, action]: PolicyNet with discrete=True has no output squashing.
        self.critics = torch.nn.ModuleList(PolicyNet(obs_dim + action_dim, 1, hidden, discrete=True)
                                           for _ in range(2)).to(device)
        self.actor_target, self.critics_target = copy.deepcopy(self.actor), copy.deepcopy(self.critics)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=TD3_LR)
        self.critic_optimizer = torch.optim.Adam(self.critics.parameters(), lr=TD3_LR)
        self.learning_starts = min(TD3_RANDOM_STEPS, budget // 10)
        self.updates = 0

    def act(self, obs: np.ndarray, steps: int, rng: np.random.Generator) -> np.ndarray:
        if steps < self.learning_starts:
            return self.family.random_actions(rng, len(obs))
        noise = rng.normal(0.0, TD3_EXPLORATION_NOISE, size=(len(obs), self.family.action_dim))
        return np.clip(self.actor.act(obs) + noise, -1.0, 1.0).astype(np.float32)

    def _q(self, critics, obs: torch.Tensor, action: torch.Tensor) -> list[torch.Tensor]:
        inputs = torch.cat([obs, action], dim=1)
        return [critic(inputs).squeeze(1) for critic in critics]

    def update(self, replay: _Replay, rng: np.random.Generator, gen: torch.Generator) -> float:
        obs, action, reward, next_obs, discount = replay.sample(rng, self.batch, 1)
        with torch.no_grad():
            noise = torch.randn(action.shape, generator=gen, device=action.device)
            noise = (noise * TD3_POLICY_NOISE).clamp(-TD3_NOISE_CLIP, TD3_NOISE_CLIP)
            next_action = (self.actor_target(next_obs) + noise).clamp(-1.0, 1.0)
            target = reward + discount * torch.minimum(*self._q(self.critics_target, next_obs, next_action))
        q1, q2 = self._q(self.critics, obs, action)
        loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self.critic_optimizer.zero_grad()
        loss.backward()
        self.critic_optimizer.step()
        self.updates += 1
        if self.updates % TD3_POLICY_DELAY == 0:
            actor_loss = -self._q(self.critics[:1], obs, self.actor(obs))[0].mean()
            self.actor_optimizer.zero_grad()
            actor_loss.backward()
            self.actor_optimizer.step()
            with torch.no_grad():
                for net, target_net in ((self.actor, self.actor_target), (self.critics, self.critics_target)):
                    for p, p_target in zip(net.parameters(), target_net.parameters()):
                        p_target.lerp_(p, TD3_TAU)
        return loss.item()

    def policy(self) -> PolicyNet:
        return self.actor


ALGORITHMS = {"dqn": _DQN, "td3": _TD3}


def evaluate_policy(family: EnvFamily, covariates, net: PolicyNet, episodes: int,
                    rng: np.random.Generator, epsilon: float = 0.0) -> np.ndarray:
    """Returns of ``episodes`` episodes of one agent, run as one batch capped at the horizon.

    The policy acts greedily; with ``epsilon`` > 0 each action is replaced by a uniform random one
    with that probability (``EnvFamily.epsilon_actions``).
    """
    sim = family.batch(np.repeat(np.asarray([covariates], dtype=np.float64), episodes, axis=0))
    obs = sim.reset(rng)
    total = np.zeros(episodes)
    alive = np.ones(episodes, bool)
    for _ in range(family.horizon):
        action = net.act(obs)
        obs, reward, terminated = sim.step(family.epsilon_actions(action, epsilon, rng) if epsilon else action)
        total += np.where(alive, reward, 0.0)
        alive &= ~terminated
        if not alive.any():
            break
    return total


@dataclass
class Checkpoint:
    """The greedy policy at one point of training: when, its score on its own agent, its weights (CPU)."""

    steps: int
    scored_return: float           # mean return on its own agent, acting at the run's score_epsilon
    state: dict[str, torch.Tensor]


TARGET_RULES = get_args(TargetRule)
EARLY_STOPPING_RULES = ("first", "first-held")


def meets_target(returns, target: float, rule: str) -> np.ndarray:
    """Which checkpoints meet ``target``: ``"first-held"``, a return reaching it (>=) right after a
    checkpoint that reached it too; any other rule, a return reaching it.

    DQN's greedy return jumps between checkpoints (MountainCar: -500, -185, -448, -196, ...), so
    the first checkpoint above a target is often a lucky one; one that holds is a policy that got there.
    """
    met = np.asarray(returns, dtype=np.float64) >= target
    return met & np.concatenate([[False], met[:-1]]) if rule == "first-held" else met


def select_checkpoint(returns, target: float | None, rule: str = "nearest") -> int:
    """Index of the checkpoint to keep, from the greedy returns of the checkpoints in training order.

    No target: the best. ``rule="nearest"``: the return nearest ``target``; ties go to the later
    checkpoint (more training behind the same score). ``rule="first"`` / ``"first-held"``: early
    stopping, the first checkpoint that ``meets_target``, the best one if none does.
    """
    if rule not in TARGET_RULES:
        raise ValueError(f"unknown checkpoint rule {rule!r}; known: {', '.join(TARGET_RULES)}")
    returns = np.asarray(returns, dtype=np.float64)
    early_stopping = rule in EARLY_STOPPING_RULES
    if target is not None and early_stopping and (met := meets_target(returns, target, rule)).any():
        return int(np.argmax(met))
    score = returns if target is None or early_stopping else -np.abs(returns - target)
    return int(len(score) - 1 - np.argmax(score[::-1]))


def train_policy(env: str, covariates, algorithm: str, budget: int, seed: int, hidden: list[int],
                 n_envs: int = 8, eval_episodes: int = 10, on_progress=None, eval_every: int | None = None,
                 target_return: float | None = None, target_rule: str = "nearest", score_epsilon: float = 0.0,
                 device: str | torch.device = "cpu") -> tuple[PolicyNet, dict]:
    """Train a policy online on one agent for ``budget`` env steps (summed over ``n_envs`` copies).

    Every ``eval_every`` env steps (rounded down to whole steps of the ``n_envs`` copies) and at
    the end, the greedy policy is scored over
    ``eval_episodes`` episodes of its own agent (one batch, the same start states every time) and
    kept as a checkpoint; ``eval_every=None`` keeps the final policy only. The checkpoint returned
    is the one nearest ``target_return`` (``target_rule="first"`` / ``"first-held"``: the first
    that ``meets_target``), or the
    best one when it is None (``select_checkpoint``). A checkpoint's score is its greedy return, or
    with ``score_epsilon`` > 0 its return when a random action replaces the greedy one with that
    probability (a logging policy chosen for a pure-eps-* regime's data quality).

    With an early-stopping rule training stops at the first checkpoint that meets the target (the
    later ones could not be chosen), so ``env_steps`` may be less than the budget; the summary's
    ``target_met`` says whether one did.

    Returns that greedy network, on the CPU in eval mode, and a summary: its mean/std return over
    ``eval_episodes`` fresh episodes (scored the same way), wall time, env steps taken, gradient
    updates, the ``checkpoints`` evaluated as [env steps, score] and the index of the ``chosen_checkpoint``.
    Networks, replay and updates run on ``device``; the envs on the CPU.
    ``on_progress(steps_done, metrics)`` is called about every 5% of the budget.
    """
    family = get_env(env)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    if (algorithm == "dqn") != family.discrete:
        kind, fit = ("discrete", "dqn") if family.discrete else ("continuous", "td3")
        raise ValueError(f"{algorithm} cannot train {env}: its actions are {kind} (use {fit})")
    covariates = tuple(float(c) for c in covariates)
    if len(covariates) != len(family.covariate_names):
        raise ValueError(f"{env} takes covariates {family.covariate_names}, got {covariates}")
    if budget < n_envs:
        raise ValueError(f"budget ({budget}) must be at least n_envs ({n_envs})")
    if target_rule not in TARGET_RULES:
        raise ValueError(f"unknown target_rule {target_rule!r}; known: {', '.join(TARGET_RULES)}")
    if not 0.0 <= score_epsilon <= 1.0:
        raise ValueError(f"score_epsilon must be in [0, 1], got {score_epsilon}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be a positive number of env steps or None, got {eval_every}")
    device = torch.device(device)

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    # Evaluations draw from streams of their own, so progress reports change neither training nor result.
    progress_rng = np.random.default_rng([seed, 1])
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.random.fork_rng(devices=[]):     # seeds weight init without touching the caller's torch RNG
        torch.manual_seed(seed)
        learner = ALGORITHMS[algorithm](family, hidden, budget, n_envs, device)

    discrete = family.discrete
    iterations = budget // n_envs      # the budget is rounded down to whole vectorised steps
    # Never more rows than the budget writes: the ring never wraps, so the capacity changes no sample.
    replay = _Replay(min(BUFFER_SIZE, iterations * n_envs), n_envs, family.obs_dim,
                     () if discrete else (family.action_dim,), np.int64 if discrete else np.float32, device)
    sim = family.batch(np.repeat(np.asarray([covariates]), n_envs, axis=0))
    obs = sim.reset(rng)
    episode_return, episode_length = np.zeros(n_envs), np.zeros(n_envs, int)
    recent = deque(maxlen=max(10, n_envs))    # returns of the latest finished episodes, for progress only
    episodes = 0
    report_every = max(iterations // 20, 1)
    checkpoint_every = max(eval_every // n_envs, 1) if eval_every is not None else None
    checkpoints: list[Checkpoint] = []
    stop_early = target_rule in EARLY_STOPPING_RULES and target_return is not None
    update_credit, loss = 0.0, float("nan")

    def checkpoint(steps_done: int) -> None:
        """Score the greedy policy on fresh copies of the agent (same start states each time) and keep it."""
        net = learner.policy()
        scored = evaluate_policy(family, covariates, net, eval_episodes, np.random.default_rng([seed, 3]), score_epsilon)
        state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in net.state_dict().items()}
        checkpoints.append(Checkpoint(steps_done, float(scored.mean()), state))

    for iteration in range(1, iterations + 1):
        steps = (iteration - 1) * n_envs
        action = learner.act(obs, steps, rng)
        next_obs, reward, terminated = sim.step(action)
        episode_return += reward
        episode_length += 1
        ended = terminated | (episode_length >= family.horizon)   # a horizon cut is not terminal
        replay.add(obs, action, reward, next_obs, terminated, ended)
        obs = next_obs
        if ended.any():
            recent.extend(episode_return[ended])
            episodes += int(ended.sum())
            episode_return[ended], episode_length[ended] = 0.0, 0
            obs = _reset_finished(sim, ended, obs, rng)

        if steps >= learner.learning_starts and replay.size >= learner.n_step:
            update_credit += n_envs * learner.updates_per_step
            while update_credit >= 1.0:
                loss = learner.update(replay, rng, gen)
                update_credit -= 1.0

        reached = False
        if (checkpoint_every is not None and iteration % checkpoint_every == 0) or iteration == iterations:
            checkpoint(iteration * n_envs)
            reached = stop_early and meets_target([c.scored_return for c in checkpoints[-2:]], target_return,
                                                  target_rule)[-1]

        if on_progress is not None and (iteration % report_every == 0 or iteration == iterations or reached):
            # Training returns include exploration (ez-greedy's long random runs topple CartPole),
            # so the greedy policy is scored too.
            greedy = evaluate_policy(family, covariates, learner.policy(), eval_episodes, progress_rng)
            metrics = {"recent_return": float(np.mean(recent)) if recent else float("nan"),
                       "greedy_return": float(greedy.mean()), "episodes": episodes,
                       "updates": learner.updates, "loss": loss, "seconds": time.perf_counter() - start}
            if algorithm == "dqn":
                metrics["epsilon"] = learner.epsilon(steps)
            on_progress(iteration * n_envs, metrics)
        if reached:     # early stopping: the first checkpoint that meets the target is the one kept
            break

    scores = [c.scored_return for c in checkpoints]
    chosen = select_checkpoint(scores, target_return, target_rule)
    target_met = target_return is not None and bool(meets_target(scores, target_return, target_rule).any())
    net = copy.deepcopy(learner.policy()).cpu().eval()
    net.load_state_dict(checkpoints[chosen].state)
    train_seconds = time.perf_counter() - start
    returns = evaluate_policy(family, covariates, net, eval_episodes, np.random.default_rng([seed, 2]), score_epsilon)
    return net, {"achieved_return": float(returns.mean()), "achieved_return_std": float(returns.std()),
                 "train_seconds": train_seconds, "env_steps": checkpoints[-1].steps,
                 "updates": learner.updates, "device": str(device),
                 "checkpoints": [[c.steps, c.scored_return] for c in checkpoints], "chosen_checkpoint": chosen,
                 "target_return": target_return, "target_rule": target_rule, "target_met": target_met,
                 "score_epsilon": score_epsilon}
