"""Hostile grids are refused by ``load_grid`` before any compute: one line naming the file and the field.

No Ray here: every case is a YAML file and a ``GridError``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from persim_bench.config import CONFIG_DIR, GridError, load_grid

INF, NAN = float("inf"), float("nan")
# A small valid grid: all three envs (so every algorithm may take part), two seeds.
BASE = {
    "name": "tiny",
    "seed": 7,
    "envs": ["mountaincar", "cartpole", "halfcheetah"],
    "regimes": ["random"],
    "seeds": [0, 1],
    "data": {"n_agents": 9, "agents_per_shard": 4, "max_steps": {"mountaincar": 60, "halfcheetah": 15}},
}


def merged(base: dict, change: dict) -> dict:
    """``change`` on top of ``base``, one level deep for sections (``{"persim": {"lr": x}}`` keeps persim's rest)."""
    out = dict(base)
    for key, value in change.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def refused(path: Path) -> str:
    with pytest.raises(GridError) as err:
        load_grid(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and "\r" not in message and len(message) < len(str(path)) + 800, message
    return message


CHECKPOINTS = {"eval_every": 100}  # target_return needs checkpoints to choose from

# (id, change to BASE, field named, what the message says after "<file>: <field>: ")
CASES = [
    # 1. the name becomes folders under the results folder
    *[(f"name-{i}", {"name": name}, "name", "is not a plain name")
      for i, name in enumerate(["../../escape", "/abs/path", "a/b", "my grid", "..", ".", ".hidden", "a..b",
                                "-dash", "x" * 65, "", "naïve", "tab\there", "new\nline", "c:\\x", "*"])],
    # 2. duplicates
    ("dup-seeds", {"seeds": [0, 0]}, "seeds", "0 is listed more than once"),
    ("dup-envs", {"envs": ["cartpole", "mountaincar", "cartpole"]}, "envs", "'cartpole' is listed more than once"),
    ("dup-regimes", {"regimes": ["random", "pure", "random"]}, "regimes", "'random' is listed more than once"),
    ("dup-algos", {"algos": ["persim", "bcq_p", "persim"]}, "algos", "'persim' is listed more than once"),
    ("dup-test-agents", {"evaluation": {"test_agents": [0, 0]}}, "evaluation.test_agents",
     "0 is listed more than once"),
    ("dup-rank-grid", {"persim": {"rank_grid": [2, 5, 2]}}, "persim.rank_grid", "2 is listed more than once"),
    # 3. non-finite numbers, anywhere (scalars, unions, lists, nested dicts)
    ("lr-inf", {"persim": {"lr": INF}}, "persim.lr", "Input should be a finite number"),
    ("lr-nan", {"persim": {"lr": NAN}}, "persim.lr", "Input should be a finite number"),
    ("lr-string-inf", {"persim": {"lr": "inf"}}, "persim.lr", "Input should be a finite number"),
    ("cv-tolerance-inf", {"persim": {"cv_tolerance": INF}}, "persim.cv_tolerance", "Input should be a finite number"),
    ("target-return-nan", {"policies": {**CHECKPOINTS, "target_return": NAN}}, "policies.target_return",
     "Input should be a finite number"),
    ("target-return-env-inf", {"policies": {**CHECKPOINTS, "target_return": {"cartpole": -INF}}},
     "policies.target_return.cartpole", "Input should be a finite number"),
    ("regime-target-nan", {"policies": {**CHECKPOINTS, "regime_targets": {"cartpole": {"pure-eps-40": NAN}}}},
     "policies.regime_targets.cartpole.pure-eps-40", "Input should be a finite number"),
    ("planner-gamma-nan", {"planner": {"gamma": NAN}}, "planner.gamma", "Input should be a finite number"),
    ("planner-init-std-inf", {"planner": {"init_std": INF}}, "planner.init_std", "Input should be a finite number"),
    ("cadm-lr-inf", {"cadm": {"lr": INF}}, "cadm.lr", "Input should be a finite number"),
    ("cadm-weight-decay-nan", {"cadm": {"weight_decay": [1e-4, NAN, 1e-4, 1e-4, 1e-4]}}, "cadm.weight_decay.1",
     "Input should be a finite number"),
    ("bcq-lr-inf", {"bcq": {"lr": INF}}, "bcq.lr", "Input should be a finite number"),
    ("bcq-logit-penalty-inf", {"bcq": {"discrete_logit_penalty": INF}}, "bcq.discrete_logit_penalty",
     "Input should be a finite number"),
    ("cql-weight-inf", {"cql": {"conservative_weight": INF}}, "cql.conservative_weight",
     "Input should be a finite number"),
    ("iql-expectile-nan", {"iql": {"expectile": NAN}}, "iql.expectile", "Input should be a finite number"),
    ("td3bc-alpha-inf", {"td3bc": {"alpha": INF}}, "td3bc.alpha", "Input should be a finite number"),
    ("box-margin-inf", {"evaluation": {"data_box_margin": INF}}, "evaluation.data_box_margin",
     "Input should be a finite number"),
    ("resources-cpu-inf", {"resources": {"persim": {"cpu": INF}}}, "resources.persim.cpu",
     "Input should be a finite number"),
    # seeds reach torch and numpy generators
    ("seed-huge", {"seeds": [2**64]}, "seeds.0", "Input should be less than 4294967296"),
    ("grid-seed-huge", {"seed": 2**40}, "seed", "Input should be less than 4294967296"),
    ("policy-seed-huge", {"policies": {"seed": 2**40}}, "policies.seed", "Input should be less than 4294967296"),
    # 4. lists whose emptiness makes no sense
    ("empty-envs", {"envs": []}, "envs", "must name at least one entry"),
    ("empty-regimes", {"regimes": []}, "regimes", "must name at least one entry"),
    ("empty-algos", {"algos": []}, "algos", "must name at least one entry"),
    ("empty-seeds", {"seeds": []}, "seeds", "must name at least one entry"),
    ("empty-test-agents", {"evaluation": {"test_agents": []}}, "evaluation.test_agents",
     "must name at least one entry"),
    ("empty-rank-grid", {"persim": {"rank_grid": []}}, "persim.rank_grid", "must name at least one entry"),
    ("empty-cadm-weight-decay", {"cadm": {"weight_decay": []}}, "cadm.weight_decay", "must name at least one entry"),
    ("empty-cadm-context-decay", {"cadm": {"context_weight_decay": []}}, "cadm.context_weight_decay",
     "must name at least one entry"),
    # d3rlpy cannot build an encoder without a hidden layer
    *[(f"empty-{section}-{field}", {section: {field: []}}, f"{section}.{field}", "must name at least one entry")
      for section, field in [("bcq", "actor_hidden"), ("bcq", "critic_hidden"), ("bcq", "vae_hidden"),
                             ("bcq", "discrete_hidden"), ("cql", "actor_hidden"), ("cql", "critic_hidden"),
                             ("cql", "discrete_hidden"), ("iql", "actor_hidden"), ("iql", "critic_hidden"),
                             ("iql", "value_hidden"), ("td3bc", "actor_hidden"), ("td3bc", "critic_hidden")]],
    # per-env settings that per_env() reads for every env of the grid
    ("planner-horizon-missing-env", {"planner": {"horizon": {"cartpole": 30, "halfcheetah": 10}}}, "planner.horizon",
     "no value for env 'mountaincar'"),
    ("planner-candidates-empty", {"planner": {"candidates": {}}}, "planner.candidates",
     "no value for env 'mountaincar'"),
    ("policies-budget-missing-env", {"policies": {"budget": {"cartpole": 100}}}, "policies.budget",
     "no value for env 'mountaincar'"),
    ("persim-rank-missing-env", {"persim": {"rank": {"cartpole": 3}}}, "persim.rank", "no value for env 'mountaincar'"),
    ("persim-state-hidden-missing-env", {"persim": {"state_hidden": {"mountaincar": [8]}}}, "persim.state_hidden",
     "no value for env 'cartpole'"),
    ("persim-normalize-missing-env", {"persim": {"normalize": {"halfcheetah": True}}}, "persim.normalize",
     "no value for env 'mountaincar'"),
    ("persim-lr-halving-missing-env", {"persim": {"lr_halving_epochs": {"mountaincar": 150}}},
     "persim.lr_halving_epochs", "no value for env 'cartpole'"),
    ("persim-lr-halving-unknown-env", {"persim": {"lr_halving_epochs": {"mountaincar": 150, "pendulum": 10}}},
     "persim.lr_halving_epochs", "unknown env 'pendulum'"),
    # unions: the error of the alternative that fits the value, without pydantic's type tags
    ("horizon-env-zero", {"planner": {"horizon": {"mountaincar": 5, "cartpole": 0, "halfcheetah": 5}}},
     "planner.horizon.cartpole", "Input should be greater than 0"),
    ("penalty-negative", {"planner": {"disagreement_penalty": -1}}, "planner.disagreement_penalty",
     "Input should be greater than or equal to 0"),
    ("penalty-unknown-env", {"planner": {"disagreement_penalty": {"atari": 1.0}}}, "planner.disagreement_penalty",
     "unknown env 'atari'"),
    ("algo-without-env", {"envs": ["cartpole"], "algos": ["iql_p"]}, "algos", "iql_p supports continuous actions only"),
]


@pytest.mark.parametrize("change, field, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_hostile_grid_is_refused_naming_file_and_field(write_grid, change, field, expected):
    path = write_grid(merged(BASE, change))
    message = refused(path)
    assert message.startswith(f"{path}: {field}: ") and expected in message.removeprefix(f"{path}: {field}: "), message


def test_base_grid_loads(write_grid):
    grid = load_grid(write_grid(BASE))
    assert grid.name == "tiny" and grid.seeds == [0, 1]


@pytest.mark.parametrize("name", ["tiny", "paper-2024", "v1.2_final", "A", "x" * 64])
def test_plain_names_load(write_grid, name):
    assert load_grid(write_grid({**BASE, "name": name})).name == name


def test_one_problem_is_one_error(write_grid):
    """A union field's per-type errors are one problem: no "(+N more)" for them; two fields are two."""
    message = refused(write_grid(merged(BASE, {"policies": {**CHECKPOINTS, "target_return": NAN}})))
    assert "more)" not in message
    message = refused(write_grid(merged(BASE, {"persim": {"lr": NAN}, "cadm": {"lr": INF}})))
    assert message.endswith("(+1 more)"), message
    for envs in ([], ["acrobot"]):  # not again as an empty default algos list
        assert "more)" not in refused(write_grid({**BASE, "envs": envs}))


def test_long_values_are_cut(write_grid):
    message = refused(write_grid({**BASE, "envs": ["x" * 5000]}))
    assert "envs: unknown env 'xxx" in message and message.count("x") < 700


def test_empty_hidden_layers_of_our_own_nets_load_and_build(write_grid):
    """Where our own MLPs take the list ([in, *hidden, out]), [] is a linear net and allowed."""
    import torch

    from persim_bench.algos.cadm import CadmModel
    from persim_bench.algos.persim import PerSimEnsemble
    from persim_bench.data.policy_net import PolicyNet
    from persim_bench.envs import get_env

    grid = load_grid(write_grid(merged(BASE, {
        "policies": {"hidden": []}, "persim": {"rank": 2, "state_hidden": [], "action_hidden": []},
        "cadm": {"hidden": [], "context_hidden": []}})))
    assert grid.policies.hidden == [] and grid.persim.state_hidden == [] and grid.cadm.hidden == []
    for env in ("cartpole", "halfcheetah"):
        model = PerSimEnsemble.from_spec(grid.persim, env, n_agents=9, seed=0)
        obs = torch.zeros(model.n_members, 3, model.obs_dim)
        family = get_env(env)
        action = torch.zeros(3, dtype=torch.long) if family.discrete else torch.zeros(3, family.action_dim)
        assert model(obs, action, torch.zeros(3, dtype=torch.long)).shape == obs.shape
        cadm = CadmModel.from_spec(grid.cadm, env, probabilistic=True, seed=0)
        assert len(cadm.forward_net.layers) == len(cadm.encoder.layers) == 1
    net = PolicyNet(4, 2, grid.policies.hidden, discrete=True)
    assert net(torch.zeros(3, 4)).shape == (3, 2)


def test_narrowing_twice_to_one_seed_runs_it_once(write_grid):
    grid = load_grid(write_grid(BASE)).narrowed(seeds=[1, 1], envs=["cartpole", "cartpole"])
    assert grid.seeds == [1] and grid.envs == ["cartpole"]


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_shipped_grids_load(name):
    grid = load_grid(name)
    assert grid.name == name


def test_shipped_grids_are_all_there():
    assert {"smoke", "lite", "paper", "full"} <= {p.stem for p in CONFIG_DIR.glob("*.yaml")}


# ---------------------------------------------------------------- 6. files that are not grids


def _bytes_file(tmp_path: Path, data: bytes, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"


@pytest.mark.parametrize("data, expected", [
    (PNG, "a binary file"),
    (random.Random(0).randbytes(4096), "a binary file"),
    (bytes(128 + b % 128 for b in random.Random(1).randbytes(4096)), "not UTF-8 text"),
    ("name: café\nenvs: [cartpole]\nregimes: [random]\n".encode("latin-1"), "not UTF-8 text (byte 9)"),
    ("name: x\n".encode("utf-16"), "a binary file"),  # NUL bytes
    (b"name: x\x07\n", "not valid YAML"),
    (b"[" * 5000, "not valid YAML"),
    (b"name: tiny\nseed: 1\nseed: 2\n", "not valid YAML (line 3): found duplicate key 'seed'"),
    (b"name: tiny\npersim:\n  lr: 0.1\n  lr: .inf\n", "not valid YAML (line 4): found duplicate key 'lr'"),
    (b"name: x\n" + b"#" * (1 << 20), "too large for a grid file"),
    (b"- just\n- a list\n", "a grid must be a YAML mapping, got list"),
])
def test_file_that_is_not_a_grid_gives_one_line(tmp_path, data, expected):
    message = refused(_bytes_file(tmp_path, data))
    assert expected in message, message


def test_folder_is_not_a_grid(tmp_path):
    folder = tmp_path / "grid.yaml"
    folder.mkdir()
    assert "is a folder, not a grid file" in refused(folder)


def test_fifo_is_not_read(tmp_path):
    fifo = tmp_path / "grid.yaml"
    os.mkfifo(fifo)
    assert "not a regular file" in refused(fifo)


def test_unreadable_file(tmp_path, monkeypatch):
    path = _bytes_file(tmp_path, b"name: x\n")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: have the open fail as it would for others
        real_open = Path.open

        def denied(self, *args, **kwargs):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", denied)
    try:
        assert "cannot read the grid file (permission denied)" in refused(path)
    finally:
        path.chmod(0o644)


def test_extends_a_folder_or_binary(tmp_path, write_grid):
    """The error names the file at fault: the extended one."""
    (tmp_path / "base.yaml").mkdir()
    with pytest.raises(GridError, match=r"base.yaml: is a folder, not a grid file$"):
        load_grid(write_grid({**BASE, "extends": "base.yaml"}))
    _bytes_file(tmp_path, PNG, "png.yaml")
    with pytest.raises(GridError, match=r"png.yaml: a binary file, not a YAML grid$"):
        load_grid(write_grid({**BASE, "extends": "png.yaml"}, "other.yaml"))


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    text = ("name: tiny\nenvs: [cartpole]\nregimes: [random]\n"
            "data:\n  <<: {n_agents: 9, agents_per_shard: 4}\n  n_agents: 10\n")
    grid = load_grid(_bytes_file(tmp_path, text.encode()))
    assert grid.data.n_agents == 10 and grid.data.agents_per_shard == 4
