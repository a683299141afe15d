"""The three heterogeneous environment families, by config name.

Importing this package registers ``persim/MountainCar-v0``, ``persim/CartPole-v0`` and
``persim/HalfCheetah-v0`` with gymnasium.
"""
import ctypes.util
import os
import platform


def _default_mujoco_gl() -> None:
    """Headless rendering for HalfCheetah's rgb_array frames: MUJOCO_GL=egl where it can work.

    mujoco picks its OpenGL backend once, from MUJOCO_GL, when it is first imported, so this must
    run before any ``import mujoco`` in the package: halfcheetah, imported below, is the first (every
    other import of mujoco in the package comes through here). EGL needs no display; on this
    project's Linux machines osmesa (no libOSMesa) and glfw (no display) do not work. A value the
    user set wins. Only on Linux ("egl" is invalid elsewhere and mujoco would refuse to import)
    and only with libEGL and libGL present: a backend whose libraries are missing can make
    ``import mujoco`` itself fail, and without a default mujoco falls back to glfw as before.
    If mujoco was imported before persim_bench, its backend is already chosen.
    """
    if "MUJOCO_GL" in os.environ or platform.system() != "Linux":
        return
    if os.environ.get("PYOPENGL_PLATFORM", "egl").lower() != "egl":
        return  # mujoco.egl refuses another PyOpenGL platform
    if ctypes.util.find_library("EGL") and (ctypes.util.find_library("OpenGL") or ctypes.util.find_library("GL")):
        os.environ.setdefault("MUJOCO_GL", "egl")


_default_mujoco_gl()

from persim_bench.envs import cartpole, halfcheetah, mountaincar  # after MUJOCO_GL, on purpose
from persim_bench.envs.base import BatchSim, CovariateError, EnvFamily, SingleAgentEnv

ENVS: dict[str, EnvFamily] = {m.FAMILY.name: m.FAMILY for m in (mountaincar, cartpole, halfcheetah)}


def get_env(name: str) -> EnvFamily:
    try:
        return ENVS[name]
    except KeyError:
        raise ValueError(f"unknown env {name!r}; known: {', '.join(ENVS)}") from None


def covariate_ranges_markdown() -> str:
    """The covariates every env accepts, as a markdown table (for docs/reliability.md).

    Accepted ranges are closed (``EnvFamily.covariate_valid``; each family's module says why);
    anything else (not finite, out of range, not [N, C]) raises ``CovariateError`` from
    ``gymnasium.make``, ``EnvFamily.batch`` and ``EnvFamily.true_dynamics``. The paper's sampling
    range, from which the training agents are drawn, is narrower.
    """
    rows = ["| env | covariate | accepted (closed) | paper's sampling range | default |",
            "|---|---|---|---|---|"]
    for family in ENVS.values():
        for i, name in enumerate(family.covariate_names):
            low, high = family.covariate_valid[i]
            rows.append(f"| `{family.gym_id}` | `{name}` | [{low:g}, {high:g}] | "
                        f"[{family.covariate_low[i]:g}, {family.covariate_high[i]:g}] | {family.default_covariates[i]:g} |")
    return "\n".join(rows) + "\n"


__all__ = ["ENVS", "BatchSim", "CovariateError", "EnvFamily", "SingleAgentEnv", "covariate_ranges_markdown", "get_env"]
