"""The CPU cost model behind ``--dry-run``: what a fit, a planner decision or an env step costs here.

Algorithms cost their own trials with these primitives (each registry entry's ``cost``);
``orchestration/estimate.py`` adds them up per stage.

A full grid is days of CPU; this says how many before anything is launched. It is an estimate
that tells minutes from days, not a schedule. Every trial is costed on one core as

    seconds = work / rate + calls x overhead + env steps x env cost

- work: multiply-adds of every dense layer the trial runs, from the grid's own layer sizes.
  A layer costs (fan_in + ELEMENTWISE) x fan_out per row and ensemble member: ELEMENTWISE
  stands for bias, activation and memory traffic per output unit, which is where layers with
  2-30 inputs spend their time (more when a call's activations overflow the cache).
  Training is 3x forward (forward + backward). ``rate`` is one core's multiply-add rate on
  these MLP shapes (``measure_rate``).
- overhead: kernel dispatch per layer and call, Python/optimizer work per gradient step (our
  batched ensembles, d3rlpy's BCQ, the online DQN/TD3 learners), per batched env step and per
  planner horizon step: constants measured once on the 2-core dev machine (below).
- env steps: per agent-step of the batched simulators and of the true dynamics, measured likewise.

What each stage runs (as trials.py, planning.py and evaluate.py do):
- policies: each ``policy_jobs`` job steps its env ``budget`` times in ``n_envs`` copies and makes
  DQN's 0.5 (TD3's 1) gradient updates per env step after its learning start.
- datasets: n_agents x episode cap env steps per env x regime, plus the logging policies' forward.
- PerSim: epochs x train rows x members through the state (and, continuous, action) encoder;
  rank_cv trials fit on (1 - cv_holdout) of the rows and score the rest after every epoch.
  A main trial whose rank rank_cv has still to pick is costed at max(rank_grid).
- CaDM: iterations x epochs_per_iteration epochs over rows x future (context, target) pairs,
  encoder + forward + backward nets per pair and member.
- BCQ: steps gradient steps of batch rows per policy (BCQ-P one, BCQ-A one per test agent).
- Evaluation of learned models: the prediction test (trajectories x test agents rolled open loop
  for prediction_steps model steps after burn_in real ones) and MPC reward: episodes x test
  agents x episode steps decisions, each horizon x candidates x members rows per round,
  iterations + 1 rounds of CEM for continuous actions. BCQ acts directly (act_samples VAE
  actions per state, continuous). "True env + MPC" plans on the env's true dynamics.

Upper bounds, on purpose: every episode runs to its cap (terminations only shorten it), CaDM
runs every epoch (early stopping only cuts), a dataset holds n_agents x cap transitions unless
its manifest under ``data_root`` says how many it has, and nothing is cached (policies and
datasets of an earlier run are reused for free). Not counted: Ray, Tune and MLflow start-up,
reading datasets, writing results. A trial given k CPUs is assumed k times faster (same CPU-hours).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from persim_bench.data import rl
from persim_bench.data.generate import dataset_plans
from persim_bench.data.policies import PolicyJob
from persim_bench.envs import get_env
from persim_bench.specs import PlannerSpec, per_env

if TYPE_CHECKING:
    from persim_bench.config import Grid

# Measured on the 2-core dev machine (AMD EPYC, torch 2.13, 1 thread) against real fits, planner
# decisions, BCQ steps, policy training and shards; see the module docstring for how they enter.
ELEMENTWISE = 32                # multiply-add equivalents per output unit and row: bias, activation, memory
# A layer whose output (rows per call x width floats) exceeds CACHE_BYTES is written to freshly
# allocated pages: its activation and bias cost 3x (measured: relu and swish at 2 ns per unit vs
# 0.1-0.4 ns below ~4 MB). Planner steps run in chunks below it; large training and validation batches hit it.
CACHE_BYTES = 4e6
STREAM_ELEMENTWISE = 96
SWISH_STREAM_ELEMENTWISE = 180  # swish runs in place only without gradients
LAYER_SECONDS = 30e-6           # kernel dispatch of one dense layer per forward call
STEP_SECONDS = {                # one gradient step beyond its layers
    # PerSim / CaDM: loss, gradients of the lookups and small ops, fused Adam; from `persim-bench bench small`
    # (2026-12-01: the cost model priced these steps within 0.9-1.1x of the measured ones at paper sizes).
    "persim": 1.0e-3,
    "cadm": 3.4e-3,
    "bcq_discrete": 4.5e-3,     # d3rlpy's DiscreteBCQ
    "bcq_continuous": 7e-3,     # d3rlpy's BCQ
    "dqn": 1.5e-3,              # data/rl.py: replay sampling, loss, Adam, gradient clipping
    "td3": 2e-3,
}
ACT_SECONDS = 1e-3              # one d3rlpy predict call (BCQ acting) beyond its layers
ENV_CALL_SECONDS = 100e-6       # one batched env step call (simulator or true dynamics) beyond its rows
ENV_ROW_SECONDS = {"mountaincar": 0.2e-6, "cartpole": 0.2e-6, "halfcheetah": 50e-6}     # per agent-step
TRUE_ROW_SECONDS = {"mountaincar": 0.02e-6, "cartpole": 0.04e-6, "halfcheetah": 35e-6}  # true dynamics, per row
CADM_STEP_SECONDS = 0.13e-3     # CaDM's step beyond its net: ~25 small tensor ops (normalise, concat, sample)
PERSIM_CHUNK_SECONDS = 0.15e-3  # a PerSim planner step's chunk beyond its layers: factor products, views
PLAN_STEP_SECONDS = 0.2e-3      # one planner horizon step beyond the model: reward, termination, bookkeeping
RL_STEP_SECONDS = 0.2e-3        # one vectorised online-RL step beyond env and net: acting, replay writes
TRAIN = 3.0                     # forward + backward, in forwards


def measure_rate(seconds: float = 0.3) -> float:
    """One core's multiply-add rate (per s) on an ensemble layer the size these models use (5 x 256 x 256).

    The fastest of the ~5 ms calls made in ``seconds``: the one least disturbed by other load.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        weight, x, bias = torch.randn(5, 256, 256), torch.randn(5, 256, 512), torch.randn(5, 256, 1)
        fastest, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds:
            began = time.perf_counter()
            torch.baddbmm(bias, weight, x).relu_()
            fastest = min(fastest, time.perf_counter() - began)
        return weight.numel() * x.shape[-1] / fastest
    finally:
        torch.set_num_threads(threads)


