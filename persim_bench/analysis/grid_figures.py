"""The figures of ``persim-bench tables``, drawn from its tables (``grid_tables``): reward bars and rank_cv losses."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from persim_bench.analysis.tabular import method_key_of, save_figure


def reward_figure(table: dict, path: Path, labels: Mapping[str, str]):
    """Bars of a reward table, one panel per regime: a group per test agent, a bar (mean, +- std whisker) per
    method, each method in its fixed colour (``analysis.tabular.method_colours``, the method found from its row
    label through ``labels``, {method key: label}) and one shared legend below.

    Rows without a regime (``-``: True env + MPC, which needs no offline data) are a reference drawn in every
    panel. Writes the PNG and a PDF beside it; returns the (closed) figure, for inspection.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from persim_bench.analysis.tabular import fit_text_width, method_colours

    agents = table["columns"][2:]
    regimes = list(dict.fromkeys(row[0] for row in table["rows"] if row[0] != "-")) or ["-"]
    shared = [row for row in table["rows"] if row[0] == "-"]
    methods = list(dict.fromkeys(row[1] for row in table["rows"]))
    colours = method_colours(method_key_of(m, labels) for m in methods)
    colour = {m: colours[method_key_of(m, labels)] for m in methods}

    n_columns = min(len(regimes), 2)
    n_rows = -(-len(regimes) // n_columns)
    per_panel = max(len(set(row[1] for row in table["rows"] if row[0] in (regime, "-"))) for regime in regimes)
    panel_width = max(5.0, 0.9 * len(agents) * max(1.0, per_panel * 0.22))
    fig, axes = plt.subplots(n_rows, n_columns, figsize=(panel_width * n_columns, 3.2 * n_rows + 0.8),
                             squeeze=False, sharey=True, layout="constrained")
    for extra in axes.flat[len(regimes):]:
        fig.delaxes(extra)
    x = np.arange(len(agents))
    for ax, regime in zip(axes.flat, regimes):
        rows = [row for row in table["rows"] if row[0] == regime] + (shared if regime != "-" else [])
        width = 0.8 / max(1, len(rows))
        for i, row in enumerate(rows):
            means = [_reward_cell(cell)[0] for cell in row[2:]]
            errors = [_reward_cell(cell)[1] for cell in row[2:]]
            ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=errors, color=colour[row[1]],
                   error_kw={"elinewidth": 0.8, "capsize": 1.5}, label=row[1])
        ax.set_xticks(x, [a.replace(", ", "\n") for a in agents], fontsize=8)
        ax.set_title("no offline data" if regime == "-" else f"regime: {regime}", fontsize=9)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(axis="y", linewidth=0.3, alpha=0.5)
    for ax in axes[:, 0]:
        ax.set_ylabel("reward")
    handles = [Patch(facecolor=colour[m], label=m) for m in methods]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(methods), 5), fontsize=8, frameon=False)
    fit_text_width(fig, fig.suptitle(table["title"], fontsize=9))
    save_figure(fig, path)
    return fig


def _reward_cell(cell: str) -> tuple[float, float]:
    """``"mean +- std"`` or ``"mean"`` (one seed) -> (mean, std)."""
    mean, _, std = cell.partition(" +- ")
    return float(mean), float(std) if std else 0.0


def rank_cv_figure(table: dict, path: Path) -> None:
    """Held-out loss against rank from ``grid_tables.rank_cv_table``: one panel per env, one line per regime
    (and seed)."""
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
