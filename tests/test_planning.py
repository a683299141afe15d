"""The shared MPC planner and evaluation on ground-truth dynamics (no learning involved)."""
import numpy as np
import pytest
import torch

from persim_bench.algos.true_env import TrueEnvModel
from persim_bench.specs import EvaluationSpec, PlannerSpec
from persim_bench.data.behaviour import RandomPolicy, prediction_policy
from persim_bench.envs import get_env
from persim_bench.evaluate import as_simulator, episode_rewards, open_loop, plan_ranking, prediction_error
from persim_bench.planning import MPCPlanner


def _planner(env, **spec):
    family = get_env(env)
    covariates = np.asarray(family.test_agents)
    return family, covariates, MPCPlanner(family, TrueEnvModel(family, covariates), PlannerSpec(**spec), seed=0)


@pytest.mark.integration
def test_true_env_mpc_balances_cartpole_far_better_than_random():
    family, covariates, planner = _planner("cartpole", horizon={"cartpole": 15}, candidates={"cartpole": 100}, elites=10)
    planned = episode_rewards(planner.act, family, covariates, [1, 3], episodes=2, max_steps=100, seed=0)
    random_policy = RandomPolicy(family)
    rng = np.random.default_rng(0)
    baseline = episode_rewards(lambda obs, agent: random_policy.act(obs, rng), family, covariates, [1, 3], 2, 100, 0)
    assert planned["reward_mean"] >= 95 and baseline["reward_mean"] < 40


@pytest.mark.integration
def test_true_env_mpc_climbs_the_mountain():
    family, covariates, planner = _planner("mountaincar", horizon={"mountaincar": 30}, candidates={"mountaincar": 100}, elites=10)
    result = episode_rewards(planner.act, family, covariates, [0, 1], episodes=1, max_steps=400, seed=0)
    assert result["length_agent0"] < 150 and result["length_agent1"] < 150  # reached the goal
    random_policy, rng = RandomPolicy(family), np.random.default_rng(0)
    baseline = episode_rewards(lambda obs, agent: random_policy.act(obs, rng), family, covariates, [0, 1], 4, 400, 0)
    assert baseline["length_agent1"] == 400


def test_cem_moves_the_cheetah_forward():
    family, covariates, planner = _planner("halfcheetah", horizon={"halfcheetah": 8}, candidates={"halfcheetah": 40},
                                           elites=8, iterations=2)
    planned = episode_rewards(planner.act, family, covariates, [4], episodes=1, max_steps=40, seed=0)
    assert planned["reward_agent4"] > 5  # random actions give about -0.2 * 40


class _Lookup:
    """A two-member model whose position change depends on (member, action) through a table."""

    n_members = 2

    def __init__(self, table):
        self.table = torch.tensor(table, dtype=torch.float32)  # [members, actions]

    def step(self, obs, action, agent):
        moved = obs.clone()
        moved[..., 0] += self.table[:, action]
        return moved


@pytest.mark.parametrize("aggregate, expected_best", [("min", 1), ("mean", 0)])
def test_members_are_aggregated_by_min_or_mean(aggregate, expected_best):
    # MountainCar's planning bonus rewards the furthest x. Action 1 is great under member 0 and
    # slightly bad under member 1; action 0 is mildly good under both: min picks the safe one.
    family = get_env("mountaincar")
    model = _Lookup([[0.1, 1.0, 0.0], [0.1, -0.05, 0.0]])
    planner = MPCPlanner(family, model, PlannerSpec(aggregate=aggregate, elites=2, candidates=2), seed=0)
    candidates = torch.tensor([1, 0]).reshape(1, 2, 1)  # E=1 episode, K=2 candidates, H=1 step
    scores = planner.score(torch.tensor([[-0.5, 0.0]]), torch.tensor([0]), candidates)
    assert scores.shape == (1, 2)
    assert int(scores.argmax()) == expected_best


@pytest.mark.parametrize("runaway", [float("inf"), float("nan")])
def test_a_plan_whose_imagined_return_is_not_finite_is_never_picked(runaway):
    # Action 1 sends member 0's position to +inf (an overflowing model) or NaN: its return is +inf or
    # NaN, which topk would rank first; the planner scores it -inf, under both aggregates.
    family = get_env("mountaincar")
    model = _Lookup([[0.1, runaway, 0.0], [0.1, 0.2, 0.0]])
    for aggregate in ("min", "mean"):
        planner = MPCPlanner(family, model, PlannerSpec(aggregate=aggregate, elites=1, candidates=2), seed=0)
        scores = planner.score(torch.tensor([[-0.5, 0.0]]), torch.tensor([0]), torch.tensor([0, 1]).reshape(1, 2, 1))[0]
        assert scores[0].isfinite() and scores[1] == float("-inf")


