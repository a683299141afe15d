"""The tables of ``persim-bench tables``, built from plain records of a grid's trials.

Orchestration fetches (MLflow runs, dataset summaries, policy headers) and turns them into the records
below; this module turns records into tables ({"title", "columns", "rows"} of strings, written by
``tabular.write_table``) and the Markdown page ``tables.md``:

- ``per_env_tables``: prediction error (the paper's Tables 2-4) and reward (Tables 5-7), per env;
- ``cost_table``: estimated vs measured CPU-seconds per main trial;
- ``dataset_table``: the offline data (Table 8); ``policy_table``: the trained policies;
- ``rank_cv_table``: PerSim's held-out loss per rank and the rank chosen.

Nothing here knows the grid file, the algorithm registry or MLflow: what a table needs of them (method
labels, the grid's method order, the test agents' column labels, ...) comes in a ``GridLayout``.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from persim_bench.analysis.tabular import method_label, to_markdown


@dataclass(frozen=True)
class GridLayout:
    """What the grid tables show of a grid, as plain values (orchestration fills it from the grid and registry)."""

    envs: tuple[str, ...]
    test_agents: tuple[int, ...]
    agent_columns: Mapping[str, tuple[str, ...]]  # env -> one column label per test agent ("length=0.5, force=10")
    methods: tuple[str, ...]  # the grid's algorithms in its order: rows follow it (others after)
    regimes: tuple[str, ...]  # the regimes in the paper's order: rows follow it (others, and "none", after)
    labels: Mapping[str, str]  # method key -> label, the algorithm registry's
    prediction_steps: int
    reward_episodes: int
    policy_reward_episodes: int


@dataclass(frozen=True)
class TrialRecord:
    """One trial's run as the grid tables read it: its tags, rank parameters and final metrics."""

    trial: str
    status: str  # MLflow's run status: FINISHED, FAILED, RUNNING, KILLED
    stage: str | None  # "main" or "rank_cv"; None (untagged) counts as main
    algo: str | None
    env: str | None
    regime: str | None
    rank: int | None = None
    rank_source: str | None = None  # PerSim: "cv", "pinned" or "sweep" (a row of its own per rank)
    error: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    data_size: bool = False  # a data-size cell's trial (a subset of the data): in the efficiency curves, not here

    @property
    def method(self) -> str:
        """The table row it belongs to: its algorithm, or ``persim@r<rank>`` for the full grid's rank sweep."""
        return f"persim@r{self.rank}" if self.rank_source == "sweep" else self.algo


@dataclass(frozen=True)
class CostRecord:
    """One finished main trial's cost: CPUs it reserved, the cost model's estimate, its timing metrics."""

    algo: str
    env: str
    cpus: float
    estimated_seconds: float | None  # None: the algorithm has no cost model
    device: str
    metrics: Mapping[str, float]  # seconds_total, seconds_<phase>, model_macs_per_second (if measured)


# ---------------------------------------------------------------------------------------- ordering

def _method_position(algo: str, algos: Sequence[str]) -> int:
    return algos.index(algo) if algo in algos else len(algos)


def _row_order(key: tuple[str, str], layout: GridLayout) -> tuple:
    """Regimes in the paper's order, then methods in the grid's order, PerSim's rank sweep after PerSim."""
    regime, method = key
    algo, _, rank = method.partition("@r")
    regimes = layout.regimes
    return (regimes.index(regime) if regime in regimes else len(regimes), _method_position(algo, layout.methods),
            int(rank or 0))


# ---------------------------------------------------------------------------------------- per env

