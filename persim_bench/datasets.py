"""The offline datasets from Python, for researchers who bring their own method.

    from persim_bench import datasets

    datasets.generate("smoke", results="results")               # logging policies + Parquet, local Ray
    data = datasets.load("smoke", "cartpole", "random", results="results")
    data.table            # pyarrow.Table: one row per transition, with its regime
    data.agents           # pyarrow.Table: one row per agent: covariates, role, logging policy
    for episode in data.episodes(): ...                         # one Episode per agent
    arrays = data.to_numpy(); tensors = data.to_torch(); mdp = data.to_d3rlpy()
    small = data.subset(agents=50, steps_per_agent=25)          # a data-size cell's nested subset

``load`` verifies the manifest against the grid and every shard's sha256 before anything is
returned, through the same reader the benchmark's own trials use.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from persim_bench.config import Grid, load_grid
from persim_bench.data.dataset import (
    MANIFEST, DatasetError, Transitions, agents_table, data_root, dataset_dir, policy_root, read_dataset, read_manifest,
)
from persim_bench.data.generate import DatasetPlan, dataset_plan
from persim_bench.data.subsets import subset_agents, take_subset
from persim_bench.envs import get_env


def _grid(grid: Grid | str | Path) -> Grid:
    return grid if isinstance(grid, Grid) else load_grid(grid)


@dataclass(frozen=True)
class Episode:
    """One agent's trajectory."""

    agent: int
    covariates: dict[str, float]
    obs: np.ndarray          # float32 [n, D]
    action: np.ndarray       # int64 [n] or float32 [n, A]
    reward: np.ndarray       # float32 [n]
    next_obs: np.ndarray     # float32 [n, D]
    terminated: np.ndarray   # bool [n]
    truncated: np.ndarray    # bool [n]


