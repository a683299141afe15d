"""MountainCar and CartPole: gym-exact with default covariates, batched == single, torch reward/done."""
import gymnasium
import numpy as np
import pytest
import torch

from persim_bench.envs import get_env


def _gym_pairs(gym_id: str, steps: int, seed: int):
    """(state, action, next_state) triples from gymnasium's own env under random actions."""
    env = gymnasium.make(gym_id).unwrapped
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        state = np.array(env.state, dtype=np.float64)
        action = int(rng.integers(env.action_space.n))
        _, reward, terminated, _, _ = env.step(action)
        yield state, action, np.array(env.state, dtype=np.float64), reward, terminated
        if terminated:
            env.reset(seed=int(rng.integers(1 << 30)))


@pytest.mark.parametrize("name, gym_id", [("mountaincar", "MountainCar-v0"), ("cartpole", "CartPole-v1")])
def test_default_covariates_reproduce_gymnasium(name, gym_id):
    family = get_env(name)
    triples = list(_gym_pairs(gym_id, 400, seed=3))
    states = np.stack([s for s, *_ in triples])
    actions = np.array([a for _, a, *_ in triples])
    sim = family.batch(np.tile(family.default_covariates, (len(triples), 1)))
    sim.reset(np.random.default_rng(0))
    sim.state = torch.from_numpy(states.copy())
    next_obs, reward, terminated = sim.step(actions)
    np.testing.assert_allclose(sim.state.numpy(), np.stack([n for _, _, n, *_ in triples]), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(reward, [r for *_, r, _ in triples])
    np.testing.assert_array_equal(terminated, [d for *_, d in triples])


@pytest.mark.parametrize("name", ["mountaincar", "cartpole"])
def test_batched_step_equals_single_steps(name):
    family = get_env(name)
    rng = np.random.default_rng(1)
    covariates = family.sample_covariates(rng, 6)
    batch = family.batch(covariates)
    obs = batch.reset(np.random.default_rng(2))
    singles = [family.batch(covariates[i : i + 1]) for i in range(6)]
    for i, single in enumerate(singles):
        single.reset(rng)
        single.state = batch.state[i : i + 1].clone()
    for _ in range(30):
        actions = family.random_actions(rng, 6)
        obs, reward, done = batch.step(actions)
        for i, single in enumerate(singles):
            o, r, d = single.step(actions[i : i + 1])
            np.testing.assert_array_equal(o[0], obs[i])
            assert r[0] == reward[i] and d[0] == done[i]


@pytest.mark.parametrize("name", ["mountaincar", "cartpole"])
def test_torch_reward_and_termination_match_the_simulator(name):
    family = get_env(name)
    rng = np.random.default_rng(4)
    sim = family.batch(family.sample_covariates(rng, 64))
    obs = sim.reset(rng)
    for _ in range(200):
        actions = family.random_actions(rng, 64)
        next_obs, reward, terminated = sim.step(actions)
        o, a, n = (torch.from_numpy(np.asarray(x)) for x in (obs, actions, next_obs))
        np.testing.assert_array_equal(family.reward(o, a, n).numpy(), reward)
        np.testing.assert_array_equal(family.terminated(o, a, n).numpy(), terminated)
        obs = next_obs


@pytest.mark.parametrize("name", ["mountaincar", "cartpole"])
def test_true_dynamics_is_the_simulator(name):
    family = get_env(name)
    rng = np.random.default_rng(5)
    covariates = family.sample_covariates(rng, 3)
    agent = rng.integers(0, 3, size=32)
    sim = family.batch(covariates[agent])
    obs = sim.reset(rng)
    actions = family.random_actions(rng, 32)
    expected, _, _ = sim.step(actions)
    dynamics = family.true_dynamics(covariates)
    predicted = dynamics(torch.from_numpy(obs), torch.from_numpy(actions), torch.from_numpy(agent))
    np.testing.assert_allclose(predicted.numpy(), expected, atol=1e-6)


def test_registered_with_covariates_as_keywords():
    import persim_bench.envs  # noqa: F401  (registers the ids)

    env = gymnasium.make("persim/CartPole-v0", length=0.3, force=4.0)
    assert env.unwrapped.covariates == (0.3, 4.0)
    env.reset(seed=0)
    steps = 0
    while True:
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        steps += 1
        if terminated or truncated:
            break
    assert steps <= 200
    low_gravity = gymnasium.make("persim/MountainCar-v0", gravity=0.0001)
    assert low_gravity.spec.max_episode_steps == 500


def test_test_agents_follow_the_paper():
    assert get_env("mountaincar").test_agents == ((0.0001,), (0.0005,), (0.001,), (0.0025,), (0.0035,))
    # paper lists (force, length): (2,.5) (10,.5) (18,.5) (10,.85) (10,.15)
    assert get_env("cartpole").test_agents == ((0.5, 2.0), (0.5, 10.0), (0.5, 18.0), (0.85, 10.0), (0.15, 10.0))
    covs = get_env("cartpole").agent_covariates(np.random.default_rng(0), 50)
    assert (covs[5:, 0] >= 0.15).all() and (covs[5:, 0] <= 0.85).all()
    assert (covs[5:, 1] >= 2).all() and (covs[5:, 1] <= 18).all()
