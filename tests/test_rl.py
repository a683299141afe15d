"""Online RL trainers: DQN learns CartPole, runs are reproducible, TD3 runs on HalfCheetah, checkpoints
are chosen by their greedy return, and training runs on a given device."""
from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch

from persim_bench.data.policy_net import PolicyNet
from persim_bench.data.rl import _reset_finished, _Replay, evaluate_policy, select_checkpoint, train_policy
from persim_bench.envs import get_env

HIDDEN = [256, 256]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small MLP updates run 2-3x slower with two intra-op threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gym_returns(act, episodes: int, seed: int) -> np.ndarray:
    """Returns through the registered gymnasium env: an evaluation independent of rl.py's."""
    env = gymnasium.make("persim/CartPole-v0")
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total += reward
            done = terminated or truncated
        returns.append(total)
    return np.asarray(returns)


@pytest.fixture(scope="module")
def cartpole_dqn():
    progress = []
    net, info = train_policy("cartpole", (0.5, 10.0), "dqn", budget=3000, seed=0, hidden=HIDDEN,
                             on_progress=lambda steps, metrics: progress.append((steps, metrics)))
    return net, info, progress


@pytest.mark.integration
def test_dqn_learns_cartpole(cartpole_dqn):
    net, info, progress = cartpole_dqn
    rng = np.random.default_rng(0)
    random = gym_returns(lambda obs: int(rng.integers(2)), episodes=10, seed=100)
    trained = gym_returns(lambda obs: int(net.act(obs[None])[0]), episodes=10, seed=100)
    assert random.mean() < 40
    assert info["achieved_return"] > 100 and trained.mean() > 100
    assert isinstance(net, PolicyNet) and not net.training and net.discrete
    assert info["env_steps"] == 3000 and info["updates"] > 0 and info["train_seconds"] > 0
    # about every 5% of the budget, ending at the budget, with a finite recent return
    steps = [s for s, _ in progress]
    assert 18 <= len(steps) <= 21 and steps == sorted(steps) and steps[-1] == 3000
    assert np.isfinite(progress[-1][1]["recent_return"]) and progress[-1][1]["greedy_return"] > 100


def test_same_seed_same_weights():
    def run(seed, on_progress=None):
        net, info = train_policy("cartpole", (0.5, 10.0), "dqn", budget=400, seed=seed, hidden=[32], n_envs=4,
                                 eval_episodes=2, on_progress=on_progress)
        return [p.detach().clone() for p in net.parameters()], info["achieved_return"]

    torch.manual_seed(123)
    outside = torch.rand(1)
    (first, result), (again, result_again) = run(5), run(5, on_progress=lambda steps, metrics: None)
    other, _ = run(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and result == result_again
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), outside)          # the caller's torch RNG is untouched


@pytest.mark.parametrize("env, algorithm", [("cartpole", "td3"), ("mountaincar", "td3"), ("halfcheetah", "dqn"),
                                            ("cartpole", "ppo")])
def test_algorithm_env_mismatch(env, algorithm):
    with pytest.raises(ValueError, match=algorithm):
        train_policy(env, get_env(env).default_covariates, algorithm, budget=100, seed=0, hidden=[8])


def test_td3_runs_on_halfcheetah():
    net, info = train_policy("halfcheetah", (1.0, 1.0), "td3", budget=600, seed=0, hidden=[64, 64], n_envs=4,
                             eval_episodes=2, eval_every=200, target_return=0.0)
    actions = net.act(np.random.default_rng(0).normal(size=(7, 18)).astype(np.float32))
    assert actions.shape == (7, 6) and actions.dtype == np.float32
    assert np.all(np.abs(actions) <= 1.0)
    assert not net.training and not net.discrete
    assert info["env_steps"] == 600 and info["updates"] == 600 - 60   # updates start after 60 random steps
    assert np.isfinite(info["achieved_return"])
    # the TD3 actor is checkpointed and chosen like a DQN: nearest the target among 200, 400, 600 steps
    returns = [r for _, r in info["checkpoints"]]
    assert [s for s, _ in info["checkpoints"]] == [200, 400, 600]
    assert info["chosen_checkpoint"] == int(np.argmin(np.abs(returns)))


