"""Grid specs: load a YAML grid from tune_configs/, validate it, fail early with a clear line.

A grid names the envs, data regimes and algorithms, and holds one section per shared part
(``specs.py``) and per algorithm family (the spec class beside each algorithm, collected by
the registry). Every error names the file and the field (``tune_configs/smoke.yaml:
data.n_agents: ...``) and is raised before Ray starts.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator

from persim_bench.algos.registry import ALGORITHMS, spec_sections
from persim_bench.envs import ENVS, get_env
from persim_bench.errors import GridError
from persim_bench.specs import (REGIMES, DataSizeSpec, DataSpec, DistinctList, EvaluationSpec, FieldError, PlannerSpec, PolicySpec,
                                Resources, Seed, Strict, check_known)

ALGOS = tuple(ALGORITHMS)
# The grids shipped with the package (a symlink to the repo's tune_configs/ in a checkout).
CONFIG_DIR = Path(__file__).parent / "tune_configs"

# What `resources:` may name: an algorithm, a stage an algorithm declares before main (rank_cv), the policies.
STAGE_KEYS = (*ALGOS, *(algo.pre_stage.name for algo in ALGORITHMS.values() if algo.pre_stage), "policies")
# The grid's name names folders under the results folder (datasets/<name>, <name>/report): one plain path part.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_GRID_BYTES = 1 << 20  # grids are a few kB; anything larger is not one
MAX_MESSAGE_CHARS = 300  # field and message of an error, each (a message may quote a long value)


class GridBase(Strict):
    """The grid's common fields; ``Grid`` adds one field per algorithm section of the registry."""

    name: str
    seed: Seed = 0
    # At least one entry each, none twice (a repeated seed would put two trials in one MLflow run).
    envs: DistinctList[str]
    regimes: DistinctList[str]
    algos: DistinctList[str] = list(ALGOS)
    # Repeats of every experiment (the paper: 5); each seed drives training, planning and evaluation.
    seeds: DistinctList[Seed] = [0, 1, 2, 3, 4]
    data: DataSpec = DataSpec()
    # Data-size axes (nested subsets of the datasets, docs/efficiency.md); absent: the full datasets only.
    data_sizes: DataSizeSpec | None = None
    policies: PolicySpec = PolicySpec()
    planner: PlannerSpec = PlannerSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    # Per algorithm (or pre-main stage, e.g. "rank_cv"): CPUs/GPUs per trial; 1 CPU when absent.
    resources: dict[str, Resources] = {}
    # Times Tune restarts a trial whose worker or node died; errors of the trial's own code are
    # recorded once and not retried (they would fail again).
    max_failures: Annotated[int, Field(ge=0)] = 2
    # A fit offers its state to a Tune checkpoint at most this often and after its last epoch; a trial
    # restarted after a lost worker, or resumed with --resume, continues from it. 0: after every epoch.
    checkpoint_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 600.0

    @model_validator(mode="before")
    @classmethod
    def _default_algos(cls, values):
        """Without an ``algos`` list: every registered algorithm that handles one of the grid's envs."""
        if isinstance(values, dict) and "algos" not in values and isinstance(values.get("envs"), list):
            envs = [get_env(env) for env in values["envs"] if env in ENVS]
            algos = [name for name, algo in ALGORITHMS.items() if any(algo.supports(env.discrete) for env in envs)]
            if algos:  # none: envs is refused itself (empty or unknown), not a second time as an empty algos
                values = {**values, "algos": algos}
        return values

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not NAME_PATTERN.fullmatch(name) or ".." in name:
            raise ValueError(f"{name!r} is not a plain name: 1-64 letters, digits, '.', '_' or '-', starting "
                             f"with a letter or digit, without '..' (it names folders under the results folder)")
        return name

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

    @field_validator("algos")
    @classmethod
    def _algos_fit_envs(cls, names: list[str], info: ValidationInfo) -> list[str]:
        envs = info.data.get("envs")  # absent when envs itself was refused
        for name in names if envs else ():
            algo = ALGORITHMS[name]
            if not any(algo.supports(get_env(env).discrete) for env in envs):
                raise ValueError(f"{name} supports {' and '.join(algo.action_spaces)} actions only, "
                                 f"which none of the grid's envs ({', '.join(envs)}) has")
        return names

    @model_validator(mode="after")
    def _per_env_settings_cover_envs(self) -> "GridBase":
        """A setting given as {env: value} (``per_env_fields`` of each section) must name every env of the grid."""
        for key in type(self).model_fields:
            section = getattr(self, key)
            if isinstance(section, Strict) and (missing := section.missing_env(self.envs)):
                field, env = missing
                raise FieldError(f"{key}.{field}", f"no value for env {env!r} (the grid's envs: {', '.join(self.envs)})")
        return self

    @model_validator(mode="after")
    def _data_sizes_fit_the_data(self) -> "GridBase":
        """Every size within the generated data, only algorithms that read data, and something to sweep."""
        sizes = self.data_sizes
        if sizes is None:
            return self
        for name in sizes.algos or ():
            if name not in self.algos:
                raise FieldError("data_sizes.algos", f"{name!r} is not in the grid's algos ({', '.join(self.algos)})")
            if not ALGORITHMS[name].needs_data:
                raise FieldError("data_sizes.algos", f"{name} reads no data: a data-size axis means nothing for it")
        if not self.swept_algos():
            raise FieldError("data_sizes", "none of the grid's algorithms reads data: nothing to sweep")
        for agents in sizes.agents or ():
            if agents > self.data.n_agents:
                raise FieldError("data_sizes.agents", f"{agents} agents, more than the dataset's {self.data.n_agents} "
                                                      f"(data.n_agents)")
        for steps in sizes.steps_per_agent:
            for env in self.envs:
                if steps is not None and steps > self.data.episode_steps(env):
                    raise FieldError("data_sizes.steps_per_agent",
                                     f"{steps} transitions per agent, more than {env}'s episodes hold "
                                     f"({self.data.episode_steps(env)} steps)")
        if self.data_size_cells() == [(None, None)]:
            raise FieldError("data_sizes", "every cell is the full dataset: give smaller agents or steps_per_agent")
        return self

    def swept_algos(self) -> list[str]:
        """The algorithms the data-size axes apply to (none without ``data_sizes``)."""
        if self.data_sizes is None:
            return []
        # After --algo narrowed the grid, only the algorithms left in it.
        return [name for name in self.data_sizes.algos or self.algos
                if name in self.algos and ALGORITHMS[name].needs_data]

    def data_size_cells(self) -> list[tuple[int | None, int | None]]:
        """(agents, steps_per_agent) of every data-size cell, the full dataset first as (None, None); both axes
        include the full dataset whether listed or not."""
        if self.data_sizes is None:
            return [(None, None)]
        sizes = self.data_sizes
        # Both axes always reach the full dataset (None): every curve ends at the main trial.
        agents = [None if n == self.data.n_agents else n for n in sizes.agents or []] + [None]
        steps = [*sizes.steps_per_agent, None]
        if sizes.cross:
            cells = [(n, k) for n in agents for k in dict.fromkeys(steps)]
        else:
            cells = [(n, None) for n in agents] + [(None, k) for k in sizes.steps_per_agent]
        return list(dict.fromkeys([(None, None)] + cells))

    def narrowed(self, envs: list[str] | None = None, regimes: list[str] | None = None,
                 algos: list[str] | None = None, seeds: list[int] | None = None) -> "Grid":
        """The same grid restricted from the command line (``--env``, ``--regime``, ``--algo``, ``--seed``)."""
        update = {"envs": envs or self.envs, "regimes": regimes or self.regimes,
                  "algos": algos or self.algos, "seeds": seeds or self.seeds}
        # `--seed 0 --seed 0` runs seed 0 once (twice would put two trials in one MLflow run).
        update = {key: list(dict.fromkeys(chosen)) for key, chosen in update.items()}
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
        raise GridError(_one_line(f"{path}: {_validation_message(err)}")) from None


