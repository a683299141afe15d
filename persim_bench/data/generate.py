"""Dataset generation: one trajectory per agent, shards recorded by Ray actors in parallel.

Each env x regime dataset is cut into shards of ``agents_per_shard`` agents. A shard is a
pure function of (grid seed, env, regime, shard index), so regenerating gives the same
bytes; its file name carries a fingerprint of everything it depends on, so a rerun skips
finished shards and never reuses stale ones. Files are written atomically.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import ray
import torch
from ray.util import ActorPool
from tqdm.auto import tqdm

import persim_bench
from persim_bench.specs import REGIMES
from persim_bench.data.behaviour import regime_policy
from persim_bench.data.policies import load_policy, logging_policy_paths
from persim_bench.data.dataset import MANIFEST, Transitions, dataset_dir, read_manifest, sha256, write_json, write_parquet
from persim_bench.envs import ENVS, get_env

if TYPE_CHECKING:
    from persim_bench.config import Grid


@dataclass(frozen=True)
class DatasetPlan:
    """Everything that determines one env x regime dataset."""

    env: str
    regime: str
    seed: int
    n_agents: int
    episode_steps: int
    agents_per_shard: int
    # Logging policy files of the pure* regimes, in policy-agent order; their names carry content keys.
    policy_paths: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        determinants = {**self.__dict__, "policy_paths": [Path(p).name for p in self.policy_paths]}
        key = json.dumps({**determinants, "version": persim_bench.__version__}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    @property
    def n_shards(self) -> int:
        return -(-self.n_agents // self.agents_per_shard)

    def shard_agents(self, shard: int) -> range:
        start = shard * self.agents_per_shard
        return range(start, min(start + self.agents_per_shard, self.n_agents))

    def shard_name(self, shard: int) -> str:
        return f"part-{shard:04d}-{self.fingerprint}.parquet"

    def rng(self, *stream: int) -> np.random.Generator:
        """Independent, stable random streams keyed by env/regime/shard indices (never hash())."""
        env_index = list(ENVS).index(self.env)
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(env_index, *stream)))

    def covariates(self) -> np.ndarray:
        """All agents' covariates: shared by every regime of an env (same agents, other policy)."""
        return get_env(self.env).agent_covariates(self.rng(), self.n_agents)


def dataset_plans(grid: Grid, policy_root: Path | None) -> list[DatasetPlan]:
    if policy_root is None and any(regime != "random" for regime in grid.regimes):
        raise ValueError("the pure* regimes need the logging policies: pass policy_root (see train_policies)")
    return [
        DatasetPlan(env, regime, grid.seed, grid.data.n_agents, grid.data.episode_steps(env), grid.data.agents_per_shard,
                    () if regime == "random" else tuple(map(str, logging_policy_paths(policy_root, grid, env, regime))))
        for env in grid.envs
        for regime in grid.regimes
    ]


@functools.lru_cache(maxsize=32)
def cached_policy(path: str):
    """A logging policy loaded once per process: every shard of an env x regime uses the same five."""
    return load_policy(path)[0]


def record_shard(plan: DatasetPlan, shard: int) -> Transitions:
    """Roll every agent of the shard for one episode, all agents stepped together."""
    family = get_env(plan.env)
    agents = np.asarray(plan.shard_agents(shard))
    covariates = plan.covariates()[agents]
    rng = plan.rng(REGIMES.index(plan.regime) + 1, shard)
    policy = regime_policy(family, plan.regime, covariates, [cached_policy(p) for p in plan.policy_paths])
    sim = family.batch(covariates)
    obs = sim.reset(rng)
    alive = np.ones(len(agents), dtype=bool)
    steps = []
    for t in range(plan.episode_steps):
        action = policy.act(obs, rng)
        next_obs, reward, terminated = sim.step(action)
        truncated = ~terminated & (t == plan.episode_steps - 1)
        steps.append((agents[alive], np.full(alive.sum(), t), obs[alive], action[alive], reward[alive],
                      next_obs[alive], terminated[alive], truncated[alive]))
        alive &= ~terminated
        if not alive.any():
            break
        obs = next_obs
    agent, t, *columns = (np.concatenate(column) for column in zip(*steps))
    order = np.lexsort((t, agent))
    obs_, action_, reward_, next_obs_, terminated_, truncated_ = (c[order] for c in columns)
    return Transitions(plan.env, plan.regime, agent[order], t[order], obs_, action_, reward_.astype(np.float32),
                       next_obs_, terminated_, truncated_, covariates=covariates)


