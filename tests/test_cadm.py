"""CaDM's pieces are right, not just present: past-only contexts, PE-TS sampling, learning at all."""
import numpy as np
import pytest
import torch

from persim_bench.algos.nets import STEP_CHUNK
from persim_bench.algos.cadm import (CadmModel, context_pairs, episode_starts, fit_cadm, row_contexts,
                                     training_tensors)
from persim_bench.algos.cadm import CadmSpec
from persim_bench.specs import PlannerSpec
from persim_bench.data.behaviour import RandomPolicy
from persim_bench.data.dataset import Transitions
from persim_bench.envs import get_env
from offline_data import take_rows
from persim_bench.evaluate import prediction_error, record_test_trajectories
from persim_bench.planning import MPCPlanner

SMALL = CadmSpec(context_hidden=[32, 16], hidden=[64, 64], history=4, future=3, iterations=1,
                 epochs_per_iteration=1, pets_members=2, pets_particles=4)


def random_transitions(env: str, covariates: np.ndarray, steps: int, seed: int = 0) -> Transitions:
    """One random-action trajectory per row of ``covariates``, as the dataset stores them (sorted by agent, t)."""
    family = get_env(env)
    obs, actions, alive, agent = record_test_trajectories(
        family, covariates, list(range(len(covariates))), RandomPolicy(family), 1, steps, np.random.default_rng(seed))
    ran = alive[:, :-1]  # a step was taken from state t
    ended = ran & ~alive[:, 1:]
    rows = np.nonzero(ran)
    return Transitions(env, "random", agent[rows[0]], rows[1], obs[:, :-1][rows], actions[rows],
                       np.zeros(len(rows[0]), np.float32), obs[:, 1:][rows], ended[rows],
                       ran[rows] & ~ended[rows] & (rows[1] == steps - 1), covariates)


def test_pairs_pair_each_context_with_the_next_transitions_of_its_own_trajectory():
    data = random_transitions("mountaincar", np.tile(get_env("mountaincar").default_covariates, (2, 1)), 5)
    starts = episode_starts(data)
    source, target = context_pairs(starts, 3)
    pairs = set(zip(source.tolist(), target.tolist()))
    assert (0, 0) in pairs and (0, 2) in pairs and (0, 3) not in pairs
    assert (3, 4) in pairs and (4, 5) not in pairs  # row 5 starts the second agent's trajectory
    assert len(pairs) == 2 * (3 + 3 + 3 + 2 + 1)


def test_context_reads_only_the_past_of_its_own_trajectory():
    family = get_env("mountaincar")  # random MountainCar episodes never end early: rows 0-11 are agent 0
    data = random_transitions("mountaincar", np.tile(family.default_covariates, (2, 1)), 12)
    model = CadmModel.from_spec(SMALL, "mountaincar", probabilistic=False, seed=0)
    row = 6  # agent 0, t = 6: its window is t = 2..5

    def context_of_row(transitions: Transitions) -> torch.Tensor:
        tensors = training_tensors(model, transitions, SMALL.future)
        return row_contexts(model, tensors, torch.tensor([row]))[0, 0]

    base = context_of_row(data)
    for changed_row, should_change in ((row, False), (row + 3, False), (len(data) - 1, False),
                                       (row - 1, True), (row - 4, True), (row - 5, False)):
        edited = Transitions(**{**data.__dict__, "next_obs": data.next_obs.copy(), "action": data.action.copy()})
        edited.next_obs[changed_row] += 0.5
        edited.action[changed_row] = (edited.action[changed_row] + 1) % family.n_actions
        moved = not torch.allclose(context_of_row(edited), base)
        assert moved == should_change, f"editing row {changed_row} {'did not move' if should_change else 'moved'} the context"


