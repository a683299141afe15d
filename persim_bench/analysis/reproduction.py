"""The reproduction report: our numbers against the paper's, cell by cell, claim by claim, and in aggregate.

A pure builder: it takes plain records (no MLflow, no Ray) and returns tables in the shape
``tabular.write_table`` writes ({"title", "columns", "rows"} with string cells), the
normalised score matrices behind the aggregates (for ``stats.performance_profile_figure``) and
the Markdown of the report; ``report_page`` assembles ``report.md`` around it (Figure 1's probe
table and figures, the performance profile ``performance_profile`` draws).

Inputs:
- ``records``: finished trials, ``{"algo", "env", "regime", "seed", "metrics"}``; metrics keys
  ``rmse_agent{a}``, ``r2_agent{a}``, ``reward_agent{a}`` and optionally
  ``episode_returns_agent{a}`` (the per-episode returns behind ``reward_agent{a}``).
  True env + MPC uses regime ``none``. At most one record per (algo, env, regime, seed).
- ``dataset_summaries``: ``{(env, regime): {"test_returns": [5], "mean_return", "mean_length"}}``.
- ``random_scores``: a uniformly random policy's mean return, keyed ``(env, agent)`` or ``env``
  (the caller runs the envs); without it the random regime's logged test-agent returns stand in.
- ``labels``: {method key: label} for the rows (the caller's algorithm registry; ``data`` for Table 8);
  an unlabelled method shows its key. Rows follow the paper's method order (``paper.METHODS``).
"""
from __future__ import annotations

import math
import numbers
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from persim_bench.analysis.paper import (ENVS, METHODS, N_TEST_AGENTS, REGIMES, Key, PaperValue, canonical,
                                         load_paper_values, tables_of)
from persim_bench.analysis.tabular import method_colours, method_label, to_markdown
from persim_bench.analysis.stats import DEFAULT_BOOT, aggregate_metrics, bootstrap_ci, normalise

# Tolerances of the cell verdicts. Each compares against every value that prints as the paper's
# number (its value +- half a unit of the last printed digit), so rounding never decides a verdict.
REWARD_REL_TOL = 0.10
"""Reward agrees if within 10% of the paper's, or if the paper's value lies inside our 95% CI:
10% is about the seed-to-seed spread the paper reports for PerSim on MountainCar/CartPole, and the
CI clause covers cells whose own noise is larger than 10% (BCQ's stds reach 50-100%)."""
RMSE_FACTOR = 2.0
"""RMSE agrees within a factor 2: 50-step open-loop error compounds, so implementation details
change it multiplicatively, and a factor 2 still separates PerSim from CaDM (10-1000x apart)."""
R2_FACTOR = 4.0
"""R^2 agrees if 1 - R^2 (squared error relative to the state variance) is within a factor 4,
the square of the RMSE factor, since 1 - R^2 scales with RMSE^2."""
DATA_REL_TOL = 0.10
"""Table 8 (one logged trajectory per agent, or a mean over 500) agrees within 10%."""
TRUE_ENV_TOL = 0.10
"""Claim: PerSim at most 10% below True env + MPC (paper: 'close to' it on MountainCar/CartPole)."""

PREDICTION_BASELINES = ("cadm_vanilla", "cadm_pets")
REWARD_BASELINES = ("cadm_vanilla", "cadm_pets", "bcq_p", "bcq_a")
AGGREGATE_METHODS = ("persim", *REWARD_BASELINES)
TRUE_ENV_CLAIM_ENVS = ("mountaincar", "cartpole")
LEARNED_REGIMES = REGIMES[:-1]


@dataclass(frozen=True)
class Cell:
    """Our estimate of one (quantity, env, regime, method, agent) cell over seeds."""

    mean: float
    low: float
    high: float
    seeds: tuple[int, ...]
    per_seed: tuple[float, ...]


@dataclass(frozen=True)
class Report:
    """The built report: tables by name, report.md's text, and the normalised scores behind the aggregates
    ({method: [runs, tasks]}, task names in ``tasks``) for ``stats.performance_profile_figure``."""

    tables: dict[str, dict]
    markdown: str
    normalised_scores: dict[str, np.ndarray] = field(default_factory=dict)
    tasks: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------- our cells

