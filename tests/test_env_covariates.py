"""Hostile covariates are refused with one clear line; every accepted agent simulates finite numbers.

Each family accepts the closed box ``covariate_valid`` (wider than the paper's sampling box) and
nothing else, through ``gymnasium.make``, ``family.batch`` and ``family.true_dynamics``. The corners
of that box run 1000 steps without a NaN/inf, and an unstable HalfCheetah state never floods stderr
with MuJoCo warnings nor writes MUJOCO_LOG.TXT.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import subprocess
import sys

import gymnasium
import numpy as np
import pytest
import torch

from persim_bench.envs import ENVS, CovariateError, covariate_ranges_markdown, get_env, halfcheetah
from persim_bench.errors import BenchError

FAMILIES = list(ENVS.values())
COVARIATES = [(family, j) for family in FAMILIES for j in range(len(family.covariate_names))]
COVARIATE_IDS = [f"{family.name}-{family.covariate_names[j]}" for family, j in COVARIATES]
BAD_VALUES = {"zero": 0.0, "negative": -1.0, "nan": math.nan, "inf": math.inf, "minus_inf": -math.inf, "huge": 1e9}


def _row(family, j: int, value: float) -> list[float]:
    """The default agent with covariate j set to value."""
    row = list(family.default_covariates)
    row[j] = value
    return row


def _assert_names(error: pytest.ExceptionInfo, family, *names: str) -> str:
    message = str(error.value)
    assert isinstance(error.value, ValueError) and isinstance(error.value, BenchError)
    assert "\n" not in message and message.startswith(f"{family.gym_id}: ")
    for name in names:
        assert name in message
    return message


def _assert_refused_value(error: pytest.ExceptionInfo, family, j: int, value: float) -> None:
    name = family.covariate_names[j]
    low, high = family.covariate_valid[j]
    message = _assert_names(error, family, name)
    assert f"{name}={float(value)!r}" in message
    assert f"{low:g} <= {name} <= {high:g}" in message


# --- refused -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
@pytest.mark.parametrize("family, j", COVARIATES, ids=COVARIATE_IDS)
def test_gymnasium_make_refuses_bad_covariates(family, j, bad):
    with pytest.raises(CovariateError) as error:
        gymnasium.make(family.gym_id, **{family.covariate_names[j]: bad})
    _assert_refused_value(error, family, j, bad)


@pytest.mark.parametrize("bad", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
@pytest.mark.parametrize("family, j", COVARIATES, ids=COVARIATE_IDS)
def test_batch_refuses_bad_covariates(family, j, bad):
    with pytest.raises(CovariateError) as error:
        family.batch(np.array([_row(family, j, bad)]))
    _assert_refused_value(error, family, j, bad)
    assert "agent" not in str(error.value), "one agent: no index to name"


@pytest.mark.parametrize("family, j", COVARIATES, ids=COVARIATE_IDS)
def test_the_bounds_are_closed(family, j):
    low, high = family.covariate_valid[j]
    family.batch(np.array([_row(family, j, low), _row(family, j, high)]))
    for outside in (np.nextafter(low, -np.inf), np.nextafter(high, np.inf)):
        with pytest.raises(CovariateError) as error:
            family.batch(np.array([_row(family, j, outside)]))
        _assert_refused_value(error, family, j, outside)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_a_bad_agent_in_a_batch_is_named(family):
    rows = np.array(family.test_agents, dtype=np.float64)
    rows[3, -1] = math.nan
    with pytest.raises(CovariateError) as error:
        family.batch(rows)
    _assert_names(error, family, family.covariate_names[-1], f"agent 3 of {len(rows)}")


def _wrong_shapes(family) -> dict[str, object]:
    c = len(family.covariate_names)
    default = np.asarray(family.default_covariates)
    return {
        "flat_row": default,
        "scalar": np.float64(default[0]),
        "extra_column": np.tile(np.append(default, 1.0), (3, 1)),
        "missing_column": np.ones((3, c - 1)),
        "three_d": np.tile(default, (2, 3, 1)),
        "ragged": [list(default), list(default) + [1.0]],
        "not_numbers": [["a"] * c],
        "none": None,
    }


@pytest.mark.parametrize("shape", list(_wrong_shapes(FAMILIES[0])))
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_batch_refuses_a_wrong_shape(family, shape):
    with pytest.raises(CovariateError) as error:
        family.batch(_wrong_shapes(family)[shape])
    _assert_names(error, family, *family.covariate_names)


@pytest.mark.parametrize("value", [[0.5, 0.6], np.array([1.0]), "heavy", None], ids=["list", "array", "string", "none"])
@pytest.mark.parametrize("family, j", COVARIATES, ids=COVARIATE_IDS)
def test_gymnasium_make_refuses_a_covariate_that_is_not_one_number(family, j, value):
    name = family.covariate_names[j]
    with pytest.raises(CovariateError) as error:
        gymnasium.make(family.gym_id, **{name: value})
    assert f"{name} must be a single number" in _assert_names(error, family, name)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_true_dynamics_checks_its_covariates(family):
    j = len(family.covariate_names) - 1
    with pytest.raises(CovariateError) as error:
        family.true_dynamics(np.array([family.default_covariates, _row(family, j, -1.0)]))
    _assert_names(error, family, family.covariate_names[j], "agent 1 of 2")
    with pytest.raises(CovariateError):  # two agents' worth of values, flat: ambiguous
        family.true_dynamics(np.tile(family.default_covariates, 2))
    family.true_dynamics(np.asarray(family.default_covariates))  # a flat [C] is one agent


# --- accepted ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_the_accepted_box_is_finite_positive_and_holds_every_paper_agent(family):
    c = len(family.covariate_names)
    assert len(family.covariate_valid) == c
    for (low, high), s_low, s_high in zip(family.covariate_valid, family.covariate_low, family.covariate_high):
        assert 0 < low < high < math.inf
        assert low <= s_low <= s_high <= high, "the sampling box lies inside the accepted one"
    corners = list(itertools.product(*zip(family.covariate_low, family.covariate_high)))
    agents = [family.default_covariates, *family.test_agents, *family.policy_agents, *corners]
    table = family.check_covariates(np.array(agents))
    assert table.dtype == np.float64 and table.shape == (len(agents), c)
    family.batch(np.array(agents)).reset(np.random.default_rng(0))
    family.true_dynamics(np.array(agents))
    for agent in [*family.test_agents, *family.policy_agents]:
        env = gymnasium.make(family.gym_id, **dict(zip(family.covariate_names, agent)))
        assert env.unwrapped.covariates == tuple(float(v) for v in agent)
        env.close()


def _extreme_actions(family, policy: str, rng: np.random.Generator, obs: np.ndarray, t: int) -> np.ndarray:
    n = len(obs)
    if family.discrete:
        if policy == "random":
            return rng.integers(0, family.n_actions, n)
        if policy == "push":  # always the last action: full right (MountainCar), right (CartPole)
            return np.full(n, family.n_actions - 1)
        # swing: follow the velocity (MountainCar pumps energy; CartPole chases its pole angle)
        return np.where(obs[:, 1 if family.name == "mountaincar" else 2] > 0, family.n_actions - 1, 0)
    if policy == "random":
        return rng.uniform(-1.0, 1.0, (n, family.action_dim))
    if policy == "push":
        return np.ones((n, family.action_dim))
    return np.sign(rng.uniform(-1.0, 1.0, (n, family.action_dim))) * (1 if (t // 10) % 2 else -1)  # bang-bang


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_the_corners_of_the_accepted_box_run_1000_steps_finite(family):
    """Every corner, under random, constant and bang-bang actions, stepped on past termination, no reset."""
    corners = np.array(list(itertools.product(*family.covariate_valid)), dtype=np.float64)
    policies = ["random", "push", "swing"]
    sim = family.batch(np.repeat(corners, len(policies), axis=0))
    rng = np.random.default_rng(0)
    obs = sim.reset(rng)
    warnings_before = sum(halfcheetah.mujoco_warning_counts().values())
    actions = family.random_actions(rng, sim.n)
    for t in range(1000):
        for i, policy in enumerate(policies):  # row r: corner r // 3 under policy r % 3
            actions[i::len(policies)] = _extreme_actions(family, policy, rng, obs[i::len(policies)], t)
        obs, reward, _ = sim.step(actions)
        assert np.isfinite(obs).all() and np.isfinite(reward).all(), f"step {t}"
    assert sum(halfcheetah.mujoco_warning_counts().values()) == warnings_before


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_true_dynamics_at_the_corners_stays_finite(family):
    """The planner's float32 ground truth at the corners, 200 steps of random actions."""
    corners = np.array(list(itertools.product(*family.covariate_valid)), dtype=np.float64)
    dynamics = family.true_dynamics(corners)
    rng = np.random.default_rng(1)
    obs = torch.from_numpy(family.batch(corners).reset(rng))
    agent = torch.arange(len(corners))
    for _ in range(200):
        obs = dynamics(obs, torch.from_numpy(family.random_actions(rng, len(corners))), agent)
        assert torch.isfinite(obs).all()


