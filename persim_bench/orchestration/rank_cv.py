"""PerSim's rank by cross-validation (the paper's protocol): the pick per env x regime, its table and figure.

The ``rank_cv`` stage fits PerSim at every rank of ``persim.rank_grid`` with a share of the
transitions held out (``algos.persim.cross_validate_rank``); here the held-out losses are read
back from MLflow and the smallest rank within ``1 + cv_tolerance`` of the lowest loss is chosen.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from persim_bench.analysis.tabular import save_figure
from persim_bench.config import Grid
from persim_bench.specs import REGIMES


def rank_cv_losses(runs: list) -> dict[tuple[str, str, int], dict[int, float]]:
    """Held-out loss per rank of every finished rank_cv trial, by (env, regime, seed)."""
    losses: dict[tuple[str, str, int], dict[int, float]] = defaultdict(dict)
    for run in runs:
        if run.data.tags.get("stage") == "rank_cv" and run.info.status == "FINISHED":
            key = run.data.tags["env"], run.data.tags["regime"], int(run.data.tags["seed"])
            losses[key][int(run.data.params["rank"])] = run.data.metrics["val_loss"]
    return losses


def best_ranks(runs: list, tolerance: float) -> dict[tuple[str, str, int], int]:
    """rank_cv's pick per (env, regime, seed): the smallest rank within (1 + tolerance) x the lowest loss."""
    return {key: min(rank for rank, loss in per_rank.items() if loss <= (1 + tolerance) * min(per_rank.values()))
            for key, per_rank in rank_cv_losses(runs).items()}


def rank_cv_table(runs: list, tolerance: float) -> dict:
    """Held-out loss per rank for every (env, regime, seed) cross-validated; the pick is starred."""
    chosen = best_ranks(runs, tolerance)
    losses = rank_cv_losses(runs)
    ranks = sorted({rank for per_rank in losses.values() for rank in per_rank})
    rows = [[env, regime, str(seed), str(chosen[env, regime, seed])] +
            [(f"{per_rank[r]:.4g}" + ("*" if r == chosen[env, regime, seed] else "")) if r in per_rank else "-"
             for r in ranks]
            for (env, regime, seed), per_rank in sorted(losses.items(), key=lambda item: (
                item[0][0], REGIMES.index(item[0][1]) if item[0][1] in REGIMES else 99, item[0][2]))]
    return {"title": f"Rank cross-validation: held-out loss (normalised-delta MSE) per rank; * = chosen "
                     f"(smallest rank within {1 + tolerance:g}x the lowest)",
            "columns": ["env", "regime", "seed", "chosen"] + [f"rank {r}" for r in ranks], "rows": rows}


def rank_cv_figure(table: dict, path: Path) -> None:
    """Held-out loss against rank, one panel per env, one line per regime (and seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [int(c.removeprefix("rank ")) for c in table["columns"][4:]]
    envs = sorted({row[0] for row in table["rows"]})
    fig, axes = plt.subplots(1, len(envs), figsize=(4.5 * len(envs), 3.5), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for row in (r for r in table["rows"] if r[0] == env):
            points = [(rank, float(v.rstrip("*"))) for rank, v in zip(ranks, row[4:]) if v != "-"]
            ax.plot(*zip(*points), marker="o", label=f"{row[1]} s{row[2]}")
        ax.set(title=env, xlabel="rank", ylabel="held-out loss", yscale="log")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def choose_ranks(grid: Grid, tracking_uri: str, experiment_id: str, parent_run_id: str) -> dict[tuple[str, str, int], int]:
    """rank_cv's picks for this invocation, logged on the parent run (params ``rank.<env>.<regime>.s<seed>``)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([experiment_id], max_results=50000,
                              filter_string=f"tags.stage = 'rank_cv' and tags.`mlflow.parentRunId` = '{parent_run_id}'")
    chosen = best_ranks(runs, grid.persim.cv_tolerance)
    params = [Param(f"rank.{env}.{regime}.s{seed}", str(rank)) for (env, regime, seed), rank in chosen.items()]
    existing = client.get_run(parent_run_id).data.params
    client.log_batch(parent_run_id, params=[p for p in params if p.key not in existing])
    return chosen
