"""The roofline counts what the ops do and bounds what they can reach; ``bench small`` reports against it."""
import pytest
import torch

from persim_bench import bench
from persim_bench.roofline import Rates, best_seconds, count_work, limit_seconds, machine_rates

RATES = Rates(macs_per_second=1e10, read_rates=((1 << 20, 1e11), (1 << 24, 1e10)))


def test_a_matmul_counts_its_multiply_adds_and_each_tensor_once():
    a, b, out = torch.randn(64, 32), torch.randn(32, 16), torch.empty(64, 16)
    (macs, size), = count_work(lambda: torch.mm(a, b, out=out))  # out= is an argument and the result: once
    assert macs == 64 * 32 * 16 and size == 4 * (64 * 32 + 32 * 16 + 64 * 16)


def test_backward_and_optimizer_ops_are_counted_too():
    layer = torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)

    def step():
        optimizer.zero_grad()
        layer(torch.randn(16, 8)).square().sum().backward()
        optimizer.step()

    ops = count_work(step)
    assert sum(macs for macs, _ in ops) == 2 * 16 * 8 * 4  # forward and the weight's gradient (the input needs none)
    assert len(ops) > 10


def test_each_op_is_bound_by_its_slower_side_at_its_size():
    assert RATES.bandwidth(1 << 10) == RATES.bandwidth(1 << 25) == 1e11  # the fastest: tensors in L2
    assert limit_seconds([(1e10, 0.0)], RATES) == pytest.approx(1.0)              # compute-bound
    assert limit_seconds([(0.0, 1 << 25)], RATES) == pytest.approx((1 << 25) / 1e11)  # memory-bound
    assert RATES.memory_bound(1.0, 1 << 25) and not RATES.memory_bound(1e10, 1 << 10)


def test_a_large_matmul_runs_near_its_limit():
    rates = machine_rates(1)
    a, b, out = torch.randn(5, 512, 512), torch.randn(5, 512, 512), torch.empty(5, 512, 512)
    call = lambda: torch.bmm(a, b, out=out)  # noqa: E731
    share = limit_seconds(count_work(call), rates) / best_seconds(call)
    # The matmul rate is this very op's: near 1 on an idle machine (the spread allows for a busy one).
    assert 0.3 < share < 2


@pytest.mark.integration
def test_bench_small_reports_shares_of_the_limit_and_the_speed_up_of_the_fit():
    rows = bench.small_model_rows(envs=("cartpole",), threads=(1,), planner_rows=2000)
    assert [r["what"].split(": ")[1] for r in rows] == [
        "PerSim fit (gradient steps/s)", "PerSim planner (model rows/s)", "Vanilla CaDM fit (gradient steps/s)",
        "Vanilla CaDM planner (model rows/s)"]
    for row in rows:
        assert row["ours"] > 0 and 0 < row["share"] < 1.5 and row["bound"] in ("memory", "compute")
    assert rows[0]["versus"] > 0 and rows[0]["target"] == 3.0
    assert all(0.05 < row["priced"] < 20 for row in rows)  # the cost model prices each call within reason
    table = bench.render_roofline(rows)
    assert "vs the code it replaced" in table and "cost model / measured" in table and "G multiply-adds/s" in table
