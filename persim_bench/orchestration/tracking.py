"""MLflow bookkeeping: where runs go, one parent run per grid invocation, a trial's params, resume state.

MLflow's relative default (./mlruns, sqlite in the cwd) would follow each trial's working
directory, so every URI here is absolute.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import yaml

from persim_bench.contracts import Trial
from persim_bench.algos.registry import ALGORITHMS
from persim_bench.config import Grid
from persim_bench.data.dataset import write_json
from persim_bench.errors import GridError, TrackingError
from persim_bench.orchestration.provenance import provenance_tags

EXPERIMENT_PREFIX = "persim-bench"
GRID_ARTIFACT = "grid.yaml"  # on every parent run


def default_tracking_uri(results: Path) -> str:
    """SQLite under results/: MLflow's relative default would follow each trial's cwd."""
    results.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(results / 'mlflow.db').resolve()}"


def experiment_name(grid: Grid) -> str:
    return f"{EXPERIMENT_PREFIX}/{grid.name}"


def flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, inner in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value
    return out


def trial_params(grid: dict, trial: Trial) -> dict:
    """The trial's own fields plus the grid sections its algorithm reads (from the registry), flattened for MLflow."""
    algo = ALGORITHMS[trial.algo]
    sections = {"data": grid["data"]}
    if trial.stage == "main":
        sections["evaluation"] = grid["evaluation"]
        if algo.plans:
            sections["planner"] = grid["planner"]
    if algo.spec_key:
        sections[algo.spec_key] = grid[algo.spec_key]
    own = {k: v for k, v in trial.as_dict().items() if k != "name" and v is not None}
    params = flatten("", {**own, **sections}, {})
    return {k: str(v)[:500] for k, v in params.items()}


# Metric names in MLflow are grouped by kind, so its compare view and charts put them together:
# reward/agent0, reward/mean, rmse/agent0, r2/agent0, seconds/fit, model/rows, probe_r2/gravity, loss/train,
# fit/<metric> (training curves, step = epoch). Inside the package (trials' outputs, Tune, analysis) the
# flat names stay: reward_agent0, seconds_fit, train_loss. Runs recorded before the grouping hold the flat
# names, which read back unchanged.
_PER_AGENT = re.compile(r"(?P<kind>.+)_agent(?P<agent>\d+)")
_MEANS = ("reward", "rmse", "r2", "plan_rank")
_PREFIXED = ("seconds", "model", "probe_r2")


def mlflow_metric_name(name: str) -> str:
    """A trial's metric as MLflow records it: ``reward_agent0`` -> ``reward/agent0``, ``train_loss`` -> ``loss/train``."""
    if match := _PER_AGENT.fullmatch(name):
        return f"{match['kind']}/agent{match['agent']}"
    if name.removesuffix("_mean") in _MEANS and name.endswith("_mean"):
        return f"{name.removesuffix('_mean')}/mean"
    for prefix in _PREFIXED:
        if name.startswith(f"{prefix}_"):
            return f"{prefix}/{name.removeprefix(f'{prefix}_')}"
    if name.endswith("_loss"):
        return f"loss/{name.removesuffix('_loss')}"
    return name


def metric_name(key: str) -> str:
    """The package's name of an MLflow metric key (the inverse of ``mlflow_metric_name``; flat keys unchanged)."""
    group, grouped, rest = key.partition("/")
    if not grouped or group == "fit":
        return key
    if rest.startswith("agent") and rest.removeprefix("agent").isdigit():
        return f"{group}_{rest}"
    return f"{rest}_loss" if group == "loss" else f"{group}_{rest}"


def run_metrics(run) -> dict[str, float]:
    """A run's latest metric values under the package's names, whichever naming the run was recorded with."""
    return {metric_name(key): value for key, value in run.data.metrics.items()}


def trial_of_run(run) -> Trial:
    """The Trial an MLflow trial run recorded (its tags and params)."""
    tags, params = run.data.tags, run.data.params
    return Trial(stage=tags.get("stage", "main"), algo=tags["algo"], env=tags["env"], regime=tags["regime"],
                 seed=int(tags["seed"]), rank=optional_int(params, "rank"), rank_source=params.get("rank_source"),
                 agents=optional_int(params, "agents"), steps_per_agent=optional_int(params, "steps_per_agent"),
                 name=tags["trial"])


def optional_int(params: dict, key: str) -> int | None:
    """An integer param of a trial run that may be absent (e.g. ``agents`` outside a data-size cell)."""
    value = params.get(key)
    return int(value) if value not in (None, "None") else None


def find_trial_run(client, experiment_id: str, parent_run_id: str, name: str):
    """This invocation's MLflow run of a trial, if an earlier attempt created one."""
    runs = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.trial = '{name}' and tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return runs[0] if runs else None


def latest_trial_runs(client, experiment_id: str) -> list:
    """The newest run per trial name, finished or failed."""
    runs = client.search_runs([experiment_id], filter_string="tags.trial != ''", max_results=50000,
                              order_by=["attributes.start_time DESC"])
    newest = {}
    for run in runs:
        newest.setdefault(run.data.tags["trial"], run)
    return list(newest.values())


def grid_experiment(client, grid: Grid, tracking_uri: str):
    """The grid's MLflow experiment; TrackingError when it has never been run there."""
    experiment = client.get_experiment_by_name(experiment_name(grid))
    if experiment is None:
        raise TrackingError(f"no MLflow experiment {experiment_name(grid)!r} at {tracking_uri}; "
                            f"run `persim-bench run --grid {grid.name}` first")
    return experiment


