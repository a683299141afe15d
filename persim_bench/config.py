"""Grid specs: load a YAML grid from tune_configs/, validate it, fail early with a clear line.

A grid names the envs, data regimes and everything the stages need. Every error names the
file and the field (``tune_configs/smoke.yaml: data.n_agents: ...``) and is raised before
Ray starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from persim_bench.envs import ENVS

REGIMES = ("pure", "random", "pure-eps-20", "pure-eps-40")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "tune_configs"

PositiveInt = Annotated[int, Field(gt=0)]


class GridError(ValueError):
    """A grid file that cannot be used; the message is one line naming file and field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(Strict):
    n_agents: Annotated[int, Field(ge=5)] = 500
    agents_per_shard: PositiveInt = 100
    # Episode cap per env; the paper's horizon when absent. Small grids shorten HalfCheetah.
    max_steps: dict[str, PositiveInt] = {}
    # Ray actors generating shards; None = one per CPU of the cluster.
    num_workers: PositiveInt | None = None

    @field_validator("max_steps")
    @classmethod
    def _known_envs_within_horizon(cls, caps: dict[str, int]) -> dict[str, int]:
        for env, cap in caps.items():
            if env not in ENVS:
                raise ValueError(f"unknown env {env!r}; known: {', '.join(ENVS)}")
            if cap > ENVS[env].horizon:
                raise ValueError(f"{env}: {cap} exceeds the paper's horizon {ENVS[env].horizon}")
        return caps

    def episode_steps(self, env: str) -> int:
        return self.max_steps.get(env, ENVS[env].horizon)


class Grid(Strict):
    name: str
    seed: Annotated[int, Field(ge=0)] = 0
    envs: list[str]
    regimes: list[str]
    data: DataSpec = DataSpec()

    @field_validator("envs")
    @classmethod
    def _known_envs(cls, envs: list[str]) -> list[str]:
        for env in envs:
            if env not in ENVS:
                raise ValueError(f"unknown env {env!r}; known: {', '.join(ENVS)}")
        return envs

    @field_validator("regimes")
    @classmethod
    def _known_regimes(cls, regimes: list[str]) -> list[str]:
        for regime in regimes:
            if regime not in REGIMES:
                raise ValueError(f"unknown regime {regime!r}; known: {', '.join(REGIMES)}")
        return regimes

    @model_validator(mode="after")
    def _non_empty(self) -> "Grid":
        if not self.envs or not self.regimes:
            raise ValueError("envs and regimes must each name at least one entry")
        return self

    def narrowed(self, envs: list[str] | None = None, regimes: list[str] | None = None) -> "Grid":
        """The same grid restricted from the command line (``--env``, ``--regime``)."""
        update = {"envs": envs or self.envs, "regimes": regimes or self.regimes}
        for key, chosen in update.items():
            extra = sorted(set(chosen) - set(getattr(self, key)))
            if extra:
                raise GridError(f"--{key[:-1]} {', '.join(extra)}: not in grid {self.name!r} ({', '.join(getattr(self, key))})")
        return self.model_copy(update=update)


def grid_path(name_or_path: str | Path) -> Path:
    """A grid given by name (``smoke`` -> tune_configs/smoke.yaml) or by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    for candidate in (Path.cwd() / "tune_configs" / f"{path}.yaml", CONFIG_DIR / f"{path}.yaml"):
        if candidate.exists():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise GridError(f"unknown grid {str(name_or_path)!r}; known: {', '.join(known)} (or a path to a .yaml)")


def load_grid(name_or_path: str | Path) -> Grid:
    path = grid_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GridError(f"{path}: no such grid file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise GridError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a grid must be a YAML mapping, got {type(raw).__name__}")
    try:
        return Grid.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise GridError(f"{path}: {field}: {message}{more}") from None
