"""BCQ (Fujimoto et al. 2019), the paper's model-free offline baselines, through d3rlpy.

BCQ-P is one policy trained on every agent's trajectory of a dataset; BCQ-A is one policy per
test agent trained on that agent's single trajectory only. MountainCar and CartPole use
d3rlpy's DiscreteBCQ, HalfCheetah its continuous BCQ, with the original code's
hyperparameters where d3rlpy's defaults differ (``BCQSpec``).

d3rlpy draws from the global ``random``, NumPy and torch generators; every fit and every act
call seeds them from our seed and restores the caller's states afterwards.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Callable

import d3rlpy
import numpy as np
import structlog
import torch
from d3rlpy.algos import BCQConfig, DiscreteBCQ, DiscreteBCQConfig, QLearningAlgoBase
from d3rlpy.constants import ActionSpace
from d3rlpy.dataset import MDPDataset
from d3rlpy.logging import FileAdapterFactory
from d3rlpy.models import VectorEncoderFactory
from d3rlpy.torch_utility import soft_sync

from persim_bench.config import BCQSpec
from persim_bench.data.dataset import Transitions
from persim_bench.envs import get_env

# d3rlpy logs through structlog to the console: dataset signatures, the whole config, every epoch's
# metrics. Keep its warnings only; the epoch metrics reach on_epoch and the CSVs under work_dir.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

DEVICE = "cpu:0"
LOG_DIR = "d3rlpy"  # d3rlpy's metric CSVs and params.json go to <work_dir>/d3rlpy/<policy name>/


def to_mdp_dataset(data: Transitions, agents: list[int] | None = None) -> MDPDataset:
    """The rows of ``agents`` (all rows when None) as d3rlpy episodes, one per trajectory, no transition lost.

    d3rlpy rebuilds (s, a, r, s') from consecutive observation rows: an episode of n rows that
    ends in a terminal gives n transitions (the terminal's s' is never read), one that ends in a
    timeout only n - 1 (its last row only serves as the previous row's s'). So a trajectory cut
    by the horizon gets one extra row holding its final next_obs, marked as the timeout.
    """
    family = get_env(data.env)
    rows = _rows(data, agents)
    rows = rows[np.lexsort((data.t[rows], data.agent[rows]))]
    agent, obs, next_obs, action = data.agent[rows], data.obs[rows], data.next_obs[rows], data.action[rows]
    terminated = data.terminated[rows]
    end = terminated | data.truncated[rows]
    end[:-1] |= agent[1:] != agent[:-1]
    end[-1] = True
    chained = np.flatnonzero(~end)  # d3rlpy will take the next row's obs as these rows' next_obs
    broken = chained[np.any(next_obs[chained] != obs[chained + 1], axis=1)]
    if broken.size:
        i = broken[0]
        raise ValueError(f"{data.env}/{data.regime}: agent {agent[i]} t {data.t[rows[i]]}: next_obs differs from the "
                         f"next row's obs, yet neither terminated nor truncated ends the trajectory there")
    timeout = np.flatnonzero(end & ~terminated)
    at = timeout + 1
    timeouts = np.zeros(len(rows) + len(at), np.float32)
    timeouts[at + np.arange(len(at))] = 1.0  # where np.insert puts the extra rows
    with _seeded(0):  # its writer fills placeholder arrays from np.random: leave the caller's stream alone
        return MDPDataset(
            observations=np.insert(obs, at, next_obs[timeout], axis=0),
            actions=np.insert(action, at, action[timeout], axis=0),  # only a next_action, unused by BCQ
            rewards=np.insert(data.reward[rows], at, 0.0),
            terminals=np.insert(terminated, at, False).astype(np.float32),
            timeouts=timeouts,
            action_space=ActionSpace.DISCRETE if family.discrete else ActionSpace.CONTINUOUS,
            action_size=family.n_actions if family.discrete else family.action_dim,
        )


def _rows(data: Transitions, agents: list[int] | None) -> np.ndarray:
    if agents is None:
        if len(data) == 0:
            raise ValueError(f"{data.env}/{data.regime}: the dataset is empty, nothing to train BCQ on")
        return np.arange(len(data))
    rows = np.flatnonzero(np.isin(data.agent, agents))
    missing = sorted(set(agents) - set(data.agent[rows].tolist()))
    if missing:
        raise ValueError(f"{data.env}/{data.regime}: no transitions of agent(s) {', '.join(map(str, missing))}")
    return rows


class BCQPolicy:
    """Trained BCQ acting for a batch of agents: one shared policy (BCQ-P, key None) or one per agent (BCQ-A)."""

    def __init__(self, env: str, algos: dict[int | None, QLearningAlgoBase], seed: int):
        self.env = env
        self.algos = algos
        family = get_env(env)
        self.discrete = family.discrete
        self.action_dims = () if family.discrete else (family.action_dim,)
        # Continuous BCQ picks among sampled VAE actions: each act call draws from a fresh seed of this stream.
        self.rng = np.random.default_rng(seed)

    def act(self, obs: np.ndarray, agent: np.ndarray) -> np.ndarray:
        """Actions for obs [E, D]: int64 [E] or float32 [E, A]; one predict call per policy and step."""
        obs, agent = np.asarray(obs, dtype=np.float32), np.asarray(agent)
        if None not in self.algos:
            unknown = np.setdiff1d(agent, list(self.algos))
            if unknown.size:
                raise ValueError(f"{self.env}: no BCQ-A policy for agent(s) {', '.join(map(str, unknown))} "
                                 f"(trained: {', '.join(map(str, self.algos))})")
        with _seeded(int(self.rng.integers(2**32))):
            if None in self.algos:
                actions = self.algos[None].predict(obs)
            else:
                actions = np.empty((len(obs), *self.action_dims))
                for a in np.unique(agent):
                    mine = agent == a
                    actions[mine] = self.algos[int(a)].predict(obs[mine])
        return actions.astype(np.int64 if self.discrete else np.float32)


def fit_bcq(data: Transitions, spec: BCQSpec, seed: int, work_dir: Path, agents: list[int] | None = None,
            on_epoch: Callable[[int, dict], None] | None = None) -> tuple[BCQPolicy, dict]:
    """BCQ-P (``agents`` None: one policy on all rows) or BCQ-A (one policy per listed agent on its own rows).

    Policies train one after the other, spec.steps gradient steps each. ``on_epoch(epoch, metrics)``
    gets d3rlpy's epoch means (losses, step times) with a running epoch number across the
    policies and, for BCQ-A, the ``agent``. Every agent is checked for data before any training.
    A policy's training depends only on (seed, agent), not on which other agents are fitted.
    Returns the policy and the final epoch's metrics (suffixed ``_agent<a>`` for BCQ-A),
    ``transitions`` and ``fit_seconds``.
    """
    started = time.perf_counter()
    if agents is not None and not agents:
        raise ValueError(f"{data.env}/{data.regime}: BCQ-A needs at least one agent")
    groups = [None] if agents is None else list(dict.fromkeys(int(a) for a in agents))
    datasets = {key: to_mdp_dataset(data, None if key is None else [key]) for key in groups}
    discrete = get_env(data.env).discrete
    epochs = spec.steps // spec.steps_per_epoch
    algos, final = {}, {"transitions": sum(d.transition_count for d in datasets.values())}
    for k, key in enumerate(groups):
        name = "bcq_p" if key is None else f"bcq_a_agent{key}"
        report = None
        if on_epoch:
            def report(epoch: int, metrics: dict, k=k, key=key) -> None:
                on_epoch(k * epochs + epoch, metrics if key is None else {**metrics, "agent": key})
        seed_key = (1,) if key is None else (2, key)
        algos[key], metrics = _fit_one(datasets[key], spec, discrete, _stream(seed, *seed_key),
                                       Path(work_dir) / LOG_DIR, name, report)
        final.update(metrics if key is None else {f"{m}_agent{key}": v for m, v in metrics.items()})
    policy = BCQPolicy(data.env, algos, _stream(seed, 0))
    return policy, {**final, "fit_seconds": time.perf_counter() - started}


def _stream(seed: int, *key: int) -> int:
    """An independent seed per purpose: (0,) acting, (1,) BCQ-P, (2, agent) BCQ-A."""
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1)[0])


def _fit_one(dataset: MDPDataset, spec: BCQSpec, discrete: bool, seed: int, log_root: Path, name: str,
             on_epoch: Callable[[int, dict], None] | None) -> tuple[QLearningAlgoBase, dict]:
    algo = _make_algo(spec, discrete)
    epochs = spec.steps // spec.steps_per_epoch
    shutil.rmtree(log_root / name, ignore_errors=True)  # a rerun would append to the old CSVs
    metrics: dict = {}
    with _seeded(seed):
        for epoch, metrics in algo.fitter(
                dataset, n_steps=spec.steps, n_steps_per_epoch=spec.steps_per_epoch, experiment_name=name,
                with_timestamp=False, logger_adapter=FileAdapterFactory(root_dir=str(log_root)), show_progress=False,
                save_interval=epochs + 1):  # no weight files: the policy is evaluated in this process
            if on_epoch:
                on_epoch(epoch, dict(metrics))
    if not discrete:
        # d3rlpy uses n_action_samples for both the Q target and acting; the original code samples
        # 10 for the target and 100 to act. Its impl keeps the number in this attribute (d3rlpy 2.8).
        algo.impl._n_action_samples = spec.act_samples
    return algo, {key: float(value) for key, value in metrics.items()}


def _make_algo(spec: BCQSpec, discrete: bool) -> QLearningAlgoBase:
    if discrete:
        config = DiscreteBCQConfig(
            learning_rate=spec.discrete_lr, batch_size=spec.discrete_batch_size,
            encoder_factory=VectorEncoderFactory(hidden_units=list(spec.discrete_hidden)),
            action_flexibility=spec.discrete_threshold, beta=spec.discrete_logit_penalty,
            share_encoder=False, target_update_interval=1)  # update_target runs every step, made soft below
        return PolyakDiscreteBCQ(config, spec.discrete_tau)
    return BCQConfig(
        actor_learning_rate=spec.lr, critic_learning_rate=spec.lr, imitator_learning_rate=spec.lr,
        actor_encoder_factory=VectorEncoderFactory(hidden_units=list(spec.actor_hidden)),
        critic_encoder_factory=VectorEncoderFactory(hidden_units=list(spec.critic_hidden)),
        imitator_encoder_factory=VectorEncoderFactory(hidden_units=list(spec.vae_hidden)),
        batch_size=spec.batch_size, n_action_samples=spec.target_samples,
    ).create(device=DEVICE)


class PolyakDiscreteBCQ(DiscreteBCQ):
    """DiscreteBCQ with the original code's soft target update (tau every step).

    d3rlpy only offers a hard copy every ``target_update_interval`` steps (the original's Atari
    setting); with interval 1 its per-step ``update_target`` is replaced by a Polyak average.
    """

    def __init__(self, config: DiscreteBCQConfig, tau: float):
        super().__init__(config, DEVICE, enable_ddp=False)
        self.tau = tau

    def inner_create_impl(self, observation_shape, action_size: int) -> None:
        super().inner_create_impl(observation_shape, action_size)
        modules = self._impl.modules
        self._impl.update_target = functools.partial(soft_sync, modules.targ_q_funcs, modules.q_funcs, self.tau)


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed the global generators d3rlpy draws from for this block; the caller's states come back after."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        d3rlpy.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
