"""persim_bench.analysis: the paper's numbers, the statistics, Figure 1 and the reproduction report.

Fast (no Ray, no MLflow, no envs): small bootstraps, a 25-agent t-SNE.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from persim_bench.analysis import (PaperValuesError, aggregate_metrics, agent_matrix, bootstrap_ci, build_report,
                                   load_paper_values, lookup, normalise, performance_profile_figure, probe_r2,
                                   tsne_figure)
from persim_bench.analysis.paper import APPENDIX_OF, COLUMNS, canonical
from persim_bench.analysis.stats import score_distribution
from persim_bench.config import load_grid
from persim_bench.orchestration.tables import method_labels, protocol_differences

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
LABELS = method_labels()  # what orchestration passes: the algorithm registry's labels


@pytest.fixture(scope="module")
def values():
    return load_paper_values()


# ---------------------------------------------------------------------------------------- paper values

def test_csv_covers_every_table_env_and_regime(values):
    tables = {v.table for v in values}
    assert tables == {f"Table {n}" for n in range(2, 15)}
    envs = ("mountaincar", "cartpole", "halfcheetah")
    expected_envs = {f"Table {n}": envs[(n - 2 - (n > 8)) % 3] for n in (2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14)}
    for table, env in expected_envs.items():
        rows = [v for v in values if v.table == table]
        assert {v.env for v in rows} == {env}, table
        assert {v.regime for v in rows} - {"none"} == {"pure", "random", "pure-eps-20", "pure-eps-40"}, table
    # appendix tables: every agent, every method; the documented gaps only (paper.py docstring, items 2 and 3)
    assert sum(v.table == "Table 10" for v in values) == 4 * 3 * 5 * 2
    assert sum(v.table == "Table 11" for v in values) == 4 * 3 * 5 * 2
    assert sum(v.table == "Table 9" for v in values) == 4 * 3 * 5 * 2 - 8 - 1
    for table in ("Table 12", "Table 13", "Table 14"):
        assert sum(v.table == table for v in values) == 4 * 5 * 5 + 5
    assert sum(v.table == "Table 8" for v in values) == 3 * 4 * 7
    # main-text agent subsets: MountainCar/CartPole 0, 3, 4; HalfCheetah 0, 1, 2
    assert {v.agent for v in values if v.table in ("Table 2", "Table 3", "Table 5", "Table 6")} == {0, 3, 4}
    assert {v.agent for v in values if v.table in ("Table 4", "Table 7")} == {0, 1, 2}


@pytest.mark.parametrize("key, table, value, std", [
    (("rmse", "mountaincar", "pure", "persim", 0), "Table 2", 0.025, None),
    (("r2", "mountaincar", "pure", "cadm_pets", 4), "Table 2", -11.44, None),
    (("rmse", "mountaincar", "pure-eps-40", "cadm_vanilla", 3), "Table 2", 0.155, None),
    (("rmse", "mountaincar", "pure-eps-40", "persim", 0), "Table 9", 0.007, None),
    (("r2", "cartpole", "pure-eps-40", "cadm_vanilla", 0), "Table 3", -21.912, None),
    (("rmse", "cartpole", "random", "persim", 2), "Table 10", 0.463, None),
    (("rmse", "halfcheetah", "pure-eps-40", "cadm_vanilla", 4), "Table 11", 82.172, None),
    (("r2", "halfcheetah", "pure", "persim", 1), "Table 4", 0.339, None),
    (("reward", "mountaincar", "pure", "persim", 3), "Table 5", -191.81, 4.44),
    (("reward", "mountaincar", "pure-eps-40", "bcq_a", 2), "Table 12", -329.6, 242),
    (("reward", "cartpole", "random", "persim", 4), "Table 6", 119.1, 21.0),
    (("reward", "cartpole", "none", "true_env_mpc", 2), "Table 13", 194.8, 14.2),
    (("reward", "halfcheetah", "random", "bcq_p", 0), "Table 7", -1.46, 0.16),
    (("reward", "halfcheetah", "none", "true_env_mpc", 1), "Table 7", 42893, 6959),
    (("reward", "halfcheetah", "pure", "bcq_p", 3), "Table 14", 2564.1, 70.2),
    (("data_return_test_agent", "mountaincar", "pure-eps-40", "data", 2), "Table 8", -500.0, None),
    (("data_mean_return", "cartpole", "random", "data", None), "Table 8", 23.67, None),
    (("data_mean_length", "mountaincar", "pure", "data", None), "Table 8", 113.914, None),
    (("data_return_test_agent", "halfcheetah", "pure", "data", 3), "Table 8", 2646.85, None),
])
def test_spot_values_match_the_paper(values, key, table, value, std):
    """Checked by hand against shared/paper/persim-neurips2021.txt."""
    cell = lookup(values, *key)
    assert cell is not None and cell.table == table
    assert cell.value == pytest.approx(value)
    assert cell.std == pytest.approx(std) if std is not None else cell.std is None


def test_main_text_and_appendix_agree_to_rounding(values):
    """The two transcriptions of every main-text cell (Tables 2-7 vs 9-14) agree up to the printed digits:
    a double entry that catches transcription slips."""
    by_key = {(v.table, *v.key): v for v in values}
    compared = 0
    for v in values:
        if v.table not in APPENDIX_OF:
            continue
        other = by_key.get((APPENDIX_OF[v.table], *v.key))
        if other is None:  # documented: Table 9 prints one merged cell for Random / PerSim
            assert (v.table, v.regime, v.method) == ("Table 2", "random", "persim"), v
            continue
        compared += 1
        tolerance = max(v.resolution, other.resolution) + 1e-9
        assert abs(v.value - other.value) <= tolerance, (v, other)
        if v.std is not None:  # a std's own printed digits may differ (151 vs 150.5): 0.5% covers that
            assert abs(v.std - other.std) <= max(tolerance, 0.005 * v.std), (v, other)
    assert compared == 395


def test_lookup_prefers_main_text_and_takes_a_table(values):
    assert lookup(values, "r2", "mountaincar", "pure", "cadm_pets", 4).value == -11.44
    assert lookup(values, "r2", "mountaincar", "pure", "cadm_pets", 4, table="Table 9").value == -11.438
    assert lookup(values, "rmse", "mountaincar", "random", "persim", 1) is None
    assert canonical(values)[("r2", "mountaincar", "pure", "cadm_pets", 4)].table == "Table 2"
    assert lookup(values, "rmse", "mountaincar", "pure", "persim", 0).resolution == pytest.approx(0.0005)


@pytest.mark.parametrize("row, message", [
    ("Table 2,rmse,moon,pure,persim,0,0.1,", "env 'moon'"),
    ("Table 2,rmse,cartpole,pure,persim,7,0.1,", "agent must be 0-4"),
    ("Table 2,r2,cartpole,pure,persim,0,1.2,", "R^2 cannot exceed 1"),
    ("Table 2,rmse,cartpole,pure,persim,0,abc,", "value 'abc'"),
    ("Table 5,reward,cartpole,none,persim,0,1,2", "regime 'none'"),
    ("Table 8,data_mean_return,cartpole,pure,data,3,1,", "agent must be empty"),
    ("Table 2,rmse,cartpole,pure,persim,0,0.025,", "duplicate of line 2"),
])
def test_malformed_csv_names_file_and_line(tmp_path, row, message):
    path = tmp_path / "bad.csv"
    path.write_text(",".join(COLUMNS) + "\nTable 2,rmse,cartpole,pure,persim,0,0.025,\n" + row + "\n")
    with pytest.raises(PaperValuesError, match=rf"bad\.csv:3: (.*){re.escape(message)}"):
        load_paper_values(path)


def test_packaged_with_the_wheel():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "analysis/*.csv" in data["tool"]["setuptools"]["package-data"]["persim_bench"]
    assert any(d.startswith("rliable") for d in data["project"]["dependencies"])


def test_no_ray_mlflow_or_config_imported():
    code = ("import sys; from persim_bench.analysis import build_report; build_report([], n_boot=10, labels={}); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'torch') or m in "
            "('persim_bench.config', 'persim_bench.orchestrate', 'persim_bench.tables') "
            "or m.startswith('persim_bench.orchestration')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------------------- statistics

def _sample(rng, seeds: int, episodes: int) -> list[np.ndarray]:
    return [rng.normal(100 + rng.normal(0, 5), 20, episodes) for _ in range(seeds)]


def test_bootstrap_ci_contains_the_mean_and_shrinks_with_more_samples():
    rng = np.random.default_rng(0)
    small, large = _sample(rng, 3, 10), _sample(rng, 30, 100)
    mean, low, high = bootstrap_ci(small, n_boot=2000, seed=1)
    assert mean == pytest.approx(np.mean([s.mean() for s in small]))
    assert low < mean < high
    mean_l, low_l, high_l = bootstrap_ci(large, n_boot=2000, seed=1)
    assert low_l < mean_l < high_l
    assert high_l - low_l < 0.5 * (high - low)
    narrower = bootstrap_ci(small, n_boot=2000, seed=1, level=0.5)
    assert high - low > narrower[2] - narrower[1]


def test_bootstrap_ci_is_seeded_and_weights_seeds_equally():
    samples = [[1.0, 2.0, 3.0], [10.0], [4.0, 6.0]]  # ragged: seed means 2, 10, 5
    first = bootstrap_ci(samples, n_boot=500, seed=7)
    assert first == bootstrap_ci(samples, n_boot=500, seed=7)
    assert first != bootstrap_ci(samples, n_boot=500, seed=8)
    assert first[0] == pytest.approx(17 / 3)
    assert 2.0 <= first[1] and first[2] <= 10.0
    assert bootstrap_ci([3.0, 3.0, 3.0], n_boot=100, seed=0) == (3.0, 3.0, 3.0)  # flat: one value per seed
    # one seed: only the episode level varies, so the CI must come from resampling episodes
    mean, low, high = bootstrap_ci([np.arange(20.0)], n_boot=2000, seed=0)
    assert mean == 9.5 and 6.0 < low < 9.0 and 10.0 < high < 13.0  # about mean +- 1.96 x 5.77 / sqrt(20)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([[1.0, math.nan]], n_boot=10, seed=0)


def test_iqm_and_optimality_gap_match_hand_computation():
    scores = np.arange(1.0, 9.0).reshape(2, 4)  # 8 scores: IQM drops 1, 2 and 7, 8
    result = aggregate_metrics({"m": scores, "n": np.array([[0.5, 1.5], [1.0, 0.0]])}, n_boot=300, seed=0)
    assert result["m"]["iqm"].point == pytest.approx((3 + 4 + 5 + 6) / 4)
    assert result["m"]["mean"].point == pytest.approx(4.5)
    assert result["n"]["optimality_gap"].point == pytest.approx(1 - (0.5 + 1 + 1 + 0) / 4)  # 1.5 clipped to 1
    for method in result.values():
        for interval in method.values():
            assert interval.low <= interval.point <= interval.high
    assert result == aggregate_metrics({"m": scores, "n": np.array([[0.5, 1.5], [1.0, 0.0]])}, n_boot=300, seed=0)


def test_stratified_bootstrap_resamples_runs_within_tasks():
    """Tasks with one constant value per task: any within-task resample keeps the mean, so the CI is a point."""
    scores = np.tile([0.2, 0.4, 0.9], (4, 1))
    interval = aggregate_metrics({"m": scores}, n_boot=200, seed=0)["m"]["mean"]
    assert interval.low == pytest.approx(0.5) and interval.high == pytest.approx(0.5)


def test_normalise_and_profile_figure(tmp_path):
    assert normalise(-500.0, -500.0, -200.0) == 0 and normalise(-200.0, -500.0, -200.0) == 1
    assert normalise(-350.0, -500.0, -200.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        normalise(1.0, 2.0, 2.0)
    np.testing.assert_allclose(score_distribution(np.array([[0.1, 0.6], [0.8, 1.2]]), [0.0, 0.5, 1.0]), [1, 0.75, 0.25])
    rng = np.random.default_rng(0)
    path = performance_profile_figure({"a": rng.uniform(0, 1, (3, 6)), "b": rng.uniform(0.5, 1.2, (3, 6))},
                                      tmp_path / "profile.png", n_boot=50)
    assert path.read_bytes()[:8] == PNG


# ---------------------------------------------------------------------------------------- factors (Figure 1)

def test_probe_r2_recovers_linear_covariates_and_not_random_ones():
    rng = np.random.default_rng(0)
    covariates = rng.uniform(0, 1, (80, 2))
    linear = covariates @ rng.normal(size=(2, 4)) + 0.01 * rng.normal(size=(80, 4))
    assert probe_r2(linear, covariates, folds=5, seed=0) == pytest.approx([1, 1], abs=0.02)
    noise = rng.normal(size=(80, 4))
    assert (probe_r2(noise, covariates, folds=5, seed=0) < 0.15).all()
    members = np.stack([linear[:, :2], linear[:, 2:]])  # [members=2, agents, r=2]
    assert agent_matrix(members).shape == (80, 4)
    np.testing.assert_allclose(agent_matrix(members), linear)


def test_tsne_figure_is_written(tmp_path):
    rng = np.random.default_rng(0)
    covariates = rng.uniform(0, 1, (25, 2))
    factors = np.stack([covariates @ rng.normal(size=(2, 3)) for _ in range(2)])  # ensemble of 2
    path = tsne_figure(factors, covariates, ["length", "force"], tmp_path / "fig" / "tsne.png", seed=0)
    assert path.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="names"):
        tsne_figure(factors, covariates, ["length"], tmp_path / "x.png")


# ---------------------------------------------------------------------------------------- report

def _record(algo, regime, seed, **metrics):
    return {"algo": algo, "env": "cartpole", "regime": regime, "seed": seed, "metrics": metrics}


# CartPole / Pure / agent 0 in the paper: PerSim 194.2 +- 3.23, RMSE 0.003 (R^2 1.000); Vanilla CaDM 37.83,
# RMSE 3.190 (R^2 -0.698); BCQ-P 166.2 +- 39.3; True env + MPC 198.9.
RECORDS = [
    _record("persim", "pure", 0, reward_agent0=180.0, episode_returns_agent0=[175.0, 185.0], rmse_agent0=0.004,
            r2_agent0=0.99),
    _record("persim", "pure", 1, reward_agent0=200.0, episode_returns_agent0=[195.0, 205.0], rmse_agent0=0.006,
            r2_agent0=0.99),
    _record("cadm_vanilla", "pure", 0, reward_agent0=30.0, rmse_agent0=8.0, r2_agent0=-0.5),
    _record("cadm_vanilla", "pure", 1, reward_agent0=40.0, rmse_agent0=8.0, r2_agent0=-0.5, rmse_agent1=math.nan),
    _record("bcq_p", "pure", 0, reward_agent0=195.0),
    _record("bcq_p", "pure", 1, reward_agent0=197.0),
    _record("true_env_mpc", "none", 0, reward_agent0=200.0),
    _record("true_env_mpc", "none", 1, reward_agent0=200.0),
]
SUMMARIES = {("cartpole", "pure"): {"test_returns": [184, 200, 196, 177, 100], "mean_return": 187.12 * 1.05,
                                    "mean_length": 150.0}}


@pytest.fixture(scope="module")
def report():
    return build_report(RECORDS, SUMMARIES, random_scores={"cartpole": 20.0}, n_boot=400, seed=0, labels=LABELS)


def _rows(report, table):
    t = report.tables[table]
    return [dict(zip(t["columns"], row)) for row in t["rows"]]


def test_report_cells_ratios_and_verdicts(report):
    reward = {(r["method"], r["agent"]): r for r in _rows(report, "paper_reward")}
    assert set(reward) == {("PerSim", "0"), ("Vanilla CaDM", "0"), ("BCQ-P", "0"), ("True env + MPC", "0")}
    persim = reward["PerSim", "0"]
    assert (persim["paper"], persim["paper table"]) == ("194.2 +- 3.23", "6/13")
    assert (persim["ours"], persim["seeds"]) == ("190", "2")
    assert persim["ours/paper"] == f"{190 / 194.2:.4g}" and persim["verdict"] == "agrees"  # 2.2% off
    assert reward["Vanilla CaDM", "0"]["ours/paper"] == f"{35 / 37.83:.4g}"
    assert reward["Vanilla CaDM", "0"]["verdict"] == "agrees"  # 7.5% off
    assert reward["BCQ-P", "0"]["ours/paper"] == f"{196 / 166.2:.4g}"
    assert reward["BCQ-P", "0"]["verdict"] == "differs"  # 18% off, and 166.2 outside our CI [195, 197]
    assert reward["True env + MPC", "0"]["verdict"] == "agrees"
    low, high = (float(x) for x in persim["95% CI"].strip("[]").split(", "))
    assert 175 <= low < 190 < high <= 205

    prediction = {(r["method"], r["quantity"]): r for r in _rows(report, "paper_prediction")}
    assert len(prediction) == 4  # agent 1's NaN RMSE is not a cell
    assert prediction["PerSim", "rmse"]["ours/paper"] == f"{0.005 / 0.003:.4g}"
    assert prediction["PerSim", "rmse"]["verdict"] == "agrees"  # 0.005 <= 2 x 0.0035
    assert prediction["PerSim", "r2"]["verdict"] == "differs"  # 1 - R^2 = 0.01 > 4 x 0.0005
    assert prediction["Vanilla CaDM", "rmse"]["verdict"] == "differs"  # 8.0 / 3.19 = 2.5x
    assert prediction["Vanilla CaDM", "r2"]["verdict"] == "agrees"  # 1.5 vs 1.698
    assert prediction["Vanilla CaDM", "rmse"]["95% CI"] == "[8, 8]"


def test_report_table8(report):
    data = {(r["quantity"], r["agent"]): r for r in _rows(report, "paper_data")}
    assert len(data) == 7
    assert data["data_return_test_agent", "0"]["verdict"] == "agrees"
    assert data["data_return_test_agent", "4"]["verdict"] == "differs"  # 100 vs 200
    assert data["data_return_test_agent", "4"]["ours/paper"] == "0.5"
    assert data["data_mean_return", ""]["verdict"] == "agrees" and data["data_mean_return", ""]["ours/paper"] == "1.05"
    assert data["data_mean_length", ""]["verdict"] == "differs"


def test_report_claims(report):
    claims = {r["claim"]: r for r in _rows(report, "claims")}
    assert set(claims) == {"PerSim's RMSE below Vanilla CaDM's", "PerSim's reward above Vanilla CaDM's",
                           "PerSim's reward above BCQ-P's", "PerSim's reward at most 10% below True env + MPC's"}
    rmse = claims["PerSim's RMSE below Vanilla CaDM's"]
    assert (rmse["ours"], rmse["agents holding"], rmse["paper"]) == ("holds", "1/1", "holds")
    assert rmse["worst agent (ours)"] == "agent 0: baseline/PerSim = 1,600x"
    vanilla = claims["PerSim's reward above Vanilla CaDM's"]
    assert vanilla["ours"] == "holds" and vanilla["worst agent (ours)"] == "agent 0: PerSim - baseline = +155"
    bcq = claims["PerSim's reward above BCQ-P's"]
    assert (bcq["ours"], bcq["agents holding"], bcq["paper"]) == ("fails", "0/1", "holds")
    assert bcq["worst agent (ours)"] == "agent 0: PerSim - baseline = -6"
    true_env = claims["PerSim's reward at most 10% below True env + MPC's"]
    assert (true_env["ours"], true_env["paper"]) == ("holds", "holds")
    assert true_env["worst agent (ours)"] == "agent 0: (PerSim - True env) / |True env| = -5.0%"


def test_report_aggregates(report):
    assert report.tasks == ("cartpole/pure/agent0",)
    np.testing.assert_allclose(report.normalised_scores["persim"], [[160 / 180], [1.0]])
    np.testing.assert_allclose(report.normalised_scores["cadm_vanilla"], [[10 / 180], [20 / 180]])
    rows = {r["method"]: r for r in _rows(report, "aggregates")}
    assert set(rows) == {"PerSim", "Vanilla CaDM", "BCQ-P"}
    assert rows["PerSim"]["IQM"].startswith(f"{(160 / 180 + 1) / 2:.3f} [")  # 2 scores: IQM trims nothing
    assert rows["PerSim"]["optimality gap"].startswith(f"{1 - (160 / 180 + 1) / 2:.3f} [")
    assert (rows["PerSim"]["runs"], rows["PerSim"]["tasks"]) == ("2", "1")


def test_report_markdown_is_deterministic_and_checks_records(report):
    again = build_report(RECORDS, SUMMARIES, random_scores={"cartpole": 20.0}, n_boot=400, seed=0, labels=LABELS)
    assert again.markdown == report.markdown
    assert report.markdown.startswith("# Reproduction report")
    for heading in ("## Agreement", "## Claims", "## Aggregates", "## Prediction error", "## Reward",
                    "## Offline data"):
        assert heading in report.markdown
    agreement = {r["quantity"]: r for r in _rows(report, "agreement")}
    assert (agreement["reward"]["cells"], agreement["reward"]["agree"]) == ("4", "3")
    with pytest.raises(ValueError, match="records 0 and 1"):
        build_report([RECORDS[0], RECORDS[0]], n_boot=10, labels=LABELS)
    # without random scores the random regime's logged returns normalise; without them no aggregates
    assert build_report(RECORDS, SUMMARIES, n_boot=10, labels=LABELS).tables["aggregates"]["rows"] == []


def test_report_states_where_the_grid_departs_from_the_paper():
    """A verdict on 4 of 300 epochs must say so: the protocol table lists every such setting, per env where the
    setting is per env, and nothing where the grid is the paper's."""
    paper = load_grid("paper")
    short = paper.model_copy(update={
        "envs": ["cartpole", "halfcheetah"], "seeds": [0], "algos": ["persim", "cadm_vanilla", "cql_p"],
        "persim": paper.persim.model_copy(update={"epochs": 4}),
        "planner": paper.planner.model_copy(update={"candidates": {"cartpole": 1000, "halfcheetah": 50},
                                                    "max_rows": 10}),
        "cadm": paper.cadm.model_copy(update={"iterations": 1}),
        "bcq": paper.bcq.model_copy(update={"steps": 10}),  # no BCQ in this grid: not its protocol
        "cql": paper.cql.model_copy(update={"steps": 10}),  # beyond the paper: no paper protocol to depart from
        "data": paper.data.model_copy(update={"num_workers": 1})})  # how work is spread, not what it computes
    rows = {(r[0], r[1]): r[2:] for r in protocol_differences(short, paper)["rows"]}
    assert rows == {("seeds", "all"): ["1", "5"], ("persim.epochs", "all"): ["4", "300"],
                    ("planner.candidates", "halfcheetah"): ["50", "200"], ("cadm.iterations", "all"): ["1", "100"]}
    built = build_report(RECORDS, SUMMARIES, n_boot=10, labels=LABELS, protocol=protocol_differences(short, paper))
    assert built.markdown.index("## Protocol") < built.markdown.index("## Agreement")
    assert "| persim.epochs | all | 4 | 300 |" in built.markdown
    same = build_report(RECORDS, SUMMARIES, n_boot=10, labels=LABELS, protocol=protocol_differences(paper, paper))
    assert "None: this grid runs the paper's protocol." in same.markdown


