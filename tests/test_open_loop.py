"""Open-loop predictions of every learned model stay on the scale of its data (HalfCheetah, smoke sizes).

Before the data box (``evaluation.clip_to_data_box``), PerSim fitted on 20 random HalfCheetah
trajectories of 100 steps predicted states of order 1e3 after 50 open-loop steps (1e15 in the
smoke grid): an over-fitted ReLU model extrapolates linearly once a state leaves the data, and
open loop feeds that back. The scale is the data's own: the RMS deviation of its states from
their mean, i.e. what predicting the data's mean state would score.
"""
import numpy as np
import pytest
import torch

from persim_bench.algos.cadm import fit_cadm
from persim_bench.algos.persim import fit_persim
from persim_bench.config import load_grid
from persim_bench.data.behaviour import prediction_policy
from persim_bench.data.generate import DatasetPlan, record_shard
from persim_bench.envs import get_env
from persim_bench.evaluate import as_simulator, open_loop, prediction_error
from persim_bench.specs import EvaluationSpec

FAMILY = get_env("halfcheetah")
# The stated bound: RMSE over 50 open-loop steps <= 2 x the data's state scale. PerSim sits at 1.49x (autograd
# training) and 1.52x (hand-written gradients: the same steps up to floating-point reordering, which 200 epochs
# of over-fitting amplify); without the box it is above 10x (the test below), and it was 1e15 before it.
SCALE_MULTIPLE = 2.0


@pytest.fixture(scope="module")
def data():
    plan = DatasetPlan("halfcheetah", "random", "test", seed=0, n_agents=20, episode_steps=100, agents_per_shard=20)
    return record_shard(plan, 0)


def _fit(name, data):
    torch.manual_seed(0)
    smoke = load_grid("smoke")
    if name == "persim":  # long enough to over-fit 2,000 transitions: the smoke grid's failure
        return fit_persim(data, smoke.persim.model_copy(update={"rank": 5, "epochs": 200, "ensemble": 2}), 0)[0]
    return fit_cadm(data, smoke.cadm.model_copy(update={"iterations": 2}), 0, probabilistic=name == "cadm_pets")[0]


@pytest.mark.integration
@pytest.mark.parametrize("name", ["persim", "cadm_vanilla", "cadm_pets"])
def test_open_loop_rmse_stays_within_a_multiple_of_the_data_scale(data, name):
    model = _fit(name, data)
    scale = float(np.sqrt(data.obs.var(axis=0).mean()))
    covariates = np.asarray(FAMILY.test_agents)
    metrics = prediction_error(as_simulator(model, FAMILY, EvaluationSpec()), FAMILY, covariates, [0, 1, 2, 3, 4],
                               prediction_policy(FAMILY), 4, 50, 10, seed=0)
    assert metrics["rmse_mean"] <= SCALE_MULTIPLE * scale, (metrics["rmse_mean"], scale)

    boxed = as_simulator(model, FAMILY, EvaluationSpec())
    margin = 0.1 * (model.data_high - model.data_low)
    start = np.repeat(data.obs[:1], 3, axis=0)
    if hasattr(model, "condition"):
        model.condition(torch.as_tensor(data.obs[None, :1]).repeat(3, 1, 1), torch.zeros(3, 0, FAMILY.action_dim))
    path = torch.as_tensor(open_loop(boxed, start, np.ones((3, 50, FAMILY.action_dim), np.float32), np.arange(3)))
    assert torch.isfinite(path).all()
    assert (path >= model.data_low - margin - 1e-4).all() and (path <= model.data_high + margin + 1e-4).all()


@pytest.mark.integration
def test_persim_runs_away_without_the_box_and_the_option_turns_it_off(data):
    model = _fit("persim", data)
    assert as_simulator(model, FAMILY, EvaluationSpec(clip_to_data_box=False)) is model  # HalfCheetah has no env box
    free = prediction_error(model, FAMILY, np.asarray(FAMILY.test_agents), [0, 2], prediction_policy(FAMILY), 4, 50, 10,
                            seed=0)
    assert free["rmse_mean"] > 10 * np.sqrt(data.obs.var(axis=0).mean())  # why the box exists (paper: no box)


def test_an_unfitted_model_has_no_data_box():
    from persim_bench.algos.persim import PerSimEnsemble

    model = PerSimEnsemble("halfcheetah", n_agents=3, rank=2, n_members=1, state_hidden=[8], action_hidden=[8])
    assert as_simulator(model, FAMILY, EvaluationSpec()) is model
