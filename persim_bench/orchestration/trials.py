"""The trials of a grid and the Tune trainable that runs one, recorded in exactly one MLflow run.

``pre_stages``/``main_trials`` expand a grid into typed ``Trial`` records with deterministic
names (an algorithm's registry entry declares a stage of its own before main, e.g. PerSim's
rank_cv, and how main uses its picks); ``run_trial`` is what every Tune trial executes: it looks
the algorithm up in the registry, gives it its spec and context, and logs what it returns
(params, metrics, artifacts, its model, failures) to MLflow.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from persim_bench.algos.registry import ALGORITHMS
from persim_bench.config import Grid
from persim_bench.contracts import AgentFactors, Checkpoints, PreStage, Trial, TrialContext, TrialOutput
from persim_bench.data.generate import dataset_plan
from persim_bench.data.policies import prediction_policy_path
from persim_bench.data.subsets import subset_record
from persim_bench.envs import get_env
from persim_bench.orchestration import reporting
from persim_bench.orchestration.provenance import dataset_input, log_dataset_input, log_trained_model, provenance_tags
from persim_bench.orchestration.tracking import find_trial_run, mlflow_metric_name, run_metrics, trial_params

MLFLOW_BATCH = 1000  # MLflow refuses more metrics per log_batch call
CHECKPOINT_FILE = "state.pt"
CURVE_STEPS = ("epoch", "iteration")  # what counts a fit's progress, the step of its curves in MLflow


def pre_stages(grid: Grid) -> list[PreStage]:
    """The stages the grid's algorithms declare before main (PerSim's rank_cv), in the grid's algorithm order."""
    stages = [ALGORITHMS[name].pre_stage for name in grid.algos if ALGORITHMS[name].pre_stage is not None]
    return list(dict.fromkeys(stages))  # one stage may serve several algorithms (rank_cv: PerSim and its ablation)


def pre_stage_of(trial: Trial) -> PreStage | None:
    """The stage before main a trial belongs to; None for a main trial."""
    algo = ALGORITHMS[trial.algo]
    return algo.pre_stage if trial.stage != "main" and algo.pre_stage and algo.pre_stage.name == trial.stage else None


def main_trials(grid: Grid, chosen: dict[tuple[str, str, int], object] | None = None) -> list[Trial]:
    """The main stage: one trial per (algo, env, regime, seed) the algorithm supports, or the several its
    registry entry's ``main_trials`` makes (PerSim: rank pinned or picked by rank_cv, ``sweep_ranks``).

    Data-free algorithms skip the regime; an algorithm is skipped on envs whose action space it
    does not handle (IQL and TD3+BC on the discrete envs). The algorithms the grid's ``data_sizes``
    sweep get one trial per data-size cell more. ``chosen``: the pre-stages' picks.
    """
    trials = []
    swept = grid.swept_algos()
    for name in grid.algos:
        algo = ALGORITHMS[name]
        cells = grid.data_size_cells() if name in swept else [(None, None)]
        for env in grid.envs:
            if not algo.supports(get_env(env).discrete):
                continue
            for regime in grid.regimes if algo.needs_data else ["none"]:
                for seed in grid.seeds:
                    for agents, steps in cells:
                        fields = dict(stage="main", algo=name, env=env, regime=regime, seed=seed, agents=agents,
                                      steps_per_agent=steps)
                        trials += (algo.main_trials(grid, fields, chosen or {}) if algo.main_trials
                                   else [Trial.named(**fields)])
    return trials


def resources_key(trial: Trial) -> str:
    """The ``resources:`` entry a trial reserves: its algorithm's, or its pre-stage's (e.g. rank_cv)."""
    return trial.stage if trial.stage != "main" else trial.algo


def trial_context(grid: Grid, trial: Trial, data_root: Path, policy_root: Path, work_dir: Path, device: str = "cpu",
                  report=lambda metrics: None, checkpoints: Checkpoints | None = None) -> TrialContext:
    """The context of a trial: the grid's shared sections, its dataset's plan, the test policy's file."""
    algo = ALGORITHMS[trial.algo]
    dataset = dataset_plan(grid, trial.env, trial.regime, policy_root) if algo.needs_data else None
    tests_predictions = algo.learns_dynamics and grid.evaluation.prediction_policy != "heuristic"
    test_policy = prediction_policy_path(policy_root, grid, trial.env) if tests_predictions else None
    return TrialContext(grid.evaluation, grid.planner, work_dir, data_root, dataset, test_policy, device, report,
                        checkpoints)


