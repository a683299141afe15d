"""IQL (Kostrikov et al. 2021), an offline baseline for continuous actions (HalfCheetah), through d3rlpy.

IQL-P is one policy on every agent's trajectory, IQL-A one per test agent on its own trajectory
(``d3rlpy_common`` does both). Hyperparameters follow the official code's Gym-MuJoCo setting
(ikostrikov/implicit_q_learning: ``configs/mujoco_config.py``, ``learner.py``, ``train_offline.py``)
where d3rlpy's defaults differ (``IQLSpec``, docs/algorithms.md).
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from persim_bench.algos.d3rlpy_common import OfflinePolicySpec, PolicyCost, d3rlpy_device, offline_policy_entries
from persim_bench.costmodel import TRAIN
from persim_bench.envs import get_env
from persim_bench.specs import HiddenUnits, PositiveInt

if TYPE_CHECKING:
    from persim_bench.config import Grid

# One gradient step beyond its layers: process CPU time per step, 1 thread, on the 2-core dev machine,
# minus costmodel's layer cost.
STEP_SECONDS = 2e-3  # 10.9 ms per step measured at the paper's sizes

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the actor's log-std bounds (official and d3rlpy)


class IQLSpec(OfflinePolicySpec):
    """IQL through d3rlpy. Defaults follow the official IQL code's MuJoCo locomotion setting.

    gamma 0.99, target tau 0.005, two critics with the min in the value and policy targets and the
    advantage weight clipped at 100 are also d3rlpy's defaults and left to it.
    """

    # Hidden layers of the actor, of each of the two critics and of the value net (official and d3rlpy: 256-256).
    actor_hidden: HiddenUnits = [256, 256]
    critic_hidden: HiddenUnits = [256, 256]
    value_hidden: HiddenUnits = [256, 256]
    # Adam learning rates: actor; critics and value net (official: 3e-4 each; d3rlpy: 3e-4, one optimizer for both).
    actor_lr: Annotated[float, Field(gt=0)] = 3e-4
    critic_lr: Annotated[float, Field(gt=0)] = 3e-4
    # The actor's learning rate decays to 0 over the run on a cosine (official ``opt_decay_schedule="cosine"``
    # over max_steps; d3rlpy: constant).
    cosine_actor_lr: bool = True
    # Minibatch size (official and d3rlpy: 256).
    batch_size: PositiveInt = 256
    # Expectile of the value regression (official MuJoCo config and d3rlpy: 0.7).
    expectile: Annotated[float, Field(gt=0, lt=1)] = 0.7
    # Inverse temperature beta of the advantage weights exp(beta (Q - V)) (official MuJoCo config and d3rlpy: 3.0).
    temperature: Annotated[float, Field(gt=0)] = 3.0
    # Rewards x 1000 / (max - min trajectory return) of the training data (official ``normalize`` for
    # locomotion; d3rlpy: no scaling). Data of one trajectory (IQL-A) or equal returns: left unscaled.
    normalize_rewards: bool = True


def make_iql(spec: IQLSpec, discrete: bool, device: str):
    from d3rlpy.algos import IQLConfig
    from d3rlpy.models import VectorEncoderFactory
    from d3rlpy.optimizers import AdamFactory, CosineAnnealingLRFactory

    if discrete:
        raise ValueError("IQL here is for continuous actions only (HalfCheetah)")
    actor_optim = AdamFactory(lr_scheduler_factory=CosineAnnealingLRFactory(T_max=spec.steps)
                              if spec.cosine_actor_lr else None)
    config = IQLConfig(
        actor_learning_rate=spec.actor_lr, critic_learning_rate=spec.critic_lr, actor_optim_factory=actor_optim,
        actor_encoder_factory=VectorEncoderFactory(hidden_units=list(spec.actor_hidden)),
        critic_encoder_factory=VectorEncoderFactory(hidden_units=list(spec.critic_hidden)),
        value_encoder_factory=VectorEncoderFactory(hidden_units=list(spec.value_hidden)),
        batch_size=spec.batch_size, expectile=spec.expectile, weight_temp=spec.temperature,
        reward_scaler=_return_range_scaler()(multiplier=1000.0) if spec.normalize_rewards else None)
    return _original_iql()(config, d3rlpy_device(device), enable_ddp=False)


@functools.cache
def _original_iql():
    """IQL whose actor starts at log-std 0 (std 1) as the official policy's ``log_stds`` parameter does.

    d3rlpy maps its state-independent parameter p to log-std -5 + 7 sigmoid(p) and starts p at 0,
    i.e. log-std -1.5; p = logit(5/7) gives the original's start (its parameterisation stays d3rlpy's).
    """
    import torch
    from d3rlpy.algos import IQL

    start = math.log((0.0 - LOG_STD_MIN) / (LOG_STD_MAX - 0.0))

    class OriginalIQL(IQL):
        def inner_create_impl(self, observation_shape, action_size: int) -> None:
            super().inner_create_impl(observation_shape, action_size)
            with torch.no_grad():
                self._impl.modules.policy._logstd.fill_(start)

    return OriginalIQL


@functools.cache
def _return_range_scaler():
    """d3rlpy's ReturnBasedRewardScaler (r x multiplier / (max - min return)), unscaled when the range is 0.

    A per-agent (IQL-A) dataset is one trajectory: the original's range is undefined there.
    """
    from d3rlpy.preprocessing import ReturnBasedRewardScaler

    class ReturnRangeScaler(ReturnBasedRewardScaler):
        def _no_range_no_scaling(self) -> None:
            if not self.return_max - self.return_min > 1e-6 * max(1.0, abs(self.return_max)):
                self.return_max = self.return_min + self.multiplier

        def fit_with_transition_picker(self, episodes, transition_picker) -> None:
            super().fit_with_transition_picker(episodes, transition_picker)
            self._no_range_no_scaling()

        def fit_with_trajectory_slicer(self, episodes, trajectory_slicer) -> None:
            super().fit_with_trajectory_slicer(episodes, trajectory_slicer)
            self._no_range_no_scaling()

    return ReturnRangeScaler


def iql_nets(grid: "Grid", env: str) -> dict[str, tuple[int, ...]]:
    family, spec = get_env(env), grid.iql
    d, a = family.obs_dim, family.action_dim
    return {"actor": (d, *spec.actor_hidden, a), "critic": (d + a, *spec.critic_hidden, 1),
            "value": (d, *spec.value_hidden, 1)}


def iql_train_calls(grid: "Grid", env: str):
    # Critic step: V on s' (target); both critics fwd+bwd on (s, a); both target critics and V fwd+bwd
    # for the expectile loss. Actor step: fwd+bwd; both target critics and V for the weights.
    calls = [("value", 1, 1), ("critic", 1, 2 * TRAIN), ("critic", 1, 2), ("value", 1, TRAIN),
             ("actor", 1, TRAIN), ("critic", 1, 2), ("value", 1, 1)]
    return calls, grid.iql.batch_size, STEP_SECONDS


def iql_act_calls(grid: "Grid", env: str):
    return [("actor", 1, 1)]  # the tanh mean


ALGORITHMS = offline_policy_entries("iql", "IQL", IQLSpec, make_iql,
                                    PolicyCost(iql_nets, iql_train_calls, iql_act_calls),
                                    action_spaces=("continuous",))