def test_a_state_that_overflows_is_an_error_not_data():
    family = get_env("cartpole")
    sim = family.batch(np.array([family.default_covariates, family.default_covariates]))
    sim.reset(np.random.default_rng(0))
    sim.state[1] = 1e300  # only a state set from outside gets here
    with pytest.raises(FloatingPointError, match=r"^persim/CartPole-v0: agent 1 \(length=0\.5, force=10\) "):
        sim.step(np.array([0, 1]))


def test_a_halfcheetah_model_gone_bad_is_an_error_not_data(caplog):
    caplog.set_level(logging.DEBUG, logger=halfcheetah.__name__)
    sim = get_env("halfcheetah").batch(np.array([(1.0, 1.0), (1.0, 1.0)]))
    sim.reset(np.random.default_rng(0))
    sim.models[1].body_mass[:] *= -1  # what a refused mass would do
    with pytest.raises(FloatingPointError, match="agent 1 .* non-finite state"):
        sim.step(np.zeros((2, 6)))


def test_set_state_refuses_non_finite_states():
    sim = get_env("halfcheetah").batch(np.array([(1.0, 1.0)]))
    with pytest.raises(ValueError, match="non-finite"):
        sim.set_state(np.zeros((1, 9)), np.full((1, 9), np.nan))


