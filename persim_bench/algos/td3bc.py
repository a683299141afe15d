"""TD3+BC (Fujimoto & Gu 2021), an offline baseline for continuous actions (HalfCheetah), through d3rlpy.

TD3+BC-P is one policy on every agent's trajectory, TD3+BC-A one per test agent on its own
trajectory (``d3rlpy_common`` does both). Hyperparameters follow the official code
(sfujim/TD3_BC: ``main.py``, ``TD3_BC.py``, ``utils.py``) where d3rlpy's defaults differ
(``TD3BCSpec``, docs/algorithms.md): only the state normalisation does.
"""
from __future__ import annotations

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
STEP_SECONDS = 2e-3  # 8.2 ms per step measured at the paper's sizes


class TD3BCSpec(OfflinePolicySpec):
    """TD3+BC through d3rlpy. Defaults follow the official TD3+BC code; all but the state normalisation
    are also d3rlpy's defaults. gamma 0.99 and target tau 0.005 (official and d3rlpy) are left to it.
    """

    # Hidden layers of the deterministic tanh actor and of each of the two critics (official and d3rlpy: 256-256).
    actor_hidden: HiddenUnits = [256, 256]
    critic_hidden: HiddenUnits = [256, 256]
    # Adam learning rate of actor and critics (official and d3rlpy: 3e-4).
    lr: Annotated[float, Field(gt=0)] = 3e-4
    # Minibatch size (official and d3rlpy: 256).
    batch_size: PositiveInt = 256
    # alpha in lambda = alpha / mean |Q(s, pi(s))|, the weight of Q against the BC term (official and d3rlpy: 2.5).
    alpha: Annotated[float, Field(gt=0)] = 2.5
    # Target policy smoothing: noise std and clip (official 0.2 / 0.5 x max action 1; d3rlpy: same).
    policy_noise: Annotated[float, Field(ge=0)] = 0.2
    noise_clip: Annotated[float, Field(ge=0)] = 0.5
    # Actor and target updates every policy_freq critic updates (official and d3rlpy: 2).
    policy_freq: PositiveInt = 2
    # States z-scored with the training data's mean and std + 1e-3, when training and acting
    # (official ``--normalize`` True; d3rlpy: no observation scaler).
    normalize_states: bool = True


def make_td3bc(spec: TD3BCSpec, discrete: bool, device: str):
    from d3rlpy.algos import TD3PlusBCConfig
    from d3rlpy.models import VectorEncoderFactory
    from d3rlpy.preprocessing import StandardObservationScaler

    if discrete:
        raise ValueError("TD3+BC here is for continuous actions only (HalfCheetah)")
    return TD3PlusBCConfig(
        actor_learning_rate=spec.lr, critic_learning_rate=spec.lr,
        actor_encoder_factory=VectorEncoderFactory(hidden_units=list(spec.actor_hidden)),
        critic_encoder_factory=VectorEncoderFactory(hidden_units=list(spec.critic_hidden)),
        batch_size=spec.batch_size, alpha=spec.alpha, target_smoothing_sigma=spec.policy_noise,
        target_smoothing_clip=spec.noise_clip, update_actor_interval=spec.policy_freq,
        observation_scaler=StandardObservationScaler(eps=1e-3) if spec.normalize_states else None,
    ).create(device=d3rlpy_device(device))


def td3bc_nets(grid: "Grid", env: str) -> dict[str, tuple[int, ...]]:
    family, spec = get_env(env), grid.td3bc
    d, a = family.obs_dim, family.action_dim
    return {"actor": (d, *spec.actor_hidden, a), "critic": (d + a, *spec.critic_hidden, 1)}


def td3bc_train_calls(grid: "Grid", env: str):
    f = grid.td3bc.policy_freq
    # Every step: target actor on s', both target critics, both critics fwd+bwd. Every f-th step:
    # actor fwd+bwd through the first critic.
    calls = [("actor", 1, 1), ("critic", 1, 2), ("critic", 1, 2 * TRAIN), ("actor", 1, TRAIN / f),
             ("critic", 1, TRAIN / f)]
    return calls, grid.td3bc.batch_size, STEP_SECONDS


def td3bc_act_calls(grid: "Grid", env: str):
    return [("actor", 1, 1)]


ALGORITHMS = offline_policy_entries("td3bc", "TD3+BC", TD3BCSpec, make_td3bc,
                                    PolicyCost(td3bc_nets, td3bc_train_calls, td3bc_act_calls),
                                    action_spaces=("continuous",))