@dataclass(frozen=True)
class OfflineDataset:
    """One env x regime dataset of a grid, verified, with its agents."""

    grid: str
    plan: DatasetPlan
    folder: Path
    transitions: Transitions
    agents: pa.Table

    @property
    def env(self) -> str:
        return self.plan.env

    @property
    def regime(self) -> str:
        return self.plan.regime

    @property
    def table(self) -> pa.Table:
        """The transitions as Arrow, as a hive reader sees them: the file columns plus ``regime``."""
        table = self.transitions.to_table(self.plan.shard_metadata())
        return table.append_column("regime", pa.array([self.regime] * len(table), pa.string()))

    def subset(self, agents: int | None = None, steps_per_agent: int | None = None) -> "OfflineDataset":
        """The nested subset a grid's ``data_sizes`` cell trains on: the test agents and the first
        ``agents - 5`` of the grid's fixed order of the others, each agent's first ``steps_per_agent``
        transitions (the cut marked truncated). Agents are renumbered 0..N-1; ``agents`` (the table)
        keeps each one's id in the full dataset as ``dataset_agent``."""
        ids = subset_agents(self.plan, agents)
        table = self.agents.filter(pa.compute.is_in(self.agents["agent"], pa.array(ids, pa.int32())))
        table = table.rename_columns(["dataset_agent" if name == "agent" else name for name in table.column_names])
        table = table.add_column(1, "agent", pa.array(np.searchsorted(ids, table["dataset_agent"].to_numpy()),
                                                      pa.int32()))
        return replace(self, transitions=take_subset(self.transitions, ids, steps_per_agent), agents=table)

    def episodes(self):
        """One ``Episode`` per agent, in agent order."""
        from persim_bench.data.formats import episode_bounds

        data, names = self.transitions, get_env(self.env).covariate_names
        agents, bounds = episode_bounds(data)
        for agent, start, stop in zip(agents, bounds[:-1], bounds[1:]):
            rows = slice(start, stop)
            yield Episode(int(agent), dict(zip(names, map(float, data.covariates[agent]))), data.obs[rows],
                          data.action[rows], data.reward[rows], data.next_obs[rows], data.terminated[rows],
                          data.truncated[rows])

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Flat arrays, one row per transition; ``covariates`` is each row's agent's [N, C]."""
        data = self.transitions
        return {"agent": data.agent, "t": data.t, "obs": data.obs, "action": data.action, "reward": data.reward,
                "next_obs": data.next_obs, "terminated": data.terminated, "truncated": data.truncated,
                "covariates": data.covariates[data.agent]}

    def to_torch(self, device: str = "cpu") -> dict:
        """``to_numpy`` as torch tensors on ``device``."""
        import torch

        return {name: torch.as_tensor(array, device=device) for name, array in self.to_numpy().items()}

    def to_d3rlpy(self, agents: list[int] | None = None):
        """A d3rlpy MDPDataset, one episode per agent (of ``agents`` when given); no transition is lost."""
        from persim_bench.data.formats import to_mdp_dataset

        return to_mdp_dataset(self.transitions, agents)

    def to_minari(self, out: Path | str, force: bool = False) -> Path:
        """A Minari dataset under ``out`` (load it with MINARI_DATASETS_PATH=out); returns its folder."""
        from persim_bench.data.formats import export_minari

        return export_minari(self.transitions, self.grid, Path(out), force)

    def to_d4rl(self, path: Path | str, force: bool = False) -> Path:
        """A D4RL-style HDF5 file at ``path``; returns it."""
        from persim_bench.data.formats import export_d4rl

        metadata = {key.removeprefix("persim."): value for key, value in self.plan.shard_metadata().items()}
        return export_d4rl(self.transitions, Path(path), metadata, force)


def export(data: OfflineDataset, fmt: str, out: Path | str, force: bool = False) -> Path:
    """``persim-bench export``: ``fmt`` minari (a datasets root) or d4rl (a folder for ``<grid>-<env>-<regime>.hdf5``)."""
    if fmt == "minari":
        return data.to_minari(out, force)
    if fmt == "d4rl":
        return data.to_d4rl(Path(out) / f"{data.grid}-{data.env}-{data.regime}.hdf5", force)
    raise ValueError(f"unknown export format {fmt!r}; known: minari, d4rl")


def available(results: Path | str = "results") -> list[str]:
    """Every generated dataset under ``results`` as ``grid/env/regime``."""
    root = Path(results) / "datasets"
    return sorted(f"{p.parent.parent.parent.name}/{p.parent.parent.name}/{p.parent.name.removeprefix('regime=')}"
                  for p in root.glob(f"*/*/regime=*/{MANIFEST}"))


def load(grid: Grid | str | Path, env: str, regime: str, results: Path | str = "results") -> OfflineDataset:
    """One verified env x regime dataset of a grid (by name, YAML path or ``Grid``)."""
    grid = _grid(grid)
    root = data_root(results, grid.name)
    if env not in grid.envs or regime not in grid.regimes or not (dataset_dir(root, env, regime) / MANIFEST).exists():
        present = ", ".join(available(results)) or "none (generate with `persim-bench data --grid <grid>`)"
        raise DatasetError(f"no dataset {grid.name}/{env}/{regime} under {Path(results) / 'datasets'} (grid "
                           f"{grid.name}: envs {', '.join(grid.envs)}, regimes {', '.join(grid.regimes)}); "
                           f"present: {present}")
    plan = dataset_plan(grid, env, regime, policy_root(results))
    transitions = read_dataset(root, plan)
    folder = dataset_dir(root, env, regime)
    return OfflineDataset(grid.name, plan, folder, transitions, agents_table(read_manifest(folder)))


def generate(grid: Grid | str | Path, results: Path | str = "results", envs: list[str] | None = None,
             regimes: list[str] | None = None, address: str = "local", workers: int | None = None) -> list[Path]:
    """Train the logging policies and generate the grid's datasets (``persim-bench data`` from Python).

    Starts a local Ray (``address="local"``) unless one is already initialised; returns the dataset folders.
    """
    from persim_bench.orchestration.cluster import connect_ray
    from persim_bench.orchestration.stages import prepare_data

    grid = _grid(grid).narrowed(envs, regimes)
    connect_ray(address)
    prepare_data(grid, Path(results).resolve(), workers)
    root = data_root(Path(results).resolve(), grid.name)
    return [dataset_dir(root, env, regime) for env in grid.envs for regime in grid.regimes]
