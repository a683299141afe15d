"""Speed benchmarks: each figure is a ratio against a baseline or limit measured in the same run.

``persim-bench bench data`` (or ``python -m persim_bench.bench data``) prints a Markdown table
that the README records. Targets come from the issues; a figure below target is reported,
not hidden.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import gymnasium
import numpy as np

from persim_bench.config import Grid
from persim_bench.envs import get_env


def timed(fn, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls: the least disturbed by other load on the machine."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def classic_batched_vs_gym_loop(env: str, n_agents: int, steps: int) -> dict:
    """Batched random-policy episodes for n agents vs the naive loop over gymnasium envs, one per agent."""
    family = get_env(env)
    gym_id, attribute = {"mountaincar": ("MountainCar-v0", ("gravity",)), "cartpole": ("CartPole-v1", ("length", "force_mag"))}[env]
    covariates = family.sample_covariates(np.random.default_rng(0), n_agents)

    def batched():
        rng = np.random.default_rng(1)
        sim = family.batch(covariates)
        sim.reset(rng)
        for _ in range(steps):  # terminated agents keep stepping: the same work as the loop below
            sim.step(family.random_actions(rng, n_agents))

    def gym_loop():
        rng = np.random.default_rng(1)
        for agent in range(n_agents):
            env_ = gymnasium.make(gym_id).unwrapped
            for name, value in zip(attribute, covariates[agent]):
                setattr(env_, name, value)
            if env == "cartpole":
                env_.polemass_length = env_.masspole * env_.length
            env_.reset(seed=int(rng.integers(1 << 30)))
            for _ in range(steps):
                _, _, terminated, _, _ = env_.step(int(rng.integers(family.n_actions)))
                if terminated:
                    env_.reset()

    fast, slow = timed(batched), timed(gym_loop, repeats=1)
    return {"what": f"{env}: batched generation vs per-agent gymnasium loop ({n_agents} agents x {steps} steps)",
            "ours_s": fast, "baseline_s": slow, "ratio": slow / fast, "target": 20.0}


def halfcheetah_batched_vs_raw_rollout(n_agents: int, steps: int) -> dict:
    """HalfCheetahBatch.step vs calling mujoco.rollout directly on the same models (the limit)."""
    import mujoco
    import mujoco.rollout

    from persim_bench.envs.halfcheetah import FRAME_SKIP

    family = get_env("halfcheetah")
    covariates = family.sample_covariates(np.random.default_rng(0), n_agents)
    sim = family.batch(covariates)
    actions = np.random.default_rng(1).uniform(-1, 1, size=(steps, n_agents, family.action_dim))

    def batched():
        sim.reset(np.random.default_rng(2))
        for t in range(steps):
            sim.step(actions[t])

    sim.reset(np.random.default_rng(2))
    initial = sim.state.copy()
    pool = mujoco.rollout.Rollout(nthread=sim.stepper.nthread)
    datas = [mujoco.MjData(sim.models[0]) for _ in range(max(sim.stepper.nthread, 1))]

    def raw():
        state = initial
        for t in range(steps):
            control = np.repeat(actions[t][:, None, :], FRAME_SKIP, axis=1)
            trajectory, _ = pool.rollout(sim.models, datas, state, control, nstep=FRAME_SKIP)
            state = trajectory[:, -1]

    ours, limit = timed(batched), timed(raw)
    env_steps = n_agents * steps
    return {"what": f"halfcheetah: batched step vs raw mujoco.rollout ({n_agents} agents x {steps} steps, "
                    f"{env_steps / ours:,.0f} vs {env_steps / limit:,.0f} env steps/s)",
            "ours_s": ours, "baseline_s": limit, "ratio": limit / ours, "target": 0.5}


def ray_workers_2_vs_1(grid: Grid) -> tuple[dict, float]:
    """The same datasets generated with one Ray actor and with two; returns the row and the 2-worker time."""
    import ray

    from persim_bench.data.generate import generate_datasets

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        times = {}
        for workers in (1, 2):
            with tempfile.TemporaryDirectory() as root:
                start = time.perf_counter()
                generate_datasets(grid, Path(root), num_workers=workers, progress=False)
                times[workers] = time.perf_counter() - start
    finally:
        ray.shutdown()
    n = grid.data.n_agents * len(grid.envs)
    row = {"what": f"datasets with 2 Ray workers vs 1 ({n} trajectories: {', '.join(grid.envs)}, random regime)",
           "ours_s": times[2], "baseline_s": times[1], "ratio": times[1] / times[2], "target": 1.6}
    return row, times[2]


def data_benchmarks(quick: bool) -> list[dict]:
    scale = 0.1 if quick else 1.0
    rows = [
        classic_batched_vs_gym_loop("mountaincar", int(500 * scale), 500),
        classic_batched_vs_gym_loop("cartpole", int(500 * scale), 200),
        halfcheetah_batched_vs_raw_rollout(int(500 * scale), 50 if quick else 200),
    ]
    n_agents = 50 if quick else 500
    paper_random = Grid(name="bench", envs=["mountaincar", "cartpole", "halfcheetah"], regimes=["random"],
                        data={"n_agents": n_agents, "agents_per_shard": max(5, n_agents // 10)})
    row, seconds = ray_workers_2_vs_1(paper_random)
    rows.append(row)
    print(f"\npaper.yaml random regime ({3 * n_agents} trajectories, paper horizons) with 2 workers: {seconds:.1f} s")
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| benchmark | ours (s) | baseline (s) | ratio | target | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        met = "yes" if r["ratio"] >= r["target"] else "NO"
        lines.append(f"| {r['what']} | {r['ours_s']:.3f} | {r['baseline_s']:.3f} | {r['ratio']:.2f}x | "
                     f">= {r['target']}x | {met} |")
    return "\n".join(lines)


def main(what: str, quick: bool = False) -> None:
    benchmarks = {"data": data_benchmarks}
    print(render(benchmarks[what](quick)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["data"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    main(args.what, args.quick)
