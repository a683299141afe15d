"""Models, planner and evaluation run on the model's device and cross to the host only at the edges.

The CPU tests check the same code path the GPU takes (which device is chosen, and that a
decision or an open-loop prediction copies data in and out once, not per step); the tests
marked ``cuda`` run it on a GPU and are skipped without one.
"""
import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from persim_bench.algos.cadm import CadmModel, CadmSpec, fit_cadm
from persim_bench.algos.persim import PerSimEnsemble, PersimSpec, fit_persim
from persim_bench.algos.true_env import TrueEnvModel
from persim_bench.specs import PlannerSpec
from persim_bench.data.behaviour import RandomPolicy
from persim_bench.envs import get_env
from persim_bench.evaluate import episode_rewards, open_loop, prediction_error
from persim_bench.planning import MPCPlanner, model_device



def on_cuda(test):
    """Marks a test ``cuda`` and skips it where torch sees no CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


SMALL_CADM = CadmSpec(context_hidden=[16], hidden=[32, 32], history=3, future=2, iterations=1,
                      epochs_per_iteration=1, pets_members=2, pets_particles=4)
TINY_PERSIM = PersimSpec(ensemble=2, epochs=1, batch_size=64, state_hidden=[16], action_hidden=[16], rank=3)


def _persim(env: str) -> PerSimEnsemble:
    return PerSimEnsemble(env, 5, 3, 2, [32], [16]).eval()


def _planner_spec(horizon: int) -> PlannerSpec:
    return PlannerSpec(horizon=horizon, candidates=16, elites=4, iterations=1)


class _Forwarding:
    """Wraps a model and forwards everything but ``step`` (as evaluate's row-counting wrapper does)."""

    def __init__(self, model):
        self.model = model

    def step(self, obs, action, agent):
        return self.model.step(obs, action, agent)

    def __getattr__(self, name):
        return getattr(self.model, name)


class _Crossings(TorchFunctionMode):
    """Counts calls that move data between host and device: tensors made from host data, and reads back."""

    INTO = {"as_tensor", "tensor", "from_numpy"}
    OUT = {"cpu", "cuda", "numpy", "item", "tolist"}

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        moves = name == "to" and ("device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:]))
        if name in self.INTO | self.OUT or moves:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **kwargs)


def test_the_planner_runs_where_its_model_is():
    family = get_env("cartpole")
    persim = _persim("cartpole")
    assert model_device(persim) == torch.device("cpu") == model_device(_Forwarding(persim))
    true_env = TrueEnvModel(family, np.asarray(family.test_agents))
    assert model_device(true_env) == torch.device("cpu") == model_device(_Forwarding(true_env))
    assert model_device(object()) == torch.device("cpu")
    meta = PerSimEnsemble("cartpole", 5, 3, 2, [8], [8]).to("meta")  # any device the model is on
    assert model_device(meta) == torch.device("meta") == model_device(_Forwarding(meta))
    planner = MPCPlanner(family, persim, _planner_spec(3), seed=0)
    assert planner.device == torch.device("cpu") and planner.generator.device == torch.device("cpu")
    assert MPCPlanner(family, true_env, _planner_spec(3), seed=0, device="cpu").generator.device.type == "cpu"


@pytest.mark.parametrize("env", ["cartpole", "halfcheetah"])  # random shooting and CEM
def test_a_decision_copies_the_observations_in_and_the_actions_out_once(env):
    family = get_env(env)
    obs = np.random.default_rng(0).normal(size=(3, family.obs_dim)).astype(np.float32)
    counts = []
    for horizon in (2, 5):  # per-step copies would grow with the horizon
        planner = MPCPlanner(family, _persim(env), _planner_spec(horizon), seed=0)
        planner.act(obs, np.arange(3))  # the second decision also warm-starts
        with _Crossings() as crossings:
            actions = planner.act(obs, np.arange(3))
        counts.append(crossings.calls)
    assert counts[0] == counts[1] == {"as_tensor": 2, "cpu": 1, "numpy": 1}  # obs and agent in; actions out
    assert actions.shape == ((3,) if family.discrete else (3, family.action_dim))


def test_open_loop_copies_inputs_in_and_predictions_out_once():
    family = get_env("halfcheetah")
    rng = np.random.default_rng(0)
    start, actions = rng.normal(size=(4, family.obs_dim)).astype(np.float32), rng.uniform(-1, 1, (4, 7, 6)).astype(np.float32)
    with _Crossings() as crossings:
        predicted = open_loop(_persim("halfcheetah"), start, actions, np.arange(4))
    assert crossings.calls == {"as_tensor": 3, "cpu": 1, "numpy": 1} and predicted.shape == (4, 7, family.obs_dim)


def _data(env: str):
    from persim_bench.data.generate import DatasetPlan, record_shard

    return record_shard(DatasetPlan(env=env, regime="random", grid="test", seed=0, n_agents=6, episode_steps=30, agents_per_shard=6), 0)


def test_fit_cadm_takes_a_device_and_trains_there():
    data = _data("mountaincar")
    default, metrics = fit_cadm(data, SMALL_CADM, seed=1, probabilistic=True)
    on_cpu, cpu_metrics = fit_cadm(data, SMALL_CADM, seed=1, probabilistic=True, device="cpu")
    assert metrics["train_loss"] == cpu_metrics["train_loss"]
    for (name, a), b in zip(default.state_dict().items(), on_cpu.state_dict().values()):
        assert a.device.type == "cpu" and torch.equal(a, b), name


# ---------------------------------------------------------------- on a GPU


@pytest.mark.parametrize("env", ["mountaincar", "halfcheetah"])
@on_cuda
def test_cuda_planner_draws_and_scores_on_the_gpu_without_syncing(env):
    family = get_env(env)
    model = _persim(env).to("cuda")
    planner = MPCPlanner(family, model, _planner_spec(4), seed=0)
    assert planner.device.type == "cuda" and planner.generator.device.type == "cuda"
    obs = torch.randn(3, family.obs_dim, device="cuda")
    agent = torch.arange(3, device="cuda")
    planner._plan(obs, agent, None)  # warm up (lazy CUDA init may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host round trip inside planning raises
    try:
        plans = planner._plan(obs, agent, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert plans.device.type == "cuda"
    actions = planner.act(obs.cpu().numpy(), np.arange(3))
    assert isinstance(actions, np.ndarray) and len(actions) == 3


@on_cuda
def test_cuda_open_loop_and_prediction_error_match_the_cpu():
    family = get_env("cartpole")
    model = _persim("cartpole")
    rng = np.random.default_rng(0)
    start, actions = rng.normal(size=(4, 4)).astype(np.float32), rng.integers(0, 2, (4, 6))
    on_cpu = open_loop(model, start, actions, np.arange(4))
    on_gpu = open_loop(model.to("cuda"), start, actions, np.arange(4))
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-4, atol=1e-5)
    covariates = np.asarray(family.test_agents)
    metrics = prediction_error(model, family, covariates, [0, 1], RandomPolicy(family), 3, 5, 2, seed=0)
    assert np.isfinite(metrics["rmse_mean"])


@on_cuda
def test_cuda_cadm_trains_conditions_samples_and_plans_on_the_gpu():
    data = _data("cartpole")
    model, metrics = fit_cadm(data, SMALL_CADM, seed=0, probabilistic=True, device="cuda")
    assert all(p.device.type == "cuda" for p in model.parameters()) and np.isfinite(metrics["train_loss"])
    family = get_env("cartpole")
    model.condition(torch.randn(2, 4, 4), torch.randint(0, 2, (2, 3)))  # host inputs are moved
    assert model.context.device.type == "cuda"
    nxt = model.step(torch.randn(model.n_members, 6, 4, device="cuda"), torch.randint(0, 2, (6,), device="cuda"),
                     torch.tensor([0, 1, 0, 1, 0, 1], device="cuda"))
    assert nxt.device.type == "cuda" and model.noise.device.type == "cuda"
    planner = MPCPlanner(family, model, _planner_spec(3), seed=0)
    result = episode_rewards(planner.act, family, np.asarray(family.test_agents), [0, 1], 2, 5, seed=0)
    assert len(result["episode_returns_agent0"]) == 2


@on_cuda
def test_cuda_persim_fits_and_plans_on_the_gpu():
    data = _data("mountaincar")
    model, metrics = fit_persim(data, TINY_PERSIM, seed=0, device="cuda")
    assert all(p.device.type == "cuda" for p in model.parameters()) and np.isfinite(metrics["train_loss"])
    family = get_env("mountaincar")
    planner = MPCPlanner(family, model, _planner_spec(5), seed=0)
    result = episode_rewards(planner.act, family, np.asarray(family.test_agents), [0, 1], 2, 10, seed=0)
    assert result["length_agent0"] == 10


@pytest.mark.parametrize("env", ["mountaincar", "cartpole", "halfcheetah"])
def test_models_and_scoring_make_no_tensor_off_their_device(env):
    # On the "meta" device (shapes only) a CPU tensor made inside would raise on first use with a meta one.
    family = get_env(env)
    meta = torch.device("meta")
    action = (torch.zeros(12, dtype=torch.long, device=meta) if family.discrete
              else torch.zeros(12, family.action_dim, device=meta))
    persim = PerSimEnsemble(env, 5, 3, 2, [16], [16]).to(meta)
    assert persim.step(torch.zeros(2, 12, family.obs_dim, device=meta), action,
                       torch.zeros(12, dtype=torch.long, device=meta)).device == meta
    cadm = CadmModel(env, 2, 2, False, history=3, context_hidden=[8], hidden=[8]).to(meta)
    past = torch.zeros(3, 2, dtype=torch.long) if family.discrete else torch.zeros(3, 2, family.action_dim)
    cadm.condition(torch.zeros(3, 3, family.obs_dim), past)  # host inputs move to the model
    assert cadm.context.device == meta
    assert cadm.step(torch.zeros(2, 12, family.obs_dim, device=meta), action,
                     torch.zeros(12, dtype=torch.long, device=meta)).device == meta
    planner = MPCPlanner(family, persim, _planner_spec(3), seed=0, device="cpu")  # no generator on meta
    candidates = action.reshape(1, 12, *action.shape[1:])[:, :, None].expand(1, 12, 3, *action.shape[1:])
    scores = planner.score(torch.zeros(1, family.obs_dim, device=meta), torch.zeros(1, dtype=torch.long, device=meta),
                           candidates)
    assert scores.shape == (1, 12) and scores.device == meta
