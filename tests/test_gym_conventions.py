"""The registered envs follow gymnasium's conventions, so Minari and d3rlpy can re-make one from a dataset's spec."""
import ctypes.util
import inspect
import json
import os
import platform
import subprocess
import sys
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from persim_bench.envs import cartpole, get_env, halfcheetah, mountaincar
from persim_bench.envs.base import UNBOUNDED
from persim_bench.envs.halfcheetah import CONTROL_COST, RENDER_HEIGHT, RENDER_WIDTH, _StateLayout, base_model

# gym id -> (family name, a non-default agent as make_env keyword arguments)
AGENTS = {
    "persim/MountainCar-v0": ("mountaincar", {"gravity": 0.0005}),
    "persim/CartPole-v0": ("cartpole", {"length": 0.85, "force": 4.0}),
    "persim/HalfCheetah-v0": ("halfcheetah", {"mass": 1.7, "damping": 0.3}),
}
IDS = list(AGENTS)

# Run by a fresh interpreter: nothing of persim_bench is imported until gymnasium resolves the entry point.
_PROBE = """
import json, sys
import gymnasium
from gymnasium.envs.registration import EnvSpec
assert "persim_bench" not in sys.modules
out = {}
for spec_json in json.loads(sys.argv[1]):
    env = gymnasium.make(EnvSpec.from_json(spec_json))
    obs, _ = env.reset(seed=7)
    out[env.spec.id] = {"covariates": env.unwrapped.covariates, "max_episode_steps": env.spec.max_episode_steps,
                        "obs": obs.tolist(), "spec": env.spec.to_json()}
    env.close()
import mujoco, os
out["gl"] = {"MUJOCO_GL": os.environ.get("MUJOCO_GL"), "context": mujoco.GLContext.__module__}
print(json.dumps(out))
"""


def make(gym_id: str, **kwargs) -> gymnasium.Env:
    return gymnasium.make(gym_id, **AGENTS[gym_id][1], **kwargs)


@pytest.fixture(scope="module")
def remade_in_fresh_process() -> dict:
    """The three agents' spec JSON, re-made by one fresh interpreter (one start-up for all three)."""
    specs = [make(gym_id).spec.to_json() for gym_id in IDS]
    # Without the MUJOCO_GL that importing persim_bench here set: the child must choose it itself.
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(specs)],
                          capture_output=True, text=True, timeout=120, check=False, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("gym_id", IDS)
def test_spec_json_round_trips_through_the_string_entry_point(gym_id, remade_in_fresh_process):
    name, kwargs = AGENTS[gym_id]
    env = make(gym_id)
    spec = json.loads(env.spec.to_json())
    assert spec["entry_point"] == f"persim_bench.envs.{name}:make_env"
    assert spec["kwargs"] == kwargs
    remade = remade_in_fresh_process[gym_id]
    assert tuple(remade["covariates"]) == tuple(kwargs.values())
    assert remade["max_episode_steps"] == get_env(name).horizon
    assert json.loads(remade["spec"]) == spec
    obs, _ = env.reset(seed=7)
    assert remade["obs"] == obs.tolist(), "the re-made env is the same agent, seeded the same"


@pytest.mark.skipif(platform.system() != "Linux" or not ctypes.util.find_library("EGL"),
                    reason="MUJOCO_GL=egl is only defaulted on Linux with libEGL")
def test_mujoco_gl_defaults_to_egl_before_mujoco_is_imported(remade_in_fresh_process):
    assert remade_in_fresh_process["gl"] == {"MUJOCO_GL": "egl", "context": "mujoco.egl"}


@pytest.mark.parametrize("gym_id", IDS)
def test_make_with_covariate_kwargs_builds_that_agent(gym_id):
    name, kwargs = AGENTS[gym_id]
    family = get_env(name)
    assert gymnasium.spec(gym_id).kwargs == dict(zip(family.covariate_names, family.default_covariates))
    assert gymnasium.make(gym_id).unwrapped.covariates == family.default_covariates
    module = sys.modules[f"persim_bench.envs.{name}"]
    parameters = inspect.signature(module.make_env).parameters
    assert tuple(parameters)[:-1] == family.covariate_names and tuple(parameters)[-1] == "render_mode"
    assert tuple(parameters[c].default for c in family.covariate_names) == family.default_covariates
    env = make(gym_id).unwrapped
    assert env.covariates == tuple(kwargs.values())
    assert np.array_equal(env.sim.covariates, [list(kwargs.values())])


@pytest.mark.parametrize("gym_id", IDS)
def test_check_env_passes_without_warnings(gym_id):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(make(gym_id).unwrapped)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # check_env warns about any wrapped env being different from env.unwrapped; only that one is let through.
        warnings.filterwarnings("ignore", message=".*is different from the unwrapped version")
        check_env(make(gym_id))


def _gym_box(gym_id: str) -> tuple[np.ndarray, np.ndarray]:
    """gymnasium's own observation box, infinite bounds as UNBOUNDED (check_env warns about inf)."""
    box = gymnasium.make(gym_id).observation_space
    return np.where(np.isinf(box.low), -UNBOUNDED, box.low), np.where(np.isinf(box.high), UNBOUNDED, box.high)


