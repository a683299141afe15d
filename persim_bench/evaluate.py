"""The one evaluation path for every algorithm: prediction error and episode reward, and the trial-level
helpers every run function shares (read the data, score a model or a policy).

Both run all (test agent x trajectory) pairs together in one batched real simulator.
Prediction error (paper Sec. 6.2, App. F): from an observed state, roll the model open loop
under the test policy's recorded actions and compare with what the real agent did: mean RMSE
over trajectories and median R^2 (variance-weighted over state dimensions, as the authors).
Reward (Sec. 6.3): undiscounted return of a policy acting on the real env.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from persim_bench.contracts import ContextualModel, DynamicsModel, Trial, TrialContext, TrialOutput
from persim_bench.data.behaviour import PREDICTION_POLICY_NAME, BehaviourPolicy, EpsilonMixture, prediction_policy
from persim_bench.data.dataset import DatasetError, Transitions, dataset_dir, read_dataset
from persim_bench.data.policies import load_policy
from persim_bench.data.subsets import subset_agents, take_subset
from persim_bench.envs import get_env
from persim_bench.envs.base import EnvFamily
from persim_bench.planning import MPCPlanner, TrueEnvModel, data_box, model_device

if TYPE_CHECKING:
    from persim_bench.specs import EvaluationSpec, PlannerSpec

# (obs [E, D], agent [E]) -> actions [E] or [E, A]: an MPC planner or a model-free policy. One that keeps
# per-episode state (the planner) also takes ``episodes=``: which episodes the E rows are (see episode_rewards).
ActFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def record_test_trajectories(family: EnvFamily, covariates: np.ndarray, agents: list[int], policy: BehaviourPolicy,
                             per_agent: int, steps: int, rng: np.random.Generator):
    """Real trajectories: obs [E, steps+1, D], actions [E, steps(, A)], alive [E, steps+1], agent [E].

    ``alive[:, t]`` is False once the episode ended at or before state t (no step is taken from it).
    """
    agent = np.repeat(np.asarray(agents), per_agent)
    sim = family.batch(covariates[agent])
    obs = [sim.reset(rng)]
    actions, alive = [], [np.ones(len(agent), dtype=bool)]
    for _ in range(steps):
        action = policy.act(obs[-1], rng)
        next_obs, _, terminated = sim.step(action)
        actions.append(action)
        obs.append(next_obs)
        alive.append(alive[-1] & ~terminated)
    return np.stack(obs, 1), np.stack(actions, 1), np.stack(alive, 1), agent


@torch.no_grad()
def open_loop(model: DynamicsModel, start: np.ndarray, actions: np.ndarray, agent: np.ndarray) -> np.ndarray:
    """Each member (or particle) rolls its own trajectory from start [E, D]; returns their mean [E, H, D].

    Runs on the model's device: the inputs go there once, the predictions come back once.
    """
    device = model_device(model)
    state = torch.as_tensor(start, dtype=torch.float32, device=device).expand(model.n_members, *start.shape).contiguous()
    steps = torch.as_tensor(actions, device=device).transpose(0, 1).contiguous()  # [H, E(, A)]: step t is contiguous
    agent_t = torch.as_tensor(agent, dtype=torch.long, device=device)
    predicted = []
    for action in steps:
        state = model.step(state, action, agent_t)
        predicted.append(state.mean(dim=0))
    return torch.stack(predicted, 1).cpu().numpy()


def _model_key(model: DynamicsModel, obs: np.ndarray, actions: np.ndarray, t: int, agent: np.ndarray) -> np.ndarray:
    """What the model's ``step`` takes to tell these real episodes apart from step t on: their agent ids,
    or for a contextual model, conditioned here on each episode's real steps up to t, their indices."""
    if not isinstance(model, ContextualModel):
        return agent
    device = model_device(model)
    model.condition(torch.as_tensor(obs[:, :t + 1], device=device), torch.as_tensor(actions[:, :t], device=device))
    return np.arange(len(agent))


