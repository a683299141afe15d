"""Datasets from a real local Ray cluster: schema, manifest, determinism, resume and bad input."""
import json
import shutil
import stat

import numpy as np
import pyarrow.parquet as pq
import pytest

from persim_bench.config import GridError, load_grid
from persim_bench.data import dataset as dataset_io
from persim_bench.data.behaviour import EpsilonMixture, RandomPolicy
from persim_bench.data.dataset import DatasetError, read_dataset, schema
from persim_bench.data.generate import dataset_plan, generate_datasets
from persim_bench.data.policies import nearest_policy_agent
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
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _plan(grid, env, regime="random"):
    return dataset_plan(grid, env, regime, None)


@pytest.mark.parametrize("env", SMALL["envs"])
def test_parquet_matches_schema_manifest_and_paper_agents(generated, env):
    grid, root = generated
    folder = root / env / "regime=random"
    manifest = json.loads((folder / "_manifest.json").read_text())
    family = get_env(env)
    assert manifest["complete"] and manifest["layout"] == dataset_io.LAYOUT and len(manifest["files"]) == 3
    for entry in manifest["files"]:
        path = folder / entry["name"]
        table = pq.read_table(path)
        assert table.schema.equals(schema(family), check_metadata=False)
        assert table.num_rows == entry["rows"]
        meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
        assert meta["persim.env"] == env and meta["persim.grid"] == "tiny" and meta["persim.regime"] == "random"
        assert meta["persim.fingerprint"] == manifest["fingerprint"] and entry["name"].endswith(f"-{meta['persim.fingerprint']}.parquet")
        assert json.loads(meta["persim.covariate_names"]) == list(family.covariate_names)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((folder / "_manifest.json").stat().st_mode) == 0o644
    assert sum(e["rows"] for e in manifest["files"]) == manifest["rows"]
    np.testing.assert_allclose(manifest["covariates"][:5], family.test_agents)
    covs = np.asarray(manifest["covariates"][5:])
    assert ((covs >= family.covariate_low) & (covs <= family.covariate_high)).all()

    agents = pq.read_table(root / env / "_agents.parquet").to_pydict()
    assert agents["agent"] == list(range(9)) and set(agents["regime"]) == {"random"}
    assert agents["role"] == ["test"] * 5 + ["train"] * 4
    for i, name in enumerate(family.covariate_names):
        assert agents[name] == [c[i] for c in manifest["covariates"]]
    assert set(agents["logging_policy"]) == {"uniform-random"} and set(agents["random_action_prob"]) == {1.0}

    data = read_dataset(root, _plan(grid, env))
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


def test_a_pure_regimes_agents_table_names_each_agents_logging_policy():
    family = get_env("cartpole")
    covariates = family.agent_covariates(np.random.default_rng(0), 12)
    policies = [f"logging-{i}-key.pt" for i in range(5)]
    manifest = {"env": "cartpole", "regime": "pure-eps-20", "covariates": covariates.tolist(),
                "policy_paths": policies, "policy_agent": nearest_policy_agent(family, covariates).tolist(),
                "random_action_prob": 0.2}
    agents = dataset_io.agents_table(manifest).to_pydict()
    nearest = nearest_policy_agent(family, covariates)
    assert agents["logging_policy"] == [policies[i] for i in nearest] and agents["policy_agent"] == nearest.tolist()
    assert agents["logging_policy"][:5] == [policies[i] for i in (0, 2, 1, 3, 4)]  # paper test agents -> nearest
    assert set(agents["random_action_prob"]) == {0.2}


def test_same_seed_same_bytes_and_an_interrupted_run_resumes(generated, tmp_path):
    grid, root = generated
    again = tmp_path / "again"
    generate_datasets(grid, again, progress=False)
    assert _files(again) == _files(root)

    # A run killed after two of three shards: the manifest lists what was verified, complete false.
    folder = again / "cartpole" / "regime=random"
    manifest = json.loads((folder / "_manifest.json").read_text())
    lost = folder / manifest["files"][1]["name"]
    lost.unlink()
    manifest["files"].pop(1)
    manifest["complete"] = False
    (folder / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="generation did not finish"):
        read_dataset(again, _plan(grid, "cartpole"))
    untouched = {p: p.stat().st_mtime_ns for p in again.rglob("part-*.parquet")}
    generate_datasets(grid, again, progress=False)
    assert lost.exists()
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # verified shards were kept
    assert _files(again) == _files(root)


def test_data_rebuilds_a_damaged_or_missing_shard_before_it_succeeds(generated, tmp_path):
    grid, root = generated
    copy, folder = _copy(root, tmp_path, "mountaincar")
    damaged, missing = sorted(folder.glob("part-*.parquet"))[:2]
    _flip_a_byte(damaged)
    missing.unlink()
    generate_datasets(grid, copy, progress=False)
    assert _files(copy) == _files(root)


def test_a_deleted_manifest_never_turns_damaged_bytes_into_the_truth(generated, tmp_path):
    grid, root = generated
    copy, folder = _copy(root, tmp_path)
    (folder / "_manifest.json").unlink()
    shard = sorted(folder.glob("part-*.parquet"))[0]
    _flip_a_byte(shard)
    generate_datasets(grid, copy, progress=False)
    assert _files(copy) == _files(root)  # every shard regenerated: nothing vouched for the old bytes
    read_dataset(copy, _plan(grid, "cartpole"))