class TrialProgress:
    """A trial's progress: every report goes to Tune, and a fit's curve (metrics of an epoch or iteration)
    to its MLflow run as it happens (``fit/<metric>`` at step = that epoch); fit states to Tune checkpoints."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id, self.last = client, run_id, {}

    def report(self, metrics: dict) -> None:
        from mlflow.entities import Metric
        from ray import tune

        tune.report(metrics)
        self.last = metrics
        step = next((int(metrics[key]) for key in CURVE_STEPS if key in metrics), None)
        if metrics.get("stage") == "fit" and step is not None:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[
                Metric(f"fit/{key}", float(value), now, step) for key, value in metrics.items()
                if key not in CURVE_STEPS and isinstance(value, (int, float))])

    def checkpoints(self, every_seconds: float, device: str) -> Checkpoints:
        """The fit's checkpoints in Tune: the state of the last one (a restarted trial's), and a saver."""
        import tempfile

        import torch
        from ray import tune

        resume = None
        if (found := tune.get_checkpoint()) is not None:
            with found.as_directory() as folder:  # tensors and plain values only: nothing unpickles code
                resume = torch.load(Path(folder) / CHECKPOINT_FILE, map_location=device, weights_only=True)
            at = ", ".join(f"{key} {resume[key] + 1}" for key in CURVE_STEPS if key in resume)
            self.client.set_tag(self.run_id, "resumed_from", at or "checkpoint")

        if reporting.verbosity() not in ("verbose", "debug"):  # else Ray logs a line per checkpoint
            logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)

        def save(state: dict) -> None:
            with tempfile.TemporaryDirectory(prefix="persim-checkpoint-") as folder:
                torch.save(state, Path(folder) / CHECKPOINT_FILE)
                # Tune copies the folder to the trial's storage before report returns.
                tune.report({**self.last, "stage": "checkpoint"}, checkpoint=tune.Checkpoint.from_directory(folder))

        return Checkpoints(resume, save, every_seconds)


def algorithm_spec(grid: Grid, trial: Trial):
    """The grid section the trial's algorithm reads (None for one that reads none)."""
    key = ALGORITHMS[trial.algo].spec_key
    return getattr(grid, key) if key else None


def trial_device(grid: Grid, trial: Trial) -> str:
    """The trial's GPU when the grid reserves one for it (and Ray gave it one), else the CPU."""
    import torch

    return "cuda" if grid.trial_resources(resources_key(trial)).gpu > 0 and torch.cuda.is_available() else "cpu"


def cost_metrics(costs: dict, total: float) -> dict:
    """Seconds by phase: load, prediction and reward as timed by the shared helpers; fit is the rest of the trial."""
    timed = sum(v for k, v in costs.items() if k.startswith("seconds_"))
    return {**costs, "seconds_total": total, "seconds_fit": max(0.0, total - timed)}


@dataclass(frozen=True)
class RunContext:
    """What every trial needs from the driver; all paths absolute (trials run in their own cwd)."""

    grid: dict
    data_root: str
    policy_root: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    session: str = ""  # one id per driver process: a trial's error is not retried within it, only on --resume


def factor_analysis(factors: AgentFactors, seed: int, out: Path) -> TrialOutput:
    """The paper's Figure 1 claim as a number and a picture: do the learned agent factors carry the hidden covariates?

    ``probe_r2_<covariate>``: cross-validated R^2 of a linear probe from every agent's factors
    (all members) to that covariate; ``agent_factors.png`` (and .pdf): their t-SNE coloured by each covariate.
    """
    from persim_bench.analysis.factors import probe_r2, tsne_figure

    r2 = probe_r2(factors.factors, factors.covariates, seed=seed)
    figure = tsne_figure(factors.factors, factors.covariates, list(factors.covariate_names), out / "agent_factors.png",
                         seed=seed, title=factors.title)
    return TrialOutput({f"probe_r2_{name}": float(value) for name, value in zip(factors.covariate_names, r2)},
                       artifacts=[figure, figure.with_suffix(".pdf")])


class TrialError(RuntimeError):
    """A trial's own code failed (recorded in MLflow): Tune shows the trial as ERROR, with this message."""


def open_trial_run(client, context: RunContext, grid: Grid, trial: Trial, earlier, where: dict) -> str:
    """The trial's MLflow run, created now or reused from ``earlier``, with all its params and its dataset input.

    Creating a run and logging its params are separate MLflow calls: a driver killed between them
    leaves a run without params, so a reused run gets whatever it misses (the tables read ``rank``
    and the data-size fields from params).
    """
    from mlflow.entities import Param

    if earlier is None:  # where it runs is tagged with the run's creation: a watcher never sees it without
        run_id = client.create_run(
            context.experiment_id, run_name=trial.name,
            tags={"mlflow.parentRunId": context.parent_run_id, "trial": trial.name, "stage": trial.stage,
                  "algo": trial.algo, "env": trial.env, "regime": trial.regime, "seed": str(trial.seed),
                  **where, **provenance_tags()}).info.run_id
        logged_params, has_input = {}, False
    else:  # a restart after the worker died, or a resumed invocation
        run_id = earlier.info.run_id
        client.set_tag(run_id, "attempts", str(int(earlier.data.tags.get("attempts", "1")) + 1))
        for key, value in where.items():
            client.set_tag(run_id, key, value)
        client.update_run(run_id, status="RUNNING")
        logged_params, has_input = earlier.data.params, bool(earlier.inputs and earlier.inputs.dataset_inputs)
    missing = [Param(k, v) for k, v in trial_params(context.grid, trial).items() if k not in logged_params]
    if missing:
        client.log_batch(run_id, params=missing)
    read = dataset_input(Path(context.data_root), grid.name, trial.env, trial.regime)
    if read is not None and ALGORITHMS[trial.algo].needs_data and not has_input:
        log_dataset_input(client, run_id, read)
    return run_id


