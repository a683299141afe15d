"""Dry-run cost estimate: trials and CPU-hours per stage of a grid, without starting Ray.

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
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from persim_bench.algos.cadm import VALID_WINDOWS_CAP
from persim_bench.algos.nets import STEP_CHUNK
from persim_bench.config import Grid, PlannerSpec, per_env
from persim_bench.data import rl
from persim_bench.data.dataset import DatasetError, dataset_dir, read_manifest
from persim_bench.data.generate import dataset_plans
from persim_bench.data.policies import PolicyJob, policy_jobs
from persim_bench.envs import get_env
from persim_bench.trials import rank_cv_configs, trial_configs

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
    "ours": 1.5e-3,             # PerSim / CaDM: index gathers, loss, fused Adam
    "bcq_discrete": 4.5e-3,     # d3rlpy's DiscreteBCQ
    "bcq_continuous": 7e-3,     # d3rlpy's BCQ
    "dqn": 1.5e-3,              # data/rl.py: replay sampling, loss, Adam, gradient clipping
    "td3": 2e-3,
}
ACT_SECONDS = 1e-3              # one d3rlpy predict call (BCQ acting) beyond its layers
ENV_CALL_SECONDS = 100e-6       # one batched env step call (simulator or true dynamics) beyond its rows
ENV_ROW_SECONDS = {"mountaincar": 0.2e-6, "cartpole": 0.2e-6, "halfcheetah": 50e-6}     # per agent-step
TRUE_ROW_SECONDS = {"mountaincar": 0.02e-6, "cartpole": 0.04e-6, "halfcheetah": 35e-6}  # true dynamics, per row
CADM_STEP_SECONDS = 0.4e-3      # CaDM's step beyond its net: ~25 small tensor ops (normalise, concat, sample)
PLAN_STEP_SECONDS = 0.2e-3      # one planner horizon step beyond the model: reward, termination, bookkeeping
RL_STEP_SECONDS = 0.2e-3        # one vectorised online-RL step beyond env and net: acting, replay writes
TRAIN = 3.0                     # forward + backward, in forwards


@dataclass
class StageEstimate:
    stage: str                  # "policies", "datasets", "rank_cv", "main"
    trials: int                 # Tune trials (policies: policy-training tasks; datasets: shards)
    cpu_hours: float
    by_algo: dict[str, float]   # cpu-hours per algorithm (main/rank_cv); {} otherwise


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


# ---------------------------------------------------------------- networks from the grid


def persim_nets(grid: Grid, env: str, rank: int) -> tuple[tuple[int, ...], ...]:
    family, spec = get_env(env), grid.persim
    state = (family.obs_dim, *per_env(spec.state_hidden, env), family.obs_dim * rank)
    return (state,) if family.discrete else (state, (family.action_dim, *spec.action_hidden, rank))


def cadm_nets(grid: Grid, env: str, probabilistic: bool) -> tuple[tuple[int, ...], ...]:
    """(context encoder (ReLU), forward dynamics, backward dynamics (both swish))."""
    family, spec = get_env(env), grid.cadm
    d = family.obs_dim
    a = family.n_actions if family.discrete else family.action_dim
    inputs = d + a + spec.context_dim
    return ((spec.history * (d + a), *spec.context_hidden, spec.context_dim),
            (inputs, *spec.hidden, 2 * d if probabilistic else d), (inputs, *spec.hidden, d))


def policy_net(grid: Grid, env: str) -> tuple[int, ...]:
    family = get_env(env)
    return family.obs_dim, *grid.policies.hidden, family.n_actions if family.discrete else family.action_dim


# ---------------------------------------------------------------- fits


def persim_fit_seconds(grid: Grid, env: str, rows: int, rank: int, holdout: float, rate: float) -> float:
    spec = grid.persim
    n_val = round(holdout * rows)
    n_train = rows - n_val
    steps = spec.epochs * math.ceil(n_train / spec.batch_size)
    seconds = steps * STEP_SECONDS["ours"]
    for net in persim_nets(grid, env, rank):
        seconds += mlp_seconds(net, spec.epochs * n_train * spec.ensemble, steps, rate, TRAIN)
        if n_val:  # val_loss after every epoch, in chunks of 16384 rows
            chunks = spec.epochs * math.ceil(n_val / 16384)
            seconds += mlp_seconds(net, spec.epochs * n_val * spec.ensemble, chunks, rate)
    return seconds


def cadm_fit_seconds(grid: Grid, env: str, rows: int, probabilistic: bool, rate: float) -> float:
    spec = grid.cadm
    members = spec.pets_members if probabilistic else 1
    n_valid = min(int(rows * spec.valid_split), VALID_WINDOWS_CAP)
    train_pairs, valid_pairs = (rows - n_valid) * spec.future, n_valid * spec.future
    epochs = spec.iterations * spec.epochs_per_iteration
    steps = epochs * math.ceil(train_pairs / spec.batch_size)
    nets = cadm_nets(grid, env, probabilistic)
    # The weight penalty touches every layer once more per step (forward and backward).
    seconds = steps * (STEP_SECONDS["ours"] + TRAIN * sum(len(net) - 1 for net in nets) * LAYER_SECONDS)
    for net, swish in zip(nets, (False, True, True)):
        seconds += mlp_seconds(net, epochs * train_pairs * members, steps, rate, TRAIN, swish)
        seconds += mlp_seconds(net, epochs * valid_pairs * members, epochs, rate, swish=swish)
    return seconds


def bcq_nets(grid: Grid, env: str) -> dict[str, tuple[int, ...]]:
    """d3rlpy's networks: discrete Q and imitator; continuous actor, critic (x2), VAE encoder and decoder."""
    family, spec = get_env(env), grid.bcq
    d = family.obs_dim
    if family.discrete:
        q = (d, *spec.discrete_hidden, family.n_actions)
        return {"q": q, "imitator": q}
    a = family.action_dim
    latent = 2 * a
    return {"actor": (d + a, *spec.actor_hidden, a), "critic": (d + a, *spec.critic_hidden, 1),
            "encoder": (d + a, *spec.vae_hidden, 2 * latent), "decoder": (d + latent, *spec.vae_hidden, a)}


