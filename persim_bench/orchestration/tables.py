"""MLflow -> the paper's tables: prediction error (Tables 2-4) and reward (Tables 5-7) per env.

Reads every trial run of the grid's experiment, keeps the latest run of each trial name (so
narrowed or repeated invocations add up), and writes Markdown, CSV and LaTeX to
``results/<grid>/``, also logged as artifacts on the newest parent run.
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from persim_bench.contracts import Trial
from persim_bench.analysis.tabular import save_figure, to_markdown, write_table
from persim_bench.algos.registry import ALGORITHMS
from persim_bench.config import Grid
from persim_bench.data.dataset import MANIFEST, DatasetError, dataset_dir, policy_root, read_dataset
from persim_bench.data.generate import dataset_plan
from persim_bench.data.policies import policy_label
from persim_bench.envs import get_env
from persim_bench.orchestration.guard import inside
from persim_bench.orchestration.rank_cv import rank_cv_figure, rank_cv_table
from persim_bench.orchestration.tracking import grid_experiment, latest_trial_runs, newest_parent_run
from persim_bench.specs import REGIMES


def agent_label(env: str, agent: int) -> str:
    family = get_env(env)
    values = family.test_agents[agent]
    return ", ".join(f"{n}={v:g}" for n, v in zip(family.covariate_names, values))


def method_key(run) -> str:
    """The table row a run belongs to: its algorithm, or ``persim@r<rank>`` for the full grid's rank sweep."""
    if run.data.params.get("rank_source") == "sweep":
        return f"persim@r{run.data.params['rank']}"
    return run.data.tags["algo"]


def method_label(key: str) -> str:
    algo, _, rank = key.partition("@r")
    label = ALGORITHMS[algo].label if algo in ALGORITHMS else algo
    return label + (f" (rank {rank})" if rank else "")


def _row_order(key: tuple[str, str], methods: list[str]) -> tuple:
    """Regimes in the paper's order, then methods in the grid's order, PerSim's rank sweep after PerSim."""
    regime, method = key
    algo, _, rank = method.partition("@r")
    return REGIMES.index(regime) if regime in REGIMES else len(REGIMES), _order(algo, methods), int(rank or 0)


def build_tables(runs: list, grid: Grid) -> dict[str, dict]:
    """{table name: {"columns": [...], "rows": [[...], ...]}} for every env of the grid."""
    agents = grid.evaluation.test_agents
    tables = {}
    for env in grid.envs:
        groups: dict[tuple[str, str], list] = defaultdict(list)
        for run in runs:
            tags = run.data.tags
            if tags.get("env") == env and run.info.status == "FINISHED" and tags.get("stage", "main") == "main":
                groups[tags["regime"], method_key(run)].append(run.data.metrics)
        columns = ["regime", "method"] + [agent_label(env, a) for a in agents]
        prediction, reward = [], []
        for key in sorted(groups, key=lambda k: _row_order(k, grid.algos)):
            regime, algo = key
            seeds = groups[key]
            label = [regime if regime != "none" else "-", method_label(algo)]
            if all(f"rmse_agent{a}" in m for m in seeds for a in agents):
                prediction.append(label + [
                    f"{_mean(seeds, f'rmse_agent{a}'):.4g} ({_mean(seeds, f'r2_agent{a}'):.3f})" for a in agents])
            if all(f"reward_agent{a}" in m for m in seeds for a in agents):
                reward.append(label + [_mean_std(seeds, f"reward_agent{a}") for a in agents])
        tables[f"prediction_{env}"] = {"title": f"Prediction error, {env}: mean RMSE (median R^2) over "
                                                f"{grid.evaluation.prediction_steps}-step open-loop predictions",
                                       "columns": columns, "rows": prediction}
        tables[f"reward_{env}"] = {"title": f"Reward, {env}: mean +- std over seeds of the mean over "
                                            f"{grid.evaluation.reward_episodes} episodes (model-free: "
                                            f"{grid.evaluation.policy_reward_episodes})",
                                   "columns": columns, "rows": reward}
    return tables