def mlp_seconds(sizes, rows: float, calls: float, rate: float, passes: float = 1.0, swish: bool = False) -> float:
    """``rows`` rows (over all calls, members included) through an MLP of these layer sizes in ``calls`` calls."""
    work = 0.0
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        per_unit = ELEMENTWISE
        if rows / max(calls, 1) * fan_out * 4 > CACHE_BYTES:
            per_unit = SWISH_STREAM_ELEMENTWISE if swish else STREAM_ELEMENTWISE
        work += (fan_in + per_unit) * fan_out
    return passes * (rows * work / rate + calls * (len(sizes) - 1) * LAYER_SECONDS)


def env_step_seconds(env: str, rows: float, true_dynamics: bool = False) -> float:
    per_row = TRUE_ROW_SECONDS if true_dynamics else ENV_ROW_SECONDS
    return ENV_CALL_SECONDS + rows * per_row[env]


@dataclass(frozen=True)
class Dynamics:
    """What one ``step`` of a model costs: the MLPs each of ``members`` runs per row, in calls of ``chunk`` rows."""

    env: str
    nets: tuple[tuple[int, ...], ...] = ()
    members: int = 1
    chunk: int | None = None            # rows per call (planner steps run in chunks); None: one call
    encoder: tuple[int, ...] | None = None  # CaDM's context encoder, run once per decision
    swish: bool = False                 # CaDM's dynamics nets
    call_seconds: float = 0.0           # per call, beyond the nets

    def step_seconds(self, rows: int, rate: float) -> float:
        """One step of ``rows`` states per member."""
        if not self.nets:  # the env's true dynamics
            return env_step_seconds(self.env, rows, true_dynamics=True)
        calls = math.ceil(rows / self.chunk) if self.chunk else 1
        nets = sum(mlp_seconds(net, rows * self.members, calls, rate, swish=self.swish) for net in self.nets)
        return nets + calls * self.call_seconds

    def condition_seconds(self, episodes: int, rate: float) -> float:
        return mlp_seconds(self.encoder, episodes * self.members, 1, rate) if self.encoder else 0.0


def policy_net(grid: Grid, env: str) -> tuple[int, ...]:
    family = get_env(env)
    return family.obs_dim, *grid.policies.hidden, family.n_actions if family.discrete else family.action_dim


def prediction_seconds(grid: Grid, env: str, model: Dynamics, rate: float) -> float:
    spec = grid.evaluation
    episodes = spec.prediction_trajectories * len(spec.test_agents)
    real_steps = spec.burn_in + spec.prediction_steps
    act = mlp_seconds(policy_net(grid, env), episodes, 1, rate) if spec.prediction_policy == "trained" else 0.0
    return (real_steps * (env_step_seconds(env, episodes) + act) + model.condition_seconds(episodes, rate)
            + spec.prediction_steps * model.step_seconds(episodes, rate))