def _mean_of_finite(values) -> float:
    """The mean over the finite values; NaN (without numpy's warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def prediction_error(model: DynamicsModel, family: EnvFamily, covariates: np.ndarray, agents: list[int],
                     policy: BehaviourPolicy, trajectories: int, steps: int, burn_in: int, seed: int) -> dict:
    """Per test agent: mean RMSE and median R^2 of ``steps``-step open-loop predictions."""
    rng = np.random.default_rng(seed)
    obs, actions, alive, agent = record_test_trajectories(
        family, covariates, agents, policy, trajectories, burn_in + steps, rng)
    truth = obs[:, burn_in + 1:]
    key = _model_key(model, obs, actions, burn_in, agent)  # a contextual model: fixed over the window
    predicted = open_loop(model, obs[:, burn_in], actions[:, burn_in:], key)
    valid = alive[:, burn_in:-1]  # state t+1 was really reached iff the episode still ran at t
    squared = np.where(valid[..., None], (predicted - truth) ** 2, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # trajectories that ended before the window: NaN
        rmse = np.sqrt(np.nanmean(squared, axis=(1, 2)))
        truth_masked = np.where(valid[..., None], truth, np.nan)
        centred = (truth_masked - np.nanmean(truth_masked, axis=1, keepdims=True)) ** 2
        r2 = 1 - np.nansum(squared, axis=(1, 2)) / np.nansum(centred, axis=(1, 2))
    metrics = {}
    for a in agents:
        usable = (agent == a) & (valid.sum(1) >= 2)  # R^2 needs at least two observed steps
        metrics[f"rmse_agent{a}"] = float(np.mean(rmse[usable])) if usable.any() else float("nan")
        metrics[f"r2_agent{a}"] = float(np.median(r2[usable])) if usable.any() else float("nan")
        metrics[f"pred_trajectories_agent{a}"] = int(usable.sum())
    metrics["rmse_mean"] = float(np.nanmean([metrics[f"rmse_agent{a}"] for a in agents]))
    return metrics


def plan_ranking(model: DynamicsModel, family: EnvFamily, covariates: np.ndarray, agents: list[int],
                 policy: BehaviourPolicy, planner_spec: "PlannerSpec", per_agent: int, steps: int, burn_in: int,
                 seed: int) -> dict:
    """Per test agent: how well the model ranks the plans the planner draws first (beyond the paper).

    A planner is only as good as the order its model puts candidate plans in. From real states the
    test policy visits (``per_agent`` trajectories per agent, trajectory j cut at step burn_in +
    j * steps / per_agent), the planner's first sample of candidates is scored by the model and by
    the agents' true dynamics, each with the planner's own score (discounted return, members
    aggregated). ``plan_rank_agent{a}``: the mean Spearman correlation of the two scores over the
    states; ``plan_regret_agent{a}``: how far the true score of the model's pick falls below the
    best candidate's, as a share of how far a blind pick's (the mean candidate's) falls (0: the
    model picks the best plan, 1: no better than chance). States whose candidates all score alike
    in truth rank nothing and are skipped.
    """
    from scipy.stats import spearmanr

    rng = np.random.default_rng(seed)
    obs, actions, alive, agent = record_test_trajectories(family, covariates, agents, policy, per_agent,
                                                          burn_in + steps, rng)
    device = model_device(model)
    planner = MPCPlanner(family, model, planner_spec, seed)
    truth = MPCPlanner(family, TrueEnvModel(family, covariates), planner_spec, seed)
    found: dict[int, list[tuple[float, float, float]]] = {a: [] for a in agents}
    for j in range(per_agent):
        t = burn_in + j * steps // per_agent
        rows = np.flatnonzero((np.arange(len(agent)) % per_agent == j) & alive[:, t])
        if not len(rows):
            continue
        key = _model_key(model, obs[rows], actions[rows], t, agent[rows])
        start = torch.as_tensor(obs[rows, t], dtype=torch.float32, device=device)
        plans = planner.first_candidates(len(rows))
        with torch.no_grad():
            predicted = planner.score(start, torch.as_tensor(key, device=device), plans).cpu().numpy()
            true = truth.score(start.cpu(), torch.as_tensor(agent[rows]), plans.cpu()).numpy()
        for a, mine, real in zip(agent[rows], predicted, true):
            kept = np.isfinite(real)  # plans that make the true physics diverge score -inf: left out
            mine, real = mine[kept], real[kept]
            if len(real) > 1 and np.ptp(real) > 0:
                rho = spearmanr(mine, real).statistic if np.ptp(mine) > 0 else np.nan  # a model that ranks nothing
                found[a].append((rho, real.max() - real[np.argmax(mine)], real.max() - real.mean()))
    metrics = {}
    for a in agents:
        rho, regret, blind = np.array(found[a]).T if found[a] else np.full((3, 1), np.nan)
        metrics[f"plan_rank_agent{a}"] = _mean_of_finite(rho)
        metrics[f"plan_regret_agent{a}"] = float(regret.sum() / blind.sum())
    metrics["plan_rank_mean"] = _mean_of_finite([metrics[f"plan_rank_agent{a}"] for a in agents])
    return metrics


def episode_rewards(act: ActFn, family: EnvFamily, covariates: np.ndarray, agents: list[int], episodes: int,
                    max_steps: int, seed: int, on_step: Callable[[int], None] | None = None) -> dict:
    """Per test agent: mean undiscounted return over ``episodes`` episodes, all run in lock-step.

    ``act`` only sees the episodes still running, so a planner's batch shrinks as episodes end.
    If it takes an ``episodes`` keyword (the MPC planner) it also gets their indices among all
    the episodes here (``arange(n)`` while all run), to keep its per-episode state aligned.
    Metrics: per agent the mean and std of the returns, the mean length, and every episode's
    return (``episode_returns_agent{a}``, a list, for bootstrap intervals). An episode whose physics
    diverged (``BatchSim.diverged``: MuJoCo restarted the body) ends there and is left out of the
    returns, as a measurement of nothing; ``diverged_agent{a}`` counts them (NaN return if all did).
    """
    rng = np.random.default_rng(seed)
    agent = np.repeat(np.asarray(agents), episodes)
    n = len(agent)
    sim = family.batch(covariates[agent])
    obs = sim.reset(rng)
    returns = np.zeros(n)
    alive = np.ones(n, dtype=bool)
    lengths = np.zeros(n, dtype=np.int64)
    diverged = np.zeros(n, dtype=bool)
    tracks_episodes = _takes_episodes(act)
    for t in range(max_steps):
        running = np.flatnonzero(alive)
        if len(running) == n:
            action = np.asarray(act(obs, agent, episodes=running) if tracks_episodes else act(obs, agent))
        else:
            chosen = np.asarray(act(obs[running], agent[running], episodes=running) if tracks_episodes
                                else act(obs[running], agent[running]))
            # The simulator steps every agent: finished ones get a placeholder action and earn nothing.
            action = np.zeros((n, *chosen.shape[1:]), dtype=chosen.dtype)
            action[running] = chosen
        obs, reward, terminated = sim.step(action)
        returns += reward * alive
        lengths += alive
        diverged |= sim.diverged & alive
        alive &= ~terminated
        if on_step:
            on_step(t)
        if not alive.any():
            break
    metrics = {}
    for a in agents:
        mine = agent == a
        scored = returns[mine & ~diverged]
        metrics[f"reward_agent{a}"] = float(scored.mean()) if len(scored) else float("nan")
        metrics[f"reward_std_agent{a}"] = float(scored.std()) if len(scored) else float("nan")
        metrics[f"length_agent{a}"] = float(lengths[mine].mean())
        metrics[f"diverged_agent{a}"] = int(diverged[mine].sum())
        metrics[f"episode_returns_agent{a}"] = [float(r) for r in scored]
    metrics["reward_mean"] = float(np.mean([metrics[f"reward_agent{a}"] for a in agents]))
    return metrics


def _takes_episodes(act: ActFn) -> bool:
    """Does ``act`` accept ``episodes=`` (a policy with per-episode state, like ``MPCPlanner.act``)?"""
    try:
        return "episodes" in inspect.signature(act).parameters
    except (TypeError, ValueError):  # no introspectable signature (some builtins): a plain ActFn
        return False


# ---------------------------------------------------------------- the evaluation every trial shares


def test_covariates(family: EnvFamily) -> np.ndarray:
    """Covariates of agents 0-4: the paper's test agents, the first rows of every dataset."""
    return np.asarray(family.test_agents, dtype=np.float64)