class _BoxedLookup(_Lookup):
    """``_Lookup`` with the data range a fitted model records (position and velocity widths 1)."""

    data_low, data_high = torch.tensor([-1.0, -0.5]), torch.tensor([0.0, 0.5])


@pytest.mark.parametrize("penalty, expected_best", [(0.0, 1), (1.0, 0)])
def test_disagreement_penalty_prefers_the_plan_the_members_agree_on(penalty, expected_best):
    # Action 1 moves further under both members (min 0.2 against 0.1) but they disagree by 0.1 about
    # where; action 0 moves both by 0.1. The bonus gap (0.01 x 0.1) is far below the penalty's
    # (std 0.071 over a width of 1, averaged with the velocity's 0: 0.035 per unit of weight).
    family = get_env("mountaincar")
    model = _BoxedLookup([[0.1, 0.3, 0.0], [0.1, 0.2, 0.0]])
    planner = MPCPlanner(family, model, PlannerSpec(disagreement_penalty=penalty, elites=2, candidates=2), seed=0)
    scores = planner.score(torch.tensor([[-0.5, 0.0]]), torch.tensor([0]), torch.tensor([0, 1]).reshape(1, 2, 1))[0]
    assert int(scores.argmax()) == expected_best  # candidate k plans action k
    spread = torch.tensor([0.3, 0.2]).std() / 2  # the candidate's disagreement in units of the data range
    assert float(scores[0] - scores[1]) == pytest.approx(0.01 * -0.1 + penalty * float(spread), abs=1e-6)


def test_disagreement_penalty_needs_a_data_range_and_skips_a_single_model():
    family = get_env("mountaincar")
    with pytest.raises(ValueError, match="disagreement_penalty on mountaincar: the model records no data range"):
        MPCPlanner(family, _Lookup([[0.1], [0.2]]), PlannerSpec(disagreement_penalty=1.0, elites=2, candidates=2), seed=0)
    true_env = TrueEnvModel(family, np.asarray(family.test_agents))  # one member: nothing to disagree about
    assert MPCPlanner(family, true_env, PlannerSpec(disagreement_penalty={"mountaincar": 1.0}), seed=0).penalty == 0.0


def test_the_planning_bonus_counts_the_start_position():
    # The bonus is the furthest x of the imagined trajectory, its start included (authors' code):
    # plans that only fall back from the start earn the start's x, however far they fall, so the
    # planner is free to swing back for energy; a plan that rises earns its new height.
    family = get_env("mountaincar")
    model = _Lookup([[0.1, -0.1, -0.01], [0.1, -0.1, -0.01]])     # actions: rise, fall far, fall a little
    planner = MPCPlanner(family, model, PlannerSpec(gamma=1.0, elites=3, candidates=3), seed=0)
    candidates = torch.tensor([1, 2, 0]).reshape(1, 3, 1)
    scores = planner.score(torch.tensor([[0.3, 0.0]]), torch.tensor([0]), candidates)[0]
    expected = torch.tensor([-1 + 0.01 * 0.3, -1 + 0.01 * 0.3, -1 + 0.01 * 0.4])
    torch.testing.assert_close(scores, expected)


def test_prediction_error_of_the_true_model_is_zero_and_of_a_wrong_agent_is_not():
    family = get_env("cartpole")
    covariates = np.asarray(family.test_agents)
    policy = prediction_policy(family)
    exact = prediction_error(TrueEnvModel(family, covariates), family, covariates, [0, 4], policy, 6, 30, 5, seed=1)
    assert exact["rmse_agent0"] < 1e-5 and exact["r2_agent0"] > 0.999
    swapped = covariates[[4, 1, 2, 3, 0]]  # the model believes agent 0 is agent 4 and vice versa
    wrong = prediction_error(TrueEnvModel(family, swapped), family, covariates, [0, 4], policy, 6, 30, 5, seed=1)
    assert wrong["rmse_agent0"] > 1e-2 and wrong["r2_agent0"] < exact["r2_agent0"]
    assert exact["pred_trajectories_agent0"] == 6


