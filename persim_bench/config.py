"""Grid specs: load a YAML grid from tune_configs/, validate it, fail early with a clear line.

A grid names the envs, data regimes and algorithms, and holds one section per shared part
(``specs.py``) and per algorithm family (the spec class beside each algorithm, collected by
the registry). Every error names the file and the field (``tune_configs/smoke.yaml:
data.n_agents: ...``) and is raised before Ray starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator

from persim_bench.algos.registry import ALGORITHMS, spec_sections
from persim_bench.envs import ENVS, get_env
from persim_bench.errors import GridError
from persim_bench.specs import (REGIMES, DataSpec, EvaluationSpec, PlannerSpec, PolicySpec, Resources, Strict,
                                check_known)

ALGOS = tuple(ALGORITHMS)
# The grids shipped with the package (a symlink to the repo's tune_configs/ in a checkout).
CONFIG_DIR = Path(__file__).parent / "tune_configs"

STAGE_KEYS = (*ALGOS, "rank_cv", "policies")  # what `resources:` may name


class GridBase(Strict):
    """The grid's common fields; ``Grid`` adds one field per algorithm section of the registry."""

    name: str
    seed: Annotated[int, Field(ge=0)] = 0
    envs: list[str]
    regimes: list[str]
    algos: list[str] = list(ALGOS)
    # Repeats of every experiment (the paper: 5); each seed drives training, planning and evaluation.
    seeds: list[Annotated[int, Field(ge=0)]] = [0, 1, 2, 3, 4]
    data: DataSpec = DataSpec()
    policies: PolicySpec = PolicySpec()
    planner: PlannerSpec = PlannerSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    # Per algorithm (or "rank_cv"): CPUs/GPUs per trial; 1 CPU when absent.
    resources: dict[str, Resources] = {}
    # Times Tune restarts a trial whose worker or node died; errors of the trial's own code are
    # recorded once and not retried (they would fail again).
    max_failures: Annotated[int, Field(ge=0)] = 2

    @model_validator(mode="before")
    @classmethod
    def _default_algos(cls, values):
        """Without an ``algos`` list: every registered algorithm that handles one of the grid's envs."""
        if isinstance(values, dict) and "algos" not in values and isinstance(values.get("envs"), list):
            envs = [get_env(env) for env in values["envs"] if env in ENVS]
            values = {**values, "algos": [name for name, algo in ALGORITHMS.items()
                                          if any(algo.supports(env.discrete) for env in envs)]}
        return values

    @field_validator("resources")
    @classmethod
    def _known_resource_keys(cls, value: dict) -> dict:
        return check_known("algorithm or stage", value, STAGE_KEYS) and value

    def trial_resources(self, key: str) -> Resources:
        return self.resources.get(key, Resources())

    def tests_predictions(self) -> bool:
        """Whether an algorithm of the grid learns a dynamics model (and so needs the test policies)."""
        return any(ALGORITHMS[name].learns_dynamics for name in self.algos)

    @field_validator("envs", "regimes", "algos")
    @classmethod
    def _known_names(cls, names: list[str], info: ValidationInfo) -> list[str]:
        kind, allowed = {"envs": ("env", ENVS), "regimes": ("regime", REGIMES), "algos": ("algorithm", ALGOS)}[info.field_name]
        return check_known(kind, names, allowed)

    @model_validator(mode="after")
    def _non_empty(self) -> "GridBase":
        for key in ("envs", "regimes", "algos", "seeds"):
            if not getattr(self, key):
                raise ValueError(f"{key} must name at least one entry")
        for name in self.algos:
            algo = ALGORITHMS[name]
            if not any(algo.supports(get_env(env).discrete) for env in self.envs):
                raise ValueError(f"{name} supports {' and '.join(algo.action_spaces)} actions only, "
                                 f"which none of the grid's envs ({', '.join(self.envs)}) has")
        return self

    def narrowed(self, envs: list[str] | None = None, regimes: list[str] | None = None,
                 algos: list[str] | None = None, seeds: list[int] | None = None) -> "Grid":
        """The same grid restricted from the command line (``--env``, ``--regime``, ``--algo``, ``--seed``)."""
        update = {"envs": envs or self.envs, "regimes": regimes or self.regimes,
                  "algos": algos or self.algos, "seeds": seeds or self.seeds}
        for key, chosen in update.items():
            extra = sorted(set(chosen) - set(getattr(self, key)))
            if extra:
                raise GridError(f"--{key[:-1]} {', '.join(map(str, extra))}: not in grid {self.name!r} "
                               f"({', '.join(map(str, getattr(self, key)))})")
        return self.model_copy(update=update)


Grid = create_model("Grid", __base__=GridBase, __module__=__name__,
                    **{key: (spec, spec()) for key, spec in spec_sections().items()})


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


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``; nested mappings merge, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def load_grid(name_or_path: str | Path) -> Grid:
    """A grid file, validated. ``extends: <grid>`` starts from another grid's YAML and overrides parts of it."""
    path = grid_path(name_or_path)
    raw = _load_raw(path, ())
    try:
        return Grid.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise GridError(f"{path}: {field}: {message}{more}") from None


def _load_raw(path: Path, seen: tuple[Path, ...]) -> dict:
    if path.resolve() in seen:
        raise GridError(f"{path}: extends itself ({' -> '.join(map(str, seen))})")
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
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise GridError(f"{path}: extends: expected a grid name or path, got {base!r}")
    base_path = path.parent / base if base.endswith((".yaml", ".yml")) else grid_path(base)
    return deep_merge(_load_raw(base_path, (*seen, path.resolve())), raw)
