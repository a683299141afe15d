"""``--dry-run``: trials and CPU-hours per stage of a grid, without starting Ray.

Each main-stage trial is costed by its algorithm's own ``cost`` (registry); an algorithm
without one is refused, never costed as another. The primitives and their assumptions are in
``persim_bench/costmodel.py``.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

from persim_bench.algos.persim import persim_fit_seconds
from persim_bench.algos.registry import ALGORITHMS
from persim_bench.config import Grid
from persim_bench.costmodel import dataset_seconds, measure_rate, policy_job_seconds
from persim_bench.data.dataset import DatasetError, dataset_dir, read_manifest
from persim_bench.data.policies import policy_jobs
from persim_bench.errors import GridError
from persim_bench.orchestration.trials import rank_cv_trials, main_trials


@dataclass
class StageEstimate:
    stage: str                  # "policies", "datasets", "rank_cv", "main"
    trials: int                 # Tune trials (policies: policy-training tasks; datasets: shards)
    cpu_hours: float
    by_algo: dict[str, float]   # cpu-hours per algorithm (main/rank_cv); {} otherwise


def dataset_rows(grid: Grid, env: str, regime: str, data_root: Path | None) -> int:
    """Transitions of a dataset: its manifest's count when it was made with this grid's sizes, else n_agents x cap."""
    cap = grid.data.episode_steps(env)
    if data_root is not None:
        try:
            manifest = read_manifest(dataset_dir(data_root, env, regime))
        except DatasetError:
            manifest = {}
        if (manifest.get("n_agents"), manifest.get("episode_steps")) == (grid.data.n_agents, cap):
            return int(manifest["rows"])
    return grid.data.n_agents * cap


def estimate(grid: Grid, rate: float | None = None, data_root: Path | None = None) -> list[StageEstimate]:
    """Trials and CPU-hours of every stage; ``rate`` (multiply-adds/s per core) is measured when None.

    Refuses (GridError) a grid with an algorithm whose registry entry has no cost function.
    """
    uncosted = [name for name in grid.algos if ALGORITHMS[name].cost is None]
    if uncosted:
        raise GridError(f"--dry-run: no cost function for {', '.join(uncosted)} (add `cost=` to its registry "
                        f"entry); narrow the grid with --algo to estimate the rest")
    rate = rate or measure_rate()
    jobs = policy_jobs(grid)
    shards, data_seconds = dataset_seconds(grid, rate)
    rows = {(env, regime): dataset_rows(grid, env, regime, data_root) for env in grid.envs for regime in grid.regimes}

    cv_trials = rank_cv_trials(grid)
    cv_hours = sum(persim_fit_seconds(grid, t.env, rows[t.env, t.regime], t.rank, grid.persim.cv_holdout, rate)
                   for t in cv_trials) / 3600
    # rank_cv has not picked yet: max(rank_grid) stands in for every pick (the dearest rank), which
    # also makes sweep_ranks count the len(rank_grid) trials it will run, not one more.
    picks = {(t.env, t.regime, t.seed): max(grid.persim.rank_grid) for t in cv_trials}
    by_algo: dict[str, float] = {}
    main = main_trials(grid, picks)
    for trial in main:
        data = rows.get((trial.env, trial.regime), 0)  # data-free algorithms (regime "none") read none
        hours = ALGORITHMS[trial.algo].cost(grid, trial, data, rate) / 3600
        by_algo[trial.algo] = by_algo.get(trial.algo, 0.0) + hours
    return [
        StageEstimate("policies", len(jobs), sum(policy_job_seconds(job, rate) for job in jobs) / 3600, {}),
        StageEstimate("datasets", shards, data_seconds / 3600, {}),
        StageEstimate("rank_cv", len(cv_trials), cv_hours, {"persim": cv_hours} if cv_trials else {}),
        StageEstimate("main", len(main), sum(by_algo.values()), by_algo),
    ]


def format_estimate(grid: Grid, stages: list[StageEstimate], rate: float | None = None) -> str:
    """A small aligned table: trials and CPU-hours per stage (main split by algorithm), the total, the assumptions."""
    row = "{:<16}{:>8}{:>14}".format
    lines = [f"grid {grid.name}: estimated cost (dry run)", row("stage", "trials", "CPU-hours")]
    for stage in stages:
        lines.append(row(stage.stage, stage.trials, f"{stage.cpu_hours:,.2f}"))
        if len(stage.by_algo) > 1:
            lines += [row(f"  {algo}", "", f"{hours:,.2f}") for algo, hours in stage.by_algo.items()]
    lines.append(row("total", sum(s.trials for s in stages), f"{sum(s.cpu_hours for s in stages):,.2f}"))
    at = f"{rate / 1e9:.0f} G" if rate else "the measured"
    lines += textwrap.wrap(
        f"Assumes: one core per trial at {at} multiply-adds/s, per-call and env-step costs measured on the 2-core "
        "dev machine; upper bounds: every episode runs to its cap, CaDM never stops early, nothing is cached; "
        "Ray, Tune and MLflow overheads not counted. Wall time ~ CPU-hours / CPUs of the cluster.", 100)
    return "\n".join(lines)
