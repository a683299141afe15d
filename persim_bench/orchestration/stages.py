"""The stages of ``persim-bench run``: policies -> datasets -> rank_cv (Tune) -> main (Tune) -> tables, in MLflow.

One MLflow parent run per grid invocation; every Tune trial opens a child run (tag
``mlflow.parentRunId``), logs its flattened config as params and its final numbers as metrics,
and ends FINISHED or FAILED with the error as a tag. A failed trial never stops the grid.
``--resume`` continues an interrupted invocation: same parent run, Tune state restored, and a
trial that already finished is never run again (its MLflow run is the one record of it).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from persim_bench.config import Grid
from persim_bench.contracts import PreStage, Trial
from persim_bench.data.dataset import data_root as data_root_of, policy_root as policy_root_of
from persim_bench.orchestration import tracking
from persim_bench.errors import Interrupted
from persim_bench.orchestration.cluster import check_shared_storage, connect_ray
from persim_bench.orchestration.guard import (
    RunLock, check_tracking_store, inside, read_state_file, state_recorder, verify_tune_state,
)
from persim_bench.orchestration.trials import RunContext, main_trials, pre_stages, resources_key, run_trial


@dataclass(frozen=True)
class GridOutcome:
    """What ``run_grid`` did: trials run, those that failed, where the tables went."""

    trials: int
    failed: list[str]
    tables_dir: Path
    tracking_uri: str


def prepare_data(grid: Grid, results: Path, workers: int | None = None) -> tuple[Path, Path]:
    """The stages before the trials: policies (Ray tasks, cached) -> datasets (Ray actors)."""
    from persim_bench.data.generate import generate_datasets
    from persim_bench.data.policies import train_policies
    from persim_bench.orchestration.tables import write_policy_table

    policy_root, data_root = inside(results, policy_root_of(results)), inside(results, data_root_of(results, grid.name))
    print(f"[policies] {policy_root}")
    headers = train_policies(grid, policy_root)
    if headers:
        write_policy_table(headers, results / grid.name)
    print(f"[datasets] {data_root}")
    generate_datasets(grid, data_root, policy_root, num_workers=workers)
    return policy_root, data_root


def run_stage(grid: Grid, trials: list[Trial], context: RunContext, storage: str, name: str, results: Path,
              metric: str | None = None, mode: str | None = None) -> list[str]:
    """Schedule trials with Ray Tune (resuming its saved state under storage/name if there is one).

    ``metric``/``mode``: what the stage optimises (a pre-stage's, e.g. rank_cv's held-out loss, min),
    so Tune's result grid knows its best trial.

    Tune's saved state is restored only when it is byte for byte what this tool recorded (it is
    unpickled on restore); a callback keeps that record current while the stage runs. Returns the
    names of trials that ended in ERROR: their own code failed (already FAILED in MLflow), or Tune
    gave up after ``grid.max_failures`` restarts (their MLflow run is then marked FAILED here). Raises
    ``Interrupted`` when Ctrl-C stopped the stage before every trial ended.
    """
    import functools

    from mlflow.tracking import MlflowClient
    from ray import tune

    from persim_bench.orchestration import reporting

    def resources(config: dict) -> dict:
        wanted = grid.trial_resources(resources_key(Trial.from_dict(config["trial"])))
        return {"cpu": wanted.cpu, "gpu": wanted.gpu}

    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), resources)
    path = f"{storage.rstrip('/')}/{name}"
    record = functools.partial(tracking.record_tune_state, results, grid.name, name, path)
    if tune.Tuner.can_restore(path):
        state_file = tracking.state_path(results, grid.name)
        verify_tune_state(path, read_state_file(state_file).get("tune_state", {}).get(name), state_file)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.as_dict() for t in trials])},
            tune_config=tune.TuneConfig(
                # A new worker per trial paid ~6 s of process start and imports (median gap between
                # trials in the smoke grid); trials keep no state in their process beyond caches.
                reuse_actors=True, metric=metric, mode=mode,
                trial_name_creator=lambda t: t.config["trial"]["name"],
                trial_dirname_creator=lambda t: t.config["trial"]["name"]),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, verbose=reporting.tune_verbosity(),
                callbacks=[state_recorder(path, record), *reporting.trial_lines()],
                failure_config=tune.FailureConfig(max_failures=grid.max_failures, fail_fast=False),
                # A restart needs only the newest. Tune then snapshots its experiment state at each checkpoint,
                # so a killed driver's saved state never names a deleted one (with 2 it did: tests/test_cluster).
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    outcome = tuner.fit()
    record()
    unfinished = [r for r in outcome if r.error is None and (r.metrics or {}).get("stage") != "done"]
    if unfinished:
        raise Interrupted(f"stage {name}: {len(unfinished)} of {len(outcome)} trials did not finish")
    client = MlflowClient(context.tracking_uri)
    failed = []
    for result in outcome:
        trial_name = result.config["trial"]["name"]
        if result.error is not None:
            run = tracking.find_trial_run(client, context.experiment_id, context.parent_run_id, trial_name)
            if run is not None and run.info.status != "FAILED":
                client.set_tag(run.info.run_id, "error", f"gave up after {grid.max_failures} restarts: "
                                                         f"{str(result.error).splitlines()[0]}"[:5000])
                client.set_terminated(run.info.run_id, "FAILED")
            failed.append(trial_name)
    return failed


def stage_name(grid: Grid, stage: str, parent_run_id: str) -> str:
    """The Tune experiment of one stage of one invocation (what --resume restores)."""
    return f"{grid.name}-{stage.replace('_', '-')}-{parent_run_id[:8]}"


def choose(grid: Grid, pre_stage: PreStage, client, experiment_id: str, parent_run_id: str) -> dict:
    """A pre-stage's picks from its finished trials of this invocation, logged on the parent run as params
    ``<picks>.<env>.<regime>.s<seed>`` (e.g. ``rank.cartpole.random.s0``)."""
    from mlflow.entities import Param

    runs = client.search_runs([experiment_id], max_results=50000,
                              filter_string=f"tags.stage = '{pre_stage.name}' and "
                                            f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    finished = [(tracking.trial_of_run(run), tracking.run_metrics(run)) for run in runs if run.info.status == "FINISHED"]
    picks = pre_stage.choose(finished, grid)
    params = [Param(f"{pre_stage.picks}.{env}.{regime}.s{seed}", str(value))
              for (env, regime, seed), value in picks.items()]
    existing = client.get_run(parent_run_id).data.params
    client.log_batch(parent_run_id, params=[p for p in params if p.key not in existing])
    return picks


def run_grid(grid: Grid, results: Path, *, source: str, address: str = "local", storage: str | None = None,
             mlflow_uri: str | None = None, resume: bool = False) -> GridOutcome:
    """datasets -> rank_cv -> main (Tune) -> tables, under one MLflow parent run (continued by ``resume``).

    One run per results folder and grid at a time (``RunLock``). The tracking store, the Ray
    address and the stores are checked before any policy or dataset is made.
    """
    with RunLock(results, grid.name, f"persim-bench run --grid {source}"):
        state = tracking.resume_state(results, grid, mlflow_uri, storage) if resume else None
        tracking_uri = state["tracking_uri"] if state else mlflow_uri or tracking.default_tracking_uri(results)
        storage = state["storage"] if state else storage or str(inside(results, results / "ray"))
        connect_ray(address)
        check_shared_storage({"--results": str(results), "--storage": storage})
        check_tracking_store(tracking_uri)  # a server that does not answer: one line now, not after the data
        policy_root, data_root = prepare_data(grid, results)
        return _run_stages(grid, results, source, tracking_uri, storage, state, policy_root, data_root, mlflow_uri)


def _run_stages(grid: Grid, results: Path, source: str, tracking_uri: str, storage: str, state: dict | None,
                policy_root: Path, data_root: Path, mlflow_uri: str | None) -> GridOutcome:
    from mlflow.tracking import MlflowClient

    from persim_bench.orchestration.report import write_report
    from persim_bench.orchestration.tables import write_tables

    client = MlflowClient(tracking_uri)
    if state:
        client.update_run(state["parent_run_id"], status="RUNNING")
    else:
        artifact_root = None if mlflow_uri else results / "mlartifacts"
        experiment_id, parent_run_id = tracking.start_parent_run(grid, tracking_uri, source, artifact_root)
        tracking.save_state(results, grid, tracking.new_state(grid, tracking_uri, storage, experiment_id,
                                                              parent_run_id, results))
        state = {"parent_run_id": parent_run_id, "experiment_id": experiment_id}
    parent_run_id, experiment_id = state["parent_run_id"], state["experiment_id"]
    context = RunContext(grid.model_dump(), str(data_root), str(policy_root), tracking_uri, experiment_id,
                         parent_run_id, session=uuid.uuid4().hex)
    print(f"[main] MLflow {tracking_uri} (parent run {parent_run_id}); Tune storage {storage}")
    failed, chosen, ran = [], {}, 0
    try:
        for pre_stage in pre_stages(grid):  # e.g. PerSim's rank_cv, whose picks set the main trials' ranks
            if trials := pre_stage.trials(grid):
                print(f"[{pre_stage.name}] {len(trials)} trials")
                failed += run_stage(grid, trials, context, storage, stage_name(grid, pre_stage.name, parent_run_id),
                                    results, pre_stage.metric, pre_stage.mode)
                picks = choose(grid, pre_stage, client, experiment_id, parent_run_id)
                print(f"[{pre_stage.name}] chosen {pre_stage.picks}: "
                      + ", ".join(f"{e}/{r}/s{s}: {k}" for (e, r, s), k in sorted(picks.items())))
                chosen.update(picks)
                ran += len(trials)
        trials = main_trials(grid, chosen)
        failed += run_stage(grid, trials, context, storage, stage_name(grid, "main", parent_run_id), results)
    except (Interrupted, KeyboardInterrupt) as err:
        tracking.mark_killed(client, experiment_id, parent_run_id)
        raise Interrupted(f"interrupted ({err or 'Ctrl-C'}); runs marked KILLED in MLflow; continue with "
                          f"`persim-bench run --grid {source} --resume`") from None

    out = write_tables(grid, tracking_uri, results, data_root)
    write_report(grid, tracking_uri, results, data_root)
    client.set_terminated(parent_run_id, "FAILED" if failed else "FINISHED")
    return GridOutcome(ran + len(trials), failed, out, tracking_uri)
