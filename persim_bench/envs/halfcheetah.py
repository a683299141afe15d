"""HalfCheetah whose agents differ in a mass scale and a damping scale (PerSim Sec. 6.1).

Follows the authors' ``envs/half_cheetah_env.py`` (AbdullahO/PerSim): gym's cheetah model with every
``body_mass`` scaled by m and every ``dof_damping`` by d (derived constants and inertias are left as
compiled, as their mujoco-py code did), frame skip 5, an 18-d observation whose first entry is the
root x-velocity by finite difference, and reward ``obs'[0] - c * |a|^2``. All agents of a batch
advance in one ``mujoco.rollout`` call, each row with its own model, on a persistent thread pool.

Numerics: mass and damping scales are accepted in [0.01, 10] (``HalfCheetah.covariate_valid``), where
MuJoCo stays finite from any reset state. A state that diverges anyway (put there with ``set_state``
or given to ``true_dynamics``, or driven there by a planner that exploits the simulator: True env +
MPC does on the light or lightly damped agents) is reset by MuJoCo itself to the model's rest pose,
with a warning that is logged once per process and kind (``_log_mujoco_warning``). ``step`` sees the
reset (the agent's clock falls back) and ends that agent's episode (``terminated``, ``diverged``)
instead of paying the jump back to the start as reward; a non-finite observation is never returned,
``step`` raises FloatingPointError instead.
"""
from __future__ import annotations

import collections
import copy
import functools
import logging
import re
import threading
from pathlib import Path

import gymnasium
import mujoco
import mujoco.rollout
import numpy as np
import numpy.typing
import torch

from persim_bench.envs.base import BatchSim, EnvFamily, Renderer, SingleAgentEnv, TorchDynamics

# Authors' code and gym use 0.1; the paper text says 0.05.
CONTROL_COST = 0.1
# Authors' reset_model: qpos and qvel each get N(0, 0.001) noise (gym would use U(-0.1, 0.1) and 0.1*N(0, 1)).
RESET_NOISE_STD = 0.001
FRAME_SKIP = 5
# gymnasium's HalfCheetah-v5 frames: 480 x 480 from the model's "track" camera (trackcom: follows the torso).
RENDER_WIDTH = RENDER_HEIGHT = 480
RENDER_CAMERA = "track"

_XML_PATH = Path(gymnasium.__file__).parent / "envs" / "mujoco" / "assets" / "half_cheetah.xml"
_DEPRECATED_TOTAL_MASS = ' settotalmass="14"'
_TOTAL_MASS = 14.0
_FULLPHYSICS = mujoco.mjtState.mjSTATE_FULLPHYSICS.value

_log = logging.getLogger(__name__)
_warning_lock = threading.Lock()
_warning_counts: collections.Counter[str] = collections.Counter()


def _warning_kind(message: str) -> str:
    """A MuJoCo warning without its numbers and time: "at DOF 3" and "at DOF 5" are one kind."""
    return re.sub(r"\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", "#", message.split(" Time =")[0]).strip()


def _log_mujoco_warning(message: str) -> None:
    """MuJoCo's warning handler: logging WARNING the first time per process and kind, DEBUG after.

    MuJoCo's default handler prints and appends to ./MUJOCO_LOG.TXT in the user's cwd. Under
    mujoco.rollout the same warning comes again on every step of an unstable agent (several lines per
    agent and step, 16,000 lines for 4 agents x 1000 steps), so only the first of a kind is a
    WARNING. Counts per kind: ``mujoco_warning_counts()``. Called from rollout's worker threads.
    """
    kind = _warning_kind(message)
    with _warning_lock:
        _warning_counts[kind] += 1
        first = _warning_counts[kind] == 1
    if first:
        _log.warning("MuJoCo: %s (once per process; repeats are logged at DEBUG)", message.strip())
    else:
        _log.debug("MuJoCo: %s", message.strip())


def mujoco_warning_counts() -> dict[str, int]:
    """How many MuJoCo warnings of each kind (the message with numbers as #) this process has seen."""
    with _warning_lock:
        return dict(_warning_counts)


