"""``persim-bench tables``: the grid's tables from MLflow, written to ``results/<grid>/`` and logged on MLflow.

Fetches every trial run of the grid's experiment (the latest run of each trial name, so narrowed or
repeated invocations add up), the datasets' summaries and the cost model's estimates, as plain records;
``analysis.grid_tables`` builds the tables from them (prediction error, Tables 2-4, and reward, Tables 5-7,
per env; costs; Table 8; rank_cv) and ``analysis.grid_figures`` draws their figures. Writes Markdown, CSV
and LaTeX to ``results/<grid>/``, also logged as artifacts on the newest parent run.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from pathlib import Path

import numpy as np

from persim_bench.algos.persim import smallest_good_rank
from persim_bench.algos.registry import ALGORITHMS
from persim_bench.analysis.grid_figures import rank_cv_figure, reward_figure
from persim_bench.analysis.grid_tables import (CostRecord, GridLayout, TrialRecord, cost_table, dataset_table,
                                               failed_trials, has_reward_figure, per_env_tables, policy_table,
                                               rank_cv_table, tables_page)
from persim_bench.analysis.tabular import write_table
from persim_bench.config import Grid
from persim_bench.data.dataset import MANIFEST, DatasetError, dataset_dir, policy_root, read_dataset
from persim_bench.data.generate import dataset_plan
from persim_bench.data.policies import policy_label
from persim_bench.envs import ENVS, get_env
from persim_bench.orchestration.guard import inside
from persim_bench.orchestration.tracking import (grid_experiment, latest_trial_runs, newest_parent_run, optional_int,
                                                 run_metrics, trial_of_run)
from persim_bench.specs import REGIMES


def method_labels() -> dict[str, str]:
    """{method key: label} of every registered algorithm (and ``data``, Table 8's rows): what analysis labels rows with."""
    return {**{name: algo.label for name, algo in ALGORITHMS.items()}, "data": "data"}


# Settings that only spread or chunk the work: they never change a number the report compares.
EXECUTION_SETTINGS = frozenset({"data.agents_per_shard", "data.num_workers", "planner.max_rows"})


def protocol_differences(grid: Grid, paper: Grid) -> dict:
    """A table of every setting where ``grid`` departs from the paper's protocol (``paper.yaml``): seeds, data,
    policies, planner, evaluation and the sections of the grid's paper methods, per env where a setting is
    given per env. The report shows it first, so a verdict on 4 of 300 epochs is read as one."""
    sections = ["data", "policies", "planner", "evaluation", *dict.fromkeys(
        ALGORITHMS[name].spec_key for name in grid.algos if name in paper.algos and ALGORITHMS[name].spec_key)]
    rows = [] if len(grid.seeds) == len(paper.seeds) else [["seeds", "all", str(len(grid.seeds)), str(len(paper.seeds))]]
    for section in sections:
        ours, theirs = getattr(grid, section), getattr(paper, section)
        for field in type(ours).model_fields:
            name = f"{section}.{field}"
            if name in EXECUTION_SETTINGS:
                continue
            envs_by_values = defaultdict(list)
            for env in grid.envs:
                mine, paper_value = _for_env(getattr(ours, field), env), _for_env(getattr(theirs, field), env)
                if mine != paper_value:
                    envs_by_values[_setting_text(mine), _setting_text(paper_value)].append(env)
            rows += [[name, "all" if len(envs) == len(grid.envs) else ", ".join(envs), mine, paper_value]
                     for (mine, paper_value), envs in envs_by_values.items()]
    return {"title": "Where this grid departs from the paper's protocol (paper.yaml); read every verdict below with it",
            "columns": ["setting", "envs", "this grid", "paper"], "rows": rows,
            "empty": "None: this grid runs the paper's protocol."}


def _for_env(value, env: str):
    """A setting's value for one env: its entry when given as {env: value} (None: not set for that env)."""
    if isinstance(value, dict) and set(value) <= set(ENVS):
        return value.get(env)
    return value


def _setting_text(value) -> str:
    if value is None:
        return "default"
    return f"{value:g}" if isinstance(value, float) else str(value)


def agent_label(env: str, agent: int) -> str:
    family = get_env(env)
    values = family.test_agents[agent]
    return ", ".join(f"{n}={v:g}" for n, v in zip(family.covariate_names, values))


def grid_layout(grid: Grid) -> GridLayout:
    """What the tables show of the grid: its envs, test agents (as covariate columns), method order and labels."""
    agents = tuple(grid.evaluation.test_agents)
    return GridLayout(envs=tuple(grid.envs), test_agents=agents,
                      agent_columns={env: tuple(agent_label(env, a) for a in agents) for env in grid.envs},
                      methods=tuple(grid.algos), regimes=tuple(REGIMES), labels=method_labels(),
                      prediction_steps=grid.evaluation.prediction_steps,
                      reward_episodes=grid.evaluation.reward_episodes,
                      policy_reward_episodes=grid.evaluation.policy_reward_episodes)


def trial_record(run) -> TrialRecord:
    """An MLflow trial run as the grid tables read it."""
    tags, params = run.data.tags, run.data.params
    return TrialRecord(trial=tags.get("trial", ""), status=run.info.status, stage=tags.get("stage"),
                       algo=tags.get("algo"), env=tags.get("env"), regime=tags.get("regime"),
                       rank=optional_int(params, "rank"), rank_source=params.get("rank_source"),
                       error=tags.get("error"), metrics=run_metrics(run),
                       data_size=any(key in params for key in ("agents", "steps_per_agent")))


def cost_records(runs: list, grid: Grid, data_root: Path, rate: float) -> list[CostRecord]:
    """Every finished main trial that logged its time, with the CPUs it reserved and the cost model's estimate."""
    from persim_bench.orchestration.estimate import dataset_rows, trial_rows

    manifest_rows = functools.cache(lambda env, regime: dataset_rows(grid, env, regime, data_root)
                                    if regime != "none" else 0)
    records = []
    for run in runs:
        tags = run.data.tags
        if not (run.info.status == "FINISHED" and tags.get("stage") == "main" and "seconds_total" in run_metrics(run)):
            continue
        algo = tags["algo"]
        cost = ALGORITHMS[algo].cost if algo in ALGORITHMS else None
        estimated = None
        if cost is not None and run.data.params:  # a run made before open_trial_run completed a killed one's params
            trial = trial_of_run(run)
            estimated = cost(grid, trial, trial_rows(grid, trial, manifest_rows(trial.env, trial.regime)), rate)
        records.append(CostRecord(algo=algo, env=tags["env"], cpus=grid.trial_resources(algo).cpu,
                                  estimated_seconds=estimated, device=tags.get("device", "cpu"),
                                  metrics=run_metrics(run)))
    return records


def dataset_summaries(grid: Grid, data_root: Path, policy_root: Path) -> dict[tuple[str, str], dict]:
    """Per env and regime generated: the five test agents' observed returns and the mean return and trajectory
    length over all agents, read from the datasets themselves (what the paper's Table 8 reports).

    A dataset never generated is left out; one that is damaged or stale gets ``{"error": message}``,
    so a table shows it instead of silently losing its row.
    """
    summaries = {}
    for env in grid.envs:
        for regime in grid.regimes:
            if not (dataset_dir(data_root, env, regime) / MANIFEST).exists():
                continue
            try:
                data = read_dataset(data_root, dataset_plan(grid, env, regime, policy_root))
            except DatasetError as err:
                summaries[env, regime] = {"error": str(err)}
                continue
            returns = np.bincount(data.agent, weights=data.reward, minlength=data.n_agents)
            lengths = np.bincount(data.agent, minlength=data.n_agents)
            summaries[env, regime] = {"test_returns": returns[:5].tolist(), "mean_return": float(returns.mean()),
                                      "mean_length": float(lengths.mean())}
    return summaries


def write_policy_table(headers: dict, out: Path) -> None:
    """The trained policies' table (from their file headers) as ``policies.{md,csv,tex}`` in ``out``."""
    policies = [(policy_label(h["role"], h.get("regime"), h["index"]), h) for h in headers.values()]
    write_table(policy_table(policies), out, "policies")


def rank_cv_losses(runs: list) -> dict[tuple[str, str, int], dict[int, float]]:
    """Held-out loss per rank of every finished rank_cv trial, by (env, regime, seed)."""
    losses: dict[tuple[str, str, int], dict[int, float]] = defaultdict(dict)
    for run in runs:
        if run.data.tags.get("stage") == "rank_cv" and run.info.status == "FINISHED":
            key = run.data.tags["env"], run.data.tags["regime"], int(run.data.tags["seed"])
            losses[key][int(run.data.params["rank"])] = run_metrics(run)["val_loss"]
    return losses


def write_tables(grid: Grid, tracking_uri: str, results: Path, data_root: Path) -> Path:
    """Write every table of the grid to results/<grid>/ and log them on the newest parent run."""
    from mlflow.tracking import MlflowClient

    from persim_bench.costmodel import measure_rate

    client = MlflowClient(tracking_uri)
    experiment = grid_experiment(client, grid, tracking_uri)
    runs = latest_trial_runs(client, experiment.experiment_id)
    records = [trial_record(run) for run in runs]
    layout = grid_layout(grid)
    out = inside(results, results / grid.name)
    out.mkdir(parents=True, exist_ok=True)
    summaries = dataset_summaries(grid, data_root, policy_root(results))
    rate = measure_rate()
    tables = {"datasets": dataset_table(summaries, grid.data.n_agents), **per_env_tables(records, layout),
              "costs": cost_table(cost_records(runs, grid, data_root, rate), layout, rate)}
    if any(record.stage == "rank_cv" for record in records):
        losses = rank_cv_losses(runs)
        chosen = {key: smallest_good_rank(per_rank, grid.persim.cv_tolerance) for key, per_rank in losses.items()}
        tables["rank_cv"] = rank_cv_table(losses, chosen, grid.persim.cv_tolerance, layout.regimes)
        if tables["rank_cv"]["rows"]:
            rank_cv_figure(tables["rank_cv"], out / "rank_cv.png")
    policies = (out / "policies.md").read_text() if (out / "policies.md").exists() else None
    for name, table in tables.items():
        write_table(table, out, name)
        if has_reward_figure(name, table):
            reward_figure(table, out / f"{name}.png", layout.labels)
    (out / "tables.md").write_text(tables_page(grid.name, tables, failed_trials(records), policies))
    parent = newest_parent_run(client, experiment.experiment_id)
    if parent is not None:
        client.log_artifacts(parent.info.run_id, str(out), artifact_path="tables")
    return out
