"""PerSim: personalisation pays off on unseen actions, batched ensemble == its members, I/O, determinism."""
import copy

import numpy as np
import pytest
import torch

from persim_bench.algos.nets import STEP_CHUNK
from persim_bench.analysis.factors import probe_r2
from persim_bench.algos.persim import PerSimEnsemble, autograd_train_step, fit_persim, train_step
from persim_bench.algos.persim import PersimSpec
from persim_bench.data.dataset import Transitions
from persim_bench.data.generate import DatasetPlan, record_shard
from persim_bench.envs import get_env
from offline_data import take_rows

TINY = PersimSpec(ensemble=3, epochs=2, batch_size=64, state_hidden=[32], action_hidden=[16], rank=3)


def _recorded(env: str, n_agents: int, steps: int) -> Transitions:
    plan = DatasetPlan(env=env, regime="random", grid="test", seed=0, n_agents=n_agents, episode_steps=steps, agents_per_shard=n_agents)
    data = record_shard(plan, 0)  # one shard holds every agent
    assert data.n_agents == n_agents and np.array_equal(data.covariates, plan.covariates())
    return data


@pytest.fixture(scope="module")
def mountaincar():
    return _recorded("mountaincar", n_agents=50, steps=200)  # 10k transitions


@pytest.fixture(scope="module")
def cartpole():
    return _recorded("cartpole", n_agents=30, steps=60)  # about 600 transitions: episodes end early


def _synthetic_halfcheetah(n_agents=6, rows=300, seed=0) -> Transitions:
    """Random HalfCheetah-shaped transitions: enough to exercise the continuous-action path."""
    rng = np.random.default_rng(seed)
    family = get_env("halfcheetah")
    obs = rng.normal(size=(rows, family.obs_dim)).astype(np.float32) * 3
    return Transitions(
        env="halfcheetah", regime="random", agent=rng.integers(0, n_agents, rows), t=np.arange(rows),
        obs=obs, action=family.random_actions(rng, rows), reward=np.zeros(rows, np.float32),
        next_obs=obs + rng.normal(size=obs.shape).astype(np.float32) * 0.1 + 1.0,
        terminated=np.zeros(rows, bool), truncated=np.zeros(rows, bool),
        covariates=family.sample_covariates(rng, n_agents))


# --- the decisive test ------------------------------------------------------------------------

def _pumping_rollouts(data: Transitions, agent: int, n_starts=16, horizon=50, seed=0):
    """Observed states of ``agent`` and the true next ``horizon`` states under a policy unlike the data's.

    The data were logged with uniform random actions, which keep the car near the valley floor;
    here the car is pushed in the direction of its velocity (pumping energy), so it swings far
    up both slopes. The action sequence is fixed by the true env, then replayed open loop.
    """
    rng = np.random.default_rng(seed)
    starts = data.obs[rng.choice(np.flatnonzero(data.agent == agent), n_starts, replace=False)]
    true_step = get_env("mountaincar").true_dynamics(data.covariates)
    obs, who, actions, states = torch.as_tensor(starts, dtype=torch.float64), torch.full((n_starts,), agent), [], []
    for _ in range(horizon):
        action = torch.where(obs[:, 1] >= 0, 2, 0)
        obs = true_step(obs, action, who)
        actions.append(action.numpy())
        states.append(obs.numpy())
    return starts, np.stack(actions), np.stack(states)


def _open_loop_rmse(model: PerSimEnsemble, agent: int, starts, actions, states) -> float:
    """Mean over steps of the RMSE of the ensemble-mean prediction (raw scale, authors' metric).

    Steps after the true car hit the left wall or passed the goal are left out: no model can
    learn walls that the logged trajectories (almost) never touch.
    """
    with torch.no_grad():
        obs = torch.as_tensor(starts).expand(model.n_members, -1, -1)
        who = torch.full((len(starts),), agent)
        predicted = []
        for action in actions:
            obs = model.step(obs, torch.as_tensor(action), who)
            predicted.append(obs.mean(0).numpy())
    squared = ((np.stack(predicted) - states) ** 2).mean(axis=2)                              # [H, starts]
    off_walls = np.minimum.accumulate((states[..., 0] > -1.19) & (states[..., 0] < 0.5), axis=0)
    assert off_walls.mean() > 0.5
    return float(np.mean([np.sqrt(step[keep].mean()) for step, keep in zip(squared, off_walls) if keep.any()]))