if mujoco.get_mju_user_warning() is None:
    mujoco.set_mju_user_warning(_log_mujoco_warning)


@functools.lru_cache(maxsize=1)
def base_model() -> mujoco.MjModel:
    """gymnasium's half_cheetah.xml, compiled without the attribute MuJoCo 4 warns about.

    ``settotalmass`` is deprecated; removing it and applying mj_setTotalmass + mj_setConst after
    compiling gives a model identical to the one gymnasium loads, without any warning.
    Treat the result as read-only: ``scaled_model`` copies it.
    """
    xml = _XML_PATH.read_text()
    if _DEPRECATED_TOTAL_MASS not in xml:
        raise RuntimeError(f"{_XML_PATH} no longer sets {_DEPRECATED_TOTAL_MASS.strip()}; revisit base_model()")
    model = mujoco.MjModel.from_xml_string(xml.replace(_DEPRECATED_TOTAL_MASS, ""))
    mujoco.mj_setTotalmass(model, _TOTAL_MASS)
    mujoco.mj_setConst(model, mujoco.MjData(model))
    return model


def scaled_model(covariates: np.typing.ArrayLike) -> mujoco.MjModel:
    """A private copy of the base model with every body mass times m and every dof damping times d.

    ``covariates`` is one agent's (m, d), unchecked: its callers have passed them through
    ``check_covariates`` (a negative or huge m gives a model MuJoCo cannot step).
    """
    mass_scale, damping_scale = np.asarray(covariates, dtype=np.float64).reshape(2)
    model = copy.copy(base_model())
    model.body_mass[:] *= mass_scale
    model.dof_damping[:] *= damping_scale
    return model


def _pool_threads(max_rows: int) -> int:
    """Threads worth starting for batches of up to max_rows; 0 runs rollouts on the calling thread."""
    # torch's thread count is this process's CPU budget: Ray sets it to a worker's CPUs.
    threads = min(torch.get_num_threads(), max_rows)
    return threads if threads > 1 else 0


