"""``--dry-run``: trials and CPU-hours per stage of a grid, without starting Ray.

Each main-stage trial is costed by its algorithm's own ``cost`` (registry); an algorithm
without one is refused, never costed as another. The primitives and their assumptions are in
``persim_bench/costmodel.py``.
"""
from __future__ import annotations

import os

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from persim_bench.algos.registry import ALGORITHMS
from persim_bench.config import Grid
from persim_bench.contracts import Trial
from persim_bench.costmodel import dataset_seconds, measure_rate, policy_job_seconds
from persim_bench.data.dataset import DatasetError, dataset_dir, read_manifest
from persim_bench.data.policies import policy_jobs
from persim_bench.envs import get_env
from persim_bench.errors import GridError
from persim_bench.specs import per_env
from persim_bench.orchestration.trials import main_trials, pre_stages


# Multiply-adds/s of one trial on a reserved GPU, for --dry-run's GPU-hours (override: --gpu-rate). Not measured
# here (no GPU on the dev machine): an A100's fp32 dense peak is 19.5 TFLOP/s = 9.75e12 multiply-adds/s, and
# these small MLPs reach maybe 40 % of it, so 4e12. Per-call overheads (kernel launches) keep their CPU values.
DEFAULT_GPU_RATE = 4e12


@dataclass
class StageEstimate:
    stage: str                  # "policies", "datasets", "rank_cv", "main"
    trials: int                 # Tune trials (policies: policy-training tasks; datasets: shards)
    cpu_hours: float            # CPU-hours reserved (a GPU trial holds its CPUs while it runs)
    by_algo: dict[str, float]   # cpu-hours per algorithm (main/rank_cv); {} otherwise
    gpu_hours: float = 0.0      # GPU-hours reserved (hours x GPU share) by trials whose grid reserves a GPU
    by_algo_gpu: dict[str, float] = field(default_factory=dict)


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


def trial_rows(grid: Grid, trial: Trial, rows: int) -> int:
    """Transitions a trial reads of a dataset of ``rows``: a data-size cell's share of agents, each agent's
    trajectory (its mean length) cut at ``steps_per_agent``."""
    if trial.agents is not None:
        rows = rows * trial.agents // grid.data.n_agents
    if trial.steps_per_agent is not None:
        agents = trial.agents or grid.data.n_agents
        rows = min(rows, agents * trial.steps_per_agent)
    return rows