def bcq_fit_seconds(grid: Grid, env: str, policies: int, rate: float) -> float:
    """``policies`` BCQ policies of spec.steps gradient steps each."""
    spec, nets = grid.bcq, bcq_nets(grid, env)
    n = spec.target_samples
    if get_env(env).discrete:
        # Q: fwd+bwd on s, online and target on s'; imitator: fwd+bwd on s, forward on s' (the action mask).
        calls = {"q": [(1, TRAIN), (1, 2)], "imitator": [(1, TRAIN), (1, 1)]}
        batch, kind = spec.discrete_batch_size, "bcq_discrete"
    else:
        # VAE fwd+bwd; Q target: n decoded, perturbed actions per s' through both target critics;
        # twin critics fwd+bwd; actor loss: decoder and actor fwd+bwd, both critics, one backward.
        calls = {"encoder": [(1, TRAIN)], "decoder": [(1, TRAIN), (n, 1), (1, TRAIN)], "actor": [(n, 1), (1, TRAIN)],
                 "critic": [(n, 2), (1, 2 * TRAIN), (1, 4)]}
        batch, kind = spec.batch_size, "bcq_continuous"
    seconds = spec.steps * STEP_SECONDS[kind]
    seconds += sum(mlp_seconds(nets[name], spec.steps * batch * rows, spec.steps, rate, passes)
                   for name, runs in calls.items() for rows, passes in runs)
    return policies * seconds


# ---------------------------------------------------------------- evaluation


def prediction_seconds(grid: Grid, env: str, model: Dynamics, rate: float) -> float:
    spec = grid.evaluation
    episodes = spec.prediction_trajectories * len(spec.test_agents)
    real_steps = spec.burn_in + spec.prediction_steps
    act = mlp_seconds(policy_net(grid, env), episodes, 1, rate) if spec.prediction_policy == "trained" else 0.0
    return (real_steps * (env_step_seconds(env, episodes) + act) + model.condition_seconds(episodes, rate)
            + spec.prediction_steps * model.step_seconds(episodes, rate))


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


def bcq_reward_seconds(grid: Grid, env: str, policies: int, rate: float) -> float:
    """Reward episodes of BCQ acting directly: one predict call per policy and step."""
    spec, nets = grid.evaluation, bcq_nets(grid, env)
    episodes = spec.policy_reward_episodes * len(spec.test_agents)
    if get_env(env).discrete:
        act = sum(mlp_seconds(nets[name], episodes, policies, rate) for name in ("q", "imitator"))
    else:  # act_samples decoded + perturbed actions per state, scored by both critics
        rows = episodes * grid.bcq.act_samples
        act = sum(mlp_seconds(nets[name], rows, policies, rate, p) for name, p in
                  (("decoder", 1), ("actor", 1), ("critic", 2)))
    return spec.episode_steps(env) * (env_step_seconds(env, episodes) + act + policies * ACT_SECONDS)


# ---------------------------------------------------------------- trials and stages


def dataset_rows(grid: Grid, env: str, regime: str, data_root: Path | None) -> int:
    """Transitions of a dataset: its manifest's count when it was made with this grid's sizes, else n_agents x cap."""
    cap = grid.data.episode_steps(env)
    if data_root is not None:
        try:
            manifest = read_manifest(dataset_dir(data_root, env, regime))
        except DatasetError:
            manifest = {}
        if (manifest.get("n_agents"), manifest.get("episode_steps")) == (grid.data.n_agents, cap):
            return int(manifest["rows"])
    return grid.data.n_agents * cap


