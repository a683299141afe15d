"""The data-efficiency experiment: how a method's prediction error and reward scale with the number of training
agents N and the transitions kept per agent k.

A pure builder, like ``reproduction``: plain records in; points, a table ({"title", "columns", "rows"} of strings,
written by ``tabular.write_table``), figures and plain-English findings out.

Inputs:
- ``records``: finished trials, ``{"algo", "env", "regime", "seed", "agents", "steps_per_agent", "metrics"}``;
  ``agents`` (N) and ``steps_per_agent`` (k, the first k transitions of each agent's trajectory) are ``None`` (or
  absent) for the full dataset. Metrics: ``rmse_agent{a}``, ``reward_agent{a}`` per test agent and, for PerSim-like
  runs, ``probe_r2_<covariate>``. At most one record per (algo, env, regime, N, k, seed).
- ``random_scores``: {(env, test agent): a uniformly random policy's mean return} (an ``env`` key serves every
  agent of that env); with the reference method's reward it fixes the normalised reward's scale.
- ``labels``: {method key: label}, the algorithm registry's; an unlabelled method shows its key.

Order: points, table rows and figure lines follow env and regime alphabetically, then the methods in the order
they first appear in the records (the caller's grid order; pass the focus first to see it first), then N, then k
(all = ``None`` last).
"""
from __future__ import annotations

import math
import numbers
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from persim_bench.analysis.stats import DEFAULT_BOOT, bootstrap_ci, normalise
from persim_bench.analysis.tabular import method_colours, method_label, save_figure, to_markdown

PROBE_PREFIX = "probe_r2_"