@contextlib.contextmanager
def timed(costs: dict, phase: str):
    """Add this block's wall time to ``costs["seconds_<phase>"]`` (a trial logs its costs with its metrics)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        key = f"seconds_{phase}"
        costs[key] = costs.get(key, 0.0) + time.perf_counter() - started


class WithinBox:
    """A learned model whose predicted states are clamped into a box; everything else goes to the model.

    Bounds [D] live on the model's device, made once: one clamp per step.
    """

    def __init__(self, model: DynamicsModel, low: torch.Tensor, high: torch.Tensor):
        device = model_device(model)
        self.model, self.low, self.high = model, low.to(device), high.to(device)

    def step(self, obs: torch.Tensor, action: torch.Tensor, agent: torch.Tensor) -> torch.Tensor:
        return self.model.step(obs, action, agent).clamp_(self.low, self.high)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def as_simulator(model: DynamicsModel, family: EnvFamily, spec: "EvaluationSpec") -> DynamicsModel:
    """The learned model as the evaluation uses it, held to a box when the grid asks:

    - the env's state box (``clip_to_state_box``): the env itself never leaves it (gym's MountainCar
      clips position and velocity), known physics like the reward function the planner is given;
    - the range of states in the model's training data, widened by ``data_box_margin`` of that range
      on each side (``clip_to_data_box``): a model that has never seen a state has no business
      predicting one ten times further out, which is how open-loop rollouts of an over-fitted
      model run away.
    """
    low = torch.full((family.obs_dim,), -math.inf)
    high = torch.full((family.obs_dim,), math.inf)
    if spec.clip_to_state_box and family.state_low is not None:
        low, high = torch.tensor(family.state_low), torch.tensor(family.state_high)
    box = data_box(model)
    if spec.clip_to_data_box and box is not None:
        data_low, data_high = box[0].cpu(), box[1].cpu()
        margin = spec.data_box_margin * (data_high - data_low)
        low, high = torch.maximum(low, data_low - margin), torch.minimum(high, data_high + margin)
    if torch.isinf(low).all() and torch.isinf(high).all():
        return model
    return WithinBox(model, low.float(), high.float())


class CountingModel:
    """A dynamics model that counts the rows (members x batch) it steps; everything else goes to the model."""

    def __init__(self, model: DynamicsModel):
        self.model = model
        self.rows = 0

    def step(self, obs: torch.Tensor, action: torch.Tensor, agent: torch.Tensor) -> torch.Tensor:
        self.rows += obs.shape[0] * obs.shape[1]
        return self.model.step(obs, action, agent)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def macs_per_row(model: DynamicsModel, family: EnvFamily, rows: int = 64) -> float:
    """Multiply-adds of one model row (one member, one state), counted by torch on one step of ``rows`` states."""
    from torch.utils.flop_counter import FlopCounterMode

    members, device = model.n_members, model_device(model)
    obs = torch.zeros(members, rows, family.obs_dim, device=device)
    action = (torch.zeros(rows, dtype=torch.long) if family.discrete else torch.zeros(rows, family.action_dim)).to(device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.step(obs, action, torch.zeros(rows, dtype=torch.long, device=device))
    return counter.get_total_flops() / 2 / (members * rows)


def model_cost(model: CountingModel, family: EnvFamily, costs: dict) -> dict:
    """Rows the model evaluated and the multiply-adds/s it achieved over the prediction and reward ``costs``."""
    seconds = costs.get("seconds_prediction", 0.0) + costs.get("seconds_reward", 0.0)
    macs = macs_per_row(model.model, family)
    figures = {"model_rows": model.rows, "model_macs_per_row": macs}
    if macs and seconds:
        figures["model_macs_per_second"] = model.rows * macs / seconds
    return figures


MODEL_FILE = "model.pt"


def save_model(model, ctx: TrialContext) -> Path:
    """The trained model into the trial's folder (``model/model.pt``); list it in ``TrialOutput.models``."""
    path = ctx.work_dir / "model" / MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def saved_model_loader(model_class) -> Callable[[Path, str], object]:
    """``Algorithm.reload`` of a model ``save_model`` wrote: (its folder, device) -> the model."""
    return lambda folder, device: model_class.load(Path(folder) / MODEL_FILE, device)