def trial_seconds(grid: Grid, trial: dict, rows: int, rate: float) -> float:
    """One main-stage trial: fit (if the algorithm learns) and its evaluation."""
    algo, env = trial["algo"], trial["env"]
    if algo == "true_env_mpc":
        return mpc_reward_seconds(grid, env, Dynamics(env), rate)
    if algo == "persim":
        rank = trial["rank"]
        model = Dynamics(env, persim_nets(grid, env, rank), grid.persim.ensemble, STEP_CHUNK)
        fit = persim_fit_seconds(grid, env, rows, rank, 0.0, rate)
        return fit + prediction_seconds(grid, env, model, rate) + mpc_reward_seconds(grid, env, model, rate)
    if algo in ("cadm_vanilla", "cadm_pets"):
        probabilistic = algo == "cadm_pets"
        encoder, forward, _ = cadm_nets(grid, env, probabilistic)
        particles = grid.cadm.pets_particles if probabilistic else 1
        members = grid.cadm.pets_members if probabilistic else 1
        # CaDM's step chunks STEP_CHUNK rows per net member, i.e. particles / members rows per state.
        chunk = max(1, STEP_CHUNK * members // particles)
        model = Dynamics(env, (forward,), particles, chunk, encoder=encoder, swish=True, call_seconds=CADM_STEP_SECONDS)
        fit = cadm_fit_seconds(grid, env, rows, probabilistic, rate)
        return fit + prediction_seconds(grid, env, model, rate) + mpc_reward_seconds(grid, env, model, rate)
    policies = len(grid.evaluation.test_agents) if algo == "bcq_a" else 1
    # BCQ-A trains each policy on one agent's rows only; the step count, not the rows, sets its cost.
    return bcq_fit_seconds(grid, env, policies, rate) + bcq_reward_seconds(grid, env, policies, rate)


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
    return seconds


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


def estimate(grid: Grid, rate: float | None = None, data_root: Path | None = None) -> list[StageEstimate]:
    """Trials and CPU-hours of every stage; ``rate`` (multiply-adds/s per core) is measured when None."""
    rate = rate or measure_rate()
    jobs = policy_jobs(grid)
    shards, data_seconds = dataset_seconds(grid, rate)
    rows = {(env, regime): dataset_rows(grid, env, regime, data_root) for env in grid.envs for regime in grid.regimes}

    cv_trials = rank_cv_configs(grid)
    cv_hours = sum(persim_fit_seconds(grid, t["env"], rows[t["env"], t["regime"]], t["rank"], grid.persim.cv_holdout,
                                      rate) for t in cv_trials) / 3600
    # rank_cv has not picked yet: max(rank_grid) stands in for every pick (the dearest rank), which
    # also makes sweep_ranks count the len(rank_grid) trials it will run, not one more.
    picks = {(t["env"], t["regime"], t["seed"]): max(grid.persim.rank_grid) for t in cv_trials}
    by_algo: dict[str, float] = {}
    main = trial_configs(grid, picks)
    for trial in main:
        data = rows.get((trial["env"], trial["regime"]), 0)  # true_env_mpc (regime "none") reads none
        hours = trial_seconds(grid, trial, data, rate) / 3600
        by_algo[trial["algo"]] = by_algo.get(trial["algo"], 0.0) + hours
    return [
        StageEstimate("policies", len(jobs), sum(policy_job_seconds(job, rate) for job in jobs) / 3600, {}),
        StageEstimate("datasets", shards, data_seconds / 3600, {}),
        StageEstimate("rank_cv", len(cv_trials), cv_hours, {"persim": cv_hours} if cv_trials else {}),
        StageEstimate("main", len(main), sum(by_algo.values()), by_algo),
    ]


def format_estimate(grid: Grid, stages: list[StageEstimate], rate: float | None = None) -> str:
    """A small aligned table: trials and CPU-hours per stage (main split by algorithm), the total, the assumptions."""
    row = "{:<16}{:>8}{:>14}".format
    lines = [f"grid {grid.name}: estimated cost (dry run)", row("stage", "trials", "CPU-hours")]
    for stage in stages:
        lines.append(row(stage.stage, stage.trials, f"{stage.cpu_hours:,.2f}"))
        if len(stage.by_algo) > 1:
            lines += [row(f"  {algo}", "", f"{hours:,.2f}") for algo, hours in stage.by_algo.items()]
    lines.append(row("total", sum(s.trials for s in stages), f"{sum(s.cpu_hours for s in stages):,.2f}"))
    at = f"{rate / 1e9:.0f} G" if rate else "the measured"
    lines += textwrap.wrap(
        f"Assumes: one core per trial at {at} multiply-adds/s, per-call and env-step costs measured on the 2-core "
        "dev machine; upper bounds: every episode runs to its cap, CaDM never stops early, nothing is cached; "
        "Ray, Tune and MLflow overheads not counted. Wall time ~ CPU-hours / CPUs of the cluster.", 100)
    return "\n".join(lines)