@pytest.mark.integration
def test_agent_factor_personalises_mountaincar_under_an_unseen_policy(mountaincar):
    """Lowest (0.0001) and highest (0.0035) gravity test agents, the two furthest from the average car."""
    spec = PersimSpec(ensemble=2, epochs=30, lr=3e-3, rank=3, state_hidden=[256])
    persim, _ = fit_persim(mountaincar, spec, seed=0)
    shared, _ = fit_persim(mountaincar, spec, seed=0, agent_factor=False)
    for agent in (0, 4):
        rollouts = _pumping_rollouts(mountaincar, agent)
        personal, pooled = _open_loop_rmse(persim, agent, *rollouts), _open_loop_rmse(shared, agent, *rollouts)
        assert personal < 0.05 and personal < 0.5 * pooled, (agent, personal, pooled)
    # Figure 1's claim as a number: the agent factors carry the hidden gravity (a linear probe, cross-validated).
    (personal_r2,) = probe_r2(persim.agent_factors(), mountaincar.covariates)
    (shared_r2,) = probe_r2(shared.agent_factors(), mountaincar.covariates)
    assert personal_r2 > 0.9 and shared_r2 < 0.1, (personal_r2, shared_r2)


# --- the batched ensemble ---------------------------------------------------------------------

def _member(model: PerSimEnsemble, m: int) -> PerSimEnsemble:
    """Member m alone: a 1-member model holding slice m of every weight."""
    single = PerSimEnsemble(**{**model.config, "n_members": 1})
    single.load_state_dict({name: value[m:m + 1] if value.dim() > 1 else value
                            for name, value in model.state_dict().items()})
    return single


@pytest.mark.parametrize("data", ["cartpole", "halfcheetah"])
def test_batched_ensemble_equals_each_member_alone(data, cartpole):
    data = cartpole if data == "cartpole" else _synthetic_halfcheetah()
    model, _ = fit_persim(data, TINY, seed=0)  # trained, so members differ and the normaliser is set
    rows = np.arange(40)
    obs = torch.as_tensor(data.obs[rows]) + torch.randn(model.n_members, len(rows), data.obs.shape[1])
    action, agent = torch.as_tensor(data.action[rows]), torch.as_tensor(data.agent[rows])
    with torch.no_grad():
        together = model.step(obs, action, agent)
        for m in range(model.n_members):
            torch.testing.assert_close(_member(model, m).step(obs[m:m + 1], action, agent), together[m:m + 1])


def test_members_are_independent_but_differently_initialised(cartpole):
    model = PerSimEnsemble.from_spec(TINY, "cartpole", cartpole.n_agents, seed=0)
    weights = model.state_encoder.layers[0].weight
    assert not torch.equal(weights[0], weights[1])
    factors = model.agent_factors()
    assert factors.shape == (TINY.ensemble, cartpole.n_agents, 3) and not np.allclose(factors[0], factors[1])


# --- step: shapes, chunking, raw scale --------------------------------------------------------

@pytest.mark.parametrize("env", ["cartpole", "halfcheetah"])
def test_step_shapes_and_chunks(env):
    family = get_env(env)
    model = PerSimEnsemble(env, n_agents=7, rank=4, n_members=3, state_hidden=[32], action_hidden=[16]).eval()
    rows = STEP_CHUNK * 2 + 37  # several chunks, the last one partial
    obs = torch.randn(3, rows, family.obs_dim)
    action = torch.as_tensor(family.random_actions(np.random.default_rng(0), rows))
    agent = torch.randint(0, 7, (rows,))
    with torch.no_grad():
        next_obs = model.step(obs, action, agent)
        assert next_obs.shape == (3, rows, family.obs_dim) and next_obs.dtype == torch.float32
        whole = obs + model(model.normalized(obs), action, agent)  # the same rows in one pass
        torch.testing.assert_close(next_obs, whole)
        assert model.step(obs[:, :5], action[:5], agent[:5]).shape == (3, 5, family.obs_dim)