def _check_records(records: Iterable[Mapping]) -> list[Mapping]:
    """Fail early, naming the record, rather than silently dropping or double-counting trials."""
    records, seen = list(records), {}
    for index, record in enumerate(records):
        missing = {"algo", "env", "regime", "seed", "metrics"} - set(record)
        if missing:
            raise ValueError(f"record {index}: missing {', '.join(sorted(missing))}")
        key = record["algo"], record["env"], record["regime"], int(record["seed"])
        if key in seen:
            raise ValueError(f"records {seen[key]} and {index}: both are {key} (pass one record per trial)")
        seen[key] = index
    return records


def _check_summaries(summaries: Mapping) -> dict:
    """Table 8 inputs: (env, regime) -> five test-agent returns, a mean return and a mean length."""
    for key, summary in summaries.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"dataset summary key {key!r}: expected (env, regime)")
        missing = {"test_returns", "mean_return", "mean_length"} - set(summary)
        if missing or len(summary["test_returns"]) != N_TEST_AGENTS:
            raise ValueError(f"dataset summary {key}: need test_returns ({N_TEST_AGENTS} values), mean_return, "
                             f"mean_length")
    return dict(summaries)


def _finite(value) -> bool:
    """A usable metric: any real number (numpy scalars too) that is not NaN or infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _cell_seed(seed: int, key: Key) -> int:
    return seed * 1_000_003 + zlib.crc32(repr(key).encode())


def our_cells(records: Iterable[Mapping], n_boot: int = DEFAULT_BOOT, seed: int = 0) -> dict[Key, Cell]:
    """Mean and 95% bootstrap CI per cell: seeds x episodes for rewards (when episodes are given),
    seeds only for prediction error; seeds whose metric is missing or NaN are left out."""
    groups: dict[tuple, list[tuple[int, float, list | None]]] = defaultdict(list)
    for record in _check_records(records):
        metrics = record["metrics"]
        for quantity in ("rmse", "r2", "reward"):
            for agent in range(N_TEST_AGENTS):
                value = metrics.get(f"{quantity}_agent{agent}")
                if _finite(value):
                    episodes = metrics.get(f"episode_returns_agent{agent}") if quantity == "reward" else None
                    key = (quantity, record["env"], record["regime"], record["algo"], agent)
                    groups[key].append((int(record["seed"]), float(value), episodes))
    return {key: _cell(key, sorted(rows), n_boot, seed) for key, rows in groups.items()}


def _cell(key: Key, rows: list[tuple[int, float, list | None]], n_boot: int, seed: int) -> Cell:
    with_episodes = all(episodes is not None and len(episodes) > 0 for _, _, episodes in rows)
    samples = [list(episodes) for _, _, episodes in rows] if with_episodes else [value for _, value, _ in rows]
    mean, low, high = bootstrap_ci(samples, n_boot, _cell_seed(seed, key))
    return Cell(mean, low, high, tuple(s for s, _, _ in rows), tuple(v for _, v, _ in rows))


# ---------------------------------------------------------------------------------------- verdicts

def ratio(ours: float, paper: float) -> float:
    return ours / paper if paper != 0 else math.nan


def reward_agrees(paper: PaperValue, ours: Cell) -> bool:
    """Within REWARD_REL_TOL of the paper's value (plus its rounding), or the paper's value inside our CI."""
    close = abs(ours.mean - paper.value) <= REWARD_REL_TOL * abs(paper.value) + paper.resolution
    return close or ours.low - paper.resolution <= paper.value <= ours.high + paper.resolution


def _within_factor(ours: float, low: float, high: float, factor: float) -> bool:
    """ours in [low / factor, high * factor]: some value in the paper's rounding interval is within the factor."""
    return max(low, 0.0) / factor <= ours <= high * factor


def rmse_agrees(paper: PaperValue, ours: Cell) -> bool:
    return _within_factor(ours.mean, paper.value - paper.resolution, paper.value + paper.resolution, RMSE_FACTOR)


def r2_agrees(paper: PaperValue, ours: Cell) -> bool:
    """Compares 1 - R^2 (>= 0 for sane models) within R2_FACTOR."""
    error_low, error_high = 1 - (paper.value + paper.resolution), 1 - (paper.value - paper.resolution)
    return _within_factor(1 - ours.mean, error_low, error_high, R2_FACTOR)


