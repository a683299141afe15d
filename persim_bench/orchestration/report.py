"""``persim-bench report``: the reproduction report of a grid from its MLflow runs (``analysis.reproduction`` builds it).

Collects every finished main trial (with its per-episode returns), the datasets' Table-8
summaries, a random policy's return per test agent (the 0 of the normalised scores), PerSim's
agent-factor figures and probe R^2 (the paper's Figure 1); analysis builds the tables, the
performance-profile figure and the page, and this writes ``results/<grid>/report/report.md`` with
CSV/LaTeX per table, also logged on the newest parent run.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from persim_bench.contracts import Trial, TrialContext
from persim_bench.config import Grid, load_grid
from persim_bench.data.behaviour import RandomPolicy
from persim_bench.data.dataset import policy_root
from persim_bench.envs import get_env
from persim_bench.evaluate import score_policy
from persim_bench.analysis.factors import has_factor_probe
from persim_bench.analysis.tabular import png_to_pdf, write_table
from persim_bench.orchestration.guard import inside
from persim_bench.orchestration.tables import dataset_summaries, method_labels, protocol_differences
from persim_bench.orchestration.tracking import (grid_experiment, latest_trial_runs, metric_name, newest_parent_run,
                                                 optional_int, run_metrics)

RANDOM_EPISODES = 20  # per test agent, for the random policy's reference return


def trial_records(client, runs: list) -> list[dict]:
    """Finished main trials as plain records, each agent's per-episode returns read from the metric history
    (``agents``/``steps_per_agent``: a data-size cell's subset, None for the full dataset)."""
    records = []
    for run in runs:
        tags = run.data.tags
        if run.info.status != "FINISHED" or tags.get("stage") != "main" or run.data.params.get("rank_source") == "sweep":
            continue
        metrics = run_metrics(run)
        for key in [k for k in run.data.metrics if metric_name(k).startswith("episode_returns_agent")]:
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            metrics[metric_name(key)] = [m.value for m in history]
        records.append({"algo": tags["algo"], "env": tags["env"], "regime": tags["regime"], "seed": int(tags["seed"]),
                        "agents": optional_int(run.data.params, "agents"),
                        "steps_per_agent": optional_int(run.data.params, "steps_per_agent"),
                        "metrics": metrics, "run_id": run.info.run_id})
    return records


def random_scores(grid: Grid) -> dict[tuple[str, int], float]:
    """Mean return of uniformly random actions per (env, test agent), through the shared evaluation."""
    scores = {}
    for env in grid.envs:
        family = get_env(env)
        trial = Trial(stage="report", algo="random", env=env, regime="none", seed=grid.seed)
        ctx = TrialContext(grid.evaluation, grid.planner, Path())
        policy = RandomPolicy(family)
        rng = np.random.default_rng(grid.seed)
        metrics = score_policy(lambda obs, agent: policy.act(obs, rng), trial, ctx, RANDOM_EPISODES).metrics
        scores.update({(env, a): metrics[f"reward_agent{a}"] for a in grid.evaluation.test_agents})
    return scores


def copy_factor_figures(client, records: list[dict], out: Path) -> list[Path]:
    """Figure 1, one PNG (and PDF) per env x regime: the t-SNE of the lowest seed's trial that learned agent
    factors (PerSim's), copied from MLflow."""
    first: dict[tuple[str, str], dict] = {}
    for record in sorted(records, key=lambda r: r["seed"]):
        if has_factor_probe(record["metrics"]):
            first.setdefault((record["env"], record["regime"]), record)
    figures = []
    for (env, regime), record in sorted(first.items()):
        names = [a.path for a in client.list_artifacts(record["run_id"])]
        if "agent_factors.png" not in names:
            continue
        local = client.download_artifacts(record["run_id"], "agent_factors.png", str(out))
        target = out / f"figure1_{env}_{regime}.png"
        shutil.move(local, target)
        if "agent_factors.pdf" in names:
            shutil.move(client.download_artifacts(record["run_id"], "agent_factors.pdf", str(out)),
                        target.with_suffix(".pdf"))
        else:  # the trial logged the PNG alone: the PDF beside it holds its pixels
            png_to_pdf(target)
        figures.append(target)
    return figures


def efficiency_section(grid: Grid, records: list[dict], random: dict[tuple[str, int], float], out: Path) -> str:
    """The data-efficiency curves of a grid with ``data_sizes``: table, figures (PNG, PDF) and findings in ``out``."""
    from persim_bench.analysis.efficiency import (efficiency_figures, efficiency_findings, efficiency_markdown,
                                                  efficiency_points, efficiency_table)

    labels = method_labels()
    in_grid_order = sorted(records, key=lambda r: grid.algos.index(r["algo"]) if r["algo"] in grid.algos else len(grid.algos))
    points = efficiency_points(in_grid_order, grid.data.n_agents, grid.evaluation.test_agents, random, seed=grid.seed)
    table = efficiency_table(points, labels)
    write_table(table, out, "efficiency")
    figures = efficiency_figures(points, out, labels)
    return efficiency_markdown(table, efficiency_findings(points, labels), figures)


def write_report(grid: Grid, tracking_uri: str, results: Path, data_root: Path) -> Path:
    """Write results/<grid>/report.md (+ csv/tex, figures) and log it on the newest parent run; returns the file."""
    from mlflow.tracking import MlflowClient

    from persim_bench.analysis.factors import probe_table
    from persim_bench.analysis.reproduction import build_report, performance_profile, report_page

    client = MlflowClient(tracking_uri)
    experiment = grid_experiment(client, grid, tracking_uri)
    every = trial_records(client, latest_trial_runs(client, experiment.experiment_id))
    records = [r for r in every if r["agents"] is None and r["steps_per_agent"] is None]  # the full datasets
    labels = method_labels()
    out = inside(results, results / grid.name / "report")
    out.mkdir(parents=True, exist_ok=True)
    summaries = dataset_summaries(grid, data_root, policy_root(results))
    unreadable = {key: s["error"] for key, s in summaries.items() if "error" in s}
    readable = {key: s for key, s in summaries.items() if key not in unreadable}
    random = random_scores(grid)
    report = build_report(records, readable, random_scores=random, seed=grid.seed, labels=labels,
                          protocol=protocol_differences(grid, load_grid("paper")))
    for name, table in report.tables.items():
        write_table(table, out, name)
    probe = probe_table(records, {env: get_env(env).covariate_names for env in sorted({r["env"] for r in records})})
    write_table(probe, out, "figure1_probe")
    figure1 = copy_factor_figures(client, records, out)
    profile = performance_profile(report, out / "performance_profile.png", labels)
    page = report_page(report, probe, unreadable, figure1, profile)
    if len(every) > len(records):  # the grid swept data sizes
        page += "\n" + efficiency_section(grid, every, random, out)
    (out / "report.md").write_text(page)
    parent = newest_parent_run(client, experiment.experiment_id)
    if parent is not None:
        client.log_artifacts(parent.info.run_id, str(out), artifact_path="report")
    return out / "report.md"
