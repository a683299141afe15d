"""Trained policies: file format, nearest-agent assignment, the cached Ray stage and the pure* regimes."""
import numpy as np
import pytest
import torch

from persim_bench.config import load_grid
from persim_bench.data.dataset import read_dataset
from persim_bench.data.generate import generate_datasets
from persim_bench.data.policies import (PolicyError, PolicyNet, load_policy, nearest_policy_agent, policy_jobs,
                                        save_policy, train_policies)
from persim_bench.envs import get_env

PURE = {
    "name": "tiny-pure",
    "seed": 3,
    "envs": ["cartpole"],
    "regimes": ["pure", "pure-eps-40"],
    "algos": ["persim"],
    "data": {"n_agents": 12, "agents_per_shard": 12},
    "policies": {"budget": 400, "test_budget": 300, "hidden": [16], "n_envs": 2},
}


def test_nearest_policy_agent_for_the_papers_test_agents():
    assert nearest_policy_agent(get_env("mountaincar"), get_env("mountaincar").test_agents).tolist() == [0, 0, 1, 3, 4]
    # (length, force): (.5,2)->(.5,6) (.5,10)->(.5,10) (.5,18)->(.5,14) (.85,10)->(.675,10) (.15,10)->(.325,10)
    assert nearest_policy_agent(get_env("cartpole"), get_env("cartpole").test_agents).tolist() == [0, 2, 1, 3, 4]
    # (1, 1) is equally far from all four HalfCheetah policy agents: the first wins.
    assert nearest_policy_agent(get_env("halfcheetah"), get_env("halfcheetah").test_agents).tolist() == [0, 1, 2, 3, 0]


def _saved(tmp_path, env="cartpole"):
    family = get_env(env)
    net = PolicyNet(family.obs_dim, family.n_actions or family.action_dim, [8], family.discrete)
    path = tmp_path / "p.pt"
    save_policy(net, {"env": env, "role": "test", "key": "abc", "hidden": [8]}, path)
    return net, path


def test_policy_file_round_trip_and_refusals(tmp_path):
    net, path = _saved(tmp_path)
    loaded, header = load_policy(path, expect={"key": "abc"})
    obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded.act(obs), net.act(obs))
    with pytest.raises(PolicyError, match="header key='abc', expected 'xyz'"):
        load_policy(path, expect={"key": "xyz"})
    blob = bytearray(path.read_bytes())
    path.write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(PolicyError, match="p.pt: unreadable policy file"):
        load_policy(path)
    torch.save({"format": "persim-policy/1", "header": {"env": "halfcheetah", "hidden": [8]},
                "state": net.state_dict()}, path)  # CartPole weights claiming to be a HalfCheetah policy
    with pytest.raises(PolicyError, match="weights do not fit a halfcheetah policy"):
        load_policy(path)
    with pytest.raises(PolicyError, match="missing policy file"):
        load_policy(tmp_path / "nope.pt")


def test_stage_trains_caches_and_retrains_on_a_changed_budget(ray_cluster, write_grid, tmp_path):
    grid = load_grid(write_grid(PURE))
    root = tmp_path / "policies"
    headers = train_policies(grid, root, progress=False)
    assert sorted((j.role, j.index) for j in headers) == [("logging", i) for i in range(5)] + [("test", 0)]
    files = {p: p.stat().st_mtime_ns for p in root.rglob("*.pt")}
    assert len(files) == 6
    again = train_policies(grid, root, progress=False)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.pt")} == files  # reused, not retrained
    assert {j: h["key"] for j, h in again.items()} == {j: h["key"] for j, h in headers.items()}

    bigger = load_grid(write_grid({**PURE, "policies": {**PURE["policies"], "test_budget": 350}}, "b.yaml"))
    changed = [j for j in policy_jobs(bigger) if not j.path(root).exists()]
    assert [(j.role, j.budget) for j in changed] == [("test", 350)]
    train_policies(bigger, root, progress=False)
    assert len(list(root.rglob("*.pt"))) == 7

    data_root = tmp_path / "datasets"
    generate_datasets(grid, data_root, root, progress=False)
    pure, noisy = read_dataset(data_root, "cartpole", "pure"), read_dataset(data_root, "cartpole", "pure-eps-40")
    family = get_env("cartpole")
    nets = [load_policy(j.path(root))[0] for j in policy_jobs(grid) if j.role == "logging"]
    assignment = nearest_policy_agent(family, pure.covariates)

    def greedy(data):
        return np.array([nets[assignment[a]].act(o[None])[0] for a, o in zip(data.agent, data.obs)])

    np.testing.assert_array_equal(greedy(pure), pure.action)  # pure: always the nearest agent's policy
    differs = (greedy(noisy) != noisy.action).mean()
    expected = 0.4 * (1 - 1 / family.n_actions)  # a random action equals the greedy one half the time
    sigma = np.sqrt(expected * (1 - expected) / len(noisy))
    assert abs(differs - expected) < 5 * sigma + 0.02