@dataclass(frozen=True)
class EfficiencyPoint:
    """One method at one data budget (N agents, k transitions per agent) of an env and regime, over seeds.

    ``rmse`` and ``reward`` (normalised: 0 = random policy, 1 = the reference) are means over seeds of the mean
    over test agents, with a 95% two-level bootstrap CI (seeds, then test agents); NaN where no seed has a value.
    ``probe_r2``: {covariate: mean over seeds of the linear probe's R^2}, empty for methods without factors."""

    env: str
    regime: str
    algo: str
    agents: int
    steps_per_agent: int | None  # None: every transition
    seeds: int
    rmse: float
    rmse_low: float
    rmse_high: float
    reward: float
    reward_low: float
    reward_high: float
    probe_r2: Mapping[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- points

def _finite(value) -> bool:
    """A usable metric: a real number (numpy scalars too) that is not NaN or infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _k_order(k: int | None) -> tuple:
    """All transitions (None) after every finite k."""
    return (k is None, k if k is not None else 0)


def _check_records(records: Iterable[Mapping], full_agents: int) -> list[Mapping]:
    """Fail early, naming the record, rather than silently double-counting a trial (agents None and agents =
    full_agents are the same budget)."""
    records, seen = list(records), {}
    for index, record in enumerate(records):
        missing = {"algo", "env", "regime", "seed", "metrics"} - set(record)
        if missing:
            raise ValueError(f"record {index}: missing {', '.join(sorted(missing))}")
        key = (record["algo"], record["env"], record["regime"], _agents(record, full_agents),
               record.get("steps_per_agent"), int(record["seed"]))
        if key in seen:
            raise ValueError(f"records {seen[key]} and {index}: both are {key} (pass one record per trial)")
        seen[key] = index
    return records


def _agents(record: Mapping, full_agents: int) -> int:
    return int(record["agents"]) if record.get("agents") is not None else int(full_agents)


def _random_score(random_scores: Mapping, env: str, agent: int) -> float | None:
    for key in ((env, agent), env):
        if key in random_scores:
            return float(random_scores[key])
    return None


def _reference_rewards(records: list[Mapping], reference: str, test_agents: Sequence[int]
                       ) -> tuple[dict[tuple[str, int, int], float], dict[tuple[str, int], float]]:
    """({(env, agent, seed): reward}, {(env, agent): mean over seeds}) of the reference. It needs no data, so its
    regime, N and k are ignored (several records of one seed are averaged)."""
    per_seed: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    for record in records:
        if record["algo"] == reference:
            for agent in test_agents:
                value = record["metrics"].get(f"reward_agent{agent}")
                if _finite(value):
                    per_seed[record["env"], agent, int(record["seed"])].append(float(value))
    same_seed = {key: float(np.mean(values)) for key, values in per_seed.items()}
    by_agent: dict[tuple[str, int], list[float]] = defaultdict(list)
    for (env, agent, _), value in same_seed.items():
        by_agent[env, agent].append(value)
    return same_seed, {key: float(np.mean(values)) for key, values in by_agent.items()}


def _normalised(value: float, env: str, agent: int, seed: int, random_scores: Mapping,
                same_seed: Mapping, mean_reference: Mapping) -> float:
    """The reward on the 0 = random, 1 = reference scale, against the reference of the same seed (the same
    evaluation seeds, so their noise cancels); its mean over seeds where that seed has none; NaN without either
    or a random score, or where reference and random coincide (no scale)."""
    low = _random_score(random_scores, env, agent)
    high = same_seed.get((env, agent, seed), mean_reference.get((env, agent)))
    if low is None or high is None or high == low:
        return math.nan
    return float(normalise(value, low, high))


def _interval(groups: list[list[float]], n_boot: int, seed: int) -> tuple[float, float, float]:
    """(mean, low, high) over the seeds with at least one finite value; all NaN if none has."""
    groups = [[v for v in group if math.isfinite(v)] for group in groups]
    groups = [group for group in groups if group]
    return bootstrap_ci(groups, n_boot, seed) if groups else (math.nan, math.nan, math.nan)


def _point_seed(seed: int, key: tuple) -> int:
    """One bootstrap stream per point and quantity, independent of the records' order."""
    return seed * 1_000_003 + zlib.crc32(repr(key).encode())


def efficiency_points(records: Iterable[Mapping], full_agents: int, test_agents: Sequence[int],
                      random_scores: Mapping, reference: str = "true_env_mpc", seed: int = 0, *,
                      n_boot: int = DEFAULT_BOOT) -> list[EfficiencyPoint]:
    """One point per (env, regime, algo, N, k) of every method but the reference, over its seeds.

    N = ``agents`` (None: ``full_agents``), k = ``steps_per_agent`` (None: all). Per seed, each test agent's
    metric counts if finite (NaN or missing ones are left out, and a seed without any); the normalised reward
    uses the reference's reward of the same env, agent and seed (see ``_normalised``)."""
    records = _check_records(records, full_agents)
    same_seed, mean_reference = _reference_rewards(records, reference, test_agents)
    groups: dict[tuple, list[Mapping]] = defaultdict(list)
    for record in records:
        if record["algo"] != reference:
            key = (record["env"], record["regime"], record["algo"], _agents(record, full_agents),
                   record.get("steps_per_agent"))
            groups[key].append(record)
    algos = list(dict.fromkeys(key[2] for key in groups))
    points = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], algos.index(k[2]), k[3], _k_order(k[4]))):
        env, regime, algo, agents, steps = key
        trials = sorted(groups[key], key=lambda r: int(r["seed"]))
        rmse = [[float(r["metrics"][f"rmse_agent{a}"]) for a in test_agents
                 if _finite(r["metrics"].get(f"rmse_agent{a}"))] for r in trials]
        reward = [[_normalised(float(r["metrics"][f"reward_agent{a}"]), env, a, int(r["seed"]), random_scores,
                               same_seed, mean_reference)
                   for a in test_agents if _finite(r["metrics"].get(f"reward_agent{a}"))] for r in trials]
        probes: dict[str, list[float]] = defaultdict(list)
        for record in trials:
            for name, value in record["metrics"].items():
                if name.startswith(PROBE_PREFIX) and _finite(value):
                    probes[name.removeprefix(PROBE_PREFIX)].append(float(value))
        points.append(EfficiencyPoint(
            env, regime, algo, agents, None if steps is None else int(steps), len(trials),
            *_interval(rmse, n_boot, _point_seed(seed, key + ("rmse",))),
            *_interval(reward, n_boot, _point_seed(seed, key + ("reward",))),
            {name: float(np.mean(values)) for name, values in sorted(probes.items())}))
    return points


# ---------------------------------------------------------------------------------------- table

