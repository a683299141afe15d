"""The Parquet datasets in other libraries' formats: d3rlpy's MDPDataset, Minari, D4RL-style HDF5.

Every format is derived from ``Transitions`` (what the one reader returns), never the other
way round. One episode per agent, in agent order. d3rlpy, minari and h5py are imported inside
the functions that need them: they cost seconds to import and most commands never convert.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from persim_bench.data.dataset import Transitions, atomic_write
from persim_bench.envs import get_env
from persim_bench.errors import BenchError


class ExportError(BenchError):
    """An export that would overwrite something, or cannot be written; the message names the path."""


@contextlib.contextmanager
def seeded(seed: int):
    """Seed the global generators d3rlpy draws from for this block; the caller's states come back after."""
    import d3rlpy

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        d3rlpy.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def agent_rows(data: Transitions, agents: list[int] | None) -> np.ndarray:
    """Row indices of ``agents`` (all rows when None), refusing agents without a transition."""
    if agents is None:
        if len(data) == 0:
            raise ValueError(f"{data.env}/{data.regime}: the dataset is empty, nothing to train on")
        return np.arange(len(data))
    rows = np.flatnonzero(np.isin(data.agent, agents))
    missing = sorted(set(agents) - set(data.agent[rows].tolist()))
    if missing:
        raise ValueError(f"{data.env}/{data.regime}: no transitions of agent(s) {', '.join(map(str, missing))}")
    return rows


def episode_bounds(data: Transitions) -> tuple[np.ndarray, np.ndarray]:
    """(agent ids, start row of each agent's episode plus the end): rows are sorted by (agent, t)."""
    agents, starts = np.unique(data.agent, return_index=True)
    return agents, np.append(starts, len(data))


def to_mdp_dataset(data: Transitions, agents: list[int] | None = None):
    """The rows of ``agents`` (all rows when None) as d3rlpy episodes, one per trajectory, no transition lost.

    d3rlpy rebuilds (s, a, r, s') from consecutive observation rows: an episode of n rows that
    ends in a terminal gives n transitions (the terminal's s' is never read), one that ends in a
    timeout only n - 1 (its last row only serves as the previous row's s'). So a trajectory cut
    by the horizon gets one extra row holding its final next_obs, marked as the timeout.
    """
    from d3rlpy.constants import ActionSpace
    from d3rlpy.dataset import MDPDataset

    family = get_env(data.env)
    rows = agent_rows(data, agents)
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
    with seeded(0):  # its writer fills placeholder arrays from np.random: leave the caller's stream alone
        return MDPDataset(
            observations=np.insert(obs, at, next_obs[timeout], axis=0),
            actions=np.insert(action, at, action[timeout], axis=0),  # only a next_action, never trained on
            rewards=np.insert(data.reward[rows], at, 0.0),
            terminals=np.insert(terminated, at, False).astype(np.float32),
            timeouts=timeouts,
            action_space=ActionSpace.DISCRETE if family.discrete else ActionSpace.CONTINUOUS,
            action_size=family.n_actions if family.discrete else family.action_dim,
        )


def refuse_existing(path: Path, force: bool) -> None:
    """An export never replaces an earlier one unless asked to (``--force``)."""
    if path.exists() and not force:
        raise ExportError(f"{path}: already exists; pass --force to replace it")


def minari_dataset_id(grid: str, env: str, regime: str) -> str:
    """``persim/<env>/<grid>-<regime>-v0``: Minari's namespace/env/name-version."""
    return f"persim/{env}/{grid}-{regime}-v0"


def export_minari(data: Transitions, grid: str, out: Path, force: bool = False, description: str = "") -> Path:
    """A Minari dataset under ``out`` (a MINARI_DATASETS_PATH): one episode per agent.

    Each episode's metadata holds ``agent`` and the agent's covariates by name, which are the
    registered env's keyword arguments, so ``dataset.recover_environment(**covariates)`` builds
    that agent. Written in a temp folder beside the target and renamed into place.
    """
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    import persim_bench

    family = get_env(data.env)
    out = Path(out).resolve()  # minari joins a relative root with itself
    dataset_id = minari_dataset_id(grid, data.env, data.regime)
    target = out / dataset_id
    refuse_existing(target, force)
    agents, bounds = episode_bounds(data)
    buffers = []
    for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        obs = np.concatenate([data.obs[start:stop], data.next_obs[stop - 1:stop]])  # Minari: n + 1 observations
        buffers.append(EpisodeBuffer(id=index, observations=obs, actions=data.action[start:stop],
                                     rewards=data.reward[start:stop],
                                     terminations=data.terminated[start:stop], truncations=data.truncated[start:stop],
                                     infos={}))
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".minari-"))
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(staging)  # minari writes under this root
    try:
        with warnings.catch_warnings():
            # minari asks for a code permalink, an author email and an evaluation env; none applies here
            warnings.filterwarnings("ignore", category=UserWarning, module=r"minari\.")
            dataset = minari.create_dataset_from_buffers(
                dataset_id, buffers, env=family.gym_id, algorithm_name=f"persim-bench {data.regime} regime",
                author="persim-bench", requirements=[f"persim-bench=={persim_bench.__version__}"],
                description=description or f"PerSim {data.env} {data.regime} data of grid {grid}: one episode per agent")
        dataset.storage.update_episode_metadata(
            [{"agent": int(agent), **dict(zip(family.covariate_names, map(float, data.covariates[agent])))}
             for agent in agents])
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / dataset_id, target)
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
        shutil.rmtree(staging, ignore_errors=True)
    return target


def export_d4rl(data: Transitions, path: Path, attrs: dict[str, str], force: bool = False) -> Path:
    """A D4RL-style HDF5 file: flat transition arrays with D4RL's names, plus agent_id, t and covariates.

    ``terminals`` marks the env's own ends, ``timeouts`` the horizon's; ``covariates`` is per row
    ([N, C], names in the ``covariate_names`` attribute) and ``agents/covariates`` per agent.
    """
    import h5py

    path = Path(path)
    refuse_existing(path, force)
    family = get_env(data.env)

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            arrays = {"observations": data.obs, "actions": data.action, "rewards": data.reward,
                      "next_observations": data.next_obs, "terminals": data.terminated, "timeouts": data.truncated,
                      "agent_id": data.agent.astype(np.int32), "t": data.t.astype(np.int32),
                      "covariates": data.covariates[data.agent]}
            for name, array in arrays.items():
                f.create_dataset(name, data=array, compression="gzip")
            f.create_dataset("agents/covariates", data=data.covariates)
            f.attrs.update({**attrs, "covariate_names": list(family.covariate_names)})

    atomic_write(path, write)
    return path