def test_select_checkpoint():
    returns = [-500, -300, -120, -95, -120, -300]
    assert select_checkpoint(returns, None) == 3                  # no target: the best
    assert select_checkpoint(returns, -130) == 4                  # nearest; a tie goes to the later one
    assert select_checkpoint(returns, -250) == 5
    assert select_checkpoint(returns, 0) == 3 and select_checkpoint(returns, -1e9) == 0
    assert select_checkpoint([7.0], 100.0) == 0
    # early stopping: the first checkpoint reaching the target, else the best
    assert select_checkpoint(returns, -130, "first") == 2 and select_checkpoint(returns, -300, "first") == 1
    assert select_checkpoint(returns, -50, "first") == 3 and select_checkpoint(returns, None, "first") == 3
    # held: the first checkpoint reaching the target right after one that reached it too, else the best
    assert select_checkpoint(returns, -130, "first-held") == 3 and select_checkpoint(returns, -300, "first-held") == 2
    assert select_checkpoint([-150, -500, -190, -120], -200, "first-held") == 3   # -150 alone is not held
    assert select_checkpoint(returns, -100, "first-held") == 3 and select_checkpoint([-150], -200, "first-held") == 0
    with pytest.raises(ValueError, match="unknown checkpoint rule 'last'"):
        select_checkpoint(returns, -130, "last")


def test_checkpoint_nearest_the_target_is_kept():
    family, covariates = get_env("cartpole"), (0.5, 10.0)

    def run(target, rule="nearest"):
        return train_policy("cartpole", covariates, "dqn", budget=1200, seed=0, hidden=[32], n_envs=4, eval_episodes=4,
                            eval_every=100, target_return=target, target_rule=rule)

    best_net, best = run(None)
    steps, returns = map(list, zip(*best["checkpoints"]))
    assert steps == list(range(100, 1300, 100))       # every 100 env steps, the last one the final policy
    assert best["chosen_checkpoint"] == max(range(len(returns)), key=lambda k: (returns[k], k))
    # a target between two evaluated returns, nearer the lower one, which is not the best
    levels = sorted(set(returns))
    assert len(levels) >= 3, f"too few distinct checkpoint returns to test with: {returns}"
    low, high = levels[-3], levels[-2]
    target = low + 0.4 * (high - low)
    net, info = run(target)
    assert info["checkpoints"] == best["checkpoints"]   # the target only chooses: training is the same
    chosen = info["chosen_checkpoint"]
    assert returns[chosen] == low and chosen == max(k for k, r in enumerate(returns) if r == low)
    # the net returned is that checkpoint: it scores the recorded return on the checkpoints' start states
    rescored = evaluate_policy(family, covariates, net, 4, np.random.default_rng([0, 3])).mean()
    assert rescored == pytest.approx(returns[chosen])
    assert not all(torch.equal(a, b) for a, b in zip(net.parameters(), best_net.parameters()))

    # early stopping: training ends at the first checkpoint reaching the target, which is kept
    first = next(k for k, r in enumerate(returns) if r >= high)
    early_net, early = run(high, "first")
    assert early["checkpoints"] == best["checkpoints"][:first + 1]
    assert early["chosen_checkpoint"] == first and early["env_steps"] == steps[first] < 1200
    rescored = evaluate_policy(family, covariates, early_net, 4, np.random.default_rng([0, 3])).mean()
    assert rescored == pytest.approx(returns[first])
    assert early["target_met"] and not best["target_met"]

    # held: training ends at the first checkpoint whose return and its predecessor's both reach the target
    held = max(min(a, b) for a, b in zip(returns, returns[1:]))
    kept = next(k for k in range(1, len(returns)) if min(returns[k - 1], returns[k]) >= held)
    assert kept > next(k for k, r in enumerate(returns) if r >= held), "no lucky first checkpoint to skip here"
    held_net, held_info = run(held, "first-held")
    assert held_info["checkpoints"] == best["checkpoints"][:kept + 1] and held_info["chosen_checkpoint"] == kept
    assert held_info["target_met"]
    never, never_info = run(1e9, "first-held")   # out of reach: the whole budget, then the best checkpoint
    assert never_info["checkpoints"] == best["checkpoints"] and not never_info["target_met"]
    assert never_info["chosen_checkpoint"] == best["chosen_checkpoint"]


