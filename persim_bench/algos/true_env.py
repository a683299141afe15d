""""True env + MPC": the shared planner on the ground-truth dynamics, the planner's upper bound."""
from __future__ import annotations

from typing import TYPE_CHECKING

from persim_bench.contracts import Algorithm, Trial, TrialContext, TrialOutput
from persim_bench.costmodel import Dynamics, mpc_reward_seconds
from persim_bench.envs import get_env
from persim_bench.evaluate import plan_and_score, test_covariates
from persim_bench.planning import TrueEnvModel

if TYPE_CHECKING:
    from persim_bench.config import Grid


def run_true_env_mpc(trial: Trial, spec: None, ctx: TrialContext) -> TrialOutput:
    """The planner on the test agents' real dynamics: no data, no fit."""
    family = get_env(trial.env)
    return plan_and_score(TrueEnvModel(family, test_covariates(family)), trial, ctx)


def true_env_trial_seconds(grid: "Grid", trial: Trial, rows: int, rate: float) -> float:
    return mpc_reward_seconds(grid, trial.env, Dynamics(trial.env), rate)


ALGORITHMS = [Algorithm("true_env_mpc", "True env + MPC", run_true_env_mpc, plans=True, needs_data=False,
                        cost=true_env_trial_seconds)]