def test_normalisation_is_internal_and_step_is_raw_scale(cartpole):
    model, _ = fit_persim(cartpole, PersimSpec(**{**TINY.model_dump(), "epochs": 40, "lr": 3e-3}), seed=0)
    delta = cartpole.next_obs - cartpole.obs
    np.testing.assert_allclose(model.obs_mean.numpy(), cartpole.obs.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.delta_std.numpy(), delta.std(0, ddof=1), rtol=1e-3)
    obs = torch.as_tensor(cartpole.obs).expand(model.n_members, -1, -1)
    with torch.no_grad():
        predicted = model.step(obs, torch.as_tensor(cartpole.action), torch.as_tensor(cartpole.agent))
        # A learned raw-scale one-step model beats "no change" by far on its own training data.
        error = (predicted - torch.as_tensor(cartpole.next_obs)).square().mean().item()
        assert error < 0.1 * float(np.square(delta).mean())
        # With the network's output zeroed, a step adds exactly the mean raw delta.
        last = model.state_encoder.layers[-1]
        last.weight.zero_(), last.bias.zero_()
        torch.testing.assert_close(model.step(obs, torch.as_tensor(cartpole.action), torch.as_tensor(cartpole.agent)),
                                   obs + torch.as_tensor(delta.mean(0)), rtol=1e-5, atol=1e-5)
    raw, _ = fit_persim(cartpole, PersimSpec(**{**TINY.model_dump(), "normalize": False, "epochs": 1}), seed=0)
    assert torch.equal(raw.obs_std, torch.ones(4)) and torch.equal(raw.delta_mean, torch.zeros(4))


# --- persistence, determinism, training loop --------------------------------------------------

@pytest.mark.parametrize("agent_factor", [True, False])
def test_save_load_round_trip(tmp_path, cartpole, agent_factor):
    model, _ = fit_persim(cartpole, TINY, seed=0, agent_factor=agent_factor)
    model.save(tmp_path / "persim.pt")
    saved = torch.load(tmp_path / "persim.pt", weights_only=True)  # plain tensors and a JSON-able header
    assert saved["config"]["env"] == "cartpole" and saved["config"]["n_agents"] == cartpole.n_agents
    loaded = PerSimEnsemble.load(tmp_path / "persim.pt")
    obs = torch.as_tensor(cartpole.obs[:50]).expand(TINY.ensemble, -1, -1)
    action, agent = torch.as_tensor(cartpole.action[:50]), torch.as_tensor(cartpole.agent[:50])
    with torch.no_grad():
        assert torch.equal(model.step(obs, action, agent), loaded.step(obs, action, agent))
    np.testing.assert_array_equal(model.agent_factors(), loaded.agent_factors())


def test_load_rejects_other_files(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a saved PerSimEnsemble"):
        PerSimEnsemble.load(tmp_path / "other.pt")


def test_same_seed_same_weights_other_seed_other_weights(cartpole):
    def weights(seed):
        model, _ = fit_persim(cartpole, TINY, seed=seed, holdout=0.2)
        return model.state_dict()

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["agent_table"], other["agent_table"])


def test_holdout_reports_validation_loss_every_epoch(cartpole):
    seen = []
    spec = PersimSpec(**{**TINY.model_dump(), "epochs": 3, "lr_halving_epochs": 1})
    model, final = fit_persim(cartpole, spec, seed=0, holdout=0.2, on_epoch=lambda epoch, m: seen.append((epoch, m)))
    assert [epoch for epoch, _ in seen] == [0, 1, 2]
    assert all(np.isfinite(m["train_loss"]) and np.isfinite(m["val_loss"]) for _, m in seen)
    assert all(m["epoch_seconds"] > 0 for _, m in seen)
    assert [m["lr"] for _, m in seen] == [spec.lr, spec.lr / 2, spec.lr / 4]
    assert final["val_loss"] == seen[-1][1]["val_loss"] and final["fit_seconds"] > 0 and not model.training
    _, no_holdout = fit_persim(cartpole, TINY, seed=0)
    assert "val_loss" not in no_holdout
    # Given per env, only the env named with a period halves its rate.
    for halving, rates in (({"cartpole": 2, "mountaincar": None}, [1, 1, 0.5]), ({"cartpole": None}, [1, 1, 1])):
        seen.clear()
        fit_persim(cartpole, spec.model_copy(update={"lr_halving_epochs": halving}), seed=0,
                   on_epoch=lambda epoch, m: seen.append((epoch, m)))
        assert [m["lr"] for _, m in seen] == [spec.lr * rate for rate in rates]