@pytest.mark.parametrize("env", ["mountaincar", "halfcheetah"])
def test_plan_ranking_of_the_true_model_is_perfect_and_of_a_wrong_agent_is_not(env):
    family = get_env(env)
    covariates = np.asarray(family.test_agents)
    spec = PlannerSpec(horizon=30, candidates=30, elites=5)
    policy = prediction_policy(family)
    exact = plan_ranking(TrueEnvModel(family, covariates), family, covariates, [0, 4], policy, spec, 3, 20, 5, seed=0)
    for a in (0, 4):
        assert exact[f"plan_rank_agent{a}"] == pytest.approx(1.0) and exact[f"plan_regret_agent{a}"] == 0.0
    # agent 0 (MountainCar: gravity 0.0001; HalfCheetah: mass 0.3, damping 1.7) planned as agent 4 (0.0035; 1.0 / 1.0)
    swapped = covariates[[4, 1, 2, 3, 0]]
    wrong = plan_ranking(TrueEnvModel(family, swapped), family, covariates, [0, 4], policy, spec, 3, 20, 5, seed=0)
    assert wrong["plan_rank_agent0"] < 0.9 and wrong["plan_regret_agent0"] > 0.2


def test_plan_ranking_conditions_a_contextual_model_on_each_states_real_past():
    family = get_env("mountaincar")
    covariates = np.asarray(family.test_agents)

    class Contextual:  # knows which agent an episode is from how long its past is: a stand-in for CaDM's encoder
        n_members, history = 1, 3

        def __init__(self):
            self.true, self.pasts = TrueEnvModel(family, covariates), []

        def condition(self, obs, action):
            assert obs.shape[:2] == (2, action.shape[1] + 1)  # agents 0 and 4, every real step so far
            self.pasts.append(obs.shape[1])

        def step(self, obs, action, episode):
            return self.true.step(obs, action, torch.tensor([0, 4])[episode])

    model = Contextual()
    spec = PlannerSpec(horizon=30, candidates=30, elites=5)
    ranked = plan_ranking(model, family, covariates, [0, 4], prediction_policy(family), spec, 3, 30, 5, seed=0)
    assert model.pasts == [6, 16, 26]  # states at steps 5, 15, 25 of the test policy's episodes
    assert ranked["plan_rank_agent0"] == pytest.approx(1.0) and ranked["plan_regret_agent4"] == 0.0


def test_plan_ranking_is_blind_for_a_model_that_cannot_tell_plans_apart():
    """A MountainCar model in which the car never moves scores every plan alike (-1 a step, the start's
    height): it ranks nothing, and its pick (the first plan) is on average as far from the best as the mean plan."""
    family = get_env("mountaincar")
    covariates = np.asarray(family.test_agents)

    class Frozen:
        n_members = 1

        def step(self, obs, action, agent):
            return obs.clone()

    spec = PlannerSpec(horizon=30, candidates=30, elites=5)
    blind = plan_ranking(Frozen(), family, covariates, [1], prediction_policy(family), spec, 6, 30, 5, seed=0)
    assert np.isnan(blind["plan_rank_agent1"]) and 0.5 < blind["plan_regret_agent1"] < 2.0


class _Runaway:
    """MountainCar's true dynamics whose velocity error compounds: the way an over-fitted model diverges open loop."""

    n_members = 1

    def __init__(self, family, covariates):
        self.true = TrueEnvModel(family, covariates)

    def step(self, obs, action, agent):
        moved = self.true.step(obs, action, agent)
        moved[..., 1] = obs[..., 1] * 3 + 0.01
        return moved


def test_state_box_stops_a_diverging_model_and_leaves_a_right_one_alone():
    family = get_env("mountaincar")
    covariates = np.asarray(family.test_agents)
    policy, agents = prediction_policy(family), [0, 3]
    runaway = _Runaway(family, covariates)
    free = prediction_error(runaway, family, covariates, agents, policy, 4, 30, 5, seed=0)
    boxed_model = as_simulator(runaway, family, EvaluationSpec())
    boxed = prediction_error(boxed_model, family, covariates, agents, policy, 4, 30, 5, seed=0)
    assert free["rmse_agent0"] > 1e3 and boxed["rmse_agent0"] < 2.0  # the box's diagonal is 1.8
    start = np.tile(np.array([[-0.5, 0.0]], dtype=np.float32), (3, 1))
    path = open_loop(boxed_model, start, np.full((3, 20), 2), np.arange(3))
    assert (path >= np.array(family.state_low) - 1e-6).all() and (path <= np.array(family.state_high) + 1e-6).all()
    exact = prediction_error(as_simulator(TrueEnvModel(family, covariates), family, EvaluationSpec()), family,
                             covariates, agents, policy, 4, 30, 5, seed=0)
    assert exact["rmse_agent0"] < 1e-5 and exact["rmse_agent3"] < 1e-5  # real states never touch the clamp
    assert as_simulator(runaway, family, EvaluationSpec(clip_to_state_box=False)) is runaway
    cartpole = get_env("cartpole")
    assert as_simulator(runaway, cartpole, EvaluationSpec()) is runaway  # CartPole has no state box