def with_evaluation(grid: Grid, overrides: dict, source: str) -> Grid:
    """The grid with these ``evaluation`` settings replaced, validated as a grid file is; errors name ``source``."""
    raw = grid.model_dump()
    raw["evaluation"] = {**raw["evaluation"], **overrides}
    try:
        return Grid.model_validate(raw)
    except ValidationError as err:
        raise GridError(_one_line(f"{source}: {_validation_message(err)}")) from None


# Where a field may take one of several types (``int | dict[str, int]``), pydantic reports an error per
# type and adds the type's tag to the error's place: "planner.horizon.constrained-int". Tags are not fields.
_UNION_TAG = re.compile(r".*\[.*|(constrained-)?(int|float|str|bool|none|list|dict)")


def _field_path(error: dict) -> tuple[str, ...]:
    parts = tuple(str(part) for part in error["loc"] if not (isinstance(part, str) and _UNION_TAG.fullmatch(part)))
    field_error = (error.get("ctx") or {}).get("error")
    if isinstance(field_error, FieldError):  # a model validator naming one field of its model
        parts += tuple(field_error.field.split("."))
    return parts


def _validation_message(err: ValidationError) -> str:
    """``field: message (+N more)`` for a grid's validation error: its first problem, said as precisely as
    pydantic knows it (of a field's alternative types, the error that got deepest into the value)."""
    errors = [(_field_path(error), error) for error in err.errors()]
    first = errors[0][0]
    # Errors of the first field's alternative types: the deepest one says the most ("horizon.cartpole:
    # greater than 0" rather than "horizon: not a valid integer").
    field, error = max((e for e in errors if e[0][:len(first)] == first), key=lambda e: len(e[0]))
    others = {path for path, _ in errors if path[:len(first)] != first}
    message = error["msg"].removeprefix("Value error, ")
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    more = f" (+{len(others)} more)" if others else ""
    where = ".".join(field) or "(top level)"
    if len(where) > MAX_MESSAGE_CHARS:  # an unknown key can be any string
        where = where[:MAX_MESSAGE_CHARS] + "..."
    return f"{where}: {message}{more}"


