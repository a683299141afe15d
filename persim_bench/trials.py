"""What one Tune trial does for each algorithm: fit (if it learns), then the shared evaluation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from persim_bench.config import Grid, PlannerSpec, per_env
from persim_bench.data.behaviour import PREDICTION_POLICY_NAME, EpsilonMixture, prediction_policy
from persim_bench.data.policies import load_policy, prediction_policy_path
from persim_bench.data.dataset import read_dataset
from persim_bench.envs import get_env
from persim_bench.envs.base import EnvFamily
from persim_bench.evaluate import ActFn, episode_rewards, prediction_error
from persim_bench.planning import MPCPlanner

Report = Callable[[dict], None]


@dataclass(frozen=True)
class TrialPaths:
    """Where a trial reads its inputs and may write its own files (the Tune trial's directory)."""

    data_root: Path
    policy_root: Path
    work_dir: Path


def test_covariates(family: EnvFamily) -> np.ndarray:
    """Covariates of agents 0-4: the paper's test agents, the first rows of every dataset."""
    return np.asarray(family.test_agents, dtype=np.float64)


def test_actions_policy(grid: Grid, family: EnvFamily, policy_root: Path, seed: int):
    """(policy, name) driving the prediction test: the trained test policy (paper) or the heuristic."""
    if grid.evaluation.prediction_policy == "heuristic":
        return prediction_policy(family, seed), PREDICTION_POLICY_NAME
    path = prediction_policy_path(policy_root, grid, family.name)
    net, header = load_policy(path, expect={"env": family.name, "role": "test"})
    # The authors act with their DQN test policies at epsilon 0.01; TD3's actor acts as is.
    policy = EpsilonMixture(net, family, 0.01) if family.discrete else net
    return policy, f"{header['algorithm']}-test:{path.name}"


def evaluate_model(model, grid: Grid, family: EnvFamily, seed: int, policy_root: Path, report: Report,
                   planner: PlannerSpec | None = None) -> dict:
    """Prediction error and MPC reward of a learned dynamics model, on the test agents."""
    spec, agents = grid.evaluation, grid.evaluation.test_agents
    covariates = test_covariates(family)
    policy, policy_name = test_actions_policy(grid, family, policy_root, seed)
    metrics = prediction_error(model, family, covariates, agents, policy,
                               spec.prediction_trajectories, spec.prediction_steps, spec.burn_in, seed)
    metrics["prediction_policy"] = policy_name
    metrics.update(plan_and_score(model, grid, family, seed, report, planner))
    return metrics


def plan_and_score(model, grid: Grid, family: EnvFamily, seed: int, report: Report,
                   planner: PlannerSpec | None = None) -> dict:
    """Reward of the shared MPC planner (grid's settings unless ``planner`` overrides them) on ``model``."""
    return score_policy(MPCPlanner(family, model, planner or grid.planner, seed).act, grid, family, seed, report,
                        grid.evaluation.reward_episodes)


def score_policy(act: ActFn, grid: Grid, family: EnvFamily, seed: int, report: Report, episodes: int) -> dict:
    """Reward of any policy (planner or model-free) on the test agents, reporting progress to Tune."""
    spec = grid.evaluation
    steps = spec.episode_steps(family.name)
    progress = max(1, steps // 10)
    return episode_rewards(
        act, family, test_covariates(family), spec.test_agents, episodes, steps, seed,
        on_step=lambda t: report({"stage": "reward", "episode_step": t + 1}) if (t + 1) % progress == 0 else None,
    )


def run_persim(grid: Grid, trial: dict, paths: TrialPaths, report: Report) -> dict:
    from persim_bench.algos.persim import fit_persim

    family = get_env(trial["env"])
    data = read_dataset(paths.data_root, trial["env"], trial["regime"])
    check_test_agents(data.covariates, family)
    if trial["rank"] is None:
        raise ValueError(f"{trial['env']}/{trial['regime']}: rank_cv chose no rank (all its trials failed)")
    spec = grid.persim.model_copy(update={"rank": trial["rank"]})
    model, fit_metrics = fit_persim(
        data, spec, trial["seed"], device=fit_device(grid, "persim"),
        on_epoch=lambda epoch, m: report({"stage": "fit", "epoch": epoch + 1, **m}))
    model = model.cpu()  # planning and evaluation run on the CPU
    return {**fit_metrics, **evaluate_model(model, grid, family, trial["seed"], paths.policy_root, report)}


def run_cadm(grid: Grid, trial: dict, paths: TrialPaths, report: Report) -> dict:
    """Vanilla or PE-TS CaDM: fit offline, then the shared evaluation with CaDM's particle aggregation."""
    from persim_bench.algos.cadm import fit_cadm

    family = get_env(trial["env"])
    data = read_dataset(paths.data_root, trial["env"], trial["regime"])
    model, fit_metrics = fit_cadm(
        data, grid.cadm, trial["seed"], probabilistic=trial["algo"] == "cadm_pets",
        on_iteration=lambda i, m: report({"stage": "fit", "iteration": i + 1, **m}))
    planner = grid.planner.model_copy(update={"aggregate": grid.cadm.aggregate})
    return {**fit_metrics, **evaluate_model(model, grid, family, trial["seed"], paths.policy_root, report, planner)}


def run_bcq(grid: Grid, trial: dict, paths: TrialPaths, report: Report) -> dict:
    """BCQ-P (one policy on every agent) or BCQ-A (one per test agent, on its own trajectory), then the reward test."""
    from persim_bench.algos.bcq import fit_bcq

    family = get_env(trial["env"])
    data = read_dataset(paths.data_root, trial["env"], trial["regime"])
    check_test_agents(data.covariates, family)
    agents = grid.evaluation.test_agents if trial["algo"] == "bcq_a" else None
    policy, fit_metrics = fit_bcq(data, grid.bcq, trial["seed"], paths.work_dir, agents,
                                  on_epoch=lambda epoch, m: report({"stage": "fit", "epoch": epoch, **m}))
    return {**fit_metrics, **score_policy(policy.act, grid, family, trial["seed"], report,
                                          grid.evaluation.policy_reward_episodes)}


def run_true_env_mpc(grid: Grid, trial: dict, paths: TrialPaths, report: Report) -> dict:
    from persim_bench.algos.true_env import TrueEnvModel

    family = get_env(trial["env"])
    return plan_and_score(TrueEnvModel(family, test_covariates(family)), grid, family, trial["seed"], report)


def fit_device(grid: Grid, key: str) -> str:
    """PerSim trains on the GPU when the grid reserves one for the trial (and Ray gave it one)."""
    import torch

    return "cuda" if grid.trial_resources(key).gpu > 0 and torch.cuda.is_available() else "cpu"


def check_test_agents(covariates: np.ndarray, family: EnvFamily) -> None:
    if not np.allclose(covariates[: len(family.test_agents)], family.test_agents):
        raise ValueError(f"{family.name}: the dataset's agents 0-4 are not the paper's test agents")


def run_rank_cv(grid: Grid, trial: dict, paths: TrialPaths, report: Report) -> dict:
    """One candidate rank of the paper's cross-validation: PerSim fitted with a share of transitions held out."""
    from persim_bench.algos.persim import fit_persim

    data = read_dataset(paths.data_root, trial["env"], trial["regime"])
    curve = []

    def on_epoch(epoch: int, metrics: dict) -> None:
        curve.append(metrics["val_loss"])
        report({"stage": "fit", "epoch": epoch + 1, **metrics})

    spec = grid.persim.model_copy(update={"rank": trial["rank"]})
    _, metrics = fit_persim(data, spec, trial["seed"], holdout=grid.persim.cv_holdout, on_epoch=on_epoch,
                            device=fit_device(grid, "rank_cv"))
    return {**metrics, "val_loss_curve": curve}


RUNNERS = {"persim": run_persim, "cadm_vanilla": run_cadm, "cadm_pets": run_cadm, "bcq_p": run_bcq, "bcq_a": run_bcq,
           "true_env_mpc": run_true_env_mpc, "rank_cv": run_rank_cv}


def runner_key(trial: dict) -> str:
    return "rank_cv" if trial["stage"] == "rank_cv" else trial["algo"]


def rank_cv_configs(grid: Grid) -> list[dict]:
    """The rank_cv stage: PerSim per env x regime (x seed if cv_per_seed) x rank of the rank grid."""
    if "persim" not in grid.algos or grid.persim.rank != "cv":
        return []
    seeds = grid.seeds if grid.persim.cv_per_seed else grid.seeds[:1]
    return [{"stage": "rank_cv", "algo": "persim", "env": env, "regime": regime, "seed": seed, "rank": rank,
             "name": f"rank-cv-{env}-{regime}-r{rank}-s{seed}"}
            for env in grid.envs for regime in grid.regimes for seed in seeds for rank in grid.persim.rank_grid]


def cv_key(grid: Grid, env: str, regime: str, seed: int) -> tuple[str, str, int]:
    """Which rank_cv result decides a main trial's rank: its own seed's, or the first seed's."""
    return env, regime, seed if grid.persim.cv_per_seed else grid.seeds[0]


def trial_configs(grid: Grid, chosen_ranks: dict[tuple[str, str, int], int] | None = None) -> list[dict]:
    """The main stage: one trial per (algo, env, regime, seed[, rank]) with a deterministic name.

    Data-free algorithms skip the regime. PerSim's rank is pinned by the grid or comes from
    ``chosen_ranks`` (rank_cv's picks; a missing pick leaves rank None, which the trial reports
    as its failure); ``sweep_ranks`` adds a trial for every other rank of the rank grid.
    """
    trials = []
    for algo in grid.algos:
        for env in grid.envs:
            for regime in grid.regimes if algo != "true_env_mpc" else ["none"]:
                for seed in grid.seeds:
                    base = {"stage": "main", "algo": algo, "env": env, "regime": regime, "seed": seed}
                    if algo != "persim":
                        trials.append(_named(base))
                        continue
                    if grid.persim.rank == "cv":
                        rank, source = (chosen_ranks or {}).get(cv_key(grid, env, regime, seed)), "cv"
                    else:
                        rank, source = per_env(grid.persim.rank, env), "pinned"
                    trials.append(_named({**base, "rank": rank, "rank_source": source}))
                    if grid.persim.sweep_ranks:
                        trials += [_named({**base, "rank": other, "rank_source": "sweep"})
                                   for other in grid.persim.rank_grid if other != rank]
    return trials


def _named(trial: dict) -> dict:
    parts = [trial["algo"].replace("_", "-"), trial["env"]] + ([trial["regime"]] if trial["regime"] != "none" else [])
    if "rank" in trial:
        parts.append(f"r{trial['rank'] if trial['rank'] is not None else 'cv'}")
    return {**trial, "name": "-".join(parts + [f"s{trial['seed']}"])}
