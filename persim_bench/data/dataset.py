"""The offline dataset on disk: layout, Parquet schema, atomic writes, manifest, agents table, and the one reader.

Layout, per grid and env (``<results>/datasets/<grid>/<env>/``), readable as one table by any
Arrow reader with hive partitioning::

    regime=<regime>/part-<k>-<fingerprint>.parquet   one row per transition
    regime=<regime>/_manifest.json                    generation spec, covariates, rows and sha256 per file
    _agents.parquet                                   one row per (regime, agent): covariates, role, logging policy

Readers skip ``_``-prefixed files. ``read_dataset`` checks the manifest against the generation
plan of the grid and every shard against the manifest's sha256, and names the file on any
mismatch; a manifest whose ``complete`` is false belongs to an unfinished generation.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from persim_bench.envs import get_env
from persim_bench.envs.base import EnvFamily
from persim_bench.errors import BenchError

LAYOUT = "persim-dataset/2"  # what this code writes and reads; layout 1 was <env>/<regime>/manifest.json
MANIFEST = "_manifest.json"
AGENTS = "_agents.parquet"
OLD_MANIFEST = "manifest.json"
SHARD_PATTERN = re.compile(r"part-\d{4}-[0-9a-f]{12}\.parquet")  # the only files the generator ever deletes
FILE_MODE = 0o644  # mkstemp makes 0600 files; datasets are meant to be shared and read by others


class DatasetError(BenchError):
    """Missing, corrupt or mismatched dataset; the message names the file."""


class DatasetPlanLike(Protocol):
    """What the reader checks a manifest against (``generate.DatasetPlan``)."""

    env: str
    regime: str
    fingerprint: str
    n_shards: int

    def shard_name(self, shard: int) -> str: ...
    def shard_agents(self, shard: int) -> range: ...
    def covariates(self) -> np.ndarray: ...
    def spec(self) -> dict: ...


def schema(family: EnvFamily, metadata: dict[str, str] | None = None) -> pa.Schema:
    """Transition columns. ``regime`` is the hive partition (the folder name), not a column of the files."""
    obs = pa.list_(pa.float32(), family.obs_dim)
    action = pa.int64() if family.discrete else pa.list_(pa.float32(), family.action_dim)
    fields = [("agent", pa.int32()), ("t", pa.int32()), ("obs", obs), ("action", action), ("reward", pa.float32()),
              ("next_obs", obs), ("terminated", pa.bool_()), ("truncated", pa.bool_())]
    return pa.schema(fields, metadata=metadata)


def schema_metadata(family: EnvFamily, regime: str, grid: str, fingerprint: str, version: str) -> dict[str, str]:
    """Key-value metadata of every shard: what a file is without its manifest."""
    return {"persim.layout": LAYOUT, "persim.env": family.name, "persim.gym_id": family.gym_id,
            "persim.regime": regime, "persim.grid": grid, "persim.fingerprint": fingerprint,
            "persim.package_version": version, "persim.covariate_names": json.dumps(list(family.covariate_names)),
            "persim.action_space": f"discrete({family.n_actions})" if family.discrete else
            f"box([-1, 1], {family.action_dim})"}


@dataclass
class Transitions:
    """An env x regime dataset as arrays, rows sorted by (agent, t)."""

    env: str
    regime: str
    agent: np.ndarray        # int64 [T]
    t: np.ndarray            # int64 [T]
    obs: np.ndarray          # float32 [T, D]
    action: np.ndarray       # int64 [T] or float32 [T, A]
    reward: np.ndarray       # float32 [T]
    next_obs: np.ndarray     # float32 [T, D]
    terminated: np.ndarray   # bool [T]
    truncated: np.ndarray    # bool [T]
    covariates: np.ndarray   # float64 [n_agents, C], from the manifest (figures and checks only)

    def __len__(self) -> int:
        return len(self.agent)

    @property
    def n_agents(self) -> int:
        return len(self.covariates)

    def to_table(self, metadata: dict[str, str] | None = None) -> pa.Table:
        family = get_env(self.env)
        columns = {
            "agent": pa.array(self.agent, pa.int32()),
            "t": pa.array(self.t, pa.int32()),
            "obs": _fixed_list(self.obs, family.obs_dim),
            "action": pa.array(self.action, pa.int64()) if family.discrete else _fixed_list(self.action, family.action_dim),
            "reward": pa.array(self.reward, pa.float32()),
            "next_obs": _fixed_list(self.next_obs, family.obs_dim),
            "terminated": pa.array(self.terminated, pa.bool_()),
            "truncated": pa.array(self.truncated, pa.bool_()),
        }
        return pa.table(columns, schema=schema(family, metadata))

    @classmethod
    def from_table(cls, table: pa.Table, env: str, regime: str, covariates: np.ndarray) -> "Transitions":
        family = get_env(env)
        action = table["action"].combine_chunks()
        return cls(
            env=env, regime=regime,
            agent=table["agent"].to_numpy().astype(np.int64),
            t=table["t"].to_numpy().astype(np.int64),
            obs=_unfixed(table["obs"], family.obs_dim),
            action=action.to_numpy().copy() if family.discrete else _unfixed(table["action"], family.action_dim),
            reward=table["reward"].to_numpy().copy(),
            next_obs=_unfixed(table["next_obs"], family.obs_dim),
            terminated=table["terminated"].to_numpy(),
            truncated=table["truncated"].to_numpy(),
            covariates=covariates,
        )


def _fixed_list(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _unfixed(column: pa.ChunkedArray, width: int) -> np.ndarray:
    return column.combine_chunks().flatten().to_numpy().reshape(-1, width).copy()  # writable, for torch


# ---------------------------------------------------------------- files


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None], mode: int = FILE_MODE) -> None:
    """Write through a temp file in the same folder, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def write_json(data: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n"))


def data_root(results: Path | str, grid: str) -> Path:
    """Where a grid's datasets live: ``<results>/datasets/<grid>/``."""
    return Path(results) / "datasets" / grid


def policy_root(results: Path | str) -> Path:
    """Where the logging and test policies live (shared by every grid): ``<results>/policies/``."""
    return Path(results) / "policies"


def env_dir(root: Path, env: str) -> Path:
    return Path(root) / env


def dataset_dir(root: Path, env: str, regime: str) -> Path:
    return env_dir(root, env) / f"regime={regime}"


# ---------------------------------------------------------------- manifest


def read_manifest(folder: Path) -> dict:
    """The manifest of a dataset folder; an old-layout dataset or a manifest of another layout is refused."""
    path = folder / MANIFEST
    if not path.exists():
        old = folder.parent / folder.name.removeprefix("regime=")
        if (old / OLD_MANIFEST).exists():
            raise DatasetError(f"{old}: dataset in the layout of persim-bench < 0.2 (<env>/<regime>/manifest.json); "
                               f"delete that folder and regenerate with `persim-bench data --grid <grid>`")
        raise DatasetError(f"{path}: missing dataset manifest (generate it with `persim-bench data`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: corrupt manifest ({err}); rerun `persim-bench data` to rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("layout") != LAYOUT:
        found = manifest.get("layout") if isinstance(manifest, dict) else None
        raise DatasetError(f"{path}: dataset layout {found!r}, this persim-bench reads {LAYOUT!r}; delete "
                           f"{folder} and regenerate with `persim-bench data`")
    return manifest


def check_manifest(manifest: dict, plan: DatasetPlanLike, folder: Path) -> None:
    """The manifest describes exactly what the plan generates: spec, covariates and file list."""
    path = folder / MANIFEST
    regenerate = "regenerate with `persim-bench data`"
    if not manifest.get("complete"):
        raise DatasetError(f"{path}: generation did not finish; rerun `persim-bench data` to complete it")
    spec = plan.spec()
    differ = sorted(key for key, value in spec.items() if manifest.get(key) != value)
    if differ or manifest.get("fingerprint") != plan.fingerprint:
        fields = ", ".join(f"{k}: {manifest.get(k)!r} != {spec[k]!r}" for k in differ) or "fingerprint"
        raise DatasetError(f"{path}: made with other settings than the grid's ({fields}); {regenerate}")
    covariates = np.asarray(manifest.get("covariates"), dtype=np.float64)
    if covariates.shape != plan.covariates().shape or not np.array_equal(covariates, plan.covariates()):
        raise DatasetError(f"{path}: the agents' covariates are not the ones the grid's seed draws; {regenerate}")
    expected = [(plan.shard_name(k), [plan.shard_agents(k).start, plan.shard_agents(k).stop])
                for k in range(plan.n_shards)]
    listed = [(entry.get("name"), entry.get("agents")) for entry in manifest.get("files", [])]
    if listed != expected:
        raise DatasetError(f"{path}: its file list is not the grid's {plan.n_shards} shards; {regenerate}")
    if manifest.get("rows") != sum(entry.get("rows", 0) for entry in manifest["files"]):
        raise DatasetError(f"{path}: its row total does not match its files' rows; {regenerate}")


def verify_shard(folder: Path, entry: dict) -> str | None:
    """None when the shard on disk is the one the manifest lists, else what is wrong with it."""
    path = folder / entry["name"]
    if not path.exists():
        return "missing"
    if sha256(path) != entry["sha256"]:
        return "content does not match the manifest's sha256 (corrupt or modified)"
    return None


# ---------------------------------------------------------------- agents table


def agents_table(manifest: dict) -> pa.Table:
    """One row per agent of a regime: id, every covariate, role, the logging policy it acted with."""
    family = get_env(manifest["env"])
    covariates = np.asarray(manifest["covariates"], dtype=np.float64)
    n = len(covariates)
    policies = manifest.get("policy_paths") or []
    policy_agent = manifest.get("policy_agent") or [None] * n
    columns = {
        "regime": pa.array([manifest["regime"]] * n, pa.string()),
        "agent": pa.array(np.arange(n), pa.int32()),
        **{name: pa.array(covariates[:, i], pa.float64()) for i, name in enumerate(family.covariate_names)},
        "role": pa.array(["test" if i < len(family.test_agents) else "train" for i in range(n)], pa.string()),
        "logging_policy": pa.array(["uniform-random" if p is None else policies[p] for p in policy_agent], pa.string()),
        "policy_agent": pa.array(policy_agent, pa.int32()),
        "random_action_prob": pa.array([manifest["random_action_prob"]] * n, pa.float64()),
    }
    return pa.table(columns)


def write_agents_table(root: Path, env: str) -> Path:
    """``<env>/_agents.parquet`` from every finished regime's manifest (rebuilt whenever a regime finishes)."""
    tables = []
    for folder in sorted(env_dir(root, env).glob("regime=*")):
        try:
            manifest = read_manifest(folder)
        except DatasetError:
            continue
        if manifest.get("complete"):
            tables.append(agents_table(manifest))
    path = env_dir(root, env) / AGENTS
    if tables:
        write_parquet(pa.concat_tables(tables), path)
    return path


# ---------------------------------------------------------------- the one reader


def read_dataset(root: Path, plan: DatasetPlanLike) -> Transitions:
    """Read one env x regime dataset after checking its manifest against the plan and every file against it."""
    folder = dataset_dir(root, plan.env, plan.regime)
    manifest = read_manifest(folder)
    check_manifest(manifest, plan, folder)
    tables = []
    for entry in manifest["files"]:
        path = folder / entry["name"]
        problem = verify_shard(folder, entry)
        if problem == "missing":
            raise DatasetError(f"{path}: missing Parquet file listed in the manifest; rerun `persim-bench data`")
        if problem:
            raise DatasetError(f"{path}: {problem}; rerun `persim-bench data` to rebuild it")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise DatasetError(f"{path}: unreadable Parquet ({err})") from None
        if table.num_rows != entry["rows"]:
            raise DatasetError(f"{path}: {table.num_rows} rows, manifest says {entry['rows']}")
        tables.append(table)
    table = pa.concat_tables(tables)
    data = Transitions.from_table(table, plan.env, plan.regime, np.asarray(manifest["covariates"], dtype=np.float64))
    for name in ("obs", "next_obs", "reward"):
        if not np.isfinite(getattr(data, name)).all():
            raise DatasetError(f"{folder}: non-finite values in column {name!r}")
    return data
