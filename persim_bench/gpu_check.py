"""``python -m persim_bench.gpu_check``: the one-command GPU check, for a machine without Ray, MLflow or d3rlpy.

It needs torch, numpy and pyarrow, and the wheels ``--fetch-wheels`` downloads beside the checkout
(pydantic, gymnasium, mujoco and their few dependencies; docs/cluster.md says how to bring them).
It measures, each against a limit measured in the same run, and prints one Markdown table:

- the device's dense matmul rate at the planner's shapes, fp32 and, where offered, TF32 and bf16;
- the planner's model evaluations per second at paper HalfCheetah sizes (PerSim rank 20, M = 5,
  CEM 200 x 30 x 6) as a share of the fp32 rate, and the ``--gpu-rate`` it implies for ``--dry-run``;
- PerSim's HalfCheetah fit, seconds per epoch at the paper's data size (500 agents x 1000 steps;
  synthetic states: the time does not depend on their values);
- one paper-size HalfCheetah CEM episode end to end (MuJoCo steps on the CPU, the model on the device);

then runs the ``cuda``-marked tests. ``--tiny`` does all of it at tiny sizes (CI runs it on a CPU).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
# What the check imports beyond torch, numpy and pyarrow, and what those need (as constraints.txt pins them).
WHEELS = ("pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions", "gymnasium",
          "Farama-Notifications", "mujoco", "mujoco-core", "mujoco-studio", "glfw", "PyOpenGL", "PyYAML")
NEVER = ("ray", "mlflow", "d3rlpy")  # what the device machine does not have


def timed(fn, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls: the least disturbed by other load on the machine."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def synchronize(device: str) -> None:
    """Wait for the device's queued work (GPU kernels run asynchronously; a CPU has nothing to wait for)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def dense_matmul_flops_per_second(device: str, members: int = 5, width: int = 512, rows: int = 512,
                                  repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """The device's dense matmul rate at the planner's shapes: a batched [M, 512, 512] @ [M, 512, rows]
    product into a preallocated output (the model's largest layer at its row-chunk size), best of ``repeats``."""
    weight = torch.randn(members, width, width, device=device, dtype=dtype)
    x = torch.randn(members, width, rows, device=device, dtype=dtype)
    out = torch.empty(members, width, rows, device=device, dtype=dtype)
    calls = max(1, int(2e10 // (2 * members * width * width * rows)))  # about 20 GFLOP per timing

    def run():
        for _ in range(calls):
            torch.bmm(weight, x, out=out)
        synchronize(device)

    run()
    return calls * 2 * members * width * width * rows / timed(run, repeats)


def matmul_rates(device: str) -> dict[str, float]:
    """FLOP/s of the planner-shaped product: fp32 (TF32 off), TF32 (CUDA only) and bf16."""
    rates = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        rates["fp32"] = dense_matmul_flops_per_second(device)
        if torch.device(device).type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            rates["tf32"] = dense_matmul_flops_per_second(device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    rates["bf16"] = dense_matmul_flops_per_second(device, dtype=torch.bfloat16)
    return rates


def mpc_throughput_vs_matmul(device: str = "cpu", episodes: int = 5, quick: bool = False) -> dict:
    """The planner's model evaluations per second (rows x members) at paper HalfCheetah sizes, as a share of
    the device's dense matmul rate: PerSim rank 20, state MLP (256, 512, 512), action MLP (256, 256), M = 5,
    CEM with 200 candidates, horizon 30, 6 rounds (quick: 1 round, 1 episode).

    Measured as whole decisions (``MPCPlanner.act``: sampling, model steps, reward, elites), so every
    overhead of the planner counts against it; FLOPs are the model's matmuls (2 x in x out per layer and
    row). The two timings alternate, best of each, to be fair on a noisy machine.
    """
    from persim_bench.algos.persim import PerSimEnsemble
    from persim_bench.envs import get_env
    from persim_bench.planning import MPCPlanner
    from persim_bench.specs import PlannerSpec, per_env

    family = get_env("halfcheetah")
    episodes = 1 if quick else episodes
    spec = PlannerSpec(iterations=0) if quick else PlannerSpec()
    model = PerSimEnsemble("halfcheetah", 500, 20, 5, [256, 512, 512], [256, 256]).eval().to(device)
    planner = MPCPlanner(family, model, spec, seed=0)
    obs = np.random.default_rng(0).normal(size=(episodes, family.obs_dim)).astype(np.float32)
    agent = np.arange(episodes, dtype=np.int64)
    planner.act(obs, agent)  # warm-up; later decisions warm-start as in an episode
    flops_per_row = sum(2 * p.shape[-1] * p.shape[-2] for n, p in model.named_parameters() if n.endswith("weight"))
    rows = episodes * per_env(spec.candidates, "halfcheetah") * per_env(spec.horizon, "halfcheetah") \
        * (spec.iterations + 1) * model.n_members
    ours = limit = float("inf")
    for _ in range(2 if quick else 3):
        ours = min(ours, timed(lambda: planner.act(obs, agent), repeats=1))  # act returns host numpy: synchronised
        limit = min(limit, rows * flops_per_row / dense_matmul_flops_per_second(device, repeats=2))
    achieved = rows * flops_per_row / ours
    return {"what": f"planner model evaluations ({device}): HalfCheetah PerSim CEM, {episodes} episode(s) x 200 "
                    f"candidates ({rows / ours:,.0f} member-rows/s, {achieved / 1e9:.0f} of "
                    f"{rows * flops_per_row / limit / 1e9:.0f} GFLOP/s dense matmul, {torch.get_num_threads()} threads)",
            "ours_s": ours, "baseline_s": limit, "ratio": limit / ours, "target": 0.8, "macs_per_second": achieved / 2}


def synthetic_halfcheetah(n_agents: int, steps: int, seed: int = 0):
    """A HalfCheetah-shaped dataset of random states and actions: what a fit epoch costs does not depend on them."""
    from persim_bench.data.dataset import Transitions
    from persim_bench.envs import get_env

    family, rng = get_env("halfcheetah"), np.random.default_rng(seed)
    rows = n_agents * steps
    obs = rng.normal(size=(rows, family.obs_dim)).astype(np.float32)
    return Transitions("halfcheetah", "random", np.repeat(np.arange(n_agents), steps), np.tile(np.arange(steps), n_agents),
                       obs, rng.uniform(-1, 1, (rows, family.action_dim)).astype(np.float32),
                       np.zeros(rows, np.float32), obs + 0.1 * rng.normal(size=obs.shape).astype(np.float32),
                       np.zeros(rows, bool), np.tile(np.arange(steps) == steps - 1, n_agents),
                       family.sample_covariates(rng, n_agents))


def fit_seconds_per_epoch(device: str, n_agents: int, steps: int, spec) -> float:
    """PerSim's fit on ``device``: seconds of its second epoch (the first pays the warm-up)."""
    from persim_bench.algos.persim import fit_persim

    data, marks = synthetic_halfcheetah(n_agents, steps), []
    fit_persim(data, spec.model_copy(update={"epochs": 2}), seed=0, device=device,
               on_epoch=lambda epoch, metrics: marks.append(time.perf_counter()))  # on_epoch reads the loss: synced
    return marks[1] - marks[0]


def cem_episode_seconds(device: str, steps: int, planner_spec, model_spec) -> tuple[float, float]:
    """(seconds, return) of one HalfCheetah episode of ``steps`` steps planned by CEM on a PerSim model of
    ``model_spec``'s sizes: real MuJoCo dynamics on the CPU, the model on ``device``."""
    from persim_bench.algos.persim import PerSimEnsemble
    from persim_bench.envs import get_env
    from persim_bench.evaluate import episode_rewards
    from persim_bench.planning import MPCPlanner

    family = get_env("halfcheetah")
    model = PerSimEnsemble.from_spec(model_spec, "halfcheetah", 500, seed=0).eval().to(device)
    planner = MPCPlanner(family, model, planner_spec, seed=0)
    covariates = np.asarray([family.default_covariates])
    start = time.perf_counter()
    metrics = episode_rewards(planner.act, family, covariates, [0], 1, steps, seed=0)
    return time.perf_counter() - start, metrics["reward_agent0"]


def run_check(device: str, tiny: bool) -> list[list[str]]:
    """Every measurement, as table rows [what, value, against]."""
    from persim_bench.algos.persim import PersimSpec
    from persim_bench.specs import PlannerSpec

    rows = []
    rates = matmul_rates(device)
    for kind, rate in rates.items():
        rows.append([f"dense matmul {kind}, [5, 512, 512] @ [5, 512, 512]", f"{rate / 1e12:.2f} TFLOP/s",
                     f"{rate / rates['fp32']:.2f}x fp32"])
    planner = mpc_throughput_vs_matmul(device, quick=tiny)
    rate_label = "suggested --gpu-rate" if torch.device(device).type == "cuda" else "multiply-adds/s"
    rows.append([planner["what"], f"{planner['ratio']:.2f} of the fp32 rate",
                 f"{rate_label} {planner['macs_per_second']:.3g}"])
    model_spec = PersimSpec(rank=20, state_hidden=[256, 512, 512], action_hidden=[256, 256])
    if tiny:
        model_spec = model_spec.model_copy(update={"rank": 3, "ensemble": 2, "state_hidden": [16], "action_hidden": [16]})
    agents, steps = (6, 40) if tiny else (500, 1000)
    per_epoch = fit_seconds_per_epoch(device, agents, steps, model_spec)
    rows.append([f"PerSim HalfCheetah fit, {agents} agents x {steps} steps, batch {model_spec.batch_size}",
                 f"{per_epoch:.2f} s per epoch", f"{model_spec.epochs} epochs: {per_epoch * model_spec.epochs / 60:.1f} min"])
    planner_spec = PlannerSpec(horizon=3, candidates=8, elites=2, iterations=1) if tiny else PlannerSpec()
    episode_steps = 10 if tiny else 1000
    seconds, score = cem_episode_seconds(device, episode_steps, planner_spec, model_spec)
    rows.append([f"HalfCheetah CEM episode, {episode_steps} steps, untrained PerSim (return {score:.1f})",
                 f"{seconds:.1f} s", f"{1000 * seconds / episode_steps:.1f} ms per step; 20 episodes x 5 agents: "
                                     f"{100 * seconds * 1000 / episode_steps / 3600:.2f} h"])
    return rows


def cuda_tests() -> int:
    """The ``cuda``-marked tests, when the checkout's tests are there."""
    tests = ROOT / "tests" / "test_device.py"
    if not tests.exists():
        print("(no tests/ beside the package: cuda tests not run)")
        return 0
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", str(tests)],
                          cwd=ROOT).returncode


def fetch_wheels(folder: Path, python: str) -> None:
    """Download the wheels the device machine lacks, at the versions constraints.txt pins (run where pip works)."""
    pinned = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M))
    wanted = [f"{name}=={pinned[name]}" for name in WHEELS]
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                             "manylinux2014_x86_64", "manylinux1_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation=cp",
                    f"--python-version={python}", *platforms, "-d", str(folder), *wanted], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m persim_bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where models run (default: cuda when torch sees it)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a check of the check, seconds on a CPU")
    parser.add_argument("--no-tests", action="store_true", help="skip the cuda-marked tests")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--fetch-wheels", type=Path, metavar="DIR",
                        help="only download the wheels the device machine needs into DIR (where pip reaches an index)")
    parser.add_argument("--python", default="3.12", help="--fetch-wheels: the device's Python version (default 3.12)")
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        fetch_wheels(args.fetch_wheels, args.python)
        return 0
    name = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "CPU"
    header = [f"GPU check on {name} (torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
              f"{', tiny sizes' if args.tiny else ''})", "", "| measured | value | against |", "|---|---|---|"]
    table = "\n".join(header + [f"| {' | '.join(row)} |" for row in run_check(args.device, args.tiny)])
    print(table, flush=True)
    if args.out:
        args.out.write_text(table + "\n")
    imported = sorted({module.split(".")[0] for module in sys.modules} & set(NEVER))
    if imported:
        print(f"gpu_check imported {', '.join(imported)}: the device machine has none of them", file=sys.stderr)
        return 1
    return 0 if args.no_tests or torch.device(args.device).type != "cuda" else cuda_tests()


if __name__ == "__main__":
    sys.exit(main())
