"""Datasets from a real local Ray cluster: schema, manifest, determinism, resume and bad input."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from persim_bench.config import GridError, load_grid
from persim_bench.data import dataset as dataset_io
from persim_bench.data.behaviour import EpsilonMixture, RandomPolicy
from persim_bench.data.dataset import DatasetError, read_dataset, schema
from persim_bench.data.generate import generate_datasets
from persim_bench.envs import get_env

SMALL = {
    "name": "tiny",
    "seed": 7,
    "envs": ["mountaincar", "cartpole", "halfcheetah"],
    "regimes": ["random"],
    "data": {"n_agents": 9, "agents_per_shard": 4, "max_steps": {"mountaincar": 60, "halfcheetah": 15}},
}


@pytest.fixture(scope="module")
def generated(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    path = root / "tiny.yaml"
    import yaml

    path.write_text(yaml.safe_dump(SMALL))
    grid = load_grid(path)
    generate_datasets(grid, root / "datasets", progress=False)
    return grid, root / "datasets"


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("env", SMALL["envs"])
def test_parquet_matches_schema_manifest_and_paper_agents(generated, env):
    grid, root = generated
    folder = root / env / "random"
    manifest = json.loads((folder / "manifest.json").read_text())
    family = get_env(env)
    assert len(manifest["files"]) == 3  # 9 agents in shards of 4
    for entry in manifest["files"]:
        table = pq.read_table(folder / entry["name"])
        assert table.schema.equals(schema(family))
        assert table.num_rows == entry["rows"]
    assert sum(e["rows"] for e in manifest["files"]) == manifest["rows"]
    np.testing.assert_allclose(manifest["covariates"][:5], family.test_agents)
    covs = np.asarray(manifest["covariates"][5:])
    assert ((covs >= family.covariate_low) & (covs <= family.covariate_high)).all()

    data = read_dataset(root, env, "random")
    assert len(data) == manifest["rows"] and data.n_agents == 9
    cap = grid.data.episode_steps(env)
    for agent in range(9):
        rows = data.agent == agent
        t = data.t[rows]
        np.testing.assert_array_equal(t, np.arange(len(t)))  # one contiguous trajectory per agent
        np.testing.assert_array_equal(data.obs[rows][1:], data.next_obs[rows][:-1])
        ended = data.terminated[rows][-1] or data.truncated[rows][-1]
        assert ended and not data.terminated[rows][:-1].any() and not data.truncated[rows][:-1].any()
        assert data.truncated[rows][-1] == (len(t) == cap and not data.terminated[rows][-1])
    if family.discrete:
        assert set(np.unique(data.action)) <= set(range(family.n_actions))
    else:
        assert data.action.shape[1] == family.action_dim and np.abs(data.action).max() <= 1


def test_same_seed_same_bytes_and_rerun_skips(generated, tmp_path):
    grid, root = generated
    again = tmp_path / "again"
    generate_datasets(grid, again, progress=False)
    assert _files(again) == _files(root)

    shard = sorted((again / "cartpole" / "random").glob("part-*.parquet"))[1]
    untouched = {p: p.stat().st_mtime_ns for p in again.rglob("*.parquet") if p != shard}
    shard.unlink()
    (again / "cartpole" / "random" / "manifest.json").unlink()
    generate_datasets(grid, again, progress=False)
    assert shard.exists()
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # finished shards were skipped
    assert _files(again) == _files(root)


def test_another_seed_gives_other_data(ray_cluster, write_grid, tmp_path):
    one = load_grid(write_grid({**SMALL, "envs": ["cartpole"], "seed": 1}))
    two = load_grid(write_grid({**SMALL, "envs": ["cartpole"], "seed": 2}, "two.yaml"))
    generate_datasets(one, tmp_path / "a", progress=False)
    generate_datasets(two, tmp_path / "b", progress=False)
    a, b = read_dataset(tmp_path / "a", "cartpole", "random"), read_dataset(tmp_path / "b", "cartpole", "random")
    assert not np.array_equal(a.covariates, b.covariates)
    np.testing.assert_array_equal(a.covariates[:5], b.covariates[:5])  # the test agents are fixed


def test_crash_mid_write_leaves_no_file(tmp_path, monkeypatch):
    def crash(table, where, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset_io.pq, "write_table", crash)
    target = tmp_path / "part-0000.parquet"
    with pytest.raises(KeyboardInterrupt):
        dataset_io.write_parquet(None, target)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"envs": ["acrobot"]}, "envs: unknown env 'acrobot'"),
        ({"regimes": ["expert"]}, "regimes: unknown regime 'expert'"),
        ({"data": {"n_agents": 3}}, "data.n_agents: Input should be greater than or equal to 5"),
        ({"data": {"max_steps": {"cartpole": 900}}}, "data.max_steps: Value error, cartpole: 900 exceeds"),
        ({"data": {"agents_per_shard": "many"}}, "data.agents_per_shard: Input should be a valid integer"),
        ({"seeds_typo": 1}, "seeds_typo: Extra inputs are not permitted"),
    ],
)
def test_bad_grid_fields_name_file_and_field(write_grid, change, expected):
    path = write_grid({**SMALL, **change})
    with pytest.raises(GridError) as err:
        load_grid(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert expected.replace("Value error, ", "") in message


def test_malformed_yaml_and_unknown_grid(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nenvs: [cartpole\n")
    with pytest.raises(GridError, match=r"broken.yaml: not valid YAML \(line"):
        load_grid(path)
    with pytest.raises(GridError, match="unknown grid 'nope'; known: .*smoke"):
        load_grid("nope")


def _copy(root, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target, target / "cartpole" / "random"


def test_missing_corrupt_and_mismatched_data_are_refused(generated, tmp_path):
    _, root = generated
    with pytest.raises(DatasetError, match=r"cartpole/pure/manifest.json: missing dataset manifest"):
        read_dataset(root, "cartpole", "pure")

    copy, folder = _copy(root, tmp_path)
    shard = sorted(folder.glob("part-*.parquet"))[0]
    shard.unlink()
    with pytest.raises(DatasetError, match=f"{shard.name}: missing Parquet file"):
        read_dataset(copy, "cartpole", "random")

    shutil.rmtree(copy)
    copy, folder = _copy(root, tmp_path)
    shard = sorted(folder.glob("part-*.parquet"))[0]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(DatasetError, match=f"{shard.name}: content does not match the manifest"):
        read_dataset(copy, "cartpole", "random")

    shutil.rmtree(copy)
    copy, folder = _copy(root, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["rows"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="manifest.json: files hold .* rows, manifest says"):
        read_dataset(copy, "cartpole", "random")
    (folder / "manifest.json").write_text("{ not json")
    with pytest.raises(DatasetError, match="manifest.json: corrupt manifest"):
        read_dataset(copy, "cartpole", "random")


@pytest.mark.parametrize("env, epsilon", [("cartpole", 0.2), ("halfcheetah", 0.4)])
def test_epsilon_mixture_explores_at_the_stated_rate(env, epsilon):
    family = get_env(env)

    class Constant:  # a deterministic base policy whose actions random draws almost never hit
        def act(self, obs, rng):
            if family.discrete:
                return np.full(len(obs), 1, dtype=np.int64)
            return np.full((len(obs), family.action_dim), 0.123, dtype=np.float32)

    rng = np.random.default_rng(0)
    actions = EpsilonMixture(Constant(), family, epsilon).act(np.zeros((20000, family.obs_dim)), rng)
    if family.discrete:  # a random action equals the base one 1/n of the time
        rate = (actions != 1).mean() * family.n_actions / (family.n_actions - 1)
    else:
        rate = (actions[:, 0] != np.float32(0.123)).mean()
    sigma = np.sqrt(epsilon * (1 - epsilon) / 20000) * 2
    assert abs(rate - epsilon) < 4 * sigma
    assert RandomPolicy(family).act(np.zeros((3, family.obs_dim)), rng).shape[0] == 3