def _mean(metrics: list[dict], key: str) -> float:
    values = [m[key] for m in metrics if not math.isnan(m[key])]
    return float(np.mean(values)) if values else float("nan")


def _mean_std(metrics: list[dict], key: str) -> str:
    values = [m[key] for m in metrics]
    return f"{np.mean(values):.4g} +- {np.std(values):.3g}" if len(values) > 1 else f"{values[0]:.4g}"


def cost_table(runs: list, grid: Grid, data_root: Path, rate: float | None = None) -> dict:
    """Estimated (``--dry-run``'s model) vs measured CPU-seconds per main trial, by algorithm x env.

    Measured = wall seconds x CPUs the trial reserved; the phase split and the model's achieved
    multiply-adds/s come from the trial's own metrics.
    """
    from persim_bench.costmodel import measure_rate
    from persim_bench.orchestration.estimate import dataset_rows

    rate = rate or measure_rate()
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for run in runs:
        tags = run.data.tags
        if run.info.status == "FINISHED" and tags.get("stage") == "main" and "seconds_total" in run.data.metrics:
            groups[tags["algo"], tags["env"]].append(run)
    rows = []
    manifest_rows = functools.cache(lambda env, regime: dataset_rows(grid, env, regime, data_root)
                                    if regime != "none" else 0)
    for (algo, env), group in sorted(groups.items(), key=lambda item: (_order(item[0][0], grid.algos), item[0][1])):
        cpus = grid.trial_resources(algo).cpu
        measured = [r.data.metrics["seconds_total"] * cpus for r in group]
        cost = ALGORITHMS[algo].cost if algo in ALGORITHMS else None
        estimated = []
        for run in group if cost is not None else []:
            trial = Trial(stage="main", algo=algo, env=env, regime=run.data.tags["regime"],
                          seed=int(run.data.tags["seed"]), rank=int(run.data.params["rank"]) if "rank" in run.data.params else None)
            estimated.append(cost(grid, trial, manifest_rows(env, trial.regime), rate))
        phases = {p: np.mean([r.data.metrics.get(f"seconds_{p}", 0.0) for r in group])
                  for p in ("load", "fit", "prediction", "reward")}
        macs = [r.data.metrics["model_macs_per_second"] for r in group if "model_macs_per_second" in r.data.metrics]
        devices = sorted({r.data.tags.get("device", "cpu") for r in group})
        est = float(np.mean(estimated)) if estimated else float("nan")
        rows.append([method_label(algo), env, str(len(group)), f"{est:.4g}", f"{np.mean(measured):.4g}",
                     f"{np.mean(measured) / est:.2f}" if estimated else "-",
                     " / ".join(f"{phases[p]:.3g}" for p in phases),
                     f"{np.mean(macs) / 1e9:.3g}" if macs else "-", ",".join(devices)])
    return {"title": f"Cost per main trial: estimated (--dry-run model, {rate / 1e9:.0f} G multiply-adds/s per core) vs "
                     f"measured CPU-seconds (wall x reserved CPUs); phases in wall seconds",
            "columns": ["method", "env", "trials", "estimated s", "measured s", "measured / estimated",
                        "load / fit / prediction / reward s", "model G multiply-adds/s", "device"],
            "rows": rows}


def _order(algo: str, algos: list[str]) -> int:
    return algos.index(algo) if algo in algos else len(algos)


def failed_trials(runs: list) -> list[str]:
    return sorted(f"{r.data.tags['trial']}: {r.data.tags.get('error', 'no error recorded')}"
                  for r in runs if r.info.status == "FAILED")


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


def dataset_table(summaries: dict[tuple[str, str], dict], n_agents: int) -> dict:
    """Paper Table 8 from ``dataset_summaries``; an unreadable dataset is a row saying why."""
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


