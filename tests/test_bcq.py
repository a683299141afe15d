"""BCQ-P/BCQ-A through d3rlpy: it learns CartPole, the conversion keeps every transition, BCQ-A dispatches by agent."""
import dataclasses
import random

import numpy as np
import pydantic
import pytest
import torch

from persim_bench.algos.bcq import BCQSpec, make_bcq, act_with_more_samples
from persim_bench.algos.d3rlpy_common import fit_policies
from persim_bench.data.formats import to_mdp_dataset
from persim_bench.data.dataset import Transitions
from offline_data import noisy_controller_cartpole, recorded, returns_vs_random

TINY = BCQSpec(steps=20, steps_per_epoch=10, discrete_hidden=[32, 32], actor_hidden=[32, 32], critic_hidden=[32, 32],
               vae_hidden=[32, 32], act_samples=20)


def fit_bcq(data, spec, seed, work_dir, agents=None, on_epoch=None):
    """BCQ-P (agents None) or BCQ-A as the registry entries run it."""
    return fit_policies(data, make_bcq, spec, seed, work_dir, "bcq_p" if agents is None else "bcq_a", agents,
                        on_epoch, before_acting=act_with_more_samples)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _take(data: Transitions, rows) -> Transitions:
    columns = ("agent", "t", "obs", "action", "reward", "next_obs", "terminated", "truncated")
    return dataclasses.replace(data, **{c: getattr(data, c)[rows] for c in columns})


@pytest.fixture(scope="module")
def cartpole():
    data = recorded("cartpole", n_agents=20, steps=25)  # random actions: some fall, some hit the cap
    assert data.terminated.any() and data.truncated.any()
    return data


# --- learning -------------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("seed", [0, 1])
def test_bcq_p_learns_cartpole_from_a_good_noisy_policy(monkeypatch, tmp_path, seed):
    data = noisy_controller_cartpole(monkeypatch, seed)
    epochs = []
    policy, metrics = fit_bcq(data, BCQSpec(steps=800, steps_per_epoch=400), seed, tmp_path,
                              on_epoch=lambda epoch, m: epochs.append((epoch, m)))
    assert [e for e, _ in epochs] == [1, 2] and {"loss", "td_loss", "imitator_loss"} <= set(epochs[-1][1])
    assert metrics["transitions"] == len(data) and metrics["fit_seconds"] > 0
    assert all(isinstance(v, float | int) for v in metrics.values())
    bcq, baseline = returns_vs_random(policy.act, data, seed)
    assert bcq > max(2 * baseline, 100), (bcq, baseline)


# --- conversion -----------------------------------------------------------------------------------

def test_mdp_dataset_keeps_every_transition(cartpole):
    dataset = to_mdp_dataset(cartpole)
    assert dataset.transition_count == len(cartpole)
    assert len(dataset.episodes) == len(np.unique(cartpole.agent))  # one trajectory per agent
    row = 0
    for episode in dataset.episodes:
        for i in range(episode.transition_count):
            tr = dataset.transition_picker(episode, i)
            assert np.array_equal(tr.observation, cartpole.obs[row])
            assert tr.action.item() == cartpole.action[row] and tr.reward.item() == cartpole.reward[row]
            if cartpole.terminated[row]:  # d3rlpy zeroes a terminal's next observation; its target never reads it
                assert tr.terminal == 1.0 and i == episode.transition_count - 1
            else:
                assert tr.terminal == 0.0 and np.array_equal(tr.next_observation, cartpole.next_obs[row])
            row += 1
        last = row - 1
        # A trajectory cut by the horizon is a timeout (bootstrapped), one that fell is a terminal.
        assert episode.terminated == bool(cartpole.terminated[last]) != bool(cartpole.truncated[last])
    assert row == len(cartpole)


def test_mdp_dataset_of_some_agents(cartpole):
    dataset = to_mdp_dataset(cartpole, agents=[3, 1])
    assert dataset.transition_count == np.isin(cartpole.agent, [1, 3]).sum()
    first = dataset.transition_picker(dataset.episodes[0], 0)
    assert np.array_equal(first.observation, cartpole.obs[cartpole.agent == 1][0])


@pytest.mark.parametrize("env,space,size", [("mountaincar", "DISCRETE", 3), ("cartpole", "DISCRETE", 2),
                                            ("halfcheetah", "CONTINUOUS", 6)])
def test_action_space_and_size(env, space, size):
    data = recorded(env, n_agents=5, steps=4)  # four steps: no trajectory ends, all are timeouts
    dataset = to_mdp_dataset(data)
    assert dataset.dataset_info.action_space.name == space and dataset.dataset_info.action_size == size
    assert dataset.transition_count == len(data) == 20
    assert not any(episode.terminated for episode in dataset.episodes)


# --- BCQ-A, continuous, logs, seeds ---------------------------------------------------------------

