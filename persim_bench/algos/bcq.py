"""BCQ (Fujimoto et al. 2019), the paper's model-free offline baselines, through d3rlpy.

BCQ-P is one policy trained on every agent's trajectory of a dataset; BCQ-A is one policy per
test agent trained on that agent's single trajectory only (``d3rlpy_common`` does both).
MountainCar and CartPole use d3rlpy's DiscreteBCQ, HalfCheetah its continuous BCQ, with the
original code's hyperparameters where d3rlpy's defaults differ (``BCQSpec``, docs/algorithms.md).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from persim_bench.algos.d3rlpy_common import OfflinePolicySpec, PolicyCost, d3rlpy_device, offline_policy_entries, step_overhead
from persim_bench.costmodel import TRAIN
from persim_bench.envs import get_env
from persim_bench.specs import HiddenUnits, PositiveInt

if TYPE_CHECKING:
    from persim_bench.config import Grid


class BCQSpec(OfflinePolicySpec):
    """BCQ through d3rlpy (paper App. D.2). Defaults follow the original BCQ code (sfujim/BCQ) where d3rlpy's differ.

    Continuous BCQ (HalfCheetah) and discrete BCQ (MountainCar, CartPole) have their own fields;
    the original code's gamma 0.99, tau 0.005, lambda 0.75, phi 0.05 and VAE KL weight 0.5 are
    also d3rlpy's defaults and are left to it.
    """

    # Continuous: hidden layers of the perturbation actor and of each twin critic (d3rlpy: 256-256).
    actor_hidden: HiddenUnits = [400, 300]
    critic_hidden: HiddenUnits = [400, 300]
    # Continuous: VAE encoder and decoder hidden layers (d3rlpy: 256-256).
    vae_hidden: HiddenUnits = [750, 750]
    # Continuous: Adam learning rate of actor, critic and VAE (original and d3rlpy: 1e-3).
    lr: Annotated[float, Field(gt=0)] = 1e-3
    # Continuous: minibatch size (original and d3rlpy: 100).
    batch_size: PositiveInt = 100
    # Continuous: VAE actions sampled per next state for the Q target (original 10) and per state
    # when acting (original 100); d3rlpy uses one number, 100, for both.
    target_samples: PositiveInt = 10
    act_samples: PositiveInt = 100
    # Discrete: hidden layers of the Q network and of the separate imitation network (d3rlpy: 256-256, shared).
    discrete_hidden: HiddenUnits = [256, 256]
    # Discrete: Adam learning rate (d3rlpy: 6.25e-5, the original's Atari setting).
    discrete_lr: Annotated[float, Field(gt=0)] = 3e-4
    # Discrete: minibatch size (d3rlpy: 32, the original's Atari setting).
    discrete_batch_size: PositiveInt = 64
    # Discrete: actions whose imitation probability is below threshold x the likeliest one's are never taken
    # (original and d3rlpy: 0.3).
    discrete_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.3
    # Discrete: Polyak target update per step (d3rlpy: a hard copy every 8000 steps, the original's Atari setting).
    discrete_tau: Annotated[float, Field(gt=0, le=1)] = 0.005
    # Discrete: weight of the mean squared imitation logits added to the loss (d3rlpy's beta: 0.5).
    discrete_logit_penalty: Annotated[float, Field(ge=0)] = 0.01


def make_bcq(spec: BCQSpec, discrete: bool, device: str):
    from d3rlpy.algos import BCQConfig, DiscreteBCQConfig
    from d3rlpy.models import VectorEncoderFactory

    if discrete:
        config = DiscreteBCQConfig(
            learning_rate=spec.discrete_lr, batch_size=spec.discrete_batch_size,
            encoder_factory=VectorEncoderFactory(hidden_units=list(spec.discrete_hidden)),
            action_flexibility=spec.discrete_threshold, beta=spec.discrete_logit_penalty,
            share_encoder=False, target_update_interval=1)  # update_target runs every step, made soft below
        return _polyak_discrete_bcq(config, spec.discrete_tau, d3rlpy_device(device))
    return BCQConfig(
        actor_learning_rate=spec.lr, critic_learning_rate=spec.lr, imitator_learning_rate=spec.lr,
        actor_encoder_factory=VectorEncoderFactory(hidden_units=list(spec.actor_hidden)),
        critic_encoder_factory=VectorEncoderFactory(hidden_units=list(spec.critic_hidden)),
        imitator_encoder_factory=VectorEncoderFactory(hidden_units=list(spec.vae_hidden)),
        batch_size=spec.batch_size, n_action_samples=spec.target_samples,
    ).create(device=d3rlpy_device(device))


def _polyak_discrete_bcq(config, tau: float, device: str):
    """DiscreteBCQ with the original code's soft target update (tau every step).

    d3rlpy only offers a hard copy every ``target_update_interval`` steps (the original's Atari
    setting); with interval 1 its per-step ``update_target`` is replaced by a Polyak average.
    """
    from d3rlpy.algos import DiscreteBCQ
    from d3rlpy.torch_utility import soft_sync

    class PolyakDiscreteBCQ(DiscreteBCQ):
        def inner_create_impl(self, observation_shape, action_size: int) -> None:
            super().inner_create_impl(observation_shape, action_size)
            modules = self._impl.modules
            self._impl.update_target = functools.partial(soft_sync, modules.targ_q_funcs, modules.q_funcs, tau)

    return PolyakDiscreteBCQ(config, device, enable_ddp=False)


def act_with_more_samples(algo, spec: BCQSpec) -> None:
    """d3rlpy uses n_action_samples for both the Q target and acting; the original code samples 10 for the
    target and 100 to act. Continuous BCQ's impl keeps the number in this attribute (d3rlpy 2.8, pinned
    <2.9; d3rlpy offers no hook for it): a d3rlpy without it fails here rather than act with the wrong count."""
    from d3rlpy.algos import DiscreteBCQ

    if isinstance(algo, DiscreteBCQ):  # discrete BCQ acts by its Q-values and imitator: no samples
        return
    if not hasattr(algo.impl, "_n_action_samples"):
        raise RuntimeError(f"d3rlpy {type(algo.impl).__name__} has no _n_action_samples: BCQ's acting sample count "
                           f"cannot be set (d3rlpy changed; persim-bench is tested with 2.8)")
    algo.impl._n_action_samples = spec.act_samples


def bcq_nets(grid: "Grid", env: str) -> dict[str, tuple[int, ...]]:
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


def bcq_train_calls(grid: "Grid", env: str):
    spec, discrete = grid.bcq, get_env(env).discrete
    if discrete:
        # Q: fwd+bwd on s, online and target on s'; imitator: fwd+bwd on s, forward on s' (the action mask).
        calls = [("q", 1, TRAIN), ("q", 1, 2), ("imitator", 1, TRAIN), ("imitator", 1, 1)]
        return calls, spec.discrete_batch_size, step_overhead(True)
    n = spec.target_samples
    # VAE fwd+bwd; Q target: n decoded, perturbed actions per s' through both target critics;
    # twin critics fwd+bwd; actor loss: decoder and actor fwd+bwd, both critics, one backward.
    calls = [("encoder", 1, TRAIN), ("decoder", 1, TRAIN), ("decoder", n, 1), ("decoder", 1, TRAIN),
             ("actor", n, 1), ("actor", 1, TRAIN), ("critic", n, 2), ("critic", 1, 2 * TRAIN), ("critic", 1, 4)]
    return calls, spec.batch_size, step_overhead(False)


def bcq_act_calls(grid: "Grid", env: str):
    if get_env(env).discrete:
        return [("q", 1, 1), ("imitator", 1, 1)]
    n = grid.bcq.act_samples  # decoded + perturbed actions per state, scored by both critics
    return [("decoder", n, 1), ("actor", n, 1), ("critic", n, 2)]


ALGORITHMS = offline_policy_entries("bcq", "BCQ", BCQSpec, make_bcq, PolicyCost(bcq_nets, bcq_train_calls, bcq_act_calls),
                                    before_acting=act_with_more_samples)
