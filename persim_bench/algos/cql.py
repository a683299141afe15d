"""CQL (Kumar et al. 2020), a conservative offline baseline beside BCQ, through d3rlpy.

CQL-P is one policy on every agent's trajectory, CQL-A one per test agent on its own
trajectory (``d3rlpy_common`` does both). HalfCheetah runs d3rlpy's CQL (SAC-based CQL(H)) with
the official code's Gym-MuJoCo setting (aviralkumar2907/CQL, ``d4rl/README.md`` and
``d4rl/examples/cql_mujoco_new.py``); MountainCar and CartPole run d3rlpy's DiscreteCQL on
QR-DQN as the official Atari code (``atari/batch_rl``) does, with an MLP for the conv net.
Where d3rlpy's defaults differ from the original code we use the original value (``CQLSpec``, docs/algorithms.md).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, model_validator

from persim_bench.algos.d3rlpy_common import OfflinePolicySpec, PolicyCost, d3rlpy_device, offline_policy_entries
from persim_bench.costmodel import TRAIN
from persim_bench.envs import get_env
from persim_bench.specs import HiddenUnits, PositiveInt

if TYPE_CHECKING:
    from persim_bench.config import Grid

# One gradient step beyond its layers (d3rlpy's Python, optimizers, sampling): process CPU time per
# step at the paper's sizes, 1 thread, on the 2-core dev machine, minus costmodel's layer cost.
# (Continuous CQL measured 164 ms per step against 205 ms of modelled layers: an upper bound.)
STEP_SECONDS = {"discrete": 1.1e-3, "continuous": 2e-3}
# QR-DQN's quantile Huber loss, per batch row and (quantile, target quantile) pair: 200 quantiles at
# batch 32 add ~17 ms per step (measured 19.7 ms per CartPole step vs 2.8 ms with 32 quantiles).
QUANTILE_PAIR_SECONDS = 13e-9


class CQLSpec(OfflinePolicySpec):
    """CQL through d3rlpy. Defaults follow the official CQL code (aviralkumar2907/CQL) where d3rlpy's differ.

    Continuous CQL (HalfCheetah) and discrete CQL (MountainCar, CartPole) have their own fields;
    gamma 0.99 and the continuous target tau 0.005 are also d3rlpy's defaults and left to it.
    """

    # Continuous: hidden layers of the tanh-Gaussian actor and of each twin critic (official: 3 x 256;
    # d3rlpy: 256-256).
    actor_hidden: HiddenUnits = [256, 256, 256]
    critic_hidden: HiddenUnits = [256, 256, 256]
    # Continuous: Adam learning rates. Actor 1e-4 (official README for Gym-MuJoCo, 3e-4 also "works";
    # its kitchen example uses 3e-5), critic 3e-4, SAC temperature as the actor (all = d3rlpy's defaults).
    actor_lr: Annotated[float, Field(gt=0)] = 1e-4
    critic_lr: Annotated[float, Field(gt=0)] = 3e-4
    temp_lr: Annotated[float, Field(gt=0)] = 1e-4
    # Continuous: minibatch size (official and d3rlpy: 256).
    batch_size: PositiveInt = 256
    # Continuous: fixed conservative weight alpha of CQL(H) (official Gym-MuJoCo: 5.0 or 10.0 with
    # lagrange_thresh -1, i.e. no Lagrange dual; d3rlpy: 5.0 scaled by a learned alpha, turned off here).
    conservative_weight: Annotated[float, Field(gt=0)] = 5.0
    # Continuous: uniform and policy actions sampled per state for the log-sum-exp (official num_random and d3rlpy: 10).
    n_action_samples: PositiveInt = 10
    # Continuous: the first steps train the actor by behaviour cloning, log-likelihood of the data's
    # actions plus the entropy term (official policy_eval_start 40000; not in d3rlpy).
    bc_warmup_steps: Annotated[int, Field(ge=0)] = 40_000
    # Discrete: hidden layers of the QR-DQN network (official: the Atari conv net + 512; d3rlpy: 256-256).
    discrete_hidden: HiddenUnits = [256, 256]
    # Discrete: quantiles of QR-DQN (official num_atoms 200; d3rlpy: a plain mean Q-function).
    discrete_quantiles: PositiveInt = 200
    # Discrete: Adam learning rate and epsilon (official 5e-5 and 3.125e-4 = 0.01/32; d3rlpy 6.25e-5 and 1e-8).
    discrete_lr: Annotated[float, Field(gt=0)] = 5e-5
    discrete_adam_eps: Annotated[float, Field(gt=0)] = 3.125e-4
    # Discrete: minibatch size (official and d3rlpy: 32).
    discrete_batch_size: PositiveInt = 32
    # Discrete: hard target copy every this many gradient steps (official: 8000 agent steps at one
    # update per 4 = 2000 updates; d3rlpy: 8000 gradient steps).
    discrete_target_update_interval: PositiveInt = 2000
    # Discrete: CQL weight (official minq_weight: 4.0 for its 1 % Atari data, ~500k transitions, 1.0 for
    # 10 %; our datasets are at most that small; d3rlpy: 1.0).
    discrete_alpha: Annotated[float, Field(gt=0)] = 4.0

    @model_validator(mode="after")
    def _warmup_within_steps(self):
        if self.bc_warmup_steps >= self.steps:
            raise ValueError(f"bc_warmup_steps ({self.bc_warmup_steps}) must be below steps ({self.steps}): "
                             f"the actor would never see the critic")
        return self


def make_cql(spec: CQLSpec, discrete: bool, device: str):
    from d3rlpy.algos import CQLConfig, DiscreteCQLConfig
    from d3rlpy.models import QRQFunctionFactory, VectorEncoderFactory
    from d3rlpy.optimizers import AdamFactory

    if discrete:
        config = DiscreteCQLConfig(
            learning_rate=spec.discrete_lr, optim_factory=AdamFactory(eps=spec.discrete_adam_eps),
            encoder_factory=VectorEncoderFactory(hidden_units=list(spec.discrete_hidden)),
            q_func_factory=QRQFunctionFactory(n_quantiles=spec.discrete_quantiles),
            batch_size=spec.discrete_batch_size, target_update_interval=spec.discrete_target_update_interval,
            alpha=spec.discrete_alpha)
        return _original_discrete_cql()(config, d3rlpy_device(device), enable_ddp=False)
    config = CQLConfig(
        actor_learning_rate=spec.actor_lr, critic_learning_rate=spec.critic_lr, temp_learning_rate=spec.temp_lr,
        actor_encoder_factory=VectorEncoderFactory(hidden_units=list(spec.actor_hidden)),
        critic_encoder_factory=VectorEncoderFactory(hidden_units=list(spec.critic_hidden)),
        batch_size=spec.batch_size, conservative_weight=spec.conservative_weight,
        n_action_samples=spec.n_action_samples,
        initial_alpha=1.0, alpha_learning_rate=0.0)  # a fixed weight: the Lagrange dual is off (alpha stays 1)
    return _original_cql()(config, d3rlpy_device(device), enable_ddp=False, bc_warmup_steps=spec.bc_warmup_steps)


@functools.cache
def _original_discrete_cql():
    """DiscreteCQL whose target takes the target network's greedy action, as QR-DQN (and the official code) does.

    d3rlpy's DiscreteCQL is built on Double DQN (the online network picks the next action).
    """
    from d3rlpy.algos import DiscreteCQL
    from d3rlpy.algos.qlearning.torch.dqn_impl import DQNImpl

    class OriginalDiscreteCQL(DiscreteCQL):
        def inner_create_impl(self, observation_shape, action_size: int) -> None:
            super().inner_create_impl(observation_shape, action_size)
            self._impl.compute_target = DQNImpl.compute_target.__get__(self._impl)

    return OriginalDiscreteCQL


@functools.cache
def _original_cql():
    """CQL with the official code's deterministic backup and behaviour-cloning warm start.

    - Q target: min of the target critics at a *sampled* next action, no entropy term (official
      ``deterministic_backup=True``); d3rlpy's non-soft backup takes the policy's mean action.
    - For the first ``bc_warmup_steps`` gradient steps the actor maximises the data actions'
      log-likelihood minus the temperature-weighted log-probability of its own samples (official
      ``policy_eval_start``); the temperature is tuned throughout, as in the official code.
    """
    import torch
    from d3rlpy.algos import CQL
    from d3rlpy.algos.qlearning.torch.sac_impl import SACActorLoss
    from d3rlpy.models.torch import build_squashed_gaussian_distribution, get_parameter

    class OriginalCQL(CQL):
        def __init__(self, config, device, enable_ddp: bool = False, bc_warmup_steps: int = 0):
            super().__init__(config, device, enable_ddp)
            self.bc_warmup_steps = bc_warmup_steps

        def inner_create_impl(self, observation_shape, action_size: int) -> None:
            super().inner_create_impl(observation_shape, action_size)
            impl, modules = self._impl, self._impl.modules
            sac_actor_loss = impl.compute_actor_loss

            def compute_target(batch):
                with torch.no_grad():
                    policy = build_squashed_gaussian_distribution(modules.policy(batch.next_observations))
                    return impl._targ_q_func_forwarder.compute_target(batch.next_observations, policy.sample(),
                                                                      reduction="min")

            def compute_actor_loss(batch, action, *args):
                if self.grad_step >= self.bc_warmup_steps:  # the algo's step counter: the current update
                    return sac_actor_loss(batch, action, *args)
                dist = build_squashed_gaussian_distribution(action)
                _, log_prob = dist.sample_with_log_prob()
                if modules.temp_optim:
                    temp_loss = impl.update_temp(log_prob)
                else:
                    temp_loss = torch.tensor(0.0, device=log_prob.device)
                temp = get_parameter(modules.log_temp).exp()
                data_log_prob = dist.log_prob(batch.actions)  # clamped to +-0.999999 before atanh
                return SACActorLoss(actor_loss=(temp * log_prob - data_log_prob).mean(), temp_loss=temp_loss,
                                    temp=temp[0][0])

            impl.compute_target = compute_target
            impl.compute_actor_loss = compute_actor_loss

    return OriginalCQL


def cql_nets(grid: "Grid", env: str) -> dict[str, tuple[int, ...]]:
    """Discrete: the QR network (actions x quantiles outputs); continuous: actor (mean and log-std) and each critic."""
    family, spec = get_env(env), grid.cql
    d = family.obs_dim
    if family.discrete:
        return {"q": (d, *spec.discrete_hidden, family.n_actions * spec.discrete_quantiles)}
    a = family.action_dim
    return {"actor": (d, *spec.actor_hidden, 2 * a), "critic": (d + a, *spec.critic_hidden, 1)}


def cql_train_calls(grid: "Grid", env: str):
    spec = grid.cql
    if get_env(env).discrete:
        # Quantile loss: fwd+bwd on s; target net twice on s' (greedy action, its quantiles);
        # CQL term: the online net on s again, in the same backward.
        calls = [("q", 1, TRAIN), ("q", 1, TRAIN), ("q", 1, 2)]
        batch = spec.discrete_batch_size
        return calls, batch, STEP_SECONDS["discrete"] + QUANTILE_PAIR_SECONDS * batch * spec.discrete_quantiles ** 2
    n = spec.n_action_samples
    # Critic: actor and both target critics on s'; both critics fwd+bwd on (s, a) for the TD loss and
    # again for the data term; actor on s and s' for the samples, both critics fwd+bwd on 3n sampled
    # actions per s. Actor: fwd+bwd, both critics forward and backward to the action.
    calls = [("actor", 1, 1), ("critic", 1, 2), ("critic", 1, 2 * TRAIN), ("critic", 1, 2 * TRAIN),
             ("actor", 2, 1), ("critic", 3 * n, 2 * TRAIN), ("actor", 1, TRAIN), ("critic", 1, 2 * TRAIN)]
    return calls, spec.batch_size, STEP_SECONDS["continuous"]


def cql_act_calls(grid: "Grid", env: str):
    return [("q", 1, 1)] if get_env(env).discrete else [("actor", 1, 1)]  # greedy / tanh of the mean


ALGORITHMS = offline_policy_entries("cql", "CQL", CQLSpec, make_cql,
                                    PolicyCost(cql_nets, cql_train_calls, cql_act_calls))
