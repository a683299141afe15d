"""The benchmark commands run end to end at quick sizes and report well-formed rows.

Speed targets are not asserted here (they live in docs/benchmarks.md's tables); a benchmark
that crashes or measures nothing is.
"""
import math

import pytest

from persim_bench import bench, gpu_check

pytestmark = pytest.mark.integration  # benchmarks at their (quick) sizes take minutes


def test_model_benchmarks_report_a_positive_time_and_ratio_per_row():
    rows = bench.model_benchmarks(quick=True)
    assert len(rows) == 6
    for row in rows:
        assert row["ours_s"] > 0 and row["baseline_s"] > 0 and math.isfinite(row["ratio"]) and row["ratio"] > 0
    table = bench.render(rows)
    assert table.count("\n") == len(rows) + 1 and "PE-TS CaDM planner step" in table
    assert "denormal, flushed (trials) vs IEEE" in table


def test_mpc_decision_latency_uses_a_paper_size_ensemble():
    row = bench.mpc_decision_latency("cartpole")
    assert row["seconds"] > 0 and "cartpole" in row["what"]


def test_mpc_benchmark_reports_the_planner_as_a_share_of_the_matmul_rate():
    row = bench.mpc_throughput_vs_matmul("cpu", quick=True)
    assert row["ours_s"] > 0 and row["baseline_s"] > 0 and 0 < row["ratio"] < 2  # a share, not a speed-up
    assert "(cpu)" in row["what"] and row["target"] == 0.8
    assert gpu_check.dense_matmul_flops_per_second("cpu", rows=64, repeats=1) > 1e8