def policy_table(headers: dict) -> dict:
    rows = [[h["env"], policy_label(h["role"], h.get("regime"), h["index"]), ", ".join(f"{c:g}" for c in h["covariates"]), h["algorithm"],
             f"{h.get('env_steps', h['budget']):,} of {h['budget']:,}", _chosen(h),
             f"{h['achieved_return']:.4g} +- {h['achieved_return_std']:.3g}", f"{h['train_seconds']:.0f}"]
            for h in sorted(headers.values(), key=lambda h: (h["env"], h["role"], h.get("regime") or "", h["index"]))]
    return {"title": "Trained policies: return on its own agent, greedy (a regime's own logging policy: acting "
                     "as the regime acts) (the checkpoint kept: its env steps and return when chosen, and the "
                     "target it was chosen for)",
            "columns": ["env", "policy", "covariates", "algorithm", "env steps of budget", "checkpoint kept",
                        "achieved return", "train s"],
            "rows": rows}


def _chosen(header: dict) -> str:
    if header.get("chosen_checkpoint") is None or not header.get("checkpoints"):
        return "final"
    steps, value = header["checkpoints"][header["chosen_checkpoint"]]
    target = header.get("target_return")
    return f"{steps:,} steps: {value:.4g}" + (f" (target {target:g}, {header.get('target_rule')})" if target is not None else " (best)")


def method_key_of(label: str) -> str:
    """The inverse of ``method_label``: ``"PerSim (rank 4)"`` -> ``persim@r4``; an unknown label is its own key."""
    algo, rank = label, ""
    if label.endswith(")") and " (rank " in label:
        algo, _, rank = label[:-1].rpartition(" (rank ")
    key = next((name for name, a in ALGORITHMS.items() if a.label == algo), algo)
    return key + (f"@r{rank}" if rank else "")


def reward_figure(table: dict, path: Path):
    """Bars of a reward table, one panel per regime: a group per test agent, a bar (mean, +- std whisker) per
    method, each method in its fixed colour (``analysis.tabular.method_colours``) and one shared legend below.

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
    colours = method_colours(method_key_of(m) for m in methods)
    colour = {m: colours[method_key_of(m)] for m in methods}

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


def write_policy_table(headers: dict, out: Path) -> None:
    write_table(policy_table(headers), out, "policies")


def write_tables(grid: Grid, tracking_uri: str, results: Path, data_root: Path) -> Path:
    """Write every table of the grid to results/<grid>/ and log them on the newest parent run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = grid_experiment(client, grid, tracking_uri)
    runs = latest_trial_runs(client, experiment.experiment_id)
    out = inside(results, results / grid.name)
    out.mkdir(parents=True, exist_ok=True)
    summaries = dataset_summaries(grid, data_root, policy_root(results))
    tables = {"datasets": dataset_table(summaries, grid.data.n_agents), **build_tables(runs, grid),
              "costs": cost_table(runs, grid, data_root)}
    if any(run.data.tags.get("stage") == "rank_cv" for run in runs):
        tables["rank_cv"] = rank_cv_table(runs, grid.persim.cv_tolerance)
        if tables["rank_cv"]["rows"]:
            rank_cv_figure(tables["rank_cv"], out / "rank_cv.png")
    summary = [f"# {grid.name}: tables\n"]
    if (out / "policies.md").exists():
        summary.append((out / "policies.md").read_text())
    for name, table in tables.items():
        write_table(table, out, name)
        summary.append(to_markdown(table))
        if name.startswith("reward_") and table["rows"]:
            reward_figure(table, out / f"{name}.png")
            summary.append(f"![{name}]({name}.png) ([PDF]({name}.pdf))\n")
    failures = failed_trials(runs)
    if failures:
        summary.append("**Failed trials**\n\n" + "\n".join(f"- {line}" for line in failures) + "\n")
    (out / "tables.md").write_text("\n".join(summary))
    parent = newest_parent_run(client, experiment.experiment_id)
    if parent is not None:
        client.log_artifacts(parent.info.run_id, str(out), artifact_path="tables")
    return out