def per_env_tables(records: Iterable[TrialRecord], layout: GridLayout) -> dict[str, dict]:
    """{"prediction_<env>": table, "reward_<env>": table} for every env of the grid, from its finished main trials.

    A row is a (regime, method) over seeds; a table leaves out a row whose seeds lack one of its metrics."""
    records = list(records)
    agents = layout.test_agents
    tables = {}
    for env in layout.envs:
        groups: dict[tuple[str, str], list] = defaultdict(list)
        for record in records:
            if (record.env == env and record.status == "FINISHED" and record.stage in (None, "main")
                    and not record.data_size):
                groups[record.regime, record.method].append(record.metrics)
        columns = ["regime", "method"] + list(layout.agent_columns[env])
        prediction, reward = [], []
        for key in sorted(groups, key=lambda k: _row_order(k, layout)):
            regime, method = key
            seeds = groups[key]
            label = [regime if regime != "none" else "-", method_label(method, layout.labels)]
            if all(f"rmse_agent{a}" in m for m in seeds for a in agents):
                prediction.append(label + [
                    f"{_mean(seeds, f'rmse_agent{a}'):.4g} ({_mean(seeds, f'r2_agent{a}'):.3f})" for a in agents])
            if all(f"reward_agent{a}" in m for m in seeds for a in agents):
                reward.append(label + [_mean_std(seeds, f"reward_agent{a}") for a in agents])
        tables[f"prediction_{env}"] = {"title": f"Prediction error, {env}: mean RMSE (median R^2) over "
                                                f"{layout.prediction_steps}-step open-loop predictions",
                                       "columns": columns, "rows": prediction}
        tables[f"reward_{env}"] = {"title": f"Reward, {env}: mean +- std over seeds of the mean over "
                                            f"{layout.reward_episodes} episodes (model-free: "
                                            f"{layout.policy_reward_episodes})",
                                   "columns": columns, "rows": reward}
    return tables


def _mean(metrics: list[Mapping], key: str) -> float:
    values = [m[key] for m in metrics if not math.isnan(m[key])]
    return float(np.mean(values)) if values else float("nan")


def _mean_std(metrics: list[Mapping], key: str) -> str:
    values = [m[key] for m in metrics]
    return f"{np.mean(values):.4g} +- {np.std(values):.3g}" if len(values) > 1 else f"{values[0]:.4g}"


def failed_trials(records: Iterable[TrialRecord]) -> list[str]:
    """``"<trial>: <error>"`` for every failed trial, sorted."""
    return sorted(f"{r.trial}: {r.error if r.error is not None else 'no error recorded'}"
                  for r in records if r.status == "FAILED")


# ---------------------------------------------------------------------------------------- cost

PHASES = ("load", "fit", "prediction", "reward")


def cost_table(records: Iterable[CostRecord], layout: GridLayout, rate: float) -> dict:
    """Estimated (``--dry-run``'s model at ``rate`` multiply-adds/s per core) vs measured CPU-seconds per main
    trial, by algorithm x env.

    Measured = wall seconds x CPUs the trial reserved; the phase split and the model's achieved
    multiply-adds/s come from the trial's own metrics.
    """
    groups: dict[tuple[str, str], list[CostRecord]] = defaultdict(list)
    for record in records:
        groups[record.algo, record.env].append(record)
    rows = []
    for (algo, env), group in sorted(groups.items(), key=lambda item: (_method_position(item[0][0], layout.methods),
                                                                       item[0][1])):
        measured = [r.metrics["seconds_total"] * r.cpus for r in group]
        estimated = [r.estimated_seconds for r in group if r.estimated_seconds is not None]
        phases = {p: np.mean([r.metrics.get(f"seconds_{p}", 0.0) for r in group]) for p in PHASES}
        macs = [r.metrics["model_macs_per_second"] for r in group if "model_macs_per_second" in r.metrics]
        devices = sorted({r.device for r in group})
        est = float(np.mean(estimated)) if estimated else float("nan")
        rows.append([method_label(algo, layout.labels), env, str(len(group)), f"{est:.4g}", f"{np.mean(measured):.4g}",
                     f"{np.mean(measured) / est:.2f}" if estimated else "-",
                     " / ".join(f"{phases[p]:.3g}" for p in phases),
                     f"{np.mean(macs) / 1e9:.3g}" if macs else "-", ",".join(devices)])
    return {"title": f"Cost per main trial: estimated (--dry-run model, {rate / 1e9:.0f} G multiply-adds/s per core) vs "
                     f"measured CPU-seconds (wall x reserved CPUs); phases in wall seconds",
            "columns": ["method", "env", "trials", "estimated s", "measured s", "measured / estimated",
                        "load / fit / prediction / reward s", "model G multiply-adds/s", "device"],
            "rows": rows}


# ---------------------------------------------------------------------------------------- data and policies

