"""Speed benchmarks: each figure is a ratio against a baseline or limit measured in the same run.

``persim-bench bench data`` (or ``python -m persim_bench.bench data``) prints a Markdown table
that docs/benchmarks.md records. Targets come from the issues; a figure below target is reported,
not hidden.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import tempfile
import time
from pathlib import Path

import gymnasium
import numpy as np

from persim_bench.config import Grid, load_grid
from persim_bench.envs import get_env
from persim_bench.errors import BenchError
from persim_bench.gpu_check import mpc_throughput_vs_matmul, timed


# PerSim's rank in the model benchmarks (grids pick it by cross-validation): the paper's true
# MountainCar rank, and the ranks this project first ran CartPole and HalfCheetah at.
BENCH_RANK = {"mountaincar": 3, "cartpole": 5, "halfcheetah": 20}


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


def persim_data(env: str, n_agents: int, steps: int):
    """A random-regime dataset recorded in-process (no Ray): the training input of the model benchmarks."""
    from persim_bench.data.generate import DatasetPlan, record_shard

    plan = DatasetPlan(env, "random", "bench", 0, n_agents, steps, n_agents)
    data = record_shard(plan, 0)
    data.covariates = plan.covariates()
    return data


def ensemble_batched_vs_sequential(env: str, n_agents: int, steps: int, state_hidden: list[int], epochs: int) -> dict:
    """M=5 members trained as one batched module vs five single-member fits of the same steps."""
    from persim_bench.algos.persim import fit_persim
    from persim_bench.algos.persim import PersimSpec

    data = persim_data(env, n_agents, steps)
    spec = PersimSpec(epochs=epochs, ensemble=5, state_hidden=state_hidden, rank=BENCH_RANK[env])
    batched = timed(lambda: fit_persim(data, spec, seed=0), repeats=2)  # best of 2: the first pays warm-up
    single = spec.model_copy(update={"ensemble": 1})
    sequential = timed(lambda: [fit_persim(data, single, seed=m) for m in range(5)], repeats=2)
    return {"what": f"{env}: PerSim ensemble of 5 batched vs 5 sequential fits ({len(data):,} transitions, "
                    f"{epochs} epochs, state MLP {state_hidden})",
            "ours_s": batched, "baseline_s": sequential, "ratio": sequential / batched, "target": 3.0}


def matmul_flops_per_second(rows: int = 8192, width: int = 512) -> float:
    """This machine's dense float32 matmul rate at the planner's shapes: the limit for model rollouts."""
    import torch

    a, b = torch.randn(rows, width), torch.randn(width, width)
    seconds = timed(lambda: [torch.mm(a, b) for _ in range(20)])
    return 20 * 2 * rows * width * width / seconds


def planner_throughput_vs_matmul(rows: int) -> dict:
    """HalfCheetah-sized PerSim (paper sizes, rank 20, M=5) model steps per second, as a share of the matmul limit."""
    import torch

    from persim_bench.algos.persim import PerSimEnsemble

    family = get_env("halfcheetah")
    model = PerSimEnsemble("halfcheetah", 500, BENCH_RANK["halfcheetah"], 5, [256, 512, 512], [256, 256]).eval()
    per_member = rows // 5
    obs, action = torch.randn(5, per_member, family.obs_dim), torch.rand(per_member, family.action_dim) * 2 - 1
    agent = torch.zeros(per_member, dtype=torch.long)
    flops = 5 * per_member * sum(2 * p.shape[-1] * p.shape[-2] for n, p in model.named_parameters()
                                 if n.endswith("weight"))
    with torch.no_grad():
        seconds = timed(lambda: [model.step(obs, action, agent) for _ in range(10)]) / 10
    achieved, limit = flops / seconds, matmul_flops_per_second()
    return {"what": f"planner model evaluations: HalfCheetah PerSim, {rows:,} rows/step "
                    f"({rows / seconds:,.0f} evals/s, {achieved / 1e9:.1f} of {limit / 1e9:.1f} GFLOP/s matmul)",
            "ours_s": seconds, "baseline_s": flops / limit, "ratio": achieved / limit, "target": 0.5}


@contextlib.contextmanager
def one_thread():
    """Time a block on one torch thread, as in a 1-CPU trial (Ray sets OMP_NUM_THREADS=1); the caller's count after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cadm_step_chunked_vs_one_pass(env: str, rows: int) -> dict:
    """PE-TS CaDM at paper sizes (5 members, 20 particles): the planner's step (STEP_CHUNK rows per call,
    in-place swish) vs the same rows in one call with out-of-place swish, as the step first ran."""
    import torch

    from persim_bench.algos.cadm import CadmModel

    family = get_env(env)
    model = CadmModel(env, members=5, particles=20, probabilistic=True)
    rng = np.random.default_rng(0)
    history = torch.as_tensor(family.random_actions(rng, 5 * 10)).reshape(5, 10, *([] if family.discrete else [-1]))
    model.condition(torch.randn(5, 11, family.obs_dim), history)
    obs = torch.randn(20, rows, family.obs_dim)
    action, episode = torch.as_tensor(family.random_actions(rng, rows)), torch.arange(rows) % 5
    features = model.dynamics_action(model.action_features(action)).repeat(4, 1)
    context = model.context[:, episode].repeat(1, 4, 1)

    def one_pass():
        with torch.enable_grad():
            delta = model.sample_delta(obs.reshape(5, 4 * rows, -1), features, context)
            return obs + (model.delta_mean + model.delta_std * delta).reshape(obs.shape)

    with one_thread():
        chunked, whole = timed(lambda: model.step(obs, action, episode), repeats=5), timed(one_pass, repeats=5)
    return {"what": f"{env}: PE-TS CaDM planner step ({20 * rows:,} particle rows, 1 thread) chunked + in-place "
                    "vs one pass",
            "ours_s": chunked, "baseline_s": whole, "ratio": whole / chunked, "target": 1.1}


