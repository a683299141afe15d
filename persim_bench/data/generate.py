"""Dataset generation: one trajectory per agent, shards recorded by Ray actors in parallel.

Each env x regime dataset is cut into shards of ``agents_per_shard`` agents. A shard is a
pure function of (grid seed, env, regime, shard index), so regenerating gives the same
bytes; its file name carries a fingerprint of everything it depends on. Files are written
atomically, and the manifest grows shard by shard (``complete: false`` until the last), so an
interrupted run resumes from the shards it recorded. A shard is reused only when the manifest
lists it and its sha256 matches: bytes nobody vouches for are regenerated, never adopted.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
import torch

import persim_bench
from persim_bench.specs import REGIMES
from persim_bench.data.behaviour import random_action_prob, regime_policy
from persim_bench.data.policies import load_policy, logging_policy_paths, nearest_policy_agent
from persim_bench.data.dataset import (
    LAYOUT, MANIFEST, SHARD_PATTERN, DatasetError, Transitions, dataset_dir, read_manifest, schema_metadata, sha256,
    verify_shard, write_agents_table, write_json, write_parquet,
)
from persim_bench.envs import ENVS, get_env

if TYPE_CHECKING:
    from persim_bench.config import Grid


@dataclass(frozen=True)
class DatasetPlan:
    """Everything that determines one env x regime dataset."""

    env: str
    regime: str
    grid: str
    seed: int
    n_agents: int
    episode_steps: int
    agents_per_shard: int
    # Logging policy files of the pure* regimes, in policy-agent order; their names carry content keys.
    policy_paths: tuple[str, ...] = ()
    logging_epsilon: float = 0.0  # the logging policies' own random-action probability (pure* regimes)

    def spec(self) -> dict:
        """The determinants as the manifest records them (policy files by name: their keys are content hashes).

        ``logging_epsilon`` enters only when not 0, so datasets made before it existed keep their fingerprint.
        """
        spec = {**self.__dict__, "policy_paths": [Path(p).name for p in self.policy_paths]}
        if not self.logging_epsilon:
            del spec["logging_epsilon"]
        return spec

    @property
    def fingerprint(self) -> str:
        key = json.dumps({**self.spec(), "version": persim_bench.__version__, "layout": LAYOUT}, sort_keys=True)
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

    @functools.cache
    def covariates(self) -> np.ndarray:
        """All agents' covariates: shared by every regime of an env (same agents, other policy)."""
        return get_env(self.env).agent_covariates(self.rng(), self.n_agents)

    def shard_metadata(self) -> dict[str, str]:
        return schema_metadata(get_env(self.env), self.regime, self.grid, self.fingerprint, persim_bench.__version__)


def dataset_plan(grid: Grid, env: str, regime: str, policy_root: Path | None) -> DatasetPlan:
    """The plan of one env x regime dataset of the grid (``policy_root``: the pure* regimes' logging policies)."""
    if policy_root is None and regime != "random":
        raise ValueError("the pure* regimes need the logging policies: pass policy_root (see train_policies)")
    if regime == "random":
        paths, logging_epsilon = (), 0.0
    else:
        paths = tuple(map(str, logging_policy_paths(policy_root, grid, env, regime)))
        logging_epsilon = grid.data.logging_epsilon.get(env, 0.0)
    return DatasetPlan(env, regime, grid.name, grid.seed, grid.data.n_agents, grid.data.episode_steps(env),
                       grid.data.agents_per_shard, paths, logging_epsilon)


def dataset_plans(grid: Grid, policy_root: Path | None) -> list[DatasetPlan]:
    return [dataset_plan(grid, env, regime, policy_root) for env in grid.envs for regime in grid.regimes]


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
    policy = regime_policy(family, plan.regime, covariates, [cached_policy(p) for p in plan.policy_paths],
                           plan.logging_epsilon)
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


class ShardWriter:
    """A Ray actor (``generate_datasets`` makes it one) that records shards and writes each as one Parquet file."""

    def __init__(self):
        torch.set_num_threads(1)  # one CPU per actor: keep torch's pool from oversubscribing it

    def write(self, plan: DatasetPlan, shard: int, root: str) -> dict:
        return write_shard(plan, shard, Path(root))


def write_shard(plan: DatasetPlan, shard: int, root: Path) -> dict:
    """Record one shard, write it atomically, and return its manifest entry."""
    path = dataset_dir(root, plan.env, plan.regime) / plan.shard_name(shard)
    write_parquet(record_shard(plan, shard).to_table(plan.shard_metadata()), path)
    return shard_entry(plan, shard, path)