def _fmt(x: float, spec: str = ".4g") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _fmt_ci(mean: float, low: float, high: float, spec: str) -> str:
    return "-" if not math.isfinite(mean) else f"{_fmt(mean, spec)} [{_fmt(low, spec)}, {_fmt(high, spec)}]"


def _k_text(k: int | None) -> str:
    return "all" if k is None else str(k)


def _ordered(points: Iterable[EfficiencyPoint]) -> list[EfficiencyPoint]:
    """Env and regime alphabetically, methods in first-appearance order, then N, then k (all last)."""
    points = list(points)
    algos = list(dict.fromkeys(p.algo for p in points))
    return sorted(points, key=lambda p: (p.env, p.regime, algos.index(p.algo), p.agents, _k_order(p.steps_per_agent)))


EFFICIENCY_COLUMNS = ["env", "regime", "method", "N", "k", "seeds", "RMSE [95% CI]", "reward (normalised) [95% CI]",
                      "probe R^2"]


def efficiency_table(points: Iterable[EfficiencyPoint], labels: Mapping[str, str], title_suffix: str = "",
                     *, reference: str = "true_env_mpc") -> dict:
    """One row per point (order: see the module docstring); ``"-"`` where a point has no value.

    ``reference`` only names the 1 of the normalised reward in the title."""
    rows = [[p.env, p.regime, method_label(p.algo, labels), str(p.agents), _k_text(p.steps_per_agent), str(p.seeds),
             _fmt_ci(p.rmse, p.rmse_low, p.rmse_high, ".4g"), _fmt_ci(p.reward, p.reward_low, p.reward_high, ".3f"),
             ", ".join(f"{name} {value:.2f}" for name, value in p.probe_r2.items()) or "-"]
            for p in _ordered(points)]
    title = (f"Data efficiency: open-loop RMSE and normalised reward (0 = random policy, 1 = "
             f"{method_label(reference, labels)}) by training agents N and transitions per agent k (all = every "
             f"one); mean over seeds of the mean over test agents, 95% bootstrap CI over seeds and test agents; "
             f"probe R^2: mean over seeds")
    return {"title": title + (f" {title_suffix}" if title_suffix else ""), "columns": list(EFFICIENCY_COLUMNS),
            "rows": rows}


# ---------------------------------------------------------------------------------------- figures

def _groups(points: Iterable[EfficiencyPoint]) -> dict[tuple[str, str], list[EfficiencyPoint]]:
    groups: dict[tuple[str, str], list[EfficiencyPoint]] = defaultdict(list)
    for point in _ordered(points):
        groups[point.env, point.regime].append(point)
    return dict(groups)


def _probe_mean(point: EfficiencyPoint) -> float:
    return float(np.mean(list(point.probe_r2.values()))) if point.probe_r2 else math.nan


def _panels(points: list[EfficiencyPoint]) -> list[dict]:
    """The panels of one (env, regime) that have data: each {"title", "xlabel", "ylabel", "lines": {algo: [(x, y,
    low, high)]}, "ticks": {x: label}}. The k sweep is drawn at the largest N of the group (the full data) and only
    if it has a finite k; all (None) sits at twice the largest finite k."""
    full_n = max(p.agents for p in points)
    finite_k = [p.steps_per_agent for p in points if p.agents == full_n and p.steps_per_agent is not None]
    all_at = 2 * max(finite_k) if finite_k else None
    n_tick = lambda p: str(p.agents)
    k_tick = lambda p: "all" if p.steps_per_agent is None else str(p.steps_per_agent)
    specs = [
        ("prediction error vs N (all transitions)", "training agents N", "open-loop RMSE",
         lambda p: p.steps_per_agent is None, lambda p: p.agents, n_tick, lambda p: (p.rmse, p.rmse_low, p.rmse_high)),
        ("reward vs N (all transitions)", "training agents N", "normalised reward",
         lambda p: p.steps_per_agent is None, lambda p: p.agents, n_tick,
         lambda p: (p.reward, p.reward_low, p.reward_high)),
        (f"prediction error vs k (N={full_n})", "transitions per agent k", "open-loop RMSE",
         lambda p: p.agents == full_n and all_at is not None,
         lambda p: all_at if p.steps_per_agent is None else p.steps_per_agent, k_tick,
         lambda p: (p.rmse, p.rmse_low, p.rmse_high)),
        ("agent factors vs N (all transitions)", "training agents N", r"probe $R^2$ (mean over covariates)",
         lambda p: p.steps_per_agent is None, lambda p: p.agents, n_tick, lambda p: (_probe_mean(p),) * 3),
    ]
    panels = []
    for title, xlabel, ylabel, keep, x_of, tick_of, y_of in specs:
        lines: dict[str, list[tuple]] = defaultdict(list)
        ticks = {}
        for point in points:
            if keep(point) and math.isfinite(y_of(point)[0]):
                lines[point.algo].append((x_of(point), *y_of(point)))
                ticks[x_of(point)] = tick_of(point)
        if lines:
            panels.append({"title": title, "xlabel": xlabel, "ylabel": ylabel, "lines": dict(lines), "ticks": ticks})
    return panels