def prepare_compute_thread(threads: int) -> None:
    """Set the calling thread up as every trial computes: ``threads`` torch threads, denormal floats flushed to zero.

    On Intel CPUs a matrix product runs 3x slower when 1 % of its operands are denormal and 19x
    when 10 % are. CaDM's weight decay drives dead encoder units' weights denormal as training goes
    on (HalfCheetah Vanilla CaDM epochs of 354, 583 and 862 s: docs/benchmarks.md). TensorFlow, which the
    CaDM authors' code runs on, flushes them by default; PyTorch does not. The flag lives in the
    thread's MXCSR register, so it is set in the thread that computes. Data generation and policy
    training keep IEEE denormals: their bytes stay as before.
    """
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


@contextlib.contextmanager
def trial_numerics():
    """Compute in the calling thread with denormals flushed, as a trial does, and restore its flag after."""
    import torch

    flushed = denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(flushed)


def denormals_flushed() -> bool:
    """Whether the calling thread flushes denormal floats: a float32 product below 1.2e-38 comes out 0."""
    import torch

    return (torch.tensor([1e-30]) * torch.tensor([1e-10])).item() == 0.0


def run_trial(config: dict, context: RunContext) -> None:
    """The Tune trainable: one experiment, recorded in exactly one MLflow run per grid invocation.

    A retried or resumed trial reuses its earlier run (and, if that run finished, its result).
    An error of the trial's own code is recorded in MLflow and raised to Tune (the trial ends
    ERROR); Tune's restart of it in the same driver session raises it again at once, so only a
    worker or node that died gets a real retry. ``--resume`` (a new session) runs it again.
    """
    import ray
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    from ray import tune

    prepare_compute_thread(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    trial = Trial.from_dict(config["trial"])
    grid = Grid.model_validate(context.grid)
    client = MlflowClient(context.tracking_uri)
    earlier = find_trial_run(client, context.experiment_id, context.parent_run_id, trial.name)
    if earlier is not None and earlier.info.status == "FINISHED":
        tune.report({**run_metrics(earlier), "stage": "done", "reused": 1, "mlflow_run_id": earlier.info.run_id})
        return
    if earlier is not None and earlier.info.status == "FAILED" and earlier.data.tags.get("session") == context.session:
        # Tune restarts an errored trial as if its node were lost: our own code's error stays an error.
        raise TrialError(earlier.data.tags.get("error", "failed"))
    device = trial_device(grid, trial)
    where = {"node": ray.get_runtime_context().get_node_id(), "device": device,
             "denormals": "flushed" if denormals_flushed() else "kept"}
    run_id = open_trial_run(client, context, grid, trial, earlier, where)
    algo, pre_stage = ALGORITHMS[trial.algo], pre_stage_of(trial)
    progress = TrialProgress(client, run_id)
    ctx = trial_context(grid, trial, Path(context.data_root), Path(context.policy_root),
                        Path(tune.get_context().get_trial_dir()), device, progress.report,
                        progress.checkpoints(grid.checkpoint_seconds, device))
    if ctx.dataset is not None and trial.in_data_size_cell:
        subset = subset_record(ctx.dataset, trial.agents, trial.steps_per_agent)
        client.log_dict(run_id, subset, "data_subset.json")
        client.set_tag(run_id, "data_subset", subset["fingerprint"])
    started = time.perf_counter()
    try:
        output = (pre_stage.run if pre_stage else algo.run)(trial, algorithm_spec(grid, trial), ctx)
        if output.factors is not None:
            output = output | factor_analysis(output.factors, trial.seed, ctx.work_dir)
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        client.set_tag(run_id, "error", error[:5000])
        client.set_tag(run_id, "session", context.session)
        client.log_text(run_id, traceback.format_exc(), "error.txt")
        client.set_terminated(run_id, "FAILED")
        raise TrialError(error) from None  # Tune records the trial as ERROR (ResultGrid.errors)
    metrics = {**output.metrics, **cost_metrics(output.costs, time.perf_counter() - started)}
    now = int(time.time() * 1000)
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    history = [Metric(mlflow_metric_name(k), float(v), now, step) for k, values in metrics.items()
               if isinstance(values, list) for step, v in enumerate(values)]  # e.g. every episode's return
    logged = [Metric(mlflow_metric_name(k), v, now, 0) for k, v in numbers.items()] + history
    for start in range(0, len(logged), MLFLOW_BATCH):
        client.log_batch(run_id, metrics=logged[start:start + MLFLOW_BATCH])
    for key, value in metrics.items():
        if isinstance(value, str):
            client.set_tag(run_id, key, value)
    for path in output.artifacts:
        client.log_artifact(run_id, str(path))
    if output.models:
        log_trained_model(client, context.experiment_id, run_id, trial.name, trial.algo, output.models)
    client.set_terminated(run_id, "FINISHED")
    tune.report({**numbers, "stage": "done", "mlflow_run_id": run_id})