def load_trial_data(trial: Trial, ctx: TrialContext, costs: dict) -> Transitions:
    """The trial's dataset, through the one reader, checked to start with the paper's test agents; a
    data-size cell's trial gets its nested subset (``data.subsets``)."""
    if ctx.dataset is None or ctx.data_root is None:
        raise ValueError(f"{trial.name or trial.algo}: this trial was given no dataset")
    with timed(costs, "load"):
        data = read_dataset(ctx.data_root, ctx.dataset)
        if trial.in_data_size_cell:
            data = take_subset(data, subset_agents(ctx.dataset, trial.agents), trial.steps_per_agent)
    family = get_env(trial.env)
    if not np.allclose(data.covariates[: len(family.test_agents)], family.test_agents):
        raise DatasetError(f"{dataset_dir(ctx.data_root, trial.env, trial.regime)}: the dataset's agents 0-4 are "
                           f"not the paper's test agents")
    return data


def test_actions_policy(ctx: TrialContext, family: EnvFamily, seed: int):
    """(policy, name) driving the prediction test: the trained test policy (paper) or the heuristic."""
    if ctx.evaluation.prediction_policy == "heuristic":
        return prediction_policy(family, seed), PREDICTION_POLICY_NAME
    if ctx.test_policy is None:
        raise ValueError(f"evaluation.prediction_policy {ctx.evaluation.prediction_policy!r}: no test policy file given")
    path = ctx.test_policy
    net, header = load_policy(path, expect={"env": family.name, "role": "test"})
    # The authors act with their DQN test policies at epsilon 0.01; TD3's actor acts as is.
    policy = EpsilonMixture(net, family, 0.01) if family.discrete else net
    return policy, f"{header['algorithm']}-test:{path.name}"