def test_bcq_a_one_policy_per_agent_and_rows_go_to_their_own(tmp_path, cartpole):
    relabelled = dataclasses.replace(cartpole, action=np.where(cartpole.agent == 0, 0, 1))  # agent 0 only pushes left
    epochs = []
    policy, metrics = fit_bcq(relabelled, TINY.model_copy(update={"steps": 100, "steps_per_epoch": 50}), 0, tmp_path,
                              agents=[0, 1], on_epoch=lambda epoch, m: epochs.append((epoch, m["agent"])))
    assert sorted(policy.algos) == [0, 1]
    assert epochs == [(1, 0), (2, 0), (3, 1), (4, 1)]  # one running count across the policies
    assert {"loss_agent0", "loss_agent1", "transitions", "fit_seconds"} <= set(metrics)
    assert metrics["transitions"] == np.isin(cartpole.agent, [0, 1]).sum()
    assert {p.name for p in (tmp_path / "d3rlpy").iterdir()} == {"bcq_a_agent0", "bcq_a_agent1"}

    calls = []
    for algo in policy.algos.values():  # spy: count predict calls, still d3rlpy's own
        algo.predict = lambda obs, predict=algo.predict: calls.append(len(obs)) or predict(obs)
    agent = np.array([0, 1, 1, 0, 1, 0])
    actions = policy.act(np.zeros((6, 4), np.float32), agent)
    # The imitator never saw the other action, so the 0.3 threshold rules it out: the action names the policy.
    assert actions.dtype == np.int64 and actions.tolist() == agent.tolist()
    assert sorted(calls) == [3, 3]  # one batched call per policy
    with pytest.raises(ValueError, match="no per-agent policy for agent.* 2"):
        policy.act(np.zeros((2, 4), np.float32), np.array([0, 2]))

    # Polyak target (original code), not d3rlpy's hard copy: after training the target lags the online net.
    modules = policy.algos[0].impl.modules
    online, target = modules.q_funcs[0]._fc.weight, modules.targ_q_funcs[0]._fc.weight
    assert not torch.equal(online, target) and torch.allclose(online, target, atol=0.1)


def test_continuous_halfcheetah_fit_and_act(tmp_path):
    data = recorded("halfcheetah", n_agents=5, steps=10)
    policy, metrics = fit_bcq(data, TINY, 0, tmp_path, agents=[2, 4])
    assert {"vae_loss_agent2", "critic_loss_agent4", "actor_loss_agent4"} <= set(metrics)
    assert policy.algos[2].impl._n_action_samples == TINY.act_samples  # the original's 100-vs-10 split
    obs = np.random.default_rng(0).normal(size=(7, 18)).astype(np.float32)
    actions = policy.act(obs, np.array([2, 4, 4, 2, 2, 4, 2]))
    assert actions.shape == (7, 6) and actions.dtype == np.float32
    assert np.isfinite(actions).all() and np.abs(actions).max() <= 1.0


def test_logs_land_in_work_dir_and_cwd_stays_clean(monkeypatch, tmp_path, cartpole):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fit_bcq(cartpole, TINY, 0, tmp_path / "work")
    logs = tmp_path / "work" / "d3rlpy" / "bcq_p"
    assert (logs / "params.json").exists() and len((logs / "loss.csv").read_text().splitlines()) == 2
    assert not list(logs.glob("*.d3"))  # no weight files
    fit_bcq(cartpole, TINY, 0, tmp_path / "work")  # a rerun starts fresh logs
    assert len((logs / "loss.csv").read_text().splitlines()) == 2
    assert list(cwd.iterdir()) == []


def test_same_seed_same_policy_and_caller_rngs_untouched(tmp_path, cartpole):
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    before = random.random(), np.random.random(), torch.rand(1).item()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    obs = cartpole.obs[:50]
    runs = []
    for seed in (3, 3, 4):
        policy, metrics = fit_bcq(cartpole, TINY, seed, tmp_path / str(len(runs)))
        weights = policy.algos[None].impl.modules.q_funcs[0]._fc.weight.detach().clone()
        runs.append((metrics["loss"], weights, policy.act(obs, cartpole.agent[:50])))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert np.array_equal(runs[0][2], runs[1][2])
    assert runs[0][0] != runs[2][0]
    assert (random.random(), np.random.random(), torch.rand(1).item()) == before


# --- bad input ------------------------------------------------------------------------------------

def test_bad_input_is_a_clear_error(tmp_path, cartpole):
    with pytest.raises(ValueError, match="cartpole/random: the dataset is empty"):
        fit_bcq(_take(cartpole, slice(0, 0)), TINY, 0, tmp_path)
    with pytest.raises(ValueError, match=r"cartpole/random: no transitions of agent\(s\) 99"):
        fit_bcq(cartpole, TINY, 0, tmp_path, agents=[0, 99])
    with pytest.raises(ValueError, match="at least one agent"):
        fit_bcq(cartpole, TINY, 0, tmp_path, agents=[])
    gap = np.flatnonzero((cartpole.agent == 0) & (cartpole.t == 2))  # a row missing mid-trajectory
    with pytest.raises(ValueError, match="agent 0 t 1: next_obs differs"):
        to_mdp_dataset(_take(cartpole, np.setdiff1d(np.arange(len(cartpole)), gap)))
    assert not (tmp_path / "d3rlpy").exists()  # nothing started
    with pytest.raises(pydantic.ValidationError, match="multiple of steps_per_epoch"):
        BCQSpec(steps=150, steps_per_epoch=100)