def test_report_tables_fit_the_table_writers(report):
    """Same shape as the grid tables (analysis/grid_tables.py), so the Markdown/LaTeX/CSV writers take them."""
    for name, table in report.tables.items():
        assert set(table) == {"title", "columns", "rows"}, name
        for row in table["rows"]:
            assert len(row) == len(table["columns"]) and all(isinstance(cell, str) for cell in row), (name, row)


def test_the_paper_agrees_with_itself(values):
    """Records that are the paper's own numbers: every cell agrees (ratio 1) and every claim's verdict on
    'our' numbers is the paper's."""
    metrics: dict[tuple, dict] = {}
    for (quantity, env, regime, method, agent), v in canonical(values).items():
        if quantity in ("rmse", "r2", "reward"):
            metrics.setdefault((method, env, regime), {})[f"{quantity}_agent{agent}"] = v.value
    records = [{"algo": m, "env": e, "regime": r, "seed": 0, "metrics": x} for (m, e, r), x in metrics.items()]
    def paper(quantity, env, regime, agent):
        return lookup(values, quantity, env, regime, "data", agent).value

    summaries = {(v.env, v.regime): {"test_returns": [paper("data_return_test_agent", v.env, v.regime, a)
                                                      for a in range(5)],
                                     "mean_return": v.value,
                                     "mean_length": paper("data_mean_length", v.env, v.regime, None)}
                 for v in values if v.quantity == "data_mean_return"}
    built = build_report(records, summaries, n_boot=20, labels=LABELS)
    for name in ("paper_prediction", "paper_reward", "paper_data"):
        rows = _rows(built, name)
        assert rows and all(r["verdict"] == "agrees" and r["ours/paper"] in ("1", "-") for r in rows), name
    assert len(_rows(built, "paper_reward")) == 315 and len(_rows(built, "paper_prediction")) == 355
    claims = _rows(built, "claims")
    assert len(claims) == 3 * 4 * 2 + 3 * 4 * 4 + 2 * 4
    assert all(r["ours"] == r["paper"] or r["paper"].startswith("fails") and r["ours"] == "fails" for r in claims)
    # the paper's own numbers do not support every claim: BCQ beats PerSim in places, and PerSim falls more
    # than 10% short of True env + MPC on CartPole / Random (agent 4: 119.1 vs 199.1)
    failing = {(r["claim"], r["env"], r["regime"]) for r in claims if r["ours"] == "fails"}
    assert ("PerSim's reward at most 10% below True env + MPC's", "cartpole", "random") in failing
    assert ("PerSim's reward above BCQ-P's", "halfcheetah", "pure") in failing
    assert not any(claim.startswith("PerSim's RMSE") for claim, _, _ in failing)
    # normalised by the paper's random-data returns (Table 8) between 0 and the paper's True env + MPC
    assert {r["method"] for r in _rows(built, "aggregates")} == {"PerSim", "Vanilla CaDM", "PE-TS CaDM", "BCQ-P",
                                                                   "BCQ-A"}
