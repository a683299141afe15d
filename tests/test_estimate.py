"""The dry-run estimate: trial counts come from the stages' own code, CPU-hours scale as the grid says, no Ray."""
from __future__ import annotations

import re

import pytest
import ray
import torch

from persim_bench.config import load_grid
from persim_bench.data.dataset import LAYOUT, MANIFEST, dataset_dir, write_json
from persim_bench.data.generate import dataset_plans
from persim_bench.data.policies import policy_jobs
from persim_bench.algos.persim import persim_fit_seconds
from persim_bench.costmodel import measure_rate
from persim_bench.orchestration.estimate import StageEstimate, check_cost, check_memory, estimate, format_estimate
from persim_bench.algos.persim import rank_cv_trials
from persim_bench.orchestration.trials import main_trials

RATE = 30e9  # a fixed rate keeps every number deterministic


def stages(grid, **kwargs) -> dict[str, StageEstimate]:
    return {stage.stage: stage for stage in estimate(grid, RATE, **kwargs)}


def with_spec(grid, field: str, **update):
    return grid.model_copy(update={field: getattr(grid, field).model_copy(update=update)})


@pytest.mark.parametrize("name", ["smoke", "paper"])
def test_counts_are_the_stages_own(name, tmp_path):
    grid = load_grid(name)
    got = stages(grid)
    assert [s.stage for s in estimate(grid, RATE)] == ["policies", "datasets", "rank_cv", "main"]
    assert got["main"].trials == len(main_trials(grid))
    assert got["rank_cv"].trials == len(rank_cv_trials(grid))
    assert got["policies"].trials == len(policy_jobs(grid))
    assert got["datasets"].trials == sum(plan.n_shards for plan in dataset_plans(grid, tmp_path))
    assert set(got["main"].by_algo) == set(grid.algos)
    assert got["main"].cpu_hours == pytest.approx(sum(got["main"].by_algo.values()))
    assert all(stage.cpu_hours > 0 for stage in got.values() if stage.trials)


def test_doubling_persim_epochs_doubles_its_fit():
    grid = load_grid("smoke")
    doubled = with_spec(grid, "persim", epochs=2 * grid.persim.epochs)
    assert persim_fit_seconds(doubled, "cartpole", 4000, 5, 0.0, RATE) == pytest.approx(
        2 * persim_fit_seconds(grid, "cartpole", 4000, 5, 0.0, RATE))
    before, after = stages(grid), stages(doubled)
    assert after["rank_cv"].cpu_hours == pytest.approx(2 * before["rank_cv"].cpu_hours)  # rank_cv is fits only
    assert after["main"].by_algo["persim"] > before["main"].by_algo["persim"]
    for algo in ("cadm_vanilla", "bcq_p", "true_env_mpc"):
        assert after["main"].by_algo[algo] == before["main"].by_algo[algo]


def test_the_ranking_test_is_priced_for_the_learned_models_only():
    from persim_bench.config import with_evaluation

    grid = load_grid("smoke")
    before, after = stages(grid), stages(with_evaluation(grid, {"plan_ranking": 8}, "test"))
    for algo in ("persim", "cadm_vanilla"):
        assert after["main"].by_algo[algo] > before["main"].by_algo[algo]
    for algo in ("bcq_p", "true_env_mpc"):
        assert after["main"].by_algo[algo] == before["main"].by_algo[algo]


def test_seeds_scale_main_linearly():
    grid = load_grid("smoke").model_copy(update={"seeds": [0]})
    one, three = stages(grid), stages(grid.model_copy(update={"seeds": [0, 1, 2]}))
    assert three["main"].trials == 3 * one["main"].trials
    assert three["main"].cpu_hours == pytest.approx(3 * one["main"].cpu_hours)
    assert three["rank_cv"].cpu_hours == pytest.approx(one["rank_cv"].cpu_hours)  # the first seed's only


def test_a_pinned_rank_empties_rank_cv():
    got = stages(with_spec(load_grid("paper"), "persim", rank=5))
    assert (got["rank_cv"].trials, got["rank_cv"].cpu_hours, got["rank_cv"].by_algo) == (0, 0.0, {})


@pytest.mark.parametrize("rank", ["cv", 5])
def test_sweep_ranks_multiplies_persim_trials(rank):
    grid = with_spec(load_grid("paper"), "persim", rank=rank, rank_grid=[3, 5, 10, 20])
    swept = with_spec(grid, "persim", sweep_ranks=True)
    persim = sum(trial.algo == "persim" for trial in main_trials(grid))
    before, after = stages(grid), stages(swept)
    assert after["main"].trials - before["main"].trials == (4 - 1) * persim
    assert after["main"].by_algo["persim"] > before["main"].by_algo["persim"]
    if rank == "cv":  # costed at the largest rank before the sweep: the other ranks cost less
        assert after["main"].by_algo["persim"] < 4 * before["main"].by_algo["persim"]
    assert after["main"].by_algo["cadm_pets"] == before["main"].by_algo["cadm_pets"]