def efficiency_figures(points: Iterable[EfficiencyPoint], out: Path, labels: Mapping[str, str]) -> list[Path]:
    """Per (env, regime), ``efficiency_<env>_<regime>.png`` and ``.pdf`` in ``out``: RMSE and normalised reward
    against N with all transitions, RMSE against k at the largest N, and the factors' mean probe R^2 against N;
    log x, one line per method in its fixed colour with its 95% CI band. A panel without data is left out, and a
    group with no panel gets no figure. Returns the files written (PNG, PDF per figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter, NullLocator

    written = []
    for (env, regime), group in _groups(points).items():
        panels = _panels(group)
        if not panels:
            continue
        algos = list(dict.fromkeys(algo for panel in panels for algo in panel["lines"]))
        colours = method_colours(algos)
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False,
                                 layout="constrained")
        for ax, panel in zip(axes[0], panels):
            for algo, line in panel["lines"].items():
                x, y, low, high = (np.asarray(v, dtype=np.float64) for v in zip(*sorted(line)))
                ax.plot(x, y, marker="o", markersize=3.5, color=colours[algo], label=method_label(algo, labels))
                ax.fill_between(x, low, high, color=colours[algo], alpha=0.2, linewidth=0)
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ticks = sorted(panel["ticks"])
            ax.set_xticks(ticks, [panel["ticks"][t] for t in ticks], fontsize=8)
            ax.set(title=panel["title"], xlabel=panel["xlabel"], ylabel=panel["ylabel"])
            ax.title.set_fontsize(9)
            ax.grid(linewidth=0.3, alpha=0.5)
        handles = [Line2D([], [], color=colours[a], marker="o", markersize=3.5, label=method_label(a, labels))
                   for a in algos]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(algos), 5), fontsize=8, frameon=False)
        fig.suptitle(f"Data efficiency: {env}, regime {regime} (bands: 95% bootstrap CI)", fontsize=10)
        png = save_figure(fig, Path(out) / f"efficiency_{env}_{regime}.png")
        written += [png, png.with_suffix(".pdf")]
    return written


# ---------------------------------------------------------------------------------------- findings

def _ratio_text(r: float) -> str:
    return f"{r:.1f}x" if r < 100 else f"{r:,.0f}x"


def _trend(first: float, last: float, show) -> str:
    return "stays" if show(first) == show(last) else "grows" if last > first else "shrinks"


def _compare(where: str, quantity: str, focus_label: str, base_label: str,
             pairs: list[tuple[int, EfficiencyPoint, EfficiencyPoint]], margin, clear, show) -> str:
    """One sentence on the focus's advantage over one baseline across N: where it first is clear (non-overlapping
    CIs in the focus's favour), how the margin changes from the smallest to the largest N, where it vanishes
    (the CIs overlap again), and where the baseline is the clearly better one."""
    better = "below" if quantity == "RMSE" else "above"
    clear_at = [n for n, f, b in pairs if clear(f, b)]
    reversed_at = [n for n, f, b in pairs if clear(b, f)]
    baseline_better = (f"; {base_label}'s {quantity} is clearly {better} {focus_label}'s at "
                       f"N={', '.join(map(str, reversed_at))}" if reversed_at else "")
    margins = {n: margin(f, b) for n, f, b in pairs}
    first_n, last_n = pairs[0][0], pairs[-1][0]
    unit = (f"the {base_label}/{focus_label} RMSE ratio" if quantity == "RMSE"
            else f"the {focus_label} - {base_label} reward difference")
    if len(pairs) == 1:
        verdict = "clearly" if clear_at else "not clearly"
        return (f"{where}: {focus_label}'s {quantity} is {verdict} {better} {base_label}'s at N={first_n} only "
                f"({unit}: {show(margins[first_n])}).")
    change = (f"{unit} {_trend(margins[first_n], margins[last_n], show)} from {show(margins[first_n])} at "
              f"N={first_n} to {show(margins[last_n])} at N={last_n}")
    if not clear_at:
        return (f"{where}: {focus_label}'s {quantity} is never clearly {better} {base_label}'s (non-overlapping 95% "
                f"CIs) at N={first_n}-{last_n}; {change}{baseline_better}.")
    appears = clear_at[0]
    sentence = (f"{where}: {focus_label}'s {quantity} is clearly {better} {base_label}'s (non-overlapping 95% CIs) "
                f"from N={appears} ({show(margins[appears])}); {change}")
    gone = [n for n, _, _ in pairs if n > appears and n not in clear_at]
    if gone:
        back = [n for n in clear_at if n > gone[0]]
        sentence += (f"; the advantage vanishes at N={gone[0]} ({show(margins[gone[0]])}, the CIs overlap)"
                     + (f" and is clear again at N={back[0]}" if back else ""))
    elif appears != last_n:
        sentence += f"; it holds up to N={last_n}"
    return sentence + baseline_better + "."


def efficiency_findings(points: Iterable[EfficiencyPoint], labels: Mapping[str, str], focus: str = "persim"
                        ) -> list[str]:
    """Sentences on the focus method against each other method, per (env, regime), from the points with all
    transitions (k = all) at the N both have: the RMSE advantage as baseline / focus and the normalised-reward
    advantage as focus - baseline. Clear = the two 95% CIs do not overlap."""
    focus_label = method_label(focus, labels)
    findings = []
    for (env, regime), group in _groups(points).items():
        full = [p for p in group if p.steps_per_agent is None]
        mine = {p.agents: p for p in full if p.algo == focus}
        if not mine:
            continue
        for base in dict.fromkeys(p.algo for p in full if p.algo != focus):
            theirs = {p.agents: p for p in full if p.algo == base}
            common = sorted(set(mine) & set(theirs))
            base_label = method_label(base, labels)
            rmse = [(n, mine[n], theirs[n]) for n in common
                    if math.isfinite(mine[n].rmse) and math.isfinite(theirs[n].rmse)]
            if rmse:
                findings.append(_compare(
                    f"{env}/{regime}", "RMSE", focus_label, base_label, rmse,
                    lambda f, b: b.rmse / f.rmse if f.rmse > 0 else math.inf,
                    lambda f, b: f.rmse_high < b.rmse_low, _ratio_text))
            reward = [(n, mine[n], theirs[n]) for n in common
                      if math.isfinite(mine[n].reward) and math.isfinite(theirs[n].reward)]
            if reward:
                findings.append(_compare(
                    f"{env}/{regime}", "normalised reward", focus_label, base_label, reward,
                    lambda f, b: f.reward - b.reward, lambda f, b: f.reward_low > b.reward_high,
                    lambda d: f"{round(d, 2) + 0.0:+.2f}"))  # + 0.0: no "-0.00"
    return findings


def efficiency_markdown(table: dict, findings: Sequence[str], figures: Sequence[Path]) -> str:
    """The report's data-efficiency section: findings first, then the figures (PNG with its PDF) and the table."""
    parts = ["## Data efficiency: error and reward against the data\n",
             "".join(f"- {sentence}\n" for sentence in findings) or "- (no PerSim points to compare)\n"]
    parts += [f"![{figure.stem}]({figure.name}) ([PDF]({figure.stem}.pdf))\n" for figure in figures
              if figure.suffix == ".png"]
    parts.append(to_markdown(table))
    return "\n".join(parts)