def test_evaluation_with_epsilon_one_ignores_the_policy():
    family, covariates = get_env("cartpole"), (0.5, 10.0)
    torch.manual_seed(0)
    nets = [PolicyNet(family.obs_dim, family.n_actions, [8], discrete=True) for _ in range(2)]

    def returns(net, epsilon):
        return evaluate_policy(family, covariates, net, 16, np.random.default_rng(5), epsilon)

    np.testing.assert_array_equal(returns(nets[0], 1.0), returns(nets[1], 1.0))   # every action random
    assert not np.array_equal(returns(nets[0], 0.0), returns(nets[0], 0.5))
    with pytest.raises(ValueError, match="score_epsilon must be in"):
        train_policy("cartpole", covariates, "dqn", budget=100, seed=0, hidden=[8], score_epsilon=1.5)


def test_explicit_cpu_device_is_the_default():
    def run(device):
        net, info = train_policy("cartpole", (0.5, 10.0), "dqn", budget=300, seed=1, hidden=[16], n_envs=4,
                                 eval_episodes=2, **device)
        return [p.detach() for p in net.parameters()], info

    (default, _), (cpu, info) = run({}), run({"device": torch.device("cpu")})
    assert all(torch.equal(a, b) for a, b in zip(default, cpu)) and info["device"] == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("env, algorithm", [("cartpole", "dqn"), ("halfcheetah", "td3")])
def test_trains_on_cuda(env, algorithm):
    family = get_env(env)
    net, info = train_policy(env, family.default_covariates, algorithm, budget=400, seed=0, hidden=[32], n_envs=4,
                             eval_episodes=2, eval_every=200, device="cuda")
    assert info["device"] == "cuda" and info["updates"] > 0 and len(info["checkpoints"]) == 2
    assert all(p.device.type == "cpu" for p in net.parameters())     # handed back on the CPU
    assert np.isfinite(info["achieved_return"])


@pytest.mark.parametrize("env", ["cartpole", "halfcheetah"])
def test_reset_finished_restarts_only_finished_rows(env):
    family = get_env(env)
    covariates = np.repeat([family.default_covariates], 3, axis=0)
    sim, untouched = family.batch(covariates), family.batch(covariates)
    untouched.reset(np.random.default_rng(0))
    obs = sim.reset(np.random.default_rng(0))
    actions = family.random_actions(np.random.default_rng(1), 3)
    for _ in range(5):
        obs, _, _ = sim.step(actions)
        untouched.step(actions)
    done = np.array([False, True, False])
    moved = obs.copy()
    obs = _reset_finished(sim, done, obs, np.random.default_rng(2))
    np.testing.assert_array_equal(obs[~done], moved[~done])
    if env == "cartpole":
        assert np.all(np.abs(obs[1]) <= 0.05)                        # CartPole's start box
    else:
        assert obs[1, 0] == 0 and np.all(np.abs(obs[1, 1:]) < 0.01)  # at rest near qpos0
    # the running rows carry on as if nothing had happened (HalfCheetah: rebuilt from qpos, qvel)
    after, expected = sim.step(actions)[0], untouched.step(actions)[0]
    np.testing.assert_allclose(after[~done], expected[~done], rtol=1e-5, atol=1e-5)


def test_replay_n_step_returns_stop_at_episode_end():
    replay = _Replay(capacity=20, n_envs=1, obs_dim=1, action_shape=(), action_dtype=np.int64)
    # one env: steps 0..5; the episode ends (terminated) at step 2, a horizon cut at step 5
    terminated = [False, False, True, False, False, False]
    ended = [False, False, True, False, False, True]
    for t in range(6):
        replay.add(np.array([[t]]), np.array([0]), np.array([1.0]), np.array([[t + 1]]), np.array([terminated[t]]),
                   np.array([ended[t]]))
    obs, _, ret, next_obs, discount = replay.sample(np.random.default_rng(0), 200, n_step=3)
    g = 0.99
    expected = {0: (1 + g + g * g, 3, 0.0), 1: (1 + g, 3, 0.0), 2: (1, 3, 0.0), 3: (1 + g + g * g, 6, g**3)}
    seen = set()
    for o, r, n, d in zip(obs[:, 0].tolist(), ret.tolist(), next_obs[:, 0].tolist(), discount.tolist()):
        start = int(o)
        assert start in expected                      # rows 4 and 5 have no complete 3-step window yet
        assert (r, n, d) == pytest.approx(expected[start], rel=1e-6)
        seen.add(start)
    assert seen == set(expected)
