"""A fit stopped after any epoch and resumed from its checkpoint ends exactly where the uninterrupted fit ends."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from persim_bench.algos.cadm import CadmSpec, fit_cadm
from persim_bench.algos.persim import PersimSpec, fit_persim
from persim_bench.contracts import Checkpoints
from persim_bench.envs import get_env

from test_cadm import random_transitions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def through_disk(state: dict) -> dict:
    """What a restarted trial reads back: the state saved by torch and loaded without unpickling code."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def fit_stopped_and_resumed(fit, stop_after: int):
    """(the uninterrupted fit's weights and metrics, the resumed one's, every state offered)."""
    saved = []  # state_dict() shares the live weights' storage: a saver writes it at once, as this copy does
    whole, whole_metrics = fit(Checkpoints(save=lambda state: saved.append(through_disk(state)), every_seconds=0.0))
    resumed, resumed_metrics = fit(Checkpoints(resume=saved[stop_after], save=lambda state: None))
    return (whole.state_dict(), whole_metrics), (resumed.state_dict(), resumed_metrics), saved


def assert_same(first: tuple, second: tuple) -> None:
    (weights, metrics), (weights_again, metrics_again) = first, second
    assert weights.keys() == weights_again.keys()
    assert all(torch.equal(weights[name], weights_again[name]) for name in weights)
    assert {k: v for k, v in metrics.items() if k != "fit_seconds"} == {
        k: v for k, v in metrics_again.items() if k != "fit_seconds"}


def cartpole_data():
    default = np.asarray(get_env("cartpole").default_covariates)
    return random_transitions("cartpole", default * np.random.default_rng(0).uniform(0.8, 1.2, (6, len(default))), 30)


@pytest.mark.parametrize("stop_after", [0, 2])
def test_persim_resumes_exactly(stop_after):
    data = cartpole_data()
    spec = PersimSpec(rank=2, epochs=4, ensemble=2, state_hidden=[16], action_hidden=[16], batch_size=32,
                      lr_halving_epochs=1)
    whole, resumed, saved = fit_stopped_and_resumed(
        lambda checkpoints: fit_persim(data, spec, seed=3, holdout=0.2, checkpoint=checkpoints), stop_after)
    assert [state["epoch"] for state in saved] == [0, 1, 2, 3]
    assert_same(whole, resumed)


@pytest.mark.parametrize("probabilistic", [False, True])
def test_cadm_resumes_exactly(probabilistic):
    data = cartpole_data()
    spec = CadmSpec(context_hidden=[8], hidden=[16], history=3, future=2, iterations=3, epochs_per_iteration=2,
                    batch_size=32, pets_members=2, pets_particles=2)
    whole, resumed, saved = fit_stopped_and_resumed(
        lambda checkpoints: fit_cadm(data, spec, 5, probabilistic, checkpoint=checkpoints), 1)
    assert [state["iteration"] for state in saved] == [0, 1, 2]
    assert_same(whole, resumed)


def test_a_checkpoint_is_built_only_when_due_and_always_at_the_end():
    built, saved = [], []

    def state():
        built.append(1)
        return {"n": len(built)}

    checkpoints = Checkpoints(save=saved.append, every_seconds=3600)
    for epoch in range(5):
        checkpoints.offer(state, last=epoch == 4)
    assert saved == [{"n": 1}] and len(built) == 1  # the last epoch's, and no state built before
    Checkpoints().offer(state, last=True)  # no saver (outside a trial): nothing happens
    assert len(built) == 1


def test_d3rlpy_policies_resume_past_what_they_finished(tmp_path):
    """BCQ-A, two per-agent policies: resumed mid-way through the second, the first is restored as it was
    and the second continues from its epoch; a policy saved to files reloads to the same actions."""
    from persim_bench.algos.bcq import BCQSpec, act_with_more_samples, make_bcq
    from persim_bench.algos.d3rlpy_common import D3rlpyPolicy, fit_policies, load_policies, load_weights, save_policies
    from persim_bench.data.formats import to_mdp_dataset

    data = cartpole_data()
    spec = BCQSpec(steps=30, steps_per_epoch=10, discrete_hidden=[16], act_samples=5)
    saved = []

    def fit(checkpoints, epochs):
        return fit_policies(data, make_bcq, spec, 0, tmp_path, "bcq_a", [0, 1],
                            on_epoch=lambda epoch, m: epochs.append(epoch), before_acting=act_with_more_samples,
                            checkpoint=checkpoints)

    whole_epochs, resumed_epochs = [], []
    whole, _ = fit(Checkpoints(save=lambda state: saved.append(through_disk(state)), every_seconds=0.0), whole_epochs)
    mid_second = next(state for state in saved if state.get("policy") == "agent1" and state["epoch"] == 0)
    assert set(mid_second["done"]) == {"agent0"}
    resumed, _ = fit(Checkpoints(resume=mid_second), resumed_epochs)
    assert whole_epochs == [1, 2, 3, 4, 5, 6] and resumed_epochs == [5, 6]  # agent 1's epochs 2 and 3 only
    probe = torch.as_tensor(data.obs[:16]).numpy()
    assert (resumed.algos[0].predict(probe) == whole.algos[0].predict(probe)).all()

    files = save_policies(whole, tmp_path / "model")
    assert sorted(path.name for path in files) == ["agent0.d3rlpy", "agent1.d3rlpy"]
    algos = {}
    for label, weights in load_policies(tmp_path / "model", "cpu").items():
        algos[int(label.removeprefix("agent"))] = algo = make_bcq(spec, True, "cpu")
        load_weights(algo, to_mdp_dataset(data, [int(label.removeprefix("agent"))]), weights)
    again = D3rlpyPolicy("cartpole", algos, 0)
    assert all((again.algos[a].predict(probe) == whole.algos[a].predict(probe)).all() for a in (0, 1))
