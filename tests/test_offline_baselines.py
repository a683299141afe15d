"""CQL, IQL and TD3+BC through d3rlpy: they fit and act for the grid, CQL learns CartPole, original-code settings hold."""
import dataclasses
import types

import numpy as np
import pydantic
import pytest
import torch

from persim_bench.algos.cql import CQLSpec, make_cql
from persim_bench.algos.d3rlpy_common import fit_policies
from persim_bench.algos.iql import IQLSpec, make_iql
from persim_bench.algos.registry import ALGORITHMS
from persim_bench.algos.td3bc import TD3BCSpec, make_td3bc
from persim_bench.config import load_grid
from persim_bench.envs import get_env
from persim_bench.errors import GridError
from persim_bench.orchestration.estimate import estimate, format_estimate
from persim_bench.orchestration.trials import main_trials
from offline_data import noisy_controller_cartpole, recorded, returns_vs_random

SMALL = dict(steps=20, steps_per_epoch=10)
TINY = {
    "cql": CQLSpec(**SMALL, bc_warmup_steps=10, actor_hidden=[32, 32], critic_hidden=[32, 32], batch_size=32,
                   discrete_hidden=[32, 32], discrete_quantiles=8, discrete_target_update_interval=5),
    "iql": IQLSpec(**SMALL, actor_hidden=[32, 32], critic_hidden=[32, 32], value_hidden=[32, 32], batch_size=32),
    "td3bc": TD3BCSpec(**SMALL, actor_hidden=[32, 32], critic_hidden=[32, 32], batch_size=32),
}
MAKE = {"cql": make_cql, "iql": make_iql, "td3bc": make_td3bc}
# Discrete CQL made quick to learn for a test: QR-DQN with 32 quantiles (200 cost ~7x per step), a
# higher learning rate and a frequent target copy; the algorithm and its CQL weight are the grid's.
FAST_DISCRETE_CQL = CQLSpec(steps=400, steps_per_epoch=200, bc_warmup_steps=0, discrete_quantiles=32,
                            discrete_lr=1e-3, discrete_batch_size=64, discrete_target_update_interval=100)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return {"cartpole": recorded("cartpole", n_agents=20, steps=25), "halfcheetah": recorded("halfcheetah", 5, 10)}


def fit(name, data, spec, seed, work_dir, agents=None):
    return fit_policies(data, MAKE[name], spec, seed, work_dir, name, agents)


# --- registry and grid ----------------------------------------------------------------------------

def test_registry_entries_their_action_spaces_and_sections():
    for prefix, label, spaces in [("cql", "CQL", ("discrete", "continuous")), ("iql", "IQL", ("continuous",)),
                                  ("td3bc", "TD3+BC", ("continuous",))]:
        for suffix in ("p", "a"):
            algo = ALGORITHMS[f"{prefix}_{suffix}"]
            assert (algo.label, algo.spec_key, algo.action_spaces) == (f"{label}-{suffix.upper()}", prefix, spaces)
            assert algo.cost is not None and not algo.plans and not algo.learns_dynamics
    grid = load_grid("smoke")
    assert {"cql_p", "iql_p", "td3bc_p"} <= set(grid.algos)
    assert isinstance(grid.cql, CQLSpec) and isinstance(grid.iql, IQLSpec) and isinstance(grid.td3bc, TD3BCSpec)
    full = load_grid("full")
    new = {f"{prefix}_{suffix}" for prefix in ("cql", "iql", "td3bc") for suffix in "pa"}
    assert set(load_grid("paper").algos) | new == set(full.algos)
    assert full.cql.steps == full.iql.steps == full.td3bc.steps == full.bcq.steps == 550_000


def test_continuous_only_algorithms_refuse_a_discrete_grid(write_grid):
    path = write_grid({"name": "x", "envs": ["cartpole"], "regimes": ["random"], "algos": ["iql_p"]})
    with pytest.raises(GridError, match="iql_p supports continuous actions only"):
        load_grid(path)
    with pytest.raises(pydantic.ValidationError, match="bc_warmup_steps .* must be below steps"):
        CQLSpec(steps=100, steps_per_epoch=50)  # the official 40k warm start would leave pure BC