@ray.remote(num_cpus=1)
class ShardWriter:
    """A Ray actor that records shards and writes each as one Parquet file."""

    def __init__(self):
        torch.set_num_threads(1)  # one CPU per actor: keep torch's pool from oversubscribing it

    def write(self, plan: DatasetPlan, shard: int, folder: str) -> dict:
        path = Path(folder) / plan.shard_name(shard)
        write_parquet(record_shard(plan, shard).to_table(), path)
        return shard_entry(plan, shard, path)


def shard_entry(plan: DatasetPlan, shard: int, path: Path) -> dict:
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(path).metadata.num_rows
    agents = plan.shard_agents(shard)
    return {"name": path.name, "rows": rows, "sha256": sha256(path), "agents": [agents.start, agents.stop]}


def is_complete(plan: DatasetPlan, folder: Path) -> bool:
    if not (folder / MANIFEST).exists():
        return False
    try:
        return read_manifest(folder).get("fingerprint") == plan.fingerprint
    except Exception:
        return False


def generate_datasets(grid: Grid, root: Path, policy_root: Path | None = None, num_workers: int | None = None,
                      progress: bool = True) -> list[Path]:
    """Generate every env x regime dataset of the grid on the connected Ray cluster.

    The pure* regimes read the logging policies under ``policy_root`` (the policies stage trains
    them). Returns the dataset folders. Finished datasets and shards are skipped.
    """
    plans = dataset_plans(grid, policy_root)
    pending = []
    for plan in plans:
        folder = dataset_dir(root, plan.env, plan.regime)
        if is_complete(plan, folder):
            continue
        for shard in range(plan.n_shards):
            path = folder / plan.shard_name(shard)
            pending.append((plan, shard, folder, path.exists()))

    entries: dict[tuple[DatasetPlan, int], dict] = {}
    todo = []
    for plan, shard, folder, done in pending:
        if done:
            entries[plan, shard] = shard_entry(plan, shard, folder / plan.shard_name(shard))
        else:
            todo.append((plan, shard, folder))
    if todo:
        workers = num_workers or grid.data.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        actors = [ShardWriter.remote() for _ in range(min(workers, len(todo)))]
        try:
            pool = ActorPool(actors)
            results = pool.map_unordered(lambda actor, job: actor.write.remote(job[0], job[1], str(job[2])), todo)
            by_name = {plan.shard_name(shard): (plan, shard) for plan, shard, _ in todo}
            with tqdm(total=len(todo), desc="datasets", unit="shard", disable=not progress) as bar:
                for entry in results:
                    entries[by_name[entry["name"]]] = entry
                    bar.set_postfix_str(f"{sum(e['rows'] for e in entries.values()):,} rows")
                    bar.update()
        finally:
            for actor in actors:  # idle actors would keep holding CPUs
                ray.kill(actor)

    folders = []
    for plan in plans:
        folder = dataset_dir(root, plan.env, plan.regime)
        folders.append(folder)
        if is_complete(plan, folder):
            continue
        write_manifest(plan, folder, [entries[plan, shard] for shard in range(plan.n_shards)])
    return folders


def write_manifest(plan: DatasetPlan, folder: Path, files: list[dict]) -> None:
    family = get_env(plan.env)
    manifest = {
        **plan.__dict__,
        "fingerprint": plan.fingerprint,
        "package_version": persim_bench.__version__,
        "covariate_names": list(family.covariate_names),
        "covariates": plan.covariates().tolist(),
        "rows": sum(f["rows"] for f in files),
        "files": files,
    }
    write_json(manifest, folder / MANIFEST)
    listed = {f["name"] for f in files}
    for stale in folder.glob("part-*.parquet"):  # shards of an older fingerprint
        if stale.name not in listed:
            stale.unlink()