def estimate(grid: Grid, rate: float | None = None, data_root: Path | None = None,
             gpu_rate: float = DEFAULT_GPU_RATE) -> list[StageEstimate]:
    """Trials and CPU-hours (and GPU-hours where the grid reserves GPUs) of every stage.

    ``rate`` (multiply-adds/s per core) is measured when None. A trial that reserves a GPU is
    costed at ``gpu_rate``: its hours count as GPU-hours x its GPU share and CPU-hours x its CPUs.
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

    def reserved(key: str, seconds_at) -> tuple[float, float]:
        """(CPU-hours, GPU-hours) of a trial reserving ``grid.resources[key]``; ``seconds_at(rate)`` its cost."""
        wanted = grid.trial_resources(key)
        if wanted.gpu > 0:
            hours = seconds_at(gpu_rate) / 3600
            return hours * wanted.cpu, hours * wanted.gpu
        return seconds_at(rate) / 3600, 0.0

    before_main, picks = [], {}
    for pre_stage in pre_stages(grid):  # e.g. rank_cv
        trials = pre_stage.trials(grid)
        hours = [reserved(pre_stage.name, lambda r, t=t: pre_stage.cost(grid, t, rows[t.env, t.regime], r))
                 for t in trials]
        cpu, gpu = sum(c for c, _ in hours), sum(g for _, g in hours)
        algo = trials[0].algo if trials else ""
        before_main.append(StageEstimate(pre_stage.name, len(trials), cpu, {algo: cpu} if trials else {}, gpu,
                                         {algo: gpu} if gpu else {}))
        # Nothing is picked yet: the dearest pick stands in for every one (rank_cv: max(rank_grid), which also
        # makes sweep_ranks count the len(rank_grid) trials it will run, not one more).
        picks.update({(t.env, t.regime, t.seed): pre_stage.dearest(grid) for t in trials})
    by_algo: dict[str, float] = {}
    by_algo_gpu: dict[str, float] = {}
    main = main_trials(grid, picks)
    for trial in main:
        data = trial_rows(grid, trial, rows.get((trial.env, trial.regime), 0))  # data-free algorithms read none
        cost = ALGORITHMS[trial.algo].cost
        cpu, gpu = reserved(trial.algo, lambda r: cost(grid, trial, data, r))
        by_algo[trial.algo] = by_algo.get(trial.algo, 0.0) + cpu
        if gpu:
            by_algo_gpu[trial.algo] = by_algo_gpu.get(trial.algo, 0.0) + gpu
    return [
        StageEstimate("policies", len(jobs), sum(policy_job_seconds(job, rate) for job in jobs) / 3600, {}),
        StageEstimate("datasets", shards, data_seconds / 3600, {}),
        *before_main,
        StageEstimate("main", len(main), sum(by_algo.values()), by_algo, sum(by_algo_gpu.values()), by_algo_gpu),
    ]


GIB = 1024 ** 3
MAX_CPU_HOURS = 1000.0  # above this a grid runs only with --yes (the paper grid is about 9,800)


def machine_memory() -> int:
    """Bytes of memory on this machine (the driver; a cluster's nodes are checked by Ray itself)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def trial_memory(grid: Grid, data_root: Path | None = None) -> list[tuple[str, int]]:
    """(what, bytes) of the largest working sets a grid asks for: an upper bound, to refuse before compute.

    A trial holds its dataset about four times (Arrow, NumPy, torch, normalised), its reward
    episodes' state in lock-step (observations, plans of ``horizon`` actions, agents), and the
    prediction test's recorded trajectories; the data stage holds every agent's covariates and
    one shard per worker. The planner's own batch is bounded by ``planner.max_rows``.
    """
    spec = grid.evaluation
    found = []
    for env in grid.envs:
        family = get_env(env)
        width = family.n_actions or family.action_dim
        row = (2 * family.obs_dim + width + 4) * 4
        rows = max(dataset_rows(grid, env, regime, data_root) for regime in grid.regimes)
        found.append((f"{env}: dataset in a trial ({rows:,} transitions)", 4 * rows * row))
        horizon = per_env(grid.planner.horizon, env)
        episodes = max(spec.reward_episodes, spec.policy_reward_episodes) * len(spec.test_agents)
        found.append((f"{env}: {episodes:,} reward episodes in lock-step",
                       episodes * 8 * (4 * family.obs_dim + 2 * horizon * width + 32)))
        trajectories = spec.prediction_trajectories * len(spec.test_agents)
        found.append((f"{env}: {trajectories:,} prediction trajectories",
                       trajectories * (spec.prediction_steps + spec.burn_in + 1) * (family.obs_dim + width) * 8 * 4))
        shard = grid.data.agents_per_shard * grid.data.episode_steps(env) * row * 3
        found.append((f"{env}: data generation ({grid.data.n_agents:,} agents)",
                      grid.data.n_agents * (len(family.covariate_names) * 8 * 3 + 64) + shard))
    return found


def check_memory(grid: Grid, data_root: Path | None, memory: int | None = None) -> None:
    """Refuse (GridError) a grid whose largest working set exceeds this machine's memory (the CLI's --yes skips it)."""
    memory = memory or machine_memory()
    what, largest = max(trial_memory(grid, data_root), key=lambda item: item[1])
    if largest > 0.8 * memory:
        raise GridError(f"grid {grid.name!r}: {what} needs about {largest / GIB:,.1f} GiB, more than this machine's "
                        f"{memory / GIB:,.0f} GiB can hold; shrink the grid (or pass --yes on bigger nodes)")


def check_cost(grid: Grid, data_root: Path | None, max_cpu_hours: float = MAX_CPU_HOURS,
               rate: float | None = None) -> None:
    """Refuse (GridError) a grid whose estimated cost exceeds ``max_cpu_hours`` (the CLI's --yes skips it)."""
    hours = sum(stage.cpu_hours for stage in estimate(grid, rate, data_root))
    if hours > max_cpu_hours:
        raise GridError(f"grid {grid.name!r}: about {hours:,.0f} CPU-hours (estimated; --dry-run itemises it), "
                        f"above --max-cpu-hours {max_cpu_hours:,.0f}; pass --yes to run it anyway")


def format_estimate(grid: Grid, stages: list[StageEstimate], rate: float | None = None,
                    gpu_rate: float = DEFAULT_GPU_RATE) -> str:
    """A small aligned table: trials, CPU-hours (and GPU-hours) per stage (main split by algorithm), the assumptions."""
    gpus = any(s.gpu_hours for s in stages)
    row = ("{:<16}{:>8}{:>14}{:>14}" if gpus else "{:<16}{:>8}{:>14}{}").format
    gpu = lambda hours: f"{hours:,.2f}" if gpus else ""
    lines = [f"grid {grid.name}: estimated cost (dry run)", row("stage", "trials", "CPU-hours", "GPU-hours" if gpus else "")]
    for stage in stages:
        lines.append(row(stage.stage, stage.trials, f"{stage.cpu_hours:,.2f}", gpu(stage.gpu_hours)))
        if len(stage.by_algo) > 1:
            lines += [row(f"  {algo}", "", f"{hours:,.2f}", gpu(stage.by_algo_gpu.get(algo, 0.0)))
                      for algo, hours in stage.by_algo.items()]
    lines.append(row("total", sum(s.trials for s in stages), f"{sum(s.cpu_hours for s in stages):,.2f}",
                     gpu(sum(s.gpu_hours for s in stages))))
    at = f"{rate / 1e9:.0f} G" if rate else "the measured"
    gpu_note = (f" Trials reserving a GPU: computed at {gpu_rate / 1e12:g} T multiply-adds/s (--gpu-rate; a "
                f"documented guess, not measured), GPU-hours x their GPU share, CPU-hours x their CPUs." if gpus else "")
    lines += textwrap.wrap(
        f"Assumes: one core per trial at {at} multiply-adds/s, per-call and env-step costs measured on the 2-core "
        "dev machine; upper bounds: every episode runs to its cap, CaDM never stops early, nothing is cached; "
        "Ray, Tune and MLflow overheads not counted. Wall time ~ CPU-hours / CPUs of the cluster." + gpu_note, 100)
    return "\n".join(lines)