def cadm_step_flushed_vs_denormal(env: str, denormal_share: float) -> dict:
    """Vanilla CaDM's forward and backward pass (paper sizes, 1 thread) with ``denormal_share`` of its context
    encoder's hidden weights denormal, as weight decay leaves dead units' weights (20-46 % of layers 1-2
    after 8k HalfCheetah steps, docs/benchmarks.md): flushed to zero, as trials compute, vs IEEE."""
    import torch

    from persim_bench.algos.cadm import CadmModel, CadmSpec, _losses, training_tensors
    from persim_bench.orchestration.trials import trial_numerics

    spec = CadmSpec()
    model = CadmModel.from_spec(spec, env, False, 0)
    tensors = training_tensors(model, persim_data(env, 20, 200), spec.future)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.encoder.layers[1:-1]:
            decayed = torch.rand(layer.weight.shape, generator=gen) < denormal_share
            layer.weight[decayed] = 1e-39 * layer.weight[decayed].sign()
    pairs = torch.randint(len(tensors["source"]), (1, spec.batch_size), generator=gen)

    def step():
        recon, _ = _losses(model, tensors, pairs, spec.back_coeff)
        recon.backward()
        model.zero_grad(set_to_none=True)

    with one_thread():
        with trial_numerics():
            flushed = timed(step, repeats=20)
        ieee = timed(step, repeats=20)
    return {"what": f"{env}: Vanilla CaDM forward + backward, {denormal_share:.0%} of the encoder's hidden "
                    "weights denormal, flushed (trials) vs IEEE",
            "ours_s": flushed, "baseline_s": ieee, "ratio": ieee / flushed, "target": 1.0}


def mpc_decision_latency(env: str, device: str = "cpu") -> dict:
    """One MPC decision for one episode at paper planner settings with a paper-size PerSim ensemble."""
    import numpy as np

    from persim_bench.algos.persim import PerSimEnsemble
    from persim_bench.algos.persim import PersimSpec
    from persim_bench.specs import PlannerSpec
    from persim_bench.planning import MPCPlanner

    family = get_env(env)
    model = PerSimEnsemble.from_spec(PersimSpec(rank=BENCH_RANK[env]), env, 500, seed=0).eval().to(device)
    planner = MPCPlanner(family, model, PlannerSpec(), seed=0)
    obs = family.batch(np.asarray([family.default_covariates])).reset(np.random.default_rng(0))
    seconds = timed(lambda: planner.act(obs, np.zeros(1, dtype=np.int64)))
    return {"what": f"{env}: one MPC decision, paper settings (PerSim M=5, {device})", "seconds": seconds}


def model_benchmarks(quick: bool) -> list[dict]:
    scale = 0.2 if quick else 1.0
    return [
        ensemble_batched_vs_sequential("mountaincar", int(100 * scale), 500, [256], epochs=2),
        ensemble_batched_vs_sequential("halfcheetah", int(50 * scale), 200, [256, 512, 512], epochs=1),
        planner_throughput_vs_matmul(5 * 1000 if not quick else 1000),
        cadm_step_chunked_vs_one_pass("mountaincar", 5000 if not quick else 1000),
        cadm_step_chunked_vs_one_pass("halfcheetah", 1000 if not quick else 200),
        cadm_step_flushed_vs_denormal("halfcheetah", 0.2),
    ]


