"""PerSim's rank by cross-validation (the paper's protocol): the pick per env x regime, read back from MLflow.

The ``rank_cv`` stage fits PerSim at every rank of ``persim.rank_grid`` with a share of the
transitions held out (``algos.persim.cross_validate_rank``); here the held-out losses are read
back from MLflow and the smallest rank within ``1 + cv_tolerance`` of the lowest loss is chosen.
Their table and figure are ``analysis.grid_tables.rank_cv_table`` and ``analysis.grid_figures.rank_cv_figure``.
"""
from __future__ import annotations

from collections import defaultdict

from persim_bench.config import Grid


def rank_cv_losses(runs: list) -> dict[tuple[str, str, int], dict[int, float]]:
    """Held-out loss per rank of every finished rank_cv trial, by (env, regime, seed)."""
    losses: dict[tuple[str, str, int], dict[int, float]] = defaultdict(dict)
    for run in runs:
        if run.data.tags.get("stage") == "rank_cv" and run.info.status == "FINISHED":
            key = run.data.tags["env"], run.data.tags["regime"], int(run.data.tags["seed"])
            losses[key][int(run.data.params["rank"])] = run.data.metrics["val_loss"]
    return losses


def best_ranks(losses: dict[tuple[str, str, int], dict[int, float]], tolerance: float) -> dict[tuple[str, str, int], int]:
    """rank_cv's pick per (env, regime, seed) of ``rank_cv_losses``: the smallest rank within (1 + tolerance) x the
    lowest loss."""
    return {key: min(rank for rank, loss in per_rank.items() if loss <= (1 + tolerance) * min(per_rank.values()))
            for key, per_rank in losses.items()}


def choose_ranks(grid: Grid, tracking_uri: str, experiment_id: str, parent_run_id: str) -> dict[tuple[str, str, int], int]:
    """rank_cv's picks for this invocation, logged on the parent run (params ``rank.<env>.<regime>.s<seed>``)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([experiment_id], max_results=50000,
                              filter_string=f"tags.stage = 'rank_cv' and tags.`mlflow.parentRunId` = '{parent_run_id}'")
    chosen = best_ranks(rank_cv_losses(runs), grid.persim.cv_tolerance)
    params = [Param(f"rank.{env}.{regime}.s{seed}", str(rank)) for (env, regime, seed), rank in chosen.items()]
    existing = client.get_run(parent_run_id).data.params
    client.log_batch(parent_run_id, params=[p for p in params if p.key not in existing])
    return chosen