def test_dry_run_costs_them_and_cost_follows_the_spec():
    grid = load_grid("smoke")
    main = {s.stage: s for s in estimate(grid, 30e9)}["main"]
    assert all(main.by_algo[name] > 0 for name in ("cql_p", "iql_p", "td3bc_p"))
    assert "cql_p" in format_estimate(grid, estimate(grid, 30e9), 30e9)
    paper = load_grid("full")
    trial = next(t for t in main_trials(paper, {}) if t.algo == "cql_p" and t.env == "cartpole")
    cost = lambda g: ALGORITHMS["cql_p"].cost(g, trial, 100_000, 30e9)
    fewer = paper.model_copy(update={"cql": paper.cql.model_copy(update={"discrete_quantiles": 32})})
    assert cost(fewer) < cost(paper) / 3  # QR's loss is quadratic in the quantiles
    per_agent = ALGORITHMS["cql_a"].cost(paper, dataclasses.replace(trial, algo="cql_a"), 100_000, 30e9)
    assert per_agent > 4 * cost(paper)  # five policies


# --- fit and act: shapes, dtypes, seeds -----------------------------------------------------------

@pytest.mark.parametrize("name,env", [("cql", "cartpole"), ("cql", "halfcheetah"), ("iql", "halfcheetah"),
                                      ("td3bc", "halfcheetah")])
def test_fit_act_shapes_and_same_seed_same_policy(tmp_path, data, name, env):
    family, transitions = get_env(env), data[env]
    obs = transitions.obs[:7]
    agent = np.array([0, 1, 1, 0, 1, 0, 0])
    runs = []
    for i, seed in enumerate((3, 3, 4)):
        policy, metrics = fit(name, transitions, TINY[name], seed, tmp_path / str(i), agents=[0, 1])
        assert sorted(policy.algos) == [0, 1] and metrics["transitions"] == np.isin(transitions.agent, [0, 1]).sum()
        actions = policy.act(obs, agent)
        if family.discrete:
            assert actions.shape == (7,) and actions.dtype == np.int64 and set(actions) <= {0, 1}
        else:
            assert actions.shape == (7, 6) and actions.dtype == np.float32
            assert np.isfinite(actions).all() and np.abs(actions).max() <= 1.0
        runs.append((metrics, actions))
    losses = lambda m: {k: v for k, v in m.items() if "loss" in k}
    assert losses(runs[0][0]) and losses(runs[0][0]) == losses(runs[1][0])
    assert np.array_equal(runs[0][1], runs[1][1])
    assert losses(runs[0][0]) != losses(runs[2][0])
    pooled, _ = fit(name, transitions, TINY[name], 0, tmp_path / "p")
    assert list(pooled.algos) == [None] and pooled.act(obs, agent).shape == runs[0][1].shape


# --- CQL ------------------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("seed", [0, 1])
def test_cql_p_learns_cartpole_from_a_good_noisy_policy(monkeypatch, tmp_path, seed):
    transitions = noisy_controller_cartpole(monkeypatch, seed)
    policy, metrics = fit("cql", transitions, FAST_DISCRETE_CQL, seed, tmp_path)
    assert {"loss", "td_loss", "conservative_loss"} <= set(metrics)
    cql, baseline = returns_vs_random(policy.act, transitions, seed)
    assert cql > max(2 * baseline, 100), (cql, baseline)


def test_cql_a_conservative_term_keeps_each_agent_on_its_data_action(tmp_path, data):
    """Agent 0 only ever pushed left, agent 1 only right, every reward -1: TD alone makes the data action
    look worse than the never-trained one; CQL's term pushes the unseen action's Q below it."""
    cartpole = data["cartpole"]
    relabelled = dataclasses.replace(cartpole, action=np.where(cartpole.agent == 0, 0, 1),
                                     reward=np.full_like(cartpole.reward, -1.0))
    obs = np.random.default_rng(0).normal(scale=0.05, size=(20, 4)).astype(np.float32)
    agent = np.arange(20) % 2
    for alpha, expected in [(FAST_DISCRETE_CQL.discrete_alpha, agent), (1e-6, 1 - agent)]:
        spec = FAST_DISCRETE_CQL.model_copy(update={"steps": 100, "steps_per_epoch": 50, "discrete_alpha": alpha})
        policy, _ = fit("cql", relabelled, spec, 0, tmp_path / str(alpha), agents=[0, 1])
        assert policy.act(obs, agent).tolist() == expected.tolist(), alpha


