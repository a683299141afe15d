"""The paper's Figure 1 (t-SNE of PerSim's learned agent factors, coloured by the hidden covariates)
and a number to go with it: how well a linear probe recovers each covariate from the factors.

Why the probe: Figure 1 is judged by eye ("the latent factors correspond closely with the
heterogeneity"); a cross-validated R^2 of a ridge regression from factors to each covariate says
the same thing as a number that can be compared across runs, ranks and regimes.
PerSim's ensemble has one agent encoder per member, so factors may come as [members, agents, r]:
members' factors are concatenated per agent (each member's basis is arbitrary, so they are not averaged).
``probe_table`` gathers the probe R^2 that PerSim's trials logged into the report's Figure 1 table.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from persim_bench.analysis.tabular import save_figure

MAX_PERPLEXITY = 30.0
EXACT_TSNE_MAX = 1000


def agent_matrix(factors) -> np.ndarray:
    """[agents, r] as is, or [members, agents, r] -> [agents, members * r]."""
    factors = np.asarray(factors, dtype=np.float64)
    if factors.ndim == 3:
        factors = np.concatenate(list(factors), axis=1)
    if factors.ndim != 2 or 0 in factors.shape:
        raise ValueError(f"factors must be [agents, r] or [members, agents, r], got shape {np.shape(factors)}")
    if not np.isfinite(factors).all():
        raise ValueError("factors contain NaN or infinity")
    return factors


def _covariates(covariates, n_agents: int) -> np.ndarray:
    covariates = np.asarray(covariates, dtype=np.float64)
    covariates = covariates[:, None] if covariates.ndim == 1 else covariates
    if covariates.ndim != 2 or covariates.shape[0] != n_agents:
        raise ValueError(f"covariates must be [agents={n_agents}, c], got shape {np.shape(covariates)}")
    return covariates


def perplexity_for(n_agents: int) -> float:
    """The paper-scale default (30) for 500 agents, capped below n_agents as t-SNE requires."""
    return float(min(MAX_PERPLEXITY, max(1.0, (n_agents - 1) / 3)))


def tsne_embedding(factors, seed: int = 0) -> np.ndarray:
    """[agents, 2] t-SNE of the (standardised) agent factors; deterministic for a seed."""
    from sklearn.manifold import TSNE

    x = agent_matrix(factors)
    if x.shape[0] < 3:
        raise ValueError(f"t-SNE needs at least 3 agents, got {x.shape[0]}")
    x = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    # Exact gradients up to EXACT_TSNE_MAX agents: measured here, faster than Barnes-Hut at that size
    # (500 agents: 13 s vs 37 s; 25 agents: 0.3 s vs 36 s) and without its approximation.
    method = "exact" if x.shape[0] <= EXACT_TSNE_MAX else "barnes_hut"
    return TSNE(n_components=2, perplexity=perplexity_for(x.shape[0]), init="pca", method=method,
                random_state=seed).fit_transform(x)


def tsne_figure(factors, covariates, covariate_names: Sequence[str], path: str | Path, seed: int = 0,
                title: str = "t-SNE of learned agent factors") -> Path:
    """PNG (and a PDF beside it) with one panel per covariate: the same 2-D embedding coloured by that covariate."""
    return save_figure(draw_tsne_figure(factors, covariates, covariate_names, seed, title), path)


def draw_tsne_figure(factors, covariates, covariate_names: Sequence[str], seed: int = 0,
                     title: str = "t-SNE of learned agent factors"):
    """The figure of ``tsne_figure``, unsaved; its title wrapped to the figure's width (one panel is narrow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from persim_bench.analysis.tabular import fit_text_width

    embedding = tsne_embedding(factors, seed)
    covariates = _covariates(covariates, embedding.shape[0])
    if len(covariate_names) != covariates.shape[1]:
        raise ValueError(f"{len(covariate_names)} covariate names for {covariates.shape[1]} covariates")
    fig, axes = plt.subplots(1, len(covariate_names), figsize=(4.2 * len(covariate_names), 3.8), squeeze=False,
                             layout="constrained")
    for ax, name, values in zip(axes[0], covariate_names, covariates.T):
        points = ax.scatter(embedding[:, 0], embedding[:, 1], c=values, cmap="viridis", s=12)
        fig.colorbar(points, ax=ax, label=name)
        ax.set(xticks=[], yticks=[])
        fit_text_width(fig, ax.set_title(f"coloured by {name}"), max_fraction=0.9 / len(covariate_names))
    fit_text_width(fig, fig.suptitle(title, fontsize="medium"))
    return fig


def probe_r2(factors, covariates, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Cross-validated R^2 per covariate of a ridge probe from agent factors to that covariate.

    Each fold's probe (standardised factors, ridge penalty chosen inside the training folds) is
    fitted on the other folds and predicts its held-out agents; R^2 is computed once on the pooled
    held-out predictions (steadier than averaging per-fold R^2 on small folds). About 1 means the
    covariate is a linear function of the factors; 0 or below means no better than its mean.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = agent_matrix(factors)
    y = _covariates(covariates, x.shape[0])
    folds = min(folds, x.shape[0])
    if folds < 2:
        raise ValueError(f"probe_r2 needs at least 2 agents and 2 folds, got {x.shape[0]} agents, {folds} folds")
    probe = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-4, 3, 15), alpha_per_target=True))
    predicted = cross_val_predict(probe, x, y, cv=KFold(folds, shuffle=True, random_state=seed))
    return np.asarray(r2_score(y, predicted.reshape(y.shape), multioutput="raw_values"))


def has_factor_probe(metrics: Mapping) -> bool:
    """Whether a trial learned agent factors (it then logs ``probe_r2_<covariate>``): PerSim's trials."""
    return any(key.startswith("probe_r2_") for key in metrics)


def probe_table(records: Iterable[Mapping], covariate_names: Mapping[str, Sequence[str]]) -> dict:
    """The paper's Figure 1 as numbers: cross-validated R^2 of a linear probe from PerSim's agent factors, per
    env x regime over seeds.

    ``records``: trials as the reproduction report takes them (``{"algo", "env", "regime", "metrics"}``, PerSim's
    with metrics ``probe_r2_<covariate>``); ``covariate_names``: each env's hidden covariates, in its order.
    """
    groups: dict[tuple[str, str], list[Mapping]] = defaultdict(list)
    for record in records:
        if has_factor_probe(record["metrics"]):
            groups[record["env"], record["regime"]].append(record["metrics"])
    rows = []
    for (env, regime), metrics in sorted(groups.items()):
        cells = []
        for name in covariate_names[env]:
            values = [m[f"probe_r2_{name}"] for m in metrics if f"probe_r2_{name}" in m]
            cells.append(f"{name}: {np.mean(values):.3f}" + (f" +- {np.std(values):.2g}" if len(values) > 1 else "")
                         if values else f"{name}: -")
        rows.append([env, regime, str(len(metrics)), "; ".join(cells)])
    return {"title": "Figure 1 as a number: cross-validated R^2 of a linear probe from PerSim's agent factors to "
                     "each hidden covariate (mean +- std over seeds; 1 = the factors carry it linearly)",
            "columns": ["env", "regime", "seeds", "probe R^2"], "rows": rows}