def dataset_table(summaries: Mapping[tuple[str, str], Mapping], n_agents: int) -> dict:
    """Paper Table 8 from dataset summaries, {(env, regime): {"test_returns": [5 returns], "mean_return",
    "mean_length"} or {"error": why it could not be read}}; an unreadable dataset is a row saying why."""
    rows = []
    for (env, regime), s in summaries.items():
        if "error" in s:
            rows.append([env, regime, f"unreadable: {s['error']}", "", "", "", "", "", ""])
        else:
            rows.append([env, regime, *(f"{r:.4g}" for r in s["test_returns"]), f"{s['mean_return']:.4g}",
                         f"{s['mean_length']:.1f}"])
    return {"title": f"Offline data (Table 8): observed return of test agents 0-4, mean return and mean "
                     f"trajectory length over all {n_agents} agents",
            "columns": ["env", "regime", "agent 0", "agent 1", "agent 2", "agent 3", "agent 4", "mean return",
                        "mean length"],
            "rows": rows}


def policy_table(policies: Iterable[tuple[str, Mapping]]) -> dict:
    """The trained policies from (policy label, policy file header) pairs, by env, role, regime and index."""
    rows = [[h["env"], label, ", ".join(f"{c:g}" for c in h["covariates"]), h["algorithm"],
             f"{h.get('env_steps', h['budget']):,} of {h['budget']:,}", _chosen(h),
             f"{h['achieved_return']:.4g} +- {h['achieved_return_std']:.3g}", f"{h['train_seconds']:.0f}"]
            for label, h in sorted(policies, key=lambda p: (p[1]["env"], p[1]["role"], p[1].get("regime") or "",
                                                            p[1]["index"]))]
    return {"title": "Trained policies: return on its own agent, greedy (a regime's own logging policy: acting "
                     "as the regime acts) (the checkpoint kept: its env steps and return when chosen, and the "
                     "target it was chosen for)",
            "columns": ["env", "policy", "covariates", "algorithm", "env steps of budget", "checkpoint kept",
                        "achieved return", "train s"],
            "rows": rows}


def _chosen(header: Mapping) -> str:
    if header.get("chosen_checkpoint") is None or not header.get("checkpoints"):
        return "final"
    steps, value = header["checkpoints"][header["chosen_checkpoint"]]
    target = header.get("target_return")
    return f"{steps:,} steps: {value:.4g}" + (f" (target {target:g}, {header.get('target_rule')})" if target is not None else " (best)")


# ---------------------------------------------------------------------------------------- rank cross-validation

def rank_cv_table(losses: Mapping[tuple[str, str, int], Mapping[int, float]],
                  chosen: Mapping[tuple[str, str, int], int], tolerance: float, regimes: Sequence[str]) -> dict:
    """Held-out loss per rank for every (env, regime, seed) cross-validated; the chosen rank is starred.

    ``losses``: {(env, regime, seed): {rank: held-out loss}}; ``chosen``: the rank picked for each key, within
    ``1 + tolerance`` of its lowest loss; rows by env, then ``regimes``' order, then seed."""
    ranks = sorted({rank for per_rank in losses.values() for rank in per_rank})
    rows = [[env, regime, str(seed), str(chosen[env, regime, seed])] +
            [(f"{per_rank[r]:.4g}" + ("*" if r == chosen[env, regime, seed] else "")) if r in per_rank else "-"
             for r in ranks]
            for (env, regime, seed), per_rank in sorted(losses.items(), key=lambda item: (
                item[0][0], regimes.index(item[0][1]) if item[0][1] in regimes else 99, item[0][2]))]
    return {"title": f"Rank cross-validation: held-out loss (normalised-delta MSE) per rank; * = chosen "
                     f"(smallest rank within {1 + tolerance:g}x the lowest)",
            "columns": ["env", "regime", "seed", "chosen"] + [f"rank {r}" for r in ranks], "rows": rows}


# ---------------------------------------------------------------------------------------- tables.md

def has_reward_figure(name: str, table: Mapping) -> bool:
    """A reward table with rows gets a bar figure (``grid_figures.reward_figure``) named after it."""
    return name.startswith("reward_") and bool(table["rows"])


def tables_page(grid_name: str, tables: Mapping[str, dict], failures: Sequence[str],
                policies_markdown: str | None = None) -> str:
    """``tables.md``: the policy table's Markdown (if the grid trained policies), every table with its reward
    figure linked, and the failed trials."""
    summary = [f"# {grid_name}: tables\n"]
    if policies_markdown is not None:
        summary.append(policies_markdown)
    for name, table in tables.items():
        summary.append(to_markdown(table))
        if has_reward_figure(name, table):
            summary.append(f"![{name}]({name}.png) ([PDF]({name}.pdf))\n")
    if failures:
        summary.append("**Failed trials**\n\n" + "\n".join(f"- {line}" for line in failures) + "\n")
    return "\n".join(summary)