def _one_line(message: str) -> str:
    return " ".join(message.splitlines())


class _GridLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                            f"found duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _read_grid_text(path: Path) -> str:
    """The file's text, or a one-line GridError naming the file (missing, a folder, unreadable, binary, huge)."""
    if path.is_dir():
        raise GridError(f"{path}: is a folder, not a grid file")
    if path.exists() and not path.is_file():  # a FIFO would block the read, a device never end it
        raise GridError(f"{path}: not a regular file")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_GRID_BYTES + 1)
    except FileNotFoundError:
        raise GridError(f"{path}: no such grid file") from None
    except IsADirectoryError:
        raise GridError(f"{path}: is a folder, not a grid file") from None
    except PermissionError:
        raise GridError(f"{path}: cannot read the grid file (permission denied)") from None
    except OSError as err:
        raise GridError(_one_line(f"{path}: cannot read the grid file ({err.strerror or err})")) from None
    if len(data) > MAX_GRID_BYTES:
        raise GridError(f"{path}: over {MAX_GRID_BYTES // 1024} KiB, too large for a grid file")
    if b"\0" in data:
        raise GridError(f"{path}: a binary file, not a YAML grid")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GridError(f"{path}: not UTF-8 text (byte {err.start}), not a YAML grid") from None


def _load_raw(path: Path, seen: tuple[Path, ...]) -> dict:
    if path.resolve() in seen:
        raise GridError(f"{path}: extends itself ({' -> '.join(map(str, seen))})")
    text = _read_grid_text(path)
    try:
        raw = yaml.load(text, Loader=_GridLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise GridError(_one_line(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}")) from None
    except RecursionError:  # deeply nested flow collections ([[[[...]]]])
        raise GridError(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a grid must be a YAML mapping, got {type(raw).__name__}")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise GridError(f"{path}: extends: expected a grid name or path, got {base!r}")
    base_path = path.parent / base if base.endswith((".yaml", ".yml")) else grid_path(base)
    return deep_merge(_load_raw(base_path, (*seen, path.resolve())), raw)