# --- MuJoCo warnings -----------------------------------------------------------------------------------

# A valid but deliberately unstable cheetah: the lightest, least damped agent kicked to an absurd joint
# velocity before every one of 1000 steps, so MuJoCo warns (and resets the agent) on every step.
_UNSTABLE = """
import json
import numpy as np
from persim_bench.envs import get_env, halfcheetah
sim = get_env("halfcheetah").batch(np.array([(0.01, 0.01), (10.0, 10.0)]))
rng = np.random.default_rng(0)
sim.reset(rng)
for _ in range(1000):
    qvel = sim.qvel.copy()
    qvel[:, 3] = 1e12
    sim.set_state(sim.qpos, qvel)
    obs, _, _ = sim.step(rng.uniform(-1, 1, (2, 6)))
    assert np.isfinite(obs).all()
print(json.dumps(halfcheetah.mujoco_warning_counts()))
"""


def test_an_unstable_halfcheetah_warns_once_and_writes_no_log_file(tmp_path):
    """A fresh interpreter, logging unconfigured as in a user's script, cwd a tmp dir.

    In-process, pytest's logging capture would swallow what logging's last-resort handler prints;
    a subprocess sees the stderr (and the cwd) a user would.
    """
    done = subprocess.run([sys.executable, "-c", _UNSTABLE], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    assert sum(counts.values()) >= 2000, counts  # MuJoCo did warn, on every step of both agents
    lines = done.stderr.splitlines()
    assert len(lines) <= 2, done.stderr
    assert all(line.startswith("MuJoCo: ") for line in lines)
    assert list(tmp_path.iterdir()) == [], "no MUJOCO_LOG.TXT (nor anything else) in the cwd"


def test_repeated_mujoco_warnings_go_to_debug(caplog, capfd):
    caplog.set_level(logging.DEBUG, logger=halfcheetah.__name__)
    before = halfcheetah.mujoco_warning_counts()
    sim = get_env("halfcheetah").batch(np.array([(1.0, 1.0)]))
    sim.reset(np.random.default_rng(0))
    for _ in range(20):
        qvel = sim.qvel.copy()
        qvel[:, 0] = 1e12
        sim.set_state(sim.qpos, qvel)
        sim.step(np.zeros((1, 6)))
    after = halfcheetah.mujoco_warning_counts()
    new = {kind: after[kind] - before.get(kind, 0) for kind in after if after[kind] > before.get(kind, 0)}
    assert new and all(n >= 20 for n in new.values()), new
    records = [r for r in caplog.records if r.name == halfcheetah.__name__]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) <= len(new) and len(records) >= 20
    assert not any(r.levelno > logging.WARNING for r in records)
    out, err = capfd.readouterr()
    assert "MuJoCo" not in out + err, "MuJoCo's own printing is replaced by the handler"


# --- the docs/reliability.md table -------------------------------------------------------------------

def test_covariate_ranges_markdown_lists_every_accepted_range():
    table = covariate_ranges_markdown()
    rows = table.strip().splitlines()
    assert rows[0].startswith("| env | covariate | accepted (closed) |") and len(rows) == 2 + len(COVARIATES)
    for row, (family, j) in zip(rows[2:], COVARIATES):
        low, high = family.covariate_valid[j]
        assert f"`{family.gym_id}`" in row and f"`{family.covariate_names[j]}`" in row and f"[{low:g}, {high:g}]" in row