def test_evaluation_context_equals_training_context_of_the_same_window():
    """condition() on a real episode's past gives the same context the training path computes for that row."""
    family = get_env("halfcheetah")
    data = random_transitions("halfcheetah", np.asarray([family.default_covariates]), 9)
    model = CadmModel.from_spec(SMALL, "halfcheetah", probabilistic=True, seed=0)
    tensors = training_tensors(model, data, SMALL.future)
    for t in (0, 2, 7):  # zero-padded, partly padded, full window
        expected = row_contexts(model, tensors, torch.tensor([t]))[:, 0]
        model.condition(torch.as_tensor(data.obs[:t + 1][None]), torch.as_tensor(data.action[:t][None]))
        torch.testing.assert_close(model.context[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_planner_conditions_on_the_real_episode_so_far():
    family = get_env("cartpole")
    model = CadmModel.from_spec(SMALL, "cartpole", probabilistic=False, seed=0)
    planner = MPCPlanner(family, model, PlannerSpec(horizon={"mountaincar": 3, "cartpole": 3, "halfcheetah": 3},
                                                    candidates=8, elites=2), seed=0)
    sim = family.batch(np.tile(family.default_covariates, (3, 1)))
    obs = [sim.reset(np.random.default_rng(0))]
    actions = []
    for _ in range(6):
        actions.append(planner.act(obs[-1], np.zeros(3, dtype=np.int64)))
        obs.append(sim.step(actions[-1])[0])
    planner.act(obs[-1], np.zeros(3, dtype=np.int64))  # conditions on the 4 latest real transitions
    seen = model.context.clone()
    model.condition(torch.as_tensor(np.stack(obs, 1)), torch.as_tensor(np.stack(actions, 1)))
    torch.testing.assert_close(seen, model.context)


@pytest.mark.integration
def test_pets_samples_spread_as_the_predicted_variance():
    family = get_env("halfcheetah")
    model = CadmModel.from_spec(SMALL, "halfcheetah", probabilistic=True, seed=3)
    model.delta_std.fill_(2.0)  # samples are de-normalised: variance scales by std^2
    model.condition(torch.zeros(1, 1, family.obs_dim), torch.zeros(1, 0, family.action_dim))
    rows = 20000
    obs = torch.randn(1, family.obs_dim).expand(model.n_members, rows, -1)
    action = torch.full((rows, family.action_dim), 0.3)
    delta = model.step(obs, action, torch.zeros(rows, dtype=torch.long)) - obs  # [P, rows, D]
    per = model.n_members // model.members
    mean, logvar = model.predict(model.forward_net, obs[:1, :1].expand(model.members, 1, -1),
                                 model.dynamics_action(model.action_features(action[:1])), model.context)
    for member in range(model.members):
        samples = delta[member * per:(member + 1) * per].reshape(-1, family.obs_dim)
        predicted_var = (torch.exp(logvar[member, 0]) * 4.0)
        torch.testing.assert_close(samples.var(dim=0) / predicted_var, torch.ones(family.obs_dim), atol=0.06, rtol=0)
        torch.testing.assert_close(samples.mean(dim=0), model.delta_mean + 2.0 * mean[member, 0],
                                   atol=float(4 * predicted_var.detach().sqrt().max() / np.sqrt(len(samples))), rtol=0)


@pytest.mark.parametrize("env", ["cartpole", "halfcheetah"])
def test_step_in_chunks_equals_one_pass(env):
    """The planner's step runs STEP_CHUNK rows per call (with in-place swish): same numbers as one pass."""
    family = get_env(env)
    model = CadmModel(env, members=2, particles=4, probabilistic=False, context_hidden=[16], hidden=[32, 32])
    history = torch.as_tensor(family.random_actions(np.random.default_rng(1), 3 * 4)).reshape(3, 4, *([] if family.discrete else [-1]))
    model.condition(torch.randn(3, 5, family.obs_dim), history)
    rows = STEP_CHUNK + 37  # x 2 particles per member: three chunks, the last one partial
    obs = torch.randn(4, rows, family.obs_dim)
    action = torch.as_tensor(family.random_actions(np.random.default_rng(0), rows))
    episode = torch.randint(0, 3, (rows,))
    next_obs = model.step(obs, action, episode)
    with torch.enable_grad():  # out-of-place swish, one call over all rows
        features = model.dynamics_action(model.action_features(action)).repeat(2, 1)
        mean, _ = model.predict(model.forward_net, obs.reshape(2, 2 * rows, -1), features,
                                model.context[:, episode].repeat(1, 2, 1))
    whole = obs + (model.delta_mean + model.delta_std * mean.detach()).reshape(4, rows, -1)
    torch.testing.assert_close(next_obs, whole)


@pytest.mark.parametrize("probabilistic", [False, True])
@pytest.mark.integration
def test_fitted_on_one_agent_it_predicts_that_agent(probabilistic):
    """On single-agent data CaDM must learn the dynamics: a poor score on heterogeneous data is then the method's."""
    family = get_env("cartpole")
    covariates = np.tile(family.default_covariates, (30, 1))
    data = random_transitions("cartpole", covariates, 100, seed=1)
    spec = SMALL.model_copy(update={"history": 10, "future": 10, "hidden": [128, 128], "context_hidden": [64, 32],
                                    "iterations": 4, "epochs_per_iteration": 4})
    model, metrics = fit_cadm(data, spec, seed=0, probabilistic=probabilistic)
    assert metrics["val_forward_mse"] < 0.05  # normalised delta: 1.0 is "knows nothing"
    result = prediction_error(model, family, covariates[:1], [0], RandomPolicy(family), 20, 20, 10, seed=5)
    assert result["rmse_agent0"] < 0.05 and result["r2_agent0"] > 0.9, result


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="multiple of pets_members"):
        CadmSpec(pets_members=3, pets_particles=20)
    with pytest.raises(ValueError, match="weight_decay needs an entry per hidden layer"):
        CadmSpec(hidden=[10] * 6)
    empty = random_transitions("cartpole", np.asarray([get_env("cartpole").default_covariates]), 3)
    empty = take_rows(empty, slice(0))
    with pytest.raises(ValueError, match="cartpole/random: no transitions"):
        fit_cadm(empty, SMALL, 0, probabilistic=False)


@pytest.mark.parametrize("valid_split", [0.0, 0.2])
def test_every_epoch_reports_its_losses_and_iteration(valid_split):
    """At paper size one iteration is an hour on a core: progress comes per epoch, the curve is the epochs run."""
    family = get_env("cartpole")
    data = random_transitions("cartpole", np.tile(family.default_covariates, (4, 1)), 30)
    spec = SMALL.model_copy(update={"iterations": 3, "epochs_per_iteration": 4, "valid_split": valid_split,
                                    "batch_size": 32})
    reports = []
    _, metrics = fit_cadm(data, spec, seed=0, probabilistic=False, on_epoch=lambda e, m: reports.append((e, m)))
    assert [epoch for epoch, _ in reports] == list(range(metrics["epochs"]))
    per_iteration = [sum(m["iteration"] == i for _, m in reports) for i in (1, 2, 3)]
    assert all(1 <= n <= 4 for n in per_iteration)
    if not valid_split:  # no validation split, no early stop: every epoch of every iteration
        assert per_iteration == [4, 4, 4] and "val_loss" not in reports[-1][1]
    else:
        assert all("val_loss" in m and np.isfinite(m["val_loss"]) for _, m in reports)
    assert reports[-1][1]["train_loss"] == metrics["train_loss"]
    assert all(m["epoch_seconds"] > 0 for _, m in reports)  # the rate of a long fit, live in MLflow


def test_a_trial_thread_computes_with_denormal_weights_flushed():
    """CaDM's weight decay drives dead units' weights denormal, and denormal operands make Intel's
    matrix products 3-19x slower (docs/benchmarks.md): a trial's thread flushes them to zero."""
    import threading

    from persim_bench.orchestration.trials import denormals_flushed, prepare_compute_thread, trial_numerics

    weights, inputs = torch.full((8, 8), 1e-39), torch.ones(8, 4)  # 1e-39: a float32 denormal
    assert (weights @ inputs).abs().min() > 0                     # IEEE: kept, products of 8e-39
    in_trial = []

    def trial_thread():
        prepare_compute_thread(1)
        in_trial.append((float((weights @ inputs).abs().max()), denormals_flushed()))

    worker = threading.Thread(target=trial_thread)
    worker.start()
    worker.join()
    assert in_trial == [(0.0, True)]
    assert not denormals_flushed()            # the flag is per thread: the caller's stays as it was
    with trial_numerics():                    # `persim-bench evaluate` scores as the trial computed
        assert float((weights @ inputs).abs().max()) == 0.0
    assert not denormals_flushed()