def test_paper_costs_far_more_than_smoke():
    smoke = sum(s.cpu_hours for s in estimate(load_grid("smoke"), RATE))
    paper = sum(s.cpu_hours for s in estimate(load_grid("paper"), RATE))
    assert paper > 1000 * smoke


def test_a_manifest_gives_the_real_row_count(tmp_path):
    grid = load_grid("smoke").model_copy(update={"envs": ["cartpole"], "regimes": ["random"]})
    upper = stages(grid, data_root=tmp_path)["main"].by_algo["persim"]
    manifest = {"layout": LAYOUT, "env": "cartpole", "regime": "random", "n_agents": grid.data.n_agents, "rows": 100,
                "episode_steps": grid.data.episode_steps("cartpole")}
    write_json(manifest, dataset_dir(tmp_path, "cartpole", "random") / MANIFEST)
    assert stages(grid, data_root=tmp_path)["main"].by_algo["persim"] < upper
    write_json({**manifest, "n_agents": 7}, dataset_dir(tmp_path, "cartpole", "random") / MANIFEST)  # another grid's
    assert stages(grid, data_root=tmp_path)["main"].by_algo["persim"] == upper


def test_format_names_every_stage_and_the_total():
    grid = load_grid("smoke")
    text = format_estimate(grid, estimate(grid, RATE), RATE)
    for word in ("policies", "datasets", "rank_cv", "main", "persim", "total", "Assumes", "30 G"):
        assert word in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_no_ray_is_started(monkeypatch):
    was_running = ray.is_initialized()

    def refuse(*args, **kwargs):
        raise AssertionError("the estimate must not start Ray")

    monkeypatch.setattr(ray, "init", refuse)
    estimate(load_grid("paper"))  # measures the rate too
    if not was_running:  # another test's session cluster may be up; it is none of ours
        assert ray.is_initialized() is False


def test_measure_rate_is_a_plausible_single_core_rate():
    threads = torch.get_num_threads()
    rate = measure_rate(0.06)
    assert 1e8 < rate < 1e13
    assert torch.get_num_threads() == threads


def test_gpu_reservations_are_costed_at_the_gpu_rate_and_reported_as_gpu_hours(write_grid):
    from persim_bench.specs import Resources

    grid = load_grid("paper")
    on_gpu = grid.model_copy(update={"resources": {"persim": Resources(cpu=2, gpu=0.25)}})
    cpu_only = stages(grid)["main"]
    gpu = stages(on_gpu, gpu_rate=RATE * 100)["main"]
    assert set(gpu.by_algo_gpu) == {"persim"} and cpu_only.gpu_hours == 0.0
    # Same trials at a 100x rate: far fewer hours, held as 2 CPUs and a quarter GPU each.
    assert gpu.by_algo["persim"] == pytest.approx(8 * gpu.by_algo_gpu["persim"])
    assert gpu.by_algo_gpu["persim"] < cpu_only.by_algo["persim"] / 10
    assert gpu.by_algo["cadm_pets"] == pytest.approx(cpu_only.by_algo["cadm_pets"])
    text = format_estimate(on_gpu, estimate(on_gpu, RATE), RATE)
    assert "GPU-hours" in text and "GPU-hours" not in format_estimate(grid, estimate(grid, RATE), RATE)


@pytest.mark.parametrize("change, expected", [
    ({"data": {"n_agents": 1_000_000_000}}, r"dataset in a trial \([\d,]{17} transitions\) needs about"),
    ({"evaluation": {"reward_episodes": 1_000_000_000}}, r"reward episodes in lock-step needs about"),
])
def test_a_grid_too_big_for_the_machine_is_refused_before_anything_runs(write_grid, tmp_path, change, expected):
    from persim_bench import cli

    grid = write_grid({**_smoke_raw(), **change, "name": "too-big"})
    results = tmp_path / "results"
    for command in (["run"], ["data"]):
        with pytest.raises(SystemExit) as err:
            cli.main([*command, "--grid", str(grid), "--results", str(results)])
        assert re.search(expected, str(err.value.code)) and "--yes" in str(err.value.code)
    assert not results.exists()  # refused before Ray, MLflow or any file


def test_a_grid_above_the_cpu_hour_threshold_needs_yes(tmp_path):
    from persim_bench import cli

    with pytest.raises(SystemExit, match=r"grid 'paper': about [\d,]+ CPU-hours .* above --max-cpu-hours 1,000; pass --yes"):
        cli.main(["run", "--grid", "paper", "--results", str(tmp_path / "results")])
    check_cost(load_grid("paper"), None, max_cpu_hours=1e6, rate=RATE)  # a raised threshold lets it through
    check_memory(load_grid("smoke"), None)


def _smoke_raw() -> dict:
    import yaml

    from persim_bench.config import grid_path

    return yaml.safe_load(grid_path("smoke").read_text())