def data_agrees(paper: PaperValue, ours: float) -> bool:
    return abs(ours - paper.value) <= DATA_REL_TOL * abs(paper.value) + paper.resolution


VERDICTS = {"rmse": rmse_agrees, "r2": r2_agrees, "reward": reward_agrees}


def verdict(paper: PaperValue, ours: Cell) -> str:
    return "agrees" if VERDICTS[paper.quantity](paper, ours) else "differs"


# ---------------------------------------------------------------------------------------- formatting

def fmt(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4g}"


def fmt_ci(cell: Cell) -> str:
    return f"[{fmt(cell.low)}, {fmt(cell.high)}]"


def fmt_paper(paper: PaperValue) -> str:
    return fmt(paper.value) + (f" +- {fmt(paper.std)}" if paper.std is not None else "")


def _index(options, item) -> int:
    """Position for sorting; unknown items (an env or method the paper lacks) go last instead of failing."""
    return options.index(item) if item in options else len(options)


def _cell_order(key: Key) -> tuple:
    quantity, env, regime, method, agent = key
    return (_index(ENVS, env), _index(REGIMES, regime), _index(METHODS, method),
            agent if agent is not None else -1, quantity)


# ---------------------------------------------------------------------------------------- paper vs ours

COMPARISON_COLUMNS = ["env", "regime", "method", "agent", "quantity", "paper", "paper table", "ours", "95% CI", "seeds",
                      "ours/paper", "verdict"]


def comparison_rows(paper: dict[Key, PaperValue], ours: dict[Key, Cell], values: list[PaperValue],
                    quantities: tuple[str, ...], labels: Mapping[str, str]) -> list[list[str]]:
    """One row per paper cell that our records cover."""
    rows = []
    for key in sorted((k for k in paper if k[0] in quantities and k in ours), key=_cell_order):
        p, o = paper[key], ours[key]
        rows.append([key[1], key[2], method_label(key[3], labels), str(key[4]), key[0], fmt_paper(p),
                     "/".join(t.removeprefix("Table ") for t in tables_of(values, key)), fmt(o.mean), fmt_ci(o),
                     str(len(o.seeds)), fmt(ratio(o.mean, p.value)), verdict(p, o)])
    return rows


def data_rows(paper: dict[Key, PaperValue], summaries: Mapping[tuple[str, str], Mapping]) -> list[list[str]]:
    """Table 8 against our datasets' summaries (no CI: the datasets are fixed, one trajectory per agent)."""
    rows = []
    for (env, regime), summary in sorted(summaries.items(), key=lambda kv: (_index(ENVS, kv[0][0]),
                                                                           _index(REGIMES, kv[0][1]))):
        ours = {("data_return_test_agent", a): float(v) for a, v in enumerate(summary["test_returns"])}
        ours[("data_mean_return", None)] = float(summary["mean_return"])
        ours[("data_mean_length", None)] = float(summary["mean_length"])
        for (quantity, agent), value in ours.items():
            p = paper.get((quantity, env, regime, "data", agent))
            if p is not None:
                rows.append([env, regime, quantity, "" if agent is None else str(agent), fmt(p.value), fmt(value),
                             fmt(ratio(value, p.value)), "agrees" if data_agrees(p, value) else "differs"])
    return rows


# ---------------------------------------------------------------------------------------- claims

CLAIM_COLUMNS = ["claim", "env", "regime", "ours", "agents holding", "worst agent (ours)", "paper"]


@dataclass(frozen=True)
class Claim:
    """An ordering the paper states, checked per (env, regime) over the test agents.

    ``margin(persim, baseline)`` is larger when PerSim is better; the claim holds for an agent if
    ``holds(margin)``, and for an env and regime if it holds for every agent."""

    text: str
    quantity: str
    baselines: tuple[str, ...]
    envs: tuple[str, ...]
    margin: Callable[[float, float], float]
    holds: Callable[[float], bool]
    show: Callable[[float], str]
    baseline_regime: str | None = None  # None: the baseline's regime is PerSim's


