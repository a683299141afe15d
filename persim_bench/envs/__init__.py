"""The three heterogeneous environment families, by config name.

Importing this package registers ``persim/MountainCar-v0``, ``persim/CartPole-v0`` and
``persim/HalfCheetah-v0`` with gymnasium.
"""
from persim_bench.envs import cartpole, halfcheetah, mountaincar
from persim_bench.envs.base import BatchSim, EnvFamily, SingleAgentEnv

ENVS: dict[str, EnvFamily] = {m.FAMILY.name: m.FAMILY for m in (mountaincar, cartpole, halfcheetah)}


def get_env(name: str) -> EnvFamily:
    try:
        return ENVS[name]
    except KeyError:
        raise ValueError(f"unknown env {name!r}; known: {', '.join(ENVS)}") from None


__all__ = ["ENVS", "BatchSim", "EnvFamily", "SingleAgentEnv", "get_env"]