def test_the_generator_deletes_only_its_own_stale_shards(generated, tmp_path):
    grid, root = generated
    copy, folder = _copy(root, tmp_path)
    stale = folder / "part-0000-0123456789ab.parquet"   # ours, of an older fingerprint
    foreign = folder / "part-notes.parquet"             # not a name the generator writes
    stale.write_bytes(b"old")
    foreign.write_bytes(b"user")
    (folder / "_manifest.json").unlink()
    generate_datasets(grid, copy, progress=False)
    assert not stale.exists() and foreign.read_bytes() == b"user"


def test_another_seed_gives_other_data(ray_cluster, write_grid, tmp_path):
    one = load_grid(write_grid({**SMALL, "envs": ["cartpole"], "seed": 1}))
    two = load_grid(write_grid({**SMALL, "envs": ["cartpole"], "seed": 2}, "two.yaml"))
    generate_datasets(one, tmp_path / "a", progress=False)
    generate_datasets(two, tmp_path / "b", progress=False)
    a, b = read_dataset(tmp_path / "a", _plan(one, "cartpole")), read_dataset(tmp_path / "b", _plan(two, "cartpole"))
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


def _copy(root, tmp_path, env="cartpole"):
    """A fresh copy of the generated datasets and its env's random-regime folder."""
    target = tmp_path / "copy"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(root, target)
    return target, target / env / "regime=random"


def _flip_a_byte(path):
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def _edit_manifest(folder, **changes):
    manifest = json.loads((folder / "_manifest.json").read_text())
    manifest.update(changes)
    (folder / "_manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_missing_corrupt_and_mismatched_data_are_refused(generated, tmp_path):
    grid, root = generated
    with pytest.raises(DatasetError, match=r"cartpole/regime=pure/_manifest.json: missing dataset manifest"):
        read_dataset(root, dataset_plan(grid, "cartpole", "pure", tmp_path))

    copy, folder = _copy(root, tmp_path)
    shard = sorted(folder.glob("part-*.parquet"))[0]
    shard.unlink()
    with pytest.raises(DatasetError, match=f"{shard.name}: missing Parquet file"):
        read_dataset(copy, _plan(grid, "cartpole"))

    copy, folder = _copy(root, tmp_path)
    shard = sorted(folder.glob("part-*.parquet"))[0]
    _flip_a_byte(shard)
    with pytest.raises(DatasetError, match=f"{shard.name}: content does not match the manifest"):
        read_dataset(copy, _plan(grid, "cartpole"))

    cases = [
        ({"rows": 1}, "_manifest.json: its row total does not match"),
        ({"seed": 8}, r"_manifest.json: made with other settings than the grid's \(seed: 8 != 7\)"),
        ({"covariates": [[0.5, 2.0]] * 9}, "_manifest.json: the agents' covariates are not the ones"),
        ({"files": []}, "_manifest.json: its file list is not the grid's 3 shards"),
        ({"layout": None}, "_manifest.json: dataset layout None"),
    ]
    for change, message in cases:
        copy, folder = _copy(root, tmp_path)
        _edit_manifest(folder, **change)
        with pytest.raises(DatasetError, match=message):
            read_dataset(copy, _plan(grid, "cartpole"))
    (folder / "_manifest.json").write_text("{ not json")
    with pytest.raises(DatasetError, match="_manifest.json: corrupt manifest"):
        read_dataset(copy, _plan(grid, "cartpole"))


def test_a_dataset_of_the_old_layout_is_refused_with_how_to_regenerate(generated, tmp_path):
    grid, root = generated
    old = tmp_path / "old" / "cartpole" / "random"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text("{}")
    (old / "part-0000-0123456789ab.parquet").write_bytes(b"PAR1")
    with pytest.raises(DatasetError) as err:
        read_dataset(tmp_path / "old", _plan(grid, "cartpole"))
    assert "layout of persim-bench < 0.2" in str(err.value) and "persim-bench data" in str(err.value)
    assert "\n" not in str(err.value)


def test_tables_show_a_damaged_dataset_instead_of_dropping_it(generated, tmp_path):
    from persim_bench.analysis.grid_tables import dataset_table
    from persim_bench.orchestration.tables import dataset_summaries

    grid, root = generated
    copy, folder = _copy(root, tmp_path)
    _flip_a_byte(sorted(folder.glob("part-*.parquet"))[0])
    summaries = dataset_summaries(grid, copy, tmp_path / "policies")
    assert set(summaries) == {(env, "random") for env in SMALL["envs"]}
    assert "content does not match" in summaries["cartpole", "random"]["error"]
    rows = {(r[0], r[1]): r for r in dataset_table(summaries, 9)["rows"]}
    assert rows["cartpole", "random"][2].startswith("unreadable: ")
    assert rows["mountaincar", "random"][2] != "" and not rows["mountaincar", "random"][2].startswith("unreadable")


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