CLAIMS = (
    Claim("PerSim's RMSE below {}'s", "rmse", PREDICTION_BASELINES, ENVS,
          lambda p, b: b / p if p > 0 else math.inf, lambda m: m > 1,
          lambda m: f"baseline/PerSim = {m:.3g}x" if m < 1000 else f"baseline/PerSim = {m:,.0f}x"),
    Claim("PerSim's reward above {}'s", "reward", REWARD_BASELINES, ENVS,
          lambda p, b: p - b, lambda m: m > 0, lambda m: f"PerSim - baseline = {m:+.4g}"),
    Claim(f"PerSim's reward at most {TRUE_ENV_TOL:.0%} below {{}}'s", "reward", ("true_env_mpc",),
          TRUE_ENV_CLAIM_ENVS, lambda p, t: (p - t) / abs(t) if t != 0 else -math.inf,
          lambda m: m >= -TRUE_ENV_TOL, lambda m: f"(PerSim - True env) / |True env| = {m:+.1%}", "none"),
)


def _value(cell: Cell | PaperValue) -> float:
    return cell.mean if isinstance(cell, Cell) else cell.value


def _margins(claim: Claim, values: Mapping[Key, Cell | PaperValue], env: str, regime: str,
             baseline: str) -> dict[int, float]:
    """Per test agent that both PerSim and the baseline have: the claim's margin."""
    margins = {}
    for agent in range(N_TEST_AGENTS):
        mine = (claim.quantity, env, regime, "persim", agent)
        theirs = (claim.quantity, env, claim.baseline_regime or regime, baseline, agent)
        if mine in values and theirs in values:
            margins[agent] = claim.margin(_value(values[mine]), _value(values[theirs]))
    return margins


def _status(claim: Claim, margins: dict[int, float]) -> str:
    failing = sum(not claim.holds(m) for m in margins.values())
    return "-" if not margins else "holds" if not failing else f"fails ({failing}/{len(margins)} agents)"


def claim_rows(ours: dict[Key, Cell], paper: dict[Key, PaperValue], labels: Mapping[str, str]) -> list[list[str]]:
    """The paper's orderings (Sec. 6.2-6.3) checked on our means, and the same check on the paper's numbers."""
    rows = []
    for claim in CLAIMS:
        for env in claim.envs:
            for regime in LEARNED_REGIMES:
                for baseline in claim.baselines:
                    margins = _margins(claim, ours, env, regime, baseline)
                    if not margins:
                        continue
                    worst = min(margins, key=margins.get)
                    holding = sum(claim.holds(m) for m in margins.values())
                    rows.append([claim.text.format(method_label(baseline, labels)), env, regime,
                                 "holds" if holding == len(margins) else "fails", f"{holding}/{len(margins)}",
                                 f"agent {worst}: {claim.show(margins[worst])}",
                                 _status(claim, _margins(claim, paper, env, regime, baseline))])
    return rows


# ---------------------------------------------------------------------------------------- aggregates

def _random_score(random_scores: Mapping | None, summaries: Mapping, env: str, agent: int) -> float | None:
    if random_scores is not None:
        for key in ((env, agent), env):
            if key in random_scores:
                return float(random_scores[key])
        return None
    summary = summaries.get((env, "random"))
    return float(summary["test_returns"][agent]) if summary is not None else None


def normalised_scores(ours: dict[Key, Cell], random_scores: Mapping | None, summaries: Mapping
                      ) -> tuple[dict[str, np.ndarray], list[tuple[str, str, int]]]:
    """{method: [runs, tasks]} of rewards normalised per (env, agent) between the random policy (0) and our
    True env + MPC (1). Tasks (env x regime x agent) are those every method covers; runs are the seeds a
    method has on all of them."""
    methods = [m for m in AGGREGATE_METHODS if any(k[0] == "reward" and k[3] == m for k in ours)]
    scales = {}
    for (quantity, env, regime, method, agent), cell in ours.items():
        if quantity == "reward" and method == "true_env_mpc":
            low = _random_score(random_scores, summaries, env, agent)
            if low is not None and low != cell.mean:
                scales[env, agent] = (low, cell.mean)
    tasks = sorted({(k[1], k[2], k[4]) for k in ours if k[0] == "reward" and k[3] in methods
                    and (k[1], k[4]) in scales and all(("reward", k[1], k[2], m, k[4]) in ours for m in methods)},
                   key=lambda t: (_index(ENVS, t[0]), _index(REGIMES, t[1]), t[2]))
    scores = {}
    for method in methods:
        cells = [ours[("reward", env, regime, method, agent)] for env, regime, agent in tasks]
        runs = sorted(set.intersection(*(set(c.seeds) for c in cells))) if cells else []
        if runs:
            scores[method] = np.array([[normalise(c.per_seed[c.seeds.index(run)], *scales[t[0], t[2]])
                                        for c, t in zip(cells, tasks)] for run in runs])
    return scores, tasks