class _Stepper:
    """A persistent rollout thread pool plus the one MjData per thread that rollout requires."""

    def __init__(self, max_rows: int):
        self.nthread = _pool_threads(max_rows)
        self.pool = mujoco.rollout.Rollout(nthread=self.nthread)
        self.datas = [mujoco.MjData(base_model()) for _ in range(max(self.nthread, 1))]

    def env_step(self, models: list[mujoco.MjModel], state: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """FULLPHYSICS states [B, nstate] after FRAME_SKIP mj_steps holding actions [B, nu] fixed.

        Every input is built here at its exact shape and dtype, so rollout's per-call Python checks
        (a loop over all B models) are skipped: they cost up to ~10% at B = 500.
        """
        batch_size, state_size = state.shape
        if len(models) != batch_size or actions.shape != (batch_size, models[0].nu):
            raise ValueError(f"rollout of {batch_size} states got {len(models)} models and actions {actions.shape}")
        control = np.repeat(np.clip(actions, -1.0, 1.0)[:, None, :], FRAME_SKIP, axis=1).astype(np.float64)
        trajectory = np.empty((batch_size, FRAME_SKIP, state_size))
        sensordata = np.empty((batch_size, FRAME_SKIP, models[0].nsensordata))
        self.pool.rollout(
            models, self.datas, np.ascontiguousarray(state, dtype=np.float64), control,
            nstep=FRAME_SKIP, state=trajectory, sensordata=sensordata, skip_checks=True,
        )
        return trajectory[:, -1].copy()


class _StateLayout:
    """Where qpos and qvel sit in a FULLPHYSICS state vector ([time, qpos, qvel, act, ...] by bit order)."""

    def __init__(self, model: mujoco.MjModel):
        self.size = mujoco.mj_stateSize(model, _FULLPHYSICS)
        self.time = 0  # the simulation clock, first in FULLPHYSICS order
        qpos_start = mujoco.mj_stateSize(model, mujoco.mjtState.mjSTATE_TIME.value)
        qvel_start = qpos_start + model.nq
        self.qpos = slice(qpos_start, qvel_start)
        self.qvel = slice(qvel_start, qvel_start + model.nv)
        self.dt = model.opt.timestep * FRAME_SKIP

    def states(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        state = np.zeros((len(qpos), self.size))
        # The clock starts at 1 s, not 0 (the cheetah's physics do not read it), so that a MuJoCo
        # restart, which sets it to 0 and then runs at most FRAME_SKIP steps, always shows in ``step``.
        state[:, self.time] = 1.0
        state[:, self.qpos] = qpos
        state[:, self.qvel] = qvel
        return state

    def restarted(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        """Rows MuJoCo restarted during one env step: it sets a diverging agent's clock to 0 (mj_resetData)."""
        return np.abs(after[:, self.time] - (before[:, self.time] + self.dt)) > 1e-6

    def observations(self, state: np.ndarray, previous_x: np.ndarray | None) -> np.ndarray:
        """[(x' - x)/dt, qpos[1:], qvel] as float32; the velocity entry is 0 without a previous x (authors)."""
        qpos, qvel = state[:, self.qpos], state[:, self.qvel]
        velocity = np.zeros(len(state)) if previous_x is None else (qpos[:, 0] - previous_x) / self.dt
        return np.concatenate([velocity[:, None], qpos[:, 1:], qvel], axis=1).astype(np.float32)


def _control_cost(actions):
    """CONTROL_COST * |a|^2 of the applied (clipped to ctrlrange) action, numpy or torch."""
    if isinstance(actions, torch.Tensor):
        return CONTROL_COST * actions.clamp(-1.0, 1.0).square().sum(dim=-1)
    return CONTROL_COST * np.square(np.clip(actions, -1.0, 1.0)).sum(axis=-1)


class HalfCheetahBatch(BatchSim):
    """N cheetahs, agent i with its own scaled MjModel, advanced together by one rollout call per step."""

    def __init__(self, covariates: np.ndarray, family: EnvFamily | None = None):
        super().__init__(covariates, FAMILY if family is None else family)
        self.models = [scaled_model(c) for c in self.covariates]
        self.layout = _StateLayout(base_model())
        self.stepper = _Stepper(self.n)
        self.state: np.ndarray | None = None

    @property
    def qpos(self) -> np.ndarray:
        return self._require_state()[:, self.layout.qpos]

    @property
    def qvel(self) -> np.ndarray:
        return self._require_state()[:, self.layout.qvel]

    def set_state(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """Place every agent at (qpos [N, 9], qvel [N, 9]); returns observations like reset does.

        Non-finite entries are refused (ValueError): MuJoCo would silently reset such an agent.
        """
        model = base_model()
        qpos = np.asarray(qpos, dtype=np.float64).reshape(self.n, model.nq)
        qvel = np.asarray(qvel, dtype=np.float64).reshape(self.n, model.nv)
        if not (np.isfinite(qpos).all() and np.isfinite(qvel).all()):
            raise ValueError(f"{self.family.gym_id}: set_state got a non-finite qpos or qvel")
        self.state = self.layout.states(qpos, qvel)
        self.diverged = np.zeros(self.n, dtype=bool)
        return self.layout.observations(self.state, previous_x=None)

    def reset(self, rng: np.random.Generator) -> np.ndarray:
        model = base_model()
        qpos = model.qpos0 + rng.normal(0.0, RESET_NOISE_STD, size=(self.n, model.nq))
        qvel = rng.normal(0.0, RESET_NOISE_STD, size=(self.n, model.nv))
        return self.set_state(qpos, qvel)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        actions = np.asarray(actions, dtype=np.float64).reshape(self.n, base_model().nu)
        state = self._require_state()
        previous_x = state[:, self.layout.qpos.start]
        self.state = self.stepper.env_step(self.models, state, actions)
        # MuJoCo restarts a diverging agent at its rest pose, mid-step; its clock is the one trace of it.
        # Its x velocity would be the jump back to the start (hundreds of thousands): the restarted row
        # gets 0, as after reset, and its episode ends.
        restarted = self.layout.restarted(state, self.state)
        previous_x = np.where(restarted, self.state[:, self.layout.qpos.start], previous_x)
        self.diverged |= restarted
        with np.errstate(over="ignore"):  # float32 overflow is inf, which _require_finite refuses
            next_obs = self._require_finite(self.layout.observations(self.state, previous_x))
        reward = next_obs[:, 0].astype(np.float64) - _control_cost(actions)
        return next_obs, reward, restarted

    def reset_info(self) -> dict[str, np.ndarray]:
        return {"x_position": self.qpos[:, 0].copy()}

    def step_info(self, actions: np.ndarray, next_obs: np.ndarray, reward: np.ndarray) -> dict[str, np.ndarray]:
        """HalfCheetah-v4's step info; reward_run + reward_ctrl is exactly the reward ``step`` returned.

        x_velocity is the observation's finite difference (float32), the number the reward pays for,
        as gym's reward_run is its x_velocity.
        """
        actions = np.asarray(actions, dtype=np.float64).reshape(self.n, base_model().nu)
        velocity = next_obs[:, 0].astype(np.float64)
        return {"x_position": self.qpos[:, 0].copy(), "x_velocity": velocity,
                "reward_run": velocity, "reward_ctrl": -_control_cost(actions)}

    def _require_state(self) -> np.ndarray:
        if self.state is None:
            raise RuntimeError("HalfCheetahBatch: call reset() or set_state() before stepping")
        return self.state


class CheetahRenderer:
    """rgb_array frames of one agent of a HalfCheetahBatch: its own scaled model in its current state.

    A private MjData gets the agent's qpos/qvel and an mj_forward (positions, camera) per frame; the
    simulation state is only read. Needs an OpenGL backend: MUJOCO_GL, see ``persim_bench.envs``.
    """

    def __init__(self, sim: HalfCheetahBatch, agent: int = 0,
                 width: int = RENDER_WIDTH, height: int = RENDER_HEIGHT, camera: str = RENDER_CAMERA):
        self.sim, self.agent = sim, agent
        self.model = sim.models[agent]
        self.data = mujoco.MjData(self.model)
        self.camera = camera
        self.renderer: mujoco.Renderer | None = mujoco.Renderer(self.model, height=height, width=width)

    def render(self) -> np.ndarray:
        """An [height, width, 3] uint8 frame."""
        if self.renderer is None:
            raise RuntimeError("CheetahRenderer: render() after close()")
        self.data.qpos[:] = self.sim.qpos[self.agent]
        self.data.qvel[:] = self.sim.qvel[self.agent]
        mujoco.mj_forward(self.model, self.data)
        self.renderer.update_scene(self.data, camera=self.camera)
        return self.renderer.render()

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None


class HalfCheetah(EnvFamily):
    name = "halfcheetah"
    gym_id = "persim/HalfCheetah-v0"
    obs_dim = 18
    n_actions = None
    action_dim = 6
    horizon = 1000
    covariate_names = ("mass", "damping")
    covariate_low = (0.2, 0.2)
    covariate_high = (1.8, 1.8)
    # Accepted (closed): 0.01 <= mass, damping <= 10, scales of the compiled masses and dof dampings.
    # A zero mass makes the inertia matrix singular (MuJoCo warns and resets the agent every step), a
    # negative one gives NaN observations; a negative damping pumps energy in until MuJoCo resets the
    # agent; 0 damping runs but is refused with the rest of <= 0. Inertias are not scaled (the
    # authors' choice), so extreme mass scales make bodies whose mass and rotational inertia disagree:
    # at 1e6 MuJoCo warns thousands of times and states go non-finite. Inside the box (100x lighter
    # to 10x heavier, 100x less to 10x more damped; the paper samples [0.2, 1.8]) every corner runs
    # 1000 steps of random, constant or bang-bang actions finite and without a MuJoCo warning; probes
    # found the same for mass 1e-4..1e5 and damping 0..1e6: two orders of magnitude of margin.
    covariate_valid = ((0.01, 10.0), (0.01, 10.0))
    default_covariates = (1.0, 1.0)
    test_agents = ((0.3, 1.7), (1.7, 0.3), (0.3, 0.3), (1.7, 1.7), (1.0, 1.0))
    policy_agents = ((0.6, 1.4), (1.4, 0.6), (0.6, 0.6), (1.4, 1.4))
    # No state box: observations are unbounded (see base.UNBOUNDED).
    render_modes = ("rgb_array",)
    render_fps = 20  # 1 / (timestep 0.01 * FRAME_SKIP), as HalfCheetah-v5

    def batch(self, covariates: np.ndarray) -> HalfCheetahBatch:
        return HalfCheetahBatch(covariates, self)

    def renderer(self, sim: BatchSim, agent: int, render_mode: str) -> Renderer:
        if render_mode != "rgb_array" or not isinstance(sim, HalfCheetahBatch):
            raise ValueError(f"halfcheetah renders rgb_array frames of a HalfCheetahBatch, not {render_mode!r} of {sim!r}")
        return CheetahRenderer(sim, agent)

    def reward(self, obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return next_obs[..., 0] - _control_cost(action)

    def terminated(self, obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(next_obs.shape[:-1], dtype=torch.bool, device=next_obs.device)

    def true_dynamics(self, covariates: np.ndarray) -> TorchDynamics:
        """Steps rows of observations; x is translation-invariant, so qpos[0] = 0 is exact.

        A row whose physics diverge (MuJoCo restarts it) comes back NaN, and so does every row stepped
        from NaN: no state follows from a divergence, and the planner scores such a plan -inf, where
        the explosion's velocity would have paid it hundreds of thousands.
        """
        models = [scaled_model(c) for c in self.check_covariates(covariates, flat_is_one_agent=True)]
        layout = _StateLayout(models[0])
        stepper = _Stepper(max_rows=torch.get_num_threads())
        nq, nv = models[0].nq, models[0].nv

        def next_observation(obs: torch.Tensor, action: torch.Tensor, agent: torch.Tensor) -> torch.Tensor:
            obs_np = obs.detach().to("cpu", torch.float64).numpy()
            action_np = action.detach().to("cpu", torch.float64).numpy()
            invalid = ~np.isfinite(obs_np).all(axis=1)
            obs_np = np.where(invalid[:, None], 0.0, obs_np)  # a placeholder to step, returned NaN; the caller's
            # tensor is left alone (for a float64 CPU input, .numpy() shares its memory)
            qpos = np.concatenate([np.zeros((len(obs_np), 1)), obs_np[:, 1:nq]], axis=1)
            state = layout.states(qpos, obs_np[:, nq:nq + nv])
            next_state = stepper.env_step([models[a] for a in agent.tolist()], state, action_np)
            with np.errstate(over="ignore"):
                next_obs = layout.observations(next_state, previous_x=np.zeros(len(obs_np)))
            next_obs[invalid | layout.restarted(state, next_state)] = np.nan
            return torch.from_numpy(next_obs).to(device=obs.device, dtype=obs.dtype)

        return next_observation


FAMILY = HalfCheetah()


def make_env(mass: float = 1.0, damping: float = 1.0, render_mode: str | None = None) -> SingleAgentEnv:
    """gymnasium entry point: ``gymnasium.make("persim/HalfCheetah-v0", mass=..., damping=..., render_mode=...)``."""
    return SingleAgentEnv(FAMILY, (mass, damping), render_mode=render_mode)


make_env.metadata = FAMILY.metadata  # gymnasium.make reads an entry point's render modes here

# A string entry point, so the spec (Minari stores it with a dataset) serialises and re-makes the
# env in a fresh process; the default covariates are explicit kwargs of the stored spec.
if FAMILY.gym_id not in gymnasium.registry:
    gymnasium.register(id=FAMILY.gym_id, entry_point="persim_bench.envs.halfcheetah:make_env",
                       max_episode_steps=FAMILY.horizon, kwargs=FAMILY.covariate_kwargs)