# ---------------------------------------------------------------- small models against the roofline


def _fit_and_plan_steps(env: str, algo: str, planner_rows: int, paper: Grid, rate: float, autograd: bool = False):
    """(one training step, one planner model step) of ``algo`` at paper sizes on ``env``'s random data: the two
    calls a trial spends its time in, as closures over fixed inputs (the planner's ``planner_rows`` model rows:
    PerSim's 5 members each step planner_rows / 5 states, Vanilla CaDM's one net all of them), and what the cost
    model prices each call at (seconds at ``rate`` on the ``paper`` grid).
    ``autograd``: PerSim's training step through autograd (the code before its hand-written gradients)."""
    import torch

    from persim_bench.algos import cadm, persim

    family = get_env(env)
    data = persim_data(env, 100, family.horizon)
    rng = torch.Generator().manual_seed(0)
    planner_batch = planner_rows // 5 if algo == "persim" else planner_rows
    obs = torch.randn(5 if algo == "persim" else 1, planner_batch, family.obs_dim)
    action = torch.as_tensor(family.random_actions(np.random.default_rng(0), planner_batch))
    if algo == "persim":
        spec = persim.PersimSpec(rank=BENCH_RANK[env])
        model = persim.PerSimEnsemble.from_spec(spec, env, data.n_agents, seed=0)
        dataset = [torch.as_tensor(values) for values in (data.obs, data.action, data.agent, data.next_obs - data.obs)]
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, fused=True)
        # As fit_persim runs them: 64 batches of one gather (per epoch there); the code before gathered every step.
        batches = torch.randint(len(data), (5, 64, spec.batch_size), generator=rng)
        shuffled = [values[batches] for values in dataset]
        order = itertools.cycle(range(64))

        def fit_step():
            batch = next(order)
            if autograd:
                return persim.autograd_train_step(model, optimizer, *(values[batches[:, batch]] for values in dataset))
            return persim.train_step(model, optimizer, *(values[:, batch] for values in shuffled))

        planner_agents = torch.zeros(planner_batch, dtype=torch.long)
        priced = (persim.persim_step_seconds(paper, env, BENCH_RANK[env], rate),
                  persim.persim_dynamics(paper, env, BENCH_RANK[env]).step_seconds(planner_batch, rate))
    else:
        spec = cadm.CadmSpec()
        model = cadm.CadmModel.from_spec(spec, env, probabilistic=False, seed=0)
        tensors = cadm.training_tensors(model, data, spec.future)
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, fused=True)
        pairs = len(tensors["source"])

        def fit_step():
            return cadm.train_step(model, optimizer, tensors, torch.randint(pairs, (1, spec.batch_size), generator=rng),
                                   spec)

        episodes = 20
        model.condition(torch.randn(episodes, spec.history + 1, family.obs_dim),
                        torch.as_tensor(family.random_actions(np.random.default_rng(1), episodes * spec.history)
                                        ).reshape(episodes, spec.history, *([] if family.discrete else [-1])))
        planner_agents = torch.arange(planner_batch) % episodes
        obs = obs.expand(model.n_members, -1, -1).contiguous()
        priced = (cadm.cadm_step_seconds(paper, env, False, rate),
                  cadm.cadm_dynamics(paper, env, False).step_seconds(planner_batch, rate))

    @torch.no_grad()
    def plan_step():
        return model.step(obs, action, planner_agents)

    return fit_step, plan_step, priced