def newest_parent_run(client, experiment_id: str):
    parents = client.search_runs([experiment_id], filter_string="tags.`persim_bench.parent` = '1'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    return parents[0] if parents else None


def start_parent_run(grid: Grid, tracking_uri: str, source: str, artifact_root: Path | None) -> tuple[str, str]:
    """Create the experiment (on the driver, before trials race to) and this invocation's parent run.

    ``artifact_root`` keeps artifacts beside the SQLite database (MLflow's default is ./mlruns in
    the cwd); None leaves the choice to a tracking server.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    name = experiment_name(grid)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = (artifact_root / name.replace("/", "-")).as_uri() if artifact_root else None
        experiment_id = client.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    parent = client.create_run(experiment_id, run_name=f"{grid.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                               tags={"grid": grid.name, "grid_source": source, "persim_bench.parent": "1",
                                     **provenance_tags()})
    # The resolved grid (extends merged, defaults filled, narrowing applied): what `evaluate` rebuilds trials from.
    client.log_text(parent.info.run_id, yaml.safe_dump(grid.model_dump(), sort_keys=False), GRID_ARTIFACT)
    return experiment_id, parent.info.run_id


def mark_killed(client, experiment_id: str, parent_run_id: str) -> None:
    """An interrupted invocation: its parent and every child run still RUNNING end KILLED."""
    running = client.search_runs([experiment_id], max_results=50000, filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"))
    for run in running:
        client.set_terminated(run.info.run_id, "KILLED")
    client.set_terminated(parent_run_id, "KILLED")


# ---------------------------------------------------------------- resume state


def grid_fingerprint(grid: Grid) -> str:
    return hashlib.sha256(json.dumps(grid.model_dump(), sort_keys=True).encode()).hexdigest()


def state_path(results: Path, grid_name: str) -> Path:
    """Where ``run`` records what ``--resume`` needs: the grid's fingerprint, parent run, stores."""
    return results / "state" / f"{grid_name}.json"


def resume_state(results: Path, grid: Grid, tracking_uri: str | None, storage: str | None) -> dict:
    """The interrupted invocation to continue; refused if the grid or its stores changed since."""
    from persim_bench.orchestration.guard import read_state_file

    path = state_path(results, grid.name)
    if not path.exists():
        raise GridError(f"{path}: nothing to resume for grid {grid.name!r} (no earlier `run` under {results})")
    state = read_state_file(path)
    if state["fingerprint"] != grid_fingerprint(grid):
        raise GridError(f"grid {grid.name!r} changed since the run being resumed (started {state.get('started')}); "
                        f"restore its definition and narrowing options, or run without --resume")
    state["tracking_uri"], state["storage"] = stores_of(state, results)
    for key, given in (("tracking_uri", tracking_uri), ("storage", storage)):
        if given and given != state[key]:
            raise GridError(f"--resume: {key} {given!r} differs from the interrupted run's {state[key]!r}")
    return state


def record_tune_state(results: Path, grid_name: str, stage: str, experiment_dir: str) -> None:
    """Keep the digest of a stage's Tune state in the resume state (read, update, atomic write: an unpickled
    copy of the Tune callback calling this after a restore holds no stale state of its own)."""
    from persim_bench.orchestration.guard import read_state_file, tune_state_digest

    path = state_path(results, grid_name)
    state = read_state_file(path)
    state.setdefault("tune_state", {})[stage] = tune_state_digest(experiment_dir)
    write_json(state, path)


def save_state(results: Path, grid: Grid, state: dict) -> None:
    path = state_path(results, grid.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(state, path)


def new_state(grid: Grid, tracking_uri: str, storage: str, experiment_id: str, parent_run_id: str,
              results: Path) -> dict:
    """What ``--resume`` needs. Locations under the results folder are kept relative to it (the folder
    can move, or be mounted elsewhere on another machine); Tune and MLflow get them absolute again."""
    return {"grid": grid.name, "fingerprint": grid_fingerprint(grid),
            "tracking_uri": _relative_uri(tracking_uri, results), "storage": _relative_path(storage, results),
            "experiment_id": experiment_id, "parent_run_id": parent_run_id,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def stores_of(state: dict, results: Path) -> tuple[str, str]:
    """(tracking URI, Tune storage) of a saved state, absolute."""
    uri, storage = state["tracking_uri"], state["storage"]
    if uri.startswith(RESULTS_SQLITE):
        uri = f"sqlite:///{(results / uri.removeprefix(RESULTS_SQLITE)).resolve()}"
    if "://" not in storage and not Path(storage).is_absolute():
        storage = str((results / storage).resolve())
    return uri, storage


RESULTS_SQLITE = "sqlite:results/"  # our marker for a SQLite store inside the results folder


def _relative_path(location: str, results: Path) -> str:
    if "://" in location:
        return location
    path, root = Path(location).resolve(), results.resolve()
    return str(path.relative_to(root)) if root in path.parents else location


def _relative_uri(uri: str, results: Path) -> str:
    if uri.startswith("sqlite:///"):
        path, root = Path(uri.removeprefix("sqlite:///")).resolve(), results.resolve()
        if root in path.parents:
            return RESULTS_SQLITE + str(path.relative_to(root))
    return uri