# ---------------------------------------------------------------- finished episodes leave the batch


def _all_episodes_through(act, family, covariates, agents, episodes, max_steps, seed):
    """The reward loop as it was: every episode gets a decision until the last one ends."""
    rng = np.random.default_rng(seed)
    agent = np.repeat(np.asarray(agents), episodes)
    sim = family.batch(covariates[agent])
    obs = sim.reset(rng)
    returns, alive = np.zeros(len(agent)), np.ones(len(agent), dtype=bool)
    for _ in range(max_steps):
        obs, reward, terminated = sim.step(act(obs, agent))
        returns += reward * alive
        alive &= ~terminated
        if not alive.any():
            break
    return returns


class _Spy:
    """An ActFn with per-episode state that records the episodes of each call and forwards to a planner."""

    def __init__(self, planner):
        self.planner, self.calls = planner, []

    def act(self, obs, agent, episodes=None):
        self.calls.append(None if episodes is None else np.asarray(episodes).copy())
        assert len(obs) == len(agent) == (len(obs) if episodes is None else len(episodes))
        return self.planner.act(obs, agent, episodes=episodes)


@pytest.mark.integration
def test_shrinking_batch_gives_the_old_returns_when_no_episode_ends():
    spec = dict(horizon={"cartpole": 10}, candidates={"cartpole": 60}, elites=10)
    family, covariates, planner = _planner("cartpole", **spec)
    new = episode_rewards(planner.act, family, covariates, [1, 2, 3], episodes=2, max_steps=25, seed=4)
    assert all(new[f"length_agent{a}"] == 25 for a in (1, 2, 3))  # the premise: nobody fell
    _, _, old_planner = _planner("cartpole", **spec)
    old = _all_episodes_through(old_planner.act, family, covariates, [1, 2, 3], 2, 25, 4)
    returns = np.concatenate([new[f"episode_returns_agent{a}"] for a in (1, 2, 3)])
    np.testing.assert_array_equal(returns, old)
    torch.testing.assert_close(planner.previous, old_planner.previous, rtol=0, atol=0)  # the same plans throughout


@pytest.mark.integration
def test_planner_is_called_with_only_the_running_episodes():
    # MountainCar: the low-gravity agent 0 reaches the goal long before agents 3 and 4 (and than the cap).
    family, covariates, planner = _planner("mountaincar", horizon={"mountaincar": 30},
                                           candidates={"mountaincar": 60}, elites=10)
    spy = _Spy(planner)
    result = episode_rewards(spy.act, family, covariates, [0, 3, 4], episodes=2, max_steps=150, seed=0)
    lengths = np.repeat([result[f"length_agent{a}"] for a in (0, 3, 4)], 2)  # agent 0's two episodes may differ
    per_episode = -np.concatenate([result[f"episode_returns_agent{a}"] for a in (0, 3, 4)])  # -1 per step
    np.testing.assert_allclose(np.repeat(per_episode.reshape(3, 2).mean(1), 2), lengths)
    assert per_episode.min() < per_episode.max()  # episodes did end at different times
    for t, episodes in enumerate(spy.calls):
        np.testing.assert_array_equal(episodes, np.flatnonzero(per_episode > t))  # exactly the running ones
    assert len(spy.calls[-1]) < 6 and len(spy.calls) == per_episode.max()
    assert len(planner.previous) == len(spy.calls[-1]) and np.array_equal(planner.episodes, spy.calls[-1])


def test_stateless_policies_get_only_the_running_rows_too():
    family = get_env("cartpole")
    covariates = np.asarray(family.test_agents)
    rows = []

    def push_right(obs, agent):  # falls within about 10 steps, the strong-force agent 2 first
        assert obs.shape == (len(agent), family.obs_dim)
        rows.append(len(obs))
        return np.ones(len(obs), dtype=np.int64)

    result = episode_rewards(push_right, family, covariates, [0, 2], episodes=3, max_steps=50, seed=0)
    returns = np.concatenate([result[f"episode_returns_agent{a}"] for a in (0, 2)])
    assert rows[0] == 6 and rows == sorted(rows, reverse=True) and rows[-1] < 6
    assert rows == [int((returns > t).sum()) for t in range(len(rows))]  # CartPole pays 1 per step taken
    assert result["reward_agent2"] == pytest.approx(np.mean(result["episode_returns_agent2"]))
    assert len(result["episode_returns_agent0"]) == 3 and isinstance(result["episode_returns_agent0"][0], float)