AGGREGATE_COLUMNS = ["method", "runs", "tasks", "median", "IQM", "mean", "optimality gap"]


def aggregate_rows(scores: dict[str, np.ndarray], n_boot: int, seed: int, labels: Mapping[str, str]
                   ) -> list[list[str]]:
    intervals = aggregate_metrics(scores, n_boot, seed)
    show = lambda i: f"{i.point:.3f} [{i.low:.3f}, {i.high:.3f}]"
    return [[method_label(m, labels), str(s.shape[0]), str(s.shape[1])] +
            [show(intervals[m][name]) for name in ("median", "iqm", "mean", "optimality_gap")]
            for m, s in scores.items()]


# ---------------------------------------------------------------------------------------- the report

def summary_rows(tables: dict[str, dict]) -> list[list[str]]:
    """Cells compared and agreeing, per quantity, across the comparison tables."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name in ("paper_prediction", "paper_reward", "paper_data"):
        for row in tables[name]["rows"]:
            quantity = row[4] if name != "paper_data" else row[2]
            counts[quantity][0] += 1
            counts[quantity][1] += row[-1] == "agrees"
    return [[q, str(n), str(ok), f"{ok / n:.0%}"] for q, (n, ok) in counts.items()]


def reproduction_tables(records: Iterable[Mapping], dataset_summaries: Mapping | None = None,
                        paper_values: list[PaperValue] | None = None, random_scores: Mapping | None = None,
                        n_boot: int = DEFAULT_BOOT, seed: int = 0, *, labels: Mapping[str, str],
                        protocol: Mapping | None = None) -> tuple[dict[str, dict], dict[str, np.ndarray], list]:
    """Every report table (``protocol``, the grid's departures from the paper's protocol, passed through),
    plus the normalised score matrices and their tasks."""
    values = paper_values if paper_values is not None else load_paper_values()
    paper, summaries = canonical(values), _check_summaries(dataset_summaries or {})
    ours = our_cells(records, n_boot, seed)
    scores, tasks = normalised_scores(ours, random_scores, summaries)
    tolerance = (f"verdict: RMSE within {RMSE_FACTOR:g}x, R^2 with 1 - R^2 within {R2_FACTOR:g}x, of the paper's "
                 f"value up to its printed rounding")
    tables = {
        "paper_prediction": {"title": f"Prediction error, paper vs ours (CI over seeds); {tolerance}",
                             "columns": COMPARISON_COLUMNS,
                             "rows": comparison_rows(paper, ours, values, ("rmse", "r2"), labels)},
        "paper_reward": {"title": f"Reward, paper (mean +- std over 5 repeats) vs ours (95% bootstrap CI over seeds "
                                  f"x episodes); verdict: within {REWARD_REL_TOL:.0%} or the paper's value inside "
                                  f"our CI",
                         "columns": COMPARISON_COLUMNS, "rows": comparison_rows(paper, ours, values, ("reward",), labels)},
        "paper_data": {"title": f"Offline data (Table 8), paper vs ours; verdict: within {DATA_REL_TOL:.0%}",
                       "columns": ["env", "regime", "quantity", "agent", "paper", "ours", "ours/paper", "verdict"],
                       "rows": data_rows(paper, summaries)},
        "claims": {"title": "The paper's claims on our numbers (means over seeds); a claim holds for an env and "
                            "regime if it holds for every test agent; 'paper' = the same check on the paper's numbers",
                   "columns": CLAIM_COLUMNS, "rows": claim_rows(ours, paper, labels)},
        "aggregates": {"title": f"Aggregate reward (rliable) over {len(tasks)} tasks (env x regime x test agent), "
                                f"normalised per env and agent: 0 = random policy, 1 = our True env + MPC; "
                                f"95% stratified-bootstrap CIs over runs",
                       "columns": AGGREGATE_COLUMNS, "rows": aggregate_rows(scores, n_boot, seed, labels) if tasks else []},
    }
    tables["agreement"] = {"title": "Cells agreeing with the paper, per quantity",
                           "columns": ["quantity", "cells", "agree", "share"], "rows": summary_rows(tables)}
    if protocol is not None:
        tables["protocol"] = dict(protocol)
    return tables, scores, tasks


SECTIONS = [("Protocol", "protocol"), ("Agreement", "agreement"), ("Claims", "claims"), ("Aggregates", "aggregates"),
            ("Prediction error", "paper_prediction"), ("Reward", "paper_reward"), ("Offline data", "paper_data")]


def build_report(records: Iterable[Mapping], dataset_summaries: Mapping | None = None,
                 paper_values: list[PaperValue] | None = None, random_scores: Mapping | None = None,
                 n_boot: int = DEFAULT_BOOT, seed: int = 0, *, labels: Mapping[str, str],
                 protocol: Mapping | None = None) -> Report:
    """Tables, normalised scores and the Markdown of the paper-vs-ours part of report.md; deterministic for a seed.
    ``protocol``: the table of the grid's departures from the paper's protocol, shown first when given."""
    tables, scores, tasks = reproduction_tables(records, dataset_summaries, paper_values, random_scores, n_boot, seed,
                                                labels=labels, protocol=protocol)
    parts = ["# Reproduction report: PerSim (NeurIPS 2021)\n",
             f"Tolerances: reward within {REWARD_REL_TOL:.0%} of the paper or the paper's value inside our 95% CI; "
             f"RMSE within {RMSE_FACTOR:g}x; 1 - R^2 within {R2_FACTOR:g}x; Table 8 within {DATA_REL_TOL:.0%}; all "
             f"up to the paper's printed rounding. Bootstrap: {n_boot} resamples, seed {seed}.\n"]
    parts += [f"## {heading}\n\n{to_markdown(tables[name])}" for heading, name in SECTIONS if name in tables]
    names = [f"{env}/{regime}/agent{agent}" for env, regime, agent in tasks]
    return Report(tables, "\n".join(parts), scores, tuple(names))


# ---------------------------------------------------------------------------------------- report.md

def performance_profile(report: Report, path: str | Path, labels: Mapping[str, str]) -> Path | None:
    """The performance-profile figure of the report's normalised scores (PNG and PDF), methods by their labels
    in their fixed colours; None (nothing drawn) if the report has no aggregates."""
    from persim_bench.analysis.stats import performance_profile_figure

    if not report.normalised_scores:
        return None
    labelled = {method_label(key, labels): scores for key, scores in report.normalised_scores.items()}
    colours = {method_label(key, labels): colour for key, colour in method_colours(report.normalised_scores).items()}
    return performance_profile_figure(labelled, path, colours=colours)


def report_page(report: Report, probe: dict, unreadable: Mapping[tuple[str, str], str] | None = None,
                figure1: Sequence[str | PurePath] = (), profile: str | PurePath | None = None) -> str:
    """The text of report.md: the report, Figure 1 (``factors.probe_table``'s table, then its figures' files),
    the datasets that could not be read ({(env, regime): why}: never a silent gap in Table 8) and the
    performance profile's file; figures are linked by file name, each with the PDF beside it."""
    parts = [report.markdown, "## Figure 1: agent factors\n", to_markdown(probe)]
    if unreadable:
        parts.append("## Datasets that could not be read\n\n" + "".join(
            f"- {env}/{regime}: {error}\n" for (env, regime), error in sorted(unreadable.items())))
    parts += [f"![{PurePath(name).stem}]({PurePath(name).name}) ([PDF]({PurePath(name).stem}.pdf))\n"
              for name in figure1]
    if profile is not None:
        name = PurePath(profile)
        parts.append(f"## Performance profile\n\n![performance profile]({name.name}) ([PDF]({name.stem}.pdf))\n")
    return "\n".join(parts)