def test_cql_original_code_target_and_warm_start(tmp_path, data):
    from d3rlpy.algos.qlearning.torch.dqn_impl import DQNImpl

    # Discrete: the target network picks the next action (QR-DQN), not the online one (d3rlpy's Double DQN).
    discrete, _ = fit("cql", data["cartpole"], TINY["cql"], 0, tmp_path / "d")
    impl = discrete.algos[None].impl
    assert impl.compute_target.__func__ is DQNImpl.compute_target
    assert impl.modules.q_funcs[0]._fc.out_features == 2 * TINY["cql"].discrete_quantiles

    # Continuous: the actor first clones the data's actions; all of them 0.5 here.
    cheetah = data["halfcheetah"]
    constant = dataclasses.replace(cheetah, action=np.full_like(cheetah.action, 0.5))
    spec = TINY["cql"].model_copy(update={"steps": 160, "steps_per_epoch": 80, "bc_warmup_steps": 159,
                                          "actor_lr": 3e-3})
    policy, _ = fit("cql", constant, spec, 0, tmp_path / "c")
    assert np.abs(policy.act(cheetah.obs[:20], cheetah.agent[:20]) - 0.5).max() < 0.15
    # The Q target samples the next action (official deterministic_backup), so it varies between calls.
    impl = policy.algos[None].impl
    batch = types.SimpleNamespace(next_observations=torch.as_tensor(cheetah.obs[:8]))
    first, second = impl.compute_target(batch), impl.compute_target(batch)
    assert first.shape == (8, 1) and not torch.equal(first, second)


# --- IQL and TD3+BC -------------------------------------------------------------------------------

def test_iql_original_code_settings(tmp_path, data):
    cheetah = data["halfcheetah"]
    policy, _ = fit("iql", cheetah, TINY["iql"], 0, tmp_path, agents=[0, 1])
    # Rewards x 1000 / (max - min trajectory return); one trajectory per agent has no range: unscaled.
    scaler = policy.algos[0].config.reward_scaler
    assert scaler.transform_numpy(np.array([2.0])) == pytest.approx([2.0])
    pooled, _ = fit("iql", cheetah, TINY["iql"], 0, tmp_path / "p")
    returns = [cheetah.reward[cheetah.agent == a].sum() for a in np.unique(cheetah.agent)]
    factor = pooled.algos[None].config.reward_scaler.transform_numpy(np.array([1.0]))[0]
    assert factor == pytest.approx(1000.0 / (max(returns) - min(returns)), rel=1e-4)
    # The actor's learning rate decays to 0 on a cosine over the run; the critics' stays.
    modules = pooled.algos[None].impl.modules
    assert modules.actor_optim.optim.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
    assert modules.critic_optim.optim.param_groups[0]["lr"] == TINY["iql"].critic_lr
    # The actor starts at log-std 0 (the original's), not d3rlpy's -1.5.
    fresh = make_iql(TINY["iql"], False, "cpu")
    fresh.create_impl((18,), 6)
    logstd = fresh.impl.modules.policy(torch.zeros(1, 18)).logstd
    assert torch.allclose(logstd, torch.zeros_like(logstd), atol=1e-6)


def test_td3bc_normalises_states_with_the_data_statistics(tmp_path, data):
    cheetah = data["halfcheetah"]
    policy, _ = fit("td3bc", cheetah, TINY["td3bc"], 0, tmp_path)
    scaler = policy.algos[None].config.observation_scaler
    assert np.allclose(scaler.mean, cheetah.obs.mean(0), atol=1e-4)
    assert np.allclose(scaler.std, cheetah.obs.std(0), rtol=1e-3, atol=1e-4) and scaler.eps == 1e-3
    off = TINY["td3bc"].model_copy(update={"normalize_states": False})
    assert make_td3bc(off, False, "cpu").config.observation_scaler is None