def test_bootstrap_gives_each_member_its_own_resample(cartpole):
    """With one transition of the last agent, a member whose resample misses it never updates that agent's factor."""
    last = cartpole.n_agents - 1
    keep = (cartpole.agent != last) | (np.arange(len(cartpole)) == np.flatnonzero(cartpole.agent == last)[0])
    data = take_rows(cartpole, keep)
    spec = TINY.model_copy(update={"ensemble": 8, "epochs": 1})

    def last_agent_factor_moved(bootstrap):
        one, two = (fit_persim(data, spec.model_copy(update={"epochs": epochs, "bootstrap": bootstrap}),
                               seed=0)[0].agent_table[:, last] for epochs in (1, 2))
        return [not torch.equal(a, b) for a, b in zip(one, two)]

    assert all(last_agent_factor_moved(False))  # every member trains on every transition
    moved = last_agent_factor_moved(True)
    assert any(moved) and not all(moved), moved  # some members' resamples hold the row, some do not
    assert all(last_agent_factor_moved({"cartpole": False}))  # per env, as the other training settings


def test_no_agent_factor_shares_one_vector(cartpole):
    model, _ = fit_persim(cartpole, TINY, seed=0, agent_factor=False)
    factors = model.agent_factors()
    assert factors.shape == (TINY.ensemble, cartpole.n_agents, 3)
    assert np.all(factors == factors[:, :1])


def test_bad_input_fails_clearly(cartpole):
    with pytest.raises(ValueError, match="holdout"):
        fit_persim(cartpole, TINY, seed=0, holdout=1.0)
    broken = Transitions(**{**cartpole.__dict__, "covariates": cartpole.covariates[:2]})
    with pytest.raises(ValueError, match="agent ids"):
        fit_persim(broken, TINY, seed=0)


@pytest.mark.parametrize("env, state_hidden, agent_factor", [
    ("mountaincar", [256], True), ("cartpole", [64], True), ("halfcheetah", [32, 16], True),
    ("cartpole", [64], False), ("halfcheetah", [], False)])
def test_hand_written_gradients_equal_autograd(env, state_hidden, agent_factor):
    """``train_step`` (gradients by hand) and ``autograd_train_step`` take the same Adam steps, for discrete and
    continuous actions, deep and linear encoders, the ablation's shared factor, repeated agents in a batch."""
    spec = TINY.model_copy(update={"rank": 4, "state_hidden": {env: state_hidden}, "action_hidden": [16, 8]})
    by_hand = PerSimEnsemble.from_spec(spec, env, n_agents=7, seed=1, agent_factor=agent_factor)
    reference = copy.deepcopy(by_hand)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2, fused=True) for m in (by_hand, reference)]
    gen = torch.Generator().manual_seed(0)
    members, rows, dim = by_hand.n_members, 33, by_hand.obs_dim
    for _ in range(5):
        obs, target = torch.randn(members, rows, dim, generator=gen), torch.randn(members, rows, dim, generator=gen)
        agent = torch.randint(7, (members, rows), generator=gen)
        action = (torch.randint(by_hand.action_table.shape[1], (members, rows), generator=gen) if by_hand.discrete
                  else torch.randn(members, rows, 6, generator=gen))
        loss = train_step(by_hand, optimizers[0], obs, action, agent, target)
        expected = autograd_train_step(reference, optimizers[1], obs, action, agent, target)
        assert torch.allclose(loss, expected, rtol=1e-5)
    for (name, value), expected in zip(by_hand.named_parameters(), reference.parameters()):
        assert torch.allclose(value, expected, rtol=1e-4, atol=1e-6), name
        assert not torch.equal(value, PerSimEnsemble.from_spec(spec, env, 7, seed=1, agent_factor=agent_factor
                                                                ).state_dict()[name]), f"{name} never trained"