def test_warm_start_follows_each_episode_through_a_shrinking_reordered_batch():
    family, covariates, planner = _planner("cartpole", horizon={"cartpole": 6}, candidates={"cartpole": 5}, elites=2)
    scored = []

    def score(obs, agent, actions):  # every candidate ties: argmax keeps candidate 0, the warm start
        scored.append(actions.clone())
        return torch.zeros(actions.shape[:2])

    planner.score = score
    obs = np.zeros((4, family.obs_dim), np.float32)
    planner.act(obs, np.arange(4))
    plans = planner.previous.clone()  # [4 episodes, H]: random, distinct per episode
    planner.act(obs[[3, 1]], np.array([3, 1]), episodes=np.array([3, 1]))
    torch.testing.assert_close(scored[-1][:, 0, :-1], plans[[3, 1], 1:])
    planner.act(obs[[1]], np.array([1]), episodes=np.array([1]))
    torch.testing.assert_close(scored[-1][0, 0, :-2], plans[1, 2:])


class _History:
    """A contextual model that only records what the planner conditions it on."""

    n_members, history = 1, 3

    def condition(self, obs, action):
        self.obs, self.action = obs.clone(), action.clone()

    def step(self, obs, action, episode):
        return obs + 1.0


def test_contextual_history_follows_the_episodes_that_keep_running():
    family = get_env("cartpole")
    model = _History()
    planner = MPCPlanner(family, model, PlannerSpec(horizon={"cartpole": 2}, candidates={"cartpole": 4}, elites=2), seed=0)
    obs = [np.arange(12, dtype=np.float32).reshape(3, 4) + 100 * t for t in range(3)]
    actions = [planner.act(obs[0], np.zeros(3)), planner.act(obs[1], np.zeros(3))]
    planner.act(obs[2][[2, 0]], np.zeros(2), episodes=np.array([2, 0]))
    np.testing.assert_array_equal(model.obs.numpy(), np.stack(obs, 1)[[2, 0]])
    np.testing.assert_array_equal(model.action.numpy(), np.stack(actions, 1)[[2, 0]])


def test_planner_refuses_rows_it_holds_no_state_for():
    family, covariates, planner = _planner("cartpole", horizon={"cartpole": 3}, candidates={"cartpole": 5}, elites=2)
    obs = np.zeros((3, family.obs_dim), np.float32)
    planner.act(obs, np.arange(3))
    with pytest.raises(ValueError, match="pass episodes"):
        planner.act(obs[:2], np.arange(2))  # which two?
    with pytest.raises(ValueError, match=r"\[5\]"):
        planner.act(obs[:2], np.arange(2), episodes=np.array([0, 5]))
    planner.reset()
    assert planner.act(obs[:2], np.arange(2)).shape == (2,)


@pytest.mark.parametrize("env, agent_factor", [("cartpole", True), ("halfcheetah", True), ("halfcheetah", False)])
def test_persim_planning_step_is_its_differentiable_step_in_a_reused_workspace(env, agent_factor):
    from persim_bench.algos.nets import STEP_CHUNK
    from persim_bench.algos.persim import PerSimEnsemble

    family = get_env(env)
    model = PerSimEnsemble(env, 20, 4, 3, [32, 48], [16], agent_factor=agent_factor).eval()
    with torch.no_grad():  # a non-trivial normaliser, as after fitting
        for name in ("obs_mean", "obs_std", "delta_mean", "delta_std"):
            getattr(model, name).copy_(torch.rand(family.obs_dim) + 0.5)
    gen = torch.Generator().manual_seed(0)
    for rows in (STEP_CHUNK + 37, 5):  # chunked, then smaller views of the same buffers
        obs = torch.randn(3, rows, family.obs_dim, generator=gen)
        action = (torch.randint(0, family.n_actions, (rows,), generator=gen) if family.discrete
                  else torch.rand(rows, family.action_dim, generator=gen) * 2 - 1)
        agent = torch.randint(0, 20, (rows,), generator=gen)
        expected = model.step(obs, action, agent)  # gradient on: the plain path through forward()
        with torch.no_grad():
            planned = model.step(obs, action, agent)
            again = model.step(obs, action, agent)
        torch.testing.assert_close(planned, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(planned, again) and planned.data_ptr() != again.data_ptr()  # results never share buffers