def evaluate_model(model: DynamicsModel, trial: Trial, ctx: TrialContext,
                   planner: "PlannerSpec | None" = None) -> TrialOutput:
    """Prediction error and MPC reward of a learned dynamics model on the test agents (as ``as_simulator`` gives it)."""
    family, spec, costs = get_env(trial.env), ctx.evaluation, {}
    counted = CountingModel(as_simulator(model, family, spec))
    with timed(costs, "prediction"):
        policy, policy_name = test_actions_policy(ctx, family, trial.seed)
        metrics = prediction_error(counted, family, test_covariates(family), spec.test_agents, policy,
                                   spec.prediction_trajectories, spec.prediction_steps, spec.burn_in, trial.seed)
    if spec.plan_ranking:  # beyond the paper: off unless asked
        with timed(costs, "ranking"):
            metrics |= plan_ranking(counted.model, family, test_covariates(family), spec.test_agents, policy,
                                    planner or ctx.planner, spec.plan_ranking, spec.prediction_steps,
                                    spec.burn_in, trial.seed)
    output = TrialOutput({**metrics, "prediction_policy": policy_name}, costs)
    if spec.rewards:  # else prediction only (``evaluation.rewards: false``)
        output = output | _planned_rewards(counted, trial, ctx, planner)
    return output | TrialOutput(costs=model_cost(counted, family, output.costs))


def plan_and_score(model: DynamicsModel, trial: Trial, ctx: TrialContext,
                   planner: "PlannerSpec | None" = None) -> TrialOutput:
    """Reward of the shared MPC planner (the grid's settings unless ``planner`` overrides them) on ``model``."""
    counted = CountingModel(model)
    output = _planned_rewards(counted, trial, ctx, planner)
    return output | TrialOutput(costs=model_cost(counted, get_env(trial.env), output.costs))


def _planned_rewards(model: CountingModel, trial: Trial, ctx: TrialContext, planner: "PlannerSpec | None") -> TrialOutput:
    act = MPCPlanner(get_env(trial.env), model, planner or ctx.planner, trial.seed).act
    return score_policy(act, trial, ctx, ctx.evaluation.reward_episodes)


def score_policy(act: ActFn, trial: Trial, ctx: TrialContext, episodes: int) -> TrialOutput:
    """Reward of any policy (planner or model-free) on the test agents, reporting progress."""
    spec, family, costs = ctx.evaluation, get_env(trial.env), {}
    steps = spec.episode_steps(family.name)
    progress = max(1, steps // 10)
    with timed(costs, "reward"):
        metrics = episode_rewards(
            act, family, test_covariates(family), spec.test_agents, episodes, steps, trial.seed,
            on_step=lambda t: ctx.report({"stage": "reward", "episode_step": t + 1}) if (t + 1) % progress == 0 else None,
        )
    return TrialOutput(metrics, costs)