@pytest.mark.parametrize("gym_id", IDS)
def test_observation_space_bounds(gym_id):
    space = make(gym_id).observation_space
    assert isinstance(space, gymnasium.spaces.Box) and space.dtype == np.float32
    if gym_id == "persim/MountainCar-v0":
        gym_space = gymnasium.make("MountainCar-v0").observation_space
        assert space == gym_space
        assert np.array_equal(space.low, gym_space.low) and np.array_equal(space.high, gym_space.high)
        low, high = gym_space.low, gym_space.high
    elif gym_id == "persim/CartPole-v0":
        low, high = _gym_box("CartPole-v1")  # x and theta at twice their thresholds, velocities open
    else:
        low, high = np.full(18, -UNBOUNDED, np.float32), np.full(18, UNBOUNDED, np.float32)
    assert np.array_equal(space.low, low) and np.array_equal(space.high, high)
    assert np.isfinite(space.low).all() and np.isfinite(space.high).all()


@pytest.mark.parametrize("gym_id", IDS)
def test_observations_stay_in_the_space_and_match_the_batch_simulator(gym_id):
    """The gym view steps exactly as a BatchSim of one seeded the same way (what the data generator runs)."""
    name, kwargs = AGENTS[gym_id]
    family = get_env(name)
    env = make(gym_id)
    sim = family.batch(np.array([list(kwargs.values())]))
    obs, info = env.reset(seed=3)
    assert isinstance(info, dict)
    assert np.array_equal(obs, sim.reset(np.random.default_rng(3))[0])
    actions = family.random_actions(np.random.default_rng(4), 40)
    for action in actions:
        assert obs.dtype == np.float32 and obs in env.observation_space
        obs, reward, terminated, _, info = env.step(action)
        expected_obs, expected_reward, expected_terminated = sim.step(action[None])
        assert np.array_equal(obs, expected_obs[0]) and reward == expected_reward[0]
        assert terminated == expected_terminated[0] and isinstance(info, dict)
        if terminated:
            break


def test_render_metadata():
    env = make("persim/HalfCheetah-v0").unwrapped
    assert env.metadata["render_modes"] == ["rgb_array"]
    assert env.metadata["render_fps"] == round(1 / _StateLayout(base_model()).dt)
    assert (mountaincar.make_env.metadata, cartpole.make_env.metadata, halfcheetah.make_env.metadata) == (
        mountaincar.FAMILY.metadata, cartpole.FAMILY.metadata, env.metadata), "what gymnasium.make reads"
    for module, fps in ((mountaincar, 30), (cartpole, 50)):  # gym's frame rates; no render modes
        assert module.make_env().metadata == {"render_modes": [], "render_fps": fps}
        with pytest.raises(ValueError, match="render_mode"):
            module.make_env(render_mode="rgb_array")


def test_halfcheetah_renders_rgb_frames_of_the_current_agent():
    env = make("persim/HalfCheetah-v0", render_mode="rgb_array")
    env.reset(seed=0)
    first = env.render()
    assert first.shape == (RENDER_HEIGHT, RENDER_WIDTH, 3) and first.dtype == np.uint8
    assert first.min() < first.max(), "a constant frame: nothing was drawn"
    renderer = env.unwrapped._renderer
    assert renderer.model is env.unwrapped.sim.models[0], "drawn with the agent's scaled model"
    for action in np.random.default_rng(1).uniform(-1, 1, size=(10, 6)):
        env.step(action)
    assert not np.array_equal(env.render(), first), "the frame follows the state"
    env.close()
    assert env.unwrapped._renderer is None and renderer.renderer is None
    env.close()  # closing twice is allowed

    quiet = make("persim/HalfCheetah-v0")
    quiet.reset(seed=0)
    with pytest.warns(UserWarning, match="render_mode"):
        assert quiet.render() is None


def test_halfcheetah_info_like_gymnasium():
    env = make("persim/HalfCheetah-v0")
    sim = env.unwrapped.sim
    _, info = env.reset(seed=0)
    assert info == {"x_position": sim.qpos[0, 0]}
    dt = _StateLayout(base_model()).dt
    for action in np.random.default_rng(2).uniform(-1.2, 1.2, size=(10, 6)):  # out of range: the clipped cost
        x_before = sim.qpos[0, 0]
        obs, reward, _, _, info = env.step(action)
        assert set(info) == {"x_position", "x_velocity", "reward_run", "reward_ctrl"}
        assert all(isinstance(value, float) for value in info.values())
        assert reward == info["reward_run"] + info["reward_ctrl"]
        assert info["x_velocity"] == info["reward_run"] == float(obs[0])
        assert info["x_position"] == sim.qpos[0, 0]
        assert np.isclose(info["x_velocity"], (info["x_position"] - x_before) / dt, rtol=1e-6, atol=1e-6)
        assert info["reward_ctrl"] == pytest.approx(-CONTROL_COST * np.square(np.clip(action, -1, 1)).sum(), rel=1e-12)
