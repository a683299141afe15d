"""HalfCheetah family against real MuJoCo and gymnasium's own HalfCheetah-v5."""
import logging

import gymnasium
import numpy as np
import pytest
import torch

from persim_bench.envs import halfcheetah
from persim_bench.envs.halfcheetah import FAMILY, HalfCheetahBatch, base_model, scaled_model

COVARIATES = np.array([(0.3, 1.7), (1.7, 0.3), (1.0, 1.0), (0.6, 1.4)])


def random_state(rng, n):
    """Moderately perturbed start states so the steps exercise joint limits and contacts."""
    return rng.uniform(-0.1, 0.1, size=(n, 9)), rng.normal(0.0, 1.0, size=(n, 9))


def test_scaled_model_scales_every_mass_and_damping():
    base = base_model()
    model = scaled_model((1.7, 0.3))
    assert np.array_equal(model.body_mass, base.body_mass * 1.7)
    assert np.array_equal(model.dof_damping, base.dof_damping * 0.3)
    assert base.body_mass[1] != model.body_mass[1], "the cached base model must stay unscaled"


def test_base_model_equals_the_model_gymnasium_loads(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # gymnasium's load of the deprecated XML may write MUJOCO_LOG.TXT
    gym_model = gymnasium.make("HalfCheetah-v5").unwrapped.model
    ours = base_model()
    for field in ("body_mass", "body_inertia", "dof_damping", "dof_invweight0", "actuator_gear"):
        assert np.array_equal(getattr(ours, field), getattr(gym_model, field)), field


def test_batched_step_equals_single_agent_steps():
    rng = np.random.default_rng(0)
    qpos, qvel = random_state(rng, len(COVARIATES))
    actions = rng.uniform(-1, 1, size=(6, len(COVARIATES), 6))

    batch = FAMILY.batch(COVARIATES)
    batch.set_state(qpos, qvel)
    batched = [batch.step(a) for a in actions]

    for i, covariates in enumerate(COVARIATES):
        single = HalfCheetahBatch(covariates[None])
        single.set_state(qpos[i:i + 1], qvel[i:i + 1])
        for t, a in enumerate(actions):
            obs, reward, terminated = single.step(a[i:i + 1])
            assert np.allclose(obs[0], batched[t][0][i], rtol=0, atol=1e-10)
            assert np.isclose(reward[0], batched[t][1][i], rtol=0, atol=1e-10)
            assert not terminated[0] and not batched[t][2][i]


def test_default_agent_matches_gymnasium_halfcheetah(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    qpos, qvel = random_state(rng, 1)
    env = gymnasium.make("HalfCheetah-v5")
    env.reset(seed=0)
    env.unwrapped.set_state(qpos[0], qvel[0])
    ours = FAMILY.batch(np.array([FAMILY.default_covariates]))
    ours.set_state(qpos, qvel)
    for action in rng.uniform(-1, 1, size=(10, 6)):
        env.step(action)
        ours.step(action[None])
    assert np.allclose(ours.qpos[0, 1:], env.unwrapped.data.qpos[1:], rtol=0, atol=1e-9)
    assert np.allclose(ours.qvel[0], env.unwrapped.data.qvel, rtol=0, atol=1e-9)


def test_reward_function_and_finite_difference_velocity_match_step():
    rng = np.random.default_rng(2)
    batch = FAMILY.batch(COVARIATES)
    obs = batch.reset(rng)
    assert np.all(obs[:, 0] == 0.0), "authors' reset: no previous x, so the velocity entry is 0"
    for _ in range(5):
        actions = rng.uniform(-1.2, 1.2, size=(len(COVARIATES), 6))  # out of range: cost of the clipped action
        x_before = batch.qpos[:, 0].copy()
        next_obs, reward, terminated = batch.step(actions)
        assert np.allclose(next_obs[:, 0], (batch.qpos[:, 0] - x_before) / 0.05, rtol=1e-6, atol=1e-6)
        assert np.allclose(next_obs[:, 1:9], batch.qpos[:, 1:], atol=1e-6)
        assert np.allclose(next_obs[:, 9:], batch.qvel, rtol=1e-6, atol=1e-5)
        as_torch = [torch.from_numpy(x) for x in (obs, actions.astype(np.float32), next_obs)]
        assert np.allclose(FAMILY.reward(*as_torch).numpy(), reward, rtol=1e-5, atol=1e-5)
        assert not FAMILY.terminated(*as_torch).any() and not terminated.any()
        obs = next_obs


def test_true_dynamics_equals_batch_step():
    rng = np.random.default_rng(3)
    covariates = np.array([0.3, 0.3])
    n = 64
    batch = FAMILY.batch(np.repeat(covariates[None], n, axis=0))
    qpos, qvel = random_state(rng, n)
    batch.set_state(qpos, qvel)
    batch.step(rng.uniform(-1, 1, size=(n, 6)))  # a state with a real velocity entry
    obs = np.concatenate([[[0.0]] * n, batch.qpos[:, 1:], batch.qvel], axis=1)
    actions = rng.uniform(-1, 1, size=(n, 6))
    expected, _, _ = batch.step(actions)

    dynamics = FAMILY.true_dynamics(covariates)
    predicted = dynamics(torch.tensor(obs), torch.tensor(actions), torch.zeros(n, dtype=torch.long))
    assert predicted.shape == (n, 18) and predicted.dtype == torch.float64
    assert np.allclose(predicted.numpy(), expected, rtol=1e-6, atol=1e-5)


def test_nothing_is_written_to_the_working_directory(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger=halfcheetah.__name__)  # repeats of a warning kind are DEBUG
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(4)
    batch = FAMILY.batch(COVARIATES)
    obs = batch.reset(rng)
    batch.step(FAMILY.random_actions(rng, len(COVARIATES)))
    dynamics = FAMILY.true_dynamics((1.7, 1.7))
    unstable = torch.from_numpy(obs).clone()
    unstable[0, 9 + 3] = 1e12  # makes MuJoCo raise a runtime warning
    dynamics(unstable, torch.zeros(len(COVARIATES), 6), torch.zeros(len(COVARIATES), dtype=torch.long))
    assert list(tmp_path.iterdir()) == []
    assert any("MuJoCo" in record.getMessage() for record in caplog.records)


def test_gymnasium_make_builds_the_requested_agent():
    assert halfcheetah.FAMILY.gym_id in gymnasium.registry
    env = gymnasium.make("persim/HalfCheetah-v0", mass=1.7, damping=0.3)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (18,) and obs.dtype == np.float32
    assert env.unwrapped.covariates == (1.7, 0.3)
    assert np.array_equal(env.unwrapped.sim.models[0].body_mass, base_model().body_mass * 1.7)
    obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
    assert obs.shape == (18,) and isinstance(reward, float) and not terminated and not truncated
    assert env.spec.max_episode_steps == 1000


@pytest.mark.parametrize("covariates", [(1.0, 1.0), [[1.0, 1.0]]])
def test_true_dynamics_accepts_flat_or_row_covariates(covariates):
    dynamics = FAMILY.true_dynamics(np.asarray(covariates))
    out = dynamics(torch.zeros(3, 18), torch.zeros(3, 6), torch.zeros(3, dtype=torch.long))
    assert out.shape == (3, 18) and out.dtype == torch.float32


# --- a diverging agent: MuJoCo restarts it mid-step ------------------------------------------------

def _kick(sim: HalfCheetahBatch, row: int) -> None:
    """Give one agent an absurd joint velocity in place (its clock and episode untouched): MuJoCo will
    find it diverging in the next step and restart it at rest, as it does for a planner's exploit."""
    sim.state[row, sim.layout.qvel.start + 3] = 1e12


def test_a_restarted_agent_ends_its_episode_and_is_not_paid_the_jump_back():
    sim = FAMILY.batch(COVARIATES[:2])
    sim.reset(np.random.default_rng(0))
    qpos = sim.qpos.copy()
    qpos[:, 0] = 100.0  # far down the track: the restart would be a jump of -100 m in 0.05 s
    sim.set_state(qpos, sim.qvel)
    _kick(sim, 1)
    obs, reward, terminated = sim.step(np.zeros((2, 6)))
    assert terminated.tolist() == [False, True] and sim.diverged.tolist() == [False, True]
    assert abs(sim.qpos[1, 0]) < 1.0, "the premise: MuJoCo put agent 1 back at the start"
    assert obs[1, 0] == 0.0 and reward[1] == 0.0  # not (0 - 100) / 0.05 = -2000
    assert abs(obs[0, 0]) < 1.0 and np.isfinite(obs).all()
    sim.step(np.zeros((2, 6)))
    assert sim.diverged.tolist() == [False, True], "stays marked until the next reset"
    sim.reset(np.random.default_rng(1))
    assert not sim.diverged.any()


class _KickedCheetah(halfcheetah.HalfCheetah):
    """The real HalfCheetah whose simulator kicks the given rows to divergence before step 3."""

    def __init__(self, rows):
        self.rows = rows

    def batch(self, covariates):
        family, sim = self, HalfCheetahBatch(covariates, self)
        original, steps = sim.step, [0]

        def step(actions):
            steps[0] += 1
            if steps[0] == 3:
                for row in family.rows:
                    _kick(sim, row)
            return original(actions)

        sim.step = step
        return sim


@pytest.mark.parametrize("rows", [[2], [2, 3]])
def test_diverged_episodes_are_left_out_of_the_returns_and_counted(rows):
    from persim_bench.evaluate import episode_rewards

    act = lambda obs, agent: np.zeros((len(obs), 6))  # noqa: E731
    # Agents 0 and 1, two episodes each: rows 2 and 3 are agent 1's.
    metrics = episode_rewards(act, _KickedCheetah(rows), COVARIATES, [0, 1], 2, 6, seed=0)
    assert metrics["diverged_agent0"] == 0 and len(metrics["episode_returns_agent0"]) == 2
    assert metrics["diverged_agent1"] == len(rows)
    assert metrics["length_agent1"] == np.mean([3 if row in rows else 6 for row in (2, 3)])
    if len(rows) == 1:
        assert metrics["episode_returns_agent1"] == [pytest.approx(metrics["reward_agent1"])]
    else:
        assert metrics["episode_returns_agent1"] == [] and np.isnan(metrics["reward_agent1"])


def test_true_dynamics_return_nan_from_a_divergence_and_the_planner_drops_such_plans():
    from persim_bench.planning import MPCPlanner, TrueEnvModel
    from persim_bench.specs import PlannerSpec

    dynamics = FAMILY.true_dynamics(COVARIATES[:1])
    obs = torch.zeros(3, 18, dtype=torch.float64)
    obs[1, 9 + 3] = 1e12  # a joint speed MuJoCo restarts the body from
    obs[2] = float("nan")  # a row that already diverged
    out = dynamics(obs, torch.zeros(3, 6, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    assert out.isnan().all(dim=1).tolist() == [False, True, True] and out[0].isfinite().all()

    planner = MPCPlanner(FAMILY, TrueEnvModel(FAMILY, COVARIATES[:1]), PlannerSpec(candidates=8, elites=2, horizon=3), seed=0)
    scores = planner.score(obs[:2].float(), torch.zeros(2, dtype=torch.long), planner.first_candidates(2))
    assert scores[0].isfinite().all() and (scores[1] == float("-inf")).all()  # not NaN, which topk would pick