def shard_entry(plan: DatasetPlan, shard: int, path: Path) -> dict:
    agents = plan.shard_agents(shard)
    return {"name": path.name, "rows": pq.ParquetFile(path).metadata.num_rows, "sha256": sha256(path),
            "agents": [agents.start, agents.stop]}


def verified_shards(plan: DatasetPlan, folder: Path) -> dict[int, dict]:
    """The manifest's entries of this plan's shards whose files are on disk with the listed sha256.

    Without a manifest of this plan nothing is verified: shards found on disk are regenerated.
    """
    try:
        manifest = read_manifest(folder)
    except DatasetError:
        return {}
    if manifest.get("fingerprint") != plan.fingerprint:
        return {}
    names = {plan.shard_name(k): k for k in range(plan.n_shards)}
    return {names[entry["name"]]: entry for entry in manifest.get("files", [])
            if entry.get("name") in names and verify_shard(folder, entry) is None}


def generate_datasets(grid: Grid, root: Path, policy_root: Path | None = None, num_workers: int | None = None,
                      progress: bool = True) -> list[Path]:
    """Generate every env x regime dataset of the grid on the connected Ray cluster.

    The pure* regimes read the logging policies under ``policy_root`` (the policies stage trains
    them). Every listed shard is verified against its manifest's sha256 first; only missing or
    damaged shards are (re)generated. Returns the dataset folders.
    """
    import ray  # here, not at the top: plans, shards and the reader need no Ray
    from ray.util import ActorPool
    from tqdm.auto import tqdm

    plans = dataset_plans(grid, policy_root)
    verified = {plan: verified_shards(plan, dataset_dir(root, plan.env, plan.regime)) for plan in plans}
    todo = [(plan, shard) for plan in plans for shard in range(plan.n_shards) if shard not in verified[plan]]
    for plan in plans:  # a manifest lists only what is verified, before any new shard lands beside it
        if len(verified[plan]) < plan.n_shards:
            write_manifest(plan, root, verified[plan])
    if todo:
        workers = num_workers or grid.data.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        writer = ray.remote(num_cpus=1)(ShardWriter)
        actors = [writer.remote() for _ in range(min(workers, len(todo)))]
        try:
            pool = ActorPool(actors)
            jobs = pool.map_unordered(lambda actor, job: actor.write.remote(job[0], job[1], str(root)), todo)
            by_name = {plan.shard_name(shard): (plan, shard) for plan, shard in todo}
            rows = sum(entry["rows"] for shards in verified.values() for entry in shards.values())
            # disable=None: a bar only when stderr is a terminal; none under `persim-bench -q`
            show = progress and os.environ.get("PERSIM_BENCH_VERBOSITY") != "quiet"
            with tqdm(total=len(todo), desc="datasets", unit="shard", disable=None if show else True) as bar:
                for entry in jobs:
                    plan, shard = by_name[entry["name"]]
                    verified[plan][shard] = entry
                    write_manifest(plan, root, verified[plan])
                    rows += entry["rows"]
                    bar.set_postfix_str(f"{rows:,} rows")
                    bar.update()
        finally:
            for actor in actors:  # idle actors would keep holding CPUs
                ray.kill(actor)
    for env in dict.fromkeys(plan.env for plan in plans):
        write_agents_table(root, env)
    return [dataset_dir(root, plan.env, plan.regime) for plan in plans]


def write_manifest(plan: DatasetPlan, root: Path, shards: dict[int, dict]) -> None:
    """The manifest of the shards verified so far; complete once every shard is, when stale shards go."""
    family = get_env(plan.env)
    folder = dataset_dir(root, plan.env, plan.regime)
    files = [shards[k] for k in sorted(shards)]
    complete = len(files) == plan.n_shards
    policy_agent = (nearest_policy_agent(family, plan.covariates()).tolist() if plan.policy_paths else None)
    manifest = {
        **plan.spec(),
        "layout": LAYOUT,
        "fingerprint": plan.fingerprint,
        "package_version": persim_bench.__version__,
        "covariate_names": list(family.covariate_names),
        "covariates": plan.covariates().tolist(),
        "policy_agent": policy_agent,
        "random_action_prob": random_action_prob(plan.regime, plan.logging_epsilon),
        "rows": sum(f["rows"] for f in files),
        "files": files,
        "complete": complete,
    }
    write_json(manifest, folder / MANIFEST)
    if complete:
        listed = {f["name"] for f in files}
        for stale in folder.glob("part-*.parquet"):  # our shards of an older fingerprint, nothing else
            if SHARD_PATTERN.fullmatch(stale.name) and stale.name not in listed:
                stale.unlink()