def evaluation_seconds(grid: Grid, env: str, model: Dynamics, rate: float) -> float:
    """A learned model's shared evaluation (``evaluate.evaluate_model``): the prediction test, the
    candidate-ranking test if asked (``evaluation.plan_ranking``), and the MPC reward episodes unless the
    grid is prediction-only (``evaluation.rewards: false``)."""
    reward = mpc_reward_seconds(grid, env, model, rate) if grid.evaluation.rewards else 0.0
    return prediction_seconds(grid, env, model, rate) + ranking_seconds(grid, env, model, rate) + reward


def ranking_seconds(grid: Grid, env: str, model: Dynamics, rate: float) -> float:
    """``evaluate.plan_ranking``: per batch of states (one per test agent), the planner's first candidates
    scored once by the model and once by the true dynamics."""
    spec, planner = grid.evaluation, grid.planner
    rows = len(spec.test_agents) * per_env(planner.candidates, env)
    step = model.step_seconds(rows, rate) + Dynamics(env).step_seconds(rows, rate)
    return spec.plan_ranking * per_env(planner.horizon, env) * step


def mpc_reward_seconds(grid: Grid, env: str, model: Dynamics, rate: float, planner: PlannerSpec | None = None) -> float:
    """Reward episodes with the MPC planner: one decision per episode and step, every episode at its cap."""
    planner, spec, family = planner or grid.planner, grid.evaluation, get_env(env)
    episodes = spec.reward_episodes * len(spec.test_agents)
    horizon, candidates = per_env(planner.horizon, env), per_env(planner.candidates, env)
    rounds = 1 if family.discrete else planner.iterations + 1
    chunk = max(1, planner.max_rows // (model.members * candidates))
    decision = model.condition_seconds(episodes, rate)
    for start in range(0, episodes, chunk):
        rows = min(chunk, episodes - start) * candidates
        scoring = PLAN_STEP_SECONDS + rows * model.members * ELEMENTWISE * family.obs_dim / rate
        decision += rounds * horizon * (model.step_seconds(rows, rate) + scoring)
    return spec.episode_steps(env) * (decision + env_step_seconds(env, episodes))


def policy_job_seconds(job: PolicyJob, rate: float) -> float:
    family = get_env(job.env)
    vector_steps = job.budget // job.n_envs
    env_steps = vector_steps * job.n_envs
    sizes = (family.obs_dim, *job.hidden, family.n_actions if family.discrete else family.action_dim)
    seconds = vector_steps * (env_step_seconds(job.env, job.n_envs) + mlp_seconds(sizes, job.n_envs, 1, rate)
                              + RL_STEP_SECONDS)
    if job.algorithm == "dqn":
        updates = (env_steps - min(rl.DQN_LEARNING_STARTS, job.budget // 10)) * rl.DQN_UPDATES_PER_STEP
        # Online and target net on s', online fwd+bwd on s.
        seconds += updates * (STEP_SECONDS["dqn"] + mlp_seconds(sizes, rl.DQN_BATCH, 1, rate, TRAIN + 2))
    else:
        updates = env_steps - min(rl.TD3_RANDOM_STEPS, job.budget // 10)
        critic = (family.obs_dim + family.action_dim, *job.hidden, 1)
        # Per update: target actor and twin target critics, twin critics fwd+bwd; every
        # TD3_POLICY_DELAY-th update the actor fwd+bwd through one critic.
        delay = rl.TD3_POLICY_DELAY
        per_update = (mlp_seconds(sizes, rl.TD3_BATCH, 1, rate, 1 + TRAIN / delay)
                      + mlp_seconds(critic, rl.TD3_BATCH, 1, rate, 2 + 2 * TRAIN + TRAIN / delay))
        seconds += updates * (STEP_SECONDS["td3"] + per_update)
    return seconds * (1 + job.retrain_misses)  # an upper bound, as early stopping: every run may miss


def dataset_seconds(grid: Grid, rate: float) -> tuple[int, float]:
    """(shards, seconds) of generating every env x regime dataset."""
    shards, seconds = 0, 0.0
    for plan in dataset_plans(grid, Path("policies")):  # only the policies' file names are computed
        net = policy_net(grid, plan.env)
        for shard in range(plan.n_shards):
            agents = len(plan.shard_agents(shard))
            # Logging policies (pure* regimes): one batched forward per policy and step.
            act = mlp_seconds(net, agents, len(plan.policy_paths), rate) if plan.policy_paths else 0.0
            seconds += plan.episode_steps * (env_step_seconds(plan.env, agents) + act)
        shards += plan.n_shards
    return shards, seconds
