"""The offline dataset on disk: Parquet schema, atomic writes, manifest, and the one reader.

Layout: ``<root>/<env>/<regime>/part-<k>-<fingerprint>.parquet`` plus ``manifest.json``
beside them. One row per transition. The manifest lists every file with its row count and
sha256, the seed and the per-agent covariates; ``read_dataset`` refuses anything that does
not match it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from persim_bench.envs import get_env
from persim_bench.envs.base import EnvFamily
from persim_bench.errors import BenchError

MANIFEST = "manifest.json"


class DatasetError(BenchError):
    """Missing, corrupt or mismatched dataset; the message names the file."""


def schema(family: EnvFamily) -> pa.Schema:
    obs = pa.list_(pa.float32(), family.obs_dim)
    action = pa.int64() if family.discrete else pa.list_(pa.float32(), family.action_dim)
    return pa.schema([
        ("env", pa.string()), ("regime", pa.string()), ("agent", pa.int32()), ("t", pa.int32()),
        ("obs", obs), ("action", action), ("reward", pa.float32()), ("next_obs", obs),
        ("terminated", pa.bool_()), ("truncated", pa.bool_()),
    ])


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

    def to_table(self) -> pa.Table:
        family = get_env(self.env)
        n = len(self)
        columns = {
            "env": pa.array([self.env] * n, pa.string()),
            "regime": pa.array([self.regime] * n, pa.string()),
            "agent": pa.array(self.agent, pa.int32()),
            "t": pa.array(self.t, pa.int32()),
            "obs": _fixed_list(self.obs, family.obs_dim),
            "action": pa.array(self.action, pa.int64()) if family.discrete else _fixed_list(self.action, family.action_dim),
            "reward": pa.array(self.reward, pa.float32()),
            "next_obs": _fixed_list(self.next_obs, family.obs_dim),
            "terminated": pa.array(self.terminated, pa.bool_()),
            "truncated": pa.array(self.truncated, pa.bool_()),
        }
        return pa.table(columns, schema=schema(family))

    @classmethod
    def from_table(cls, table: pa.Table, covariates: np.ndarray) -> "Transitions":
        env, regime = table["env"][0].as_py(), table["regime"][0].as_py()
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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same folder, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def write_json(data: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n"))


def dataset_dir(root: Path, env: str, regime: str) -> Path:
    return Path(root) / env / regime


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.exists():
        raise DatasetError(f"{path}: missing dataset manifest (generate it with `persim-bench data`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: corrupt manifest ({err})") from None


def read_dataset(root: Path, env: str, regime: str) -> Transitions:
    """Read one env x regime dataset after checking every file against its manifest."""
    folder = dataset_dir(root, env, regime)
    manifest = read_manifest(folder)
    if (manifest.get("env"), manifest.get("regime")) != (env, regime):
        raise DatasetError(f"{folder / MANIFEST}: describes {manifest.get('env')}/{manifest.get('regime')}, not {env}/{regime}")
    tables = []
    for entry in manifest["files"]:
        path = folder / entry["name"]
        if not path.exists():
            raise DatasetError(f"{path}: missing Parquet file listed in the manifest")
        if sha256(path) != entry["sha256"]:
            raise DatasetError(f"{path}: content does not match the manifest's sha256 (corrupt or modified)")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise DatasetError(f"{path}: unreadable Parquet ({err})") from None
        if table.num_rows != entry["rows"]:
            raise DatasetError(f"{path}: {table.num_rows} rows, manifest says {entry['rows']}")
        tables.append(table)
    table = pa.concat_tables(tables)
    if table.num_rows != manifest["rows"]:
        raise DatasetError(f"{folder / MANIFEST}: files hold {table.num_rows} rows, manifest says {manifest['rows']}")
    data = Transitions.from_table(table, np.asarray(manifest["covariates"], dtype=np.float64))
    for name in ("obs", "next_obs", "reward"):
        if not np.isfinite(getattr(data, name)).all():
            raise DatasetError(f"{folder}: non-finite values in column {name!r}")
    return data