def small_model_rows(envs=("mountaincar", "cartpole"), threads=(1, 2), planner_rows: int = 100_000) -> list[dict]:
    """Fit gradient steps/s and planner model rows/s of PerSim and Vanilla CaDM at paper sizes on the small envs,
    each against this machine's roofline for the same ops (``roofline``), measured in the same run, and against
    what ``--dry-run``'s cost model prices the call at (one thread: the cost model prices one core per trial)."""
    import torch

    from persim_bench.costmodel import measure_rate
    from persim_bench.roofline import best_seconds, count_work, limit_seconds, machine_rates

    previous, rows, rate, paper = torch.get_num_threads(), [], measure_rate(), load_grid("paper")
    try:
        for n in threads:
            rates = machine_rates(n)
            torch.set_num_threads(n)
            for env in envs:
                for algo, label in (("persim", "PerSim"), ("cadm", "Vanilla CaDM")):
                    fit_step, plan_step, priced = _fit_and_plan_steps(env, algo, planner_rows, paper, rate)
                    for what, fn, unit, per_call, target, price in (
                            ("fit", fit_step, "gradient steps/s", 1, None, priced[0]),
                            ("planner", plan_step, "model rows/s", planner_rows, 0.4, priced[1])):
                        seconds, ops = best_seconds(fn), count_work(fn)
                        limit = limit_seconds(ops, rates)
                        memory = sum(rates.op_seconds(macs, size) for macs, size in ops
                                     if rates.memory_bound(macs, size))
                        rows.append({"what": f"{env}: {label} {what} ({unit})", "threads": n,
                                     "ours": per_call / seconds, "limit": per_call / limit, "share": limit / seconds,
                                     "bound": "memory" if memory > limit / 2 else "compute", "target": target,
                                     "rates": rates, "priced": price / seconds if n == 1 else None})
                    if algo == "persim":  # against the autograd step it replaced, in the same run
                        autograd_step, _, _ = _fit_and_plan_steps(env, algo, planner_rows, paper, rate, autograd=True)
                        seconds = best_seconds(autograd_step)
                        fit = rows[-2]
                        fit["versus"], fit["target"] = fit["ours"] * seconds, 3.0
    finally:
        torch.set_num_threads(previous)
    return rows


def render_roofline(rows: list[dict]) -> str:
    """Targets: the planner's share of the limit; the fit's speed-up over the autograd step it replaced (``versus``)."""
    lines = ["| benchmark | threads | ours | roofline limit | share of limit | bound by | vs the code it replaced "
             "| cost model / measured | target |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reached = r.get("versus", r["share"])
        target = "-" if r["target"] is None else f">= {r['target']}" + ("" if reached >= r["target"] else ": **not met**")
        versus = f"{r['versus']:.2f}x" if "versus" in r else "-"
        priced = "-" if r["priced"] is None else f"{r['priced']:.2f}"
        lines.append(f"| {r['what']} | {r['threads']} | {r['ours']:,.0f} | {r['limit']:,.0f} | {r['share']:.2f} | "
                     f"{r['bound']} | {versus} | {priced} | {target} |")
    rates = {r["threads"]: r["rates"] for r in rows}
    lines.append("")
    lines += [f"Machine, {n} thread(s): dense matmul {rate.macs_per_second / 1e9:.1f} G multiply-adds/s; read "
              + ", ".join(f"{size >> 10:,} KiB at {speed / 1e9:.1f} GB/s" for size, speed in rate.read_rates) + "."
              for n, rate in rates.items()]
    return "\n".join(lines)


def render(rows: list[dict]) -> str:
    lines = ["| benchmark | ours (s) | baseline (s) | ratio | target | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        met = "yes" if r["ratio"] >= r["target"] else "NO"
        lines.append(f"| {r['what']} | {r['ours_s']:.3f} | {r['baseline_s']:.3f} | {r['ratio']:.2f}x | "
                     f">= {r['target']}x | {met} |")
    return "\n".join(lines)


BENCHMARKS = {"data": data_benchmarks, "model": model_benchmarks}


def mpc_benchmarks(quick: bool, device: str = "cpu") -> list[dict]:
    return [mpc_throughput_vs_matmul(device, quick=quick)]


def main(what: str, quick: bool = False, device: str = "cpu") -> None:
    """Print one benchmark table; ``device`` ("cpu" or "cuda") is where ``mpc`` runs the planner."""
    if what in BENCHMARKS:
        print(render(BENCHMARKS[what](quick)))
        return
    if what == "small":
        print(render_roofline(small_model_rows(planner_rows=10_000 if quick else 100_000)))
        return
    if what != "mpc":
        raise BenchError(f"unknown benchmark {what!r}: one of {', '.join([*BENCHMARKS, 'mpc', 'small'])}")
    import torch

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {device}: torch sees no CUDA device here")
    print(render(mpc_benchmarks(quick, device)))
    print("\n| MPC decision | seconds |\n|---|---|")
    for env in ("mountaincar", "cartpole", "halfcheetah"):
        row = mpc_decision_latency(env, device)
        print(f"| {row['what']} | {row['seconds']:.3f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["data", "model", "mpc", "small"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="where `mpc` runs: cpu or cuda")
    args = parser.parse_args()
    main(args.what, args.quick, args.device)
