"""persim_bench.analysis.efficiency: the data-efficiency experiment's points, table, figures and findings.

Fast (no Ray, no MLflow, no envs): synthetic records, small bootstraps.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from persim_bench.analysis import efficiency
from persim_bench.analysis.efficiency import (
    EFFICIENCY_COLUMNS,
    efficiency_figures,
    efficiency_findings,
    efficiency_points,
    efficiency_table,
)

LABELS = {"persim": "PerSim", "cadm_vanilla": "CaDM", "bcq_p": "BCQ-P", "true_env_mpc": "True env + MPC"}
AGENTS = (0, 1, 2)
RANDOM = {("cartpole", a): 0.0 for a in AGENTS}
PNG = b"\x89PNG\r\n\x1a\n"
N_BOOT = 500


def record(algo, seed, metrics, agents=None, steps=None, env="cartpole", regime="pure"):
    return {"algo": algo, "env": env, "regime": regime if algo != "true_env_mpc" else "none", "seed": seed,
            "agents": agents, "steps_per_agent": steps, "metrics": metrics}


def reference(seed, reward=100.0, env="cartpole"):
    return record("true_env_mpc", seed, {f"reward_agent{a}": reward for a in AGENTS}, env=env)


def points(records, **kwargs):
    return efficiency_points(records, full_agents=500, test_agents=AGENTS, random_scores=RANDOM, n_boot=N_BOOT,
                             **kwargs)


def scaling_records(rng, seeds=4, noise=0.001):
    """PerSim's RMSE equals CaDM's (0.1) at N=10 and is half of it at N=100 and 500; rewards the other way."""
    persim = {10: 0.1, 50: 0.08, 100: 0.05, 500: 0.05}
    records = [reference(s) for s in range(seeds)]
    for n, mine in persim.items():
        for s in range(seeds):
            for algo, rmse, reward in (("persim", mine, 100 * (1.1 - mine * 4)), ("cadm_vanilla", 0.1, 70.0)):
                metrics = {f"rmse_agent{a}": rmse + noise * rng.standard_normal() for a in AGENTS}
                metrics |= {f"reward_agent{a}": reward + 100 * noise * rng.standard_normal() for a in AGENTS}
                if algo == "persim":
                    metrics |= {"probe_r2_length": 0.5 + n / 1000, "probe_r2_force": 0.3}
                records.append(record(algo, s, metrics, agents=None if n == 500 else n))
    return records


# ---------------------------------------------------------------------------------------- points

def test_ci_contains_the_mean_and_narrows_with_more_seeds():
    rng = np.random.default_rng(0)
    width = {}
    for seeds in (3, 30):
        records = [reference(s) for s in range(seeds)]
        records += [record("persim", s, {f"rmse_agent{a}": 0.1 + 0.02 * rng.standard_normal() for a in AGENTS} |
                           {f"reward_agent{a}": 60 + 10 * rng.standard_normal() for a in AGENTS})
                    for s in range(seeds)]
        [point] = points(records)
        assert point.seeds == seeds
        assert point.rmse_low < point.rmse < point.rmse_high
        assert point.reward_low < point.reward < point.reward_high
        expected = np.mean([np.mean([r["metrics"][f"rmse_agent{a}"] for a in AGENTS])
                            for r in records if r["algo"] == "persim"])
        assert point.rmse == pytest.approx(expected)
        width[seeds] = (point.rmse_high - point.rmse_low, point.reward_high - point.reward_low)
    assert width[30][0] < 0.8 * width[3][0]
    assert width[30][1] < 0.8 * width[3][1]


def test_the_bootstrap_is_deterministic_for_a_seed_and_independent_of_record_order():
    records = scaling_records(np.random.default_rng(1))
    first, again, shuffled = points(records, seed=3), points(records, seed=3), points(records[::-1], seed=3)
    assert first == again
    assert {(p.algo, p.agents): p for p in first} == {(p.algo, p.agents): p for p in shuffled}
    assert points(records, seed=4)[0].rmse_low != first[0].rmse_low


def test_the_reward_is_normalised_against_the_same_seeds_reference():
    random = {("cartpole", a): 10.0 for a in AGENTS}
    records = [reference(0, 110.0), reference(1, 210.0),
               record("persim", 0, {f"reward_agent{a}": 110.0 for a in AGENTS}),  # 1.0 of seed 0's reference
               record("persim", 1, {f"reward_agent{a}": 110.0 for a in AGENTS})]  # 0.5 of seed 1's reference
    [point] = efficiency_points(records, 500, AGENTS, random, n_boot=N_BOOT)
    assert point.reward == pytest.approx(0.75)  # against the mean reference (160) it would be 0.667
    assert (point.reward_low, point.reward_high) == pytest.approx((0.5, 1.0))
    # seed 2 has no reference trial: the reference's mean over seeds (160) stands in
    records.append(record("persim", 2, {f"reward_agent{a}": 85.0 for a in AGENTS}))
    [point] = efficiency_points(records, 500, AGENTS, random, n_boot=N_BOOT)
    assert point.reward == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    # no reference at all: no normalised reward, but the point is still there
    [point] = efficiency_points(records[2:], 500, AGENTS, random, n_boot=N_BOOT)
    assert math.isnan(point.reward) and point.seeds == 3


def test_agents_none_is_the_full_dataset_and_steps_none_is_all():
    records = [reference(0)] + [record("persim", 0, {"rmse_agent0": 0.1}, agents=n, steps=k)
                                for n, k in ((None, None), (None, 20), (10, None))]
    found = [(p.agents, p.steps_per_agent) for p in points(records)]
    assert found == [(10, None), (500, 20), (500, None)]  # by N, then k with all last
    table = efficiency_table(points(records), LABELS)
    assert [(row[3], row[4]) for row in table["rows"]] == [("10", "all"), ("500", "20"), ("500", "all")]
    with pytest.raises(ValueError, match="one record per trial"):
        points(records + [record("persim", 0, {"rmse_agent0": 0.2}, agents=500)])


def test_nan_and_missing_metrics_are_left_out_per_agent_and_per_seed():
    records = [reference(0), reference(1),
               record("persim", 0, {"rmse_agent0": 0.1, "rmse_agent1": math.nan, "rmse_agent2": 0.3}),
               record("persim", 1, {"rmse_agent0": math.nan, "probe_r2_length": math.nan})]
    [point] = points(records)
    assert point.rmse == pytest.approx(0.2) and point.seeds == 2
    assert math.isnan(point.reward) and point.probe_r2 == {}


def test_nan_only_metrics_do_not_crash(tmp_path):
    nan = {f"{q}_agent{a}": math.nan for q in ("rmse", "reward") for a in AGENTS} | {"probe_r2_length": math.nan}
    records = [record("true_env_mpc", 0, {f"reward_agent{a}": math.nan for a in AGENTS}),
               record("persim", 0, nan), record("cadm_vanilla", 0, nan)]
    found = points(records)
    assert len(found) == 2 and all(math.isnan(p.rmse) and math.isnan(p.reward) for p in found)
    table = efficiency_table(found, LABELS)
    assert [row[6:] for row in table["rows"]] == [["-", "-", "-"]] * 2
    assert efficiency_figures(found, tmp_path, LABELS) == []
    assert efficiency_findings(found, LABELS) == []


def test_the_reference_is_not_a_point_and_probes_are_means_over_seeds():
    records = scaling_records(np.random.default_rng(2))
    found = points(records)
    assert {p.algo for p in found} == {"persim", "cadm_vanilla"}
    persim_full = next(p for p in found if p.algo == "persim" and p.agents == 500)
    assert persim_full.probe_r2 == pytest.approx({"force": 0.3, "length": 1.0})
    assert next(p for p in found if p.algo == "cadm_vanilla").probe_r2 == {}


# ---------------------------------------------------------------------------------------- table

def test_table_rows_and_columns():
    found = points(scaling_records(np.random.default_rng(3)))
    table = efficiency_table(found, LABELS, title_suffix="(synthetic)")
    assert table["columns"] == EFFICIENCY_COLUMNS == ["env", "regime", "method", "N", "k", "seeds", "RMSE [95% CI]",
                                                      "reward (normalised) [95% CI]", "probe R^2"]
    assert table["title"].endswith("(synthetic)") and "True env + MPC" in table["title"]
    assert len(table["rows"]) == 8 and all(len(row) == len(table["columns"]) for row in table["rows"])
    # methods in first-appearance order (PerSim's records come first), then N ascending
    assert [(row[2], row[3]) for row in table["rows"]] == [
        (m, n) for m in ("PerSim", "CaDM") for n in ("10", "50", "100", "500")]
    persim_500 = table["rows"][3]
    assert persim_500[:6] == ["cartpole", "pure", "PerSim", "500", "all", "4"]
    point = next(p for p in found if p.algo == "persim" and p.agents == 500)
    assert persim_500[6] == f"{point.rmse:.4g} [{point.rmse_low:.4g}, {point.rmse_high:.4g}]"
    assert persim_500[7] == f"{point.reward:.3f} [{point.reward_low:.3f}, {point.reward_high:.3f}]"
    assert persim_500[8] == "force 0.30, length 1.00"
    assert table["rows"][4][8] == "-"


# ---------------------------------------------------------------------------------------- figures

def _capture_panels(monkeypatch):
    """The panel titles of every figure saved, recorded before the real save."""
    titles = []
    real = efficiency.save_figure

    def spy(fig, path):
        titles.append([ax.get_title() for ax in fig.axes])
        return real(fig, path)

    monkeypatch.setattr(efficiency, "save_figure", spy)
    return titles


def test_figures_are_written_as_png_and_pdf_with_every_panel(tmp_path, monkeypatch):
    titles = _capture_panels(monkeypatch)
    records = scaling_records(np.random.default_rng(4))
    records += [record("persim", s, {f"rmse_agent{a}": 0.2 / k ** 0.5 for a in AGENTS}, steps=k)
                for k in (10, 100) for s in range(2)]
    written = efficiency_figures(points(records), tmp_path / "figs", LABELS)
    figs = tmp_path / "figs"
    assert written == [figs / "efficiency_cartpole_pure.png", figs / "efficiency_cartpole_pure.pdf"]
    assert written[0].read_bytes().startswith(PNG) and written[1].read_bytes().startswith(b"%PDF")
    assert len(titles) == 1 and len(titles[0]) == 4
    assert any("vs k" in t for t in titles[0]) and any("reward" in t for t in titles[0])


def test_a_panel_without_data_is_left_out(tmp_path, monkeypatch):
    titles = _capture_panels(monkeypatch)
    records = [record("persim", s, {f"rmse_agent{a}": 0.1 / n for a in AGENTS}, agents=n)
               for n in (10, 100) for s in range(2)]  # prediction only: no reward, no probe, no k sweep
    records += [record("cadm_vanilla", 0, {f"rmse_agent{a}": 0.2 for a in AGENTS}, agents=10, env="pendulum")]
    written = efficiency_figures(points(records), tmp_path, LABELS)
    assert sorted(p.name for p in written) == ["efficiency_cartpole_pure.pdf", "efficiency_cartpole_pure.png",
                                               "efficiency_pendulum_pure.pdf", "efficiency_pendulum_pure.png"]
    assert all(p.exists() for p in written)
    assert titles == [["prediction error vs N (all transitions)"]] * 2


# ---------------------------------------------------------------------------------------- findings

def test_findings_say_where_the_advantage_appears_and_that_it_grows():
    found = points(scaling_records(np.random.default_rng(5)))
    findings = efficiency_findings(found, LABELS)
    rmse = [f for f in findings if "RMSE" in f]
    assert len(rmse) == 1 and len(findings) == 2
    [sentence] = rmse
    assert sentence.startswith("cartpole/pure: PerSim's RMSE is clearly below CaDM's")
    at_50 = {p.algo: p.rmse for p in found if p.agents == 50}
    assert f"from N=50 ({at_50['cadm_vanilla'] / at_50['persim']:.1f}x)" in sentence  # N=10: equal, CIs overlap
    assert "CaDM/PerSim RMSE ratio grows from 1.0x at N=10 to 2.0x at N=500" in sentence
    assert "holds up to N=500" in sentence and "vanishes" not in sentence
    [reward] = [f for f in findings if "reward" in f]
    # normalised rewards: PerSim 0.70, 0.78, 0.90, 0.90 of the reference; CaDM 0.70 at every N
    assert reward.startswith("cartpole/pure: PerSim's normalised reward is clearly above CaDM's")
    assert "from N=50 (+0.08)" in reward and "reward difference grows from " in reward
    assert "at N=10 to +0.20 at N=500" in reward


def test_findings_say_where_the_advantage_vanishes_and_when_there_is_none():
    rng = np.random.default_rng(6)
    records = [reference(s) for s in range(4)]
    for n, mine, theirs in ((10, 0.05, 0.1), (100, 0.05, 0.1), (500, 0.1, 0.1)):
        for s in range(4):
            for algo, rmse in (("persim", mine), ("cadm_vanilla", theirs), ("bcq_p", None)):
                metrics = {f"reward_agent{a}": 50 + rng.standard_normal() for a in AGENTS}
                if rmse is not None:
                    metrics |= {f"rmse_agent{a}": rmse + 0.001 * rng.standard_normal() for a in AGENTS}
                records.append(record(algo, s, metrics, agents=n))
    findings = efficiency_findings(points(records), LABELS)
    [rmse] = [f for f in findings if "RMSE" in f]
    assert "from N=10 (2.0x)" in rmse and "shrinks from 2.0x at N=10 to 1.0x at N=500" in rmse
    assert "vanishes at N=500 (1.0x, the CIs overlap)" in rmse
    # equal rewards: never clearly better, for CaDM and for BCQ-P (which has no RMSE: no RMSE sentence)
    reward = [f for f in findings if "reward" in f]
    assert len(reward) == 2 and all("never clearly above" in f and "N=10-500" in f for f in reward)
    assert any("BCQ-P" in f for f in reward) and not any("BCQ-P" in f for f in findings if "RMSE" in f)


def test_findings_follow_the_focus_and_its_label():
    found = points(scaling_records(np.random.default_rng(7)))
    findings = efficiency_findings(found, {"cadm_vanilla": "CaDM (vanilla)"}, focus="cadm_vanilla")
    [rmse] = [f for f in findings if "RMSE" in f]
    assert rmse.startswith("cartpole/pure: CaDM (vanilla)'s RMSE is never clearly below persim's")
    assert "persim/CaDM (vanilla) RMSE ratio shrinks from 1.0x at N=10 to 0.5x at N=500" in rmse
    assert "; persim's RMSE is clearly below CaDM (vanilla)'s at N=" in rmse and "N=10," not in rmse.split("; ")[-1]
    assert efficiency_findings(found, LABELS, focus="absent") == []
