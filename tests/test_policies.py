"""Trained policies: file format, nearest-agent assignment, the cached Ray stage (checkpoints chosen by a
target return), the pure* regimes, and an acyclic import graph of the data package."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import persim_bench
from persim_bench.config import GridError, load_grid
from persim_bench.costmodel import policy_job_seconds
from persim_bench.data.behaviour import random_action_prob, regime_policy
from persim_bench.data.dataset import read_dataset
from persim_bench.data.generate import dataset_plan, dataset_plans, generate_datasets
from persim_bench.data.policies import (PolicyError, ProgressLines, _train_task, load_policy, logging_policy_paths,
                                        longest_first, nearest_policy_agent, policy_jobs, save_policy,
                                        train_policies)
from persim_bench.data.policy_net import PolicyNet
from persim_bench.data.rl import evaluate_policy
from persim_bench.envs import get_env

PURE = {
    "name": "tiny-pure",
    "seed": 3,
    "envs": ["cartpole"],
    "regimes": ["pure", "pure-eps-40"],
    "algos": ["persim"],
    "data": {"n_agents": 12, "agents_per_shard": 12},
    "policies": {"budget": 400, "test_budget": 300, "hidden": [16], "n_envs": 2, "eval_every": 100,
                 "target_return": {"cartpole": 30.0}},
}


def data_import_graph() -> dict[str, set[str]]:
    """persim_bench.data's modules -> the data modules each imports, at top level or inside functions.

    Imports under ``if TYPE_CHECKING:`` never run and are left out.
    """
    folder = Path(persim_bench.__file__).parent / "data"
    modules = {path.stem for path in folder.glob("*.py")} - {"__init__"}

    def targets(node: ast.AST) -> set[str]:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return set().union(*map(targets, node.orelse))
        found = set()
        if isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("persim_bench.data.") for alias in node.names
                      if alias.name.startswith("persim_bench.data.")}
        elif isinstance(node, ast.ImportFrom):
            package = "persim_bench.data" if node.level == 1 else "persim_bench" if node.level == 2 else ""
            module = ".".join(filter(None, [package, node.module or ""])) if node.level else node.module or ""
            if module == "persim_bench.data":              # from persim_bench.data import rl
                found |= {alias.name for alias in node.names}
            elif module.startswith("persim_bench.data."):
                found.add(module.removeprefix("persim_bench.data.").split(".")[0])
        for child in ast.iter_child_nodes(node):
            found |= targets(child)
        return found

    return {name: (targets(ast.parse((folder / f"{name}.py").read_text())) & modules) - {name} for name in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    return next((cycle for node in sorted(graph) if node not in state and (cycle := visit(node))), None)


def test_data_package_import_graph_is_acyclic():
    graph = data_import_graph()
    assert {"rl", "policies", "policy_net", "behaviour"} <= set(graph)
    assert "policies" in graph["behaviour"] and "rl" in graph["policies"]      # the graph is really read
    assert graph["policy_net"] == set() and "policies" not in graph["rl"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert find_cycle({**graph, "rl": graph["rl"] | {"policies"}}) == ["policies", "rl", "policies"]


def test_target_return_enters_the_logging_policies_keys_only(write_grid):
    def jobs(name, **policies):
        grid = {**PURE, "policies": {**PURE["policies"], **policies}}
        return {(j.role, j.index): j for j in policy_jobs(load_grid(write_grid(grid, f"{name}.yaml")))}

    base, other, none = jobs("a"), jobs("b", target_return={"cartpole": 150.0}), jobs("c", target_return=None)
    logging = [key for key in base if key[0] == "logging"]
    assert len(logging) == 5 and all(base[k].target_return == 30.0 for k in logging)
    assert base["test", 0].target_return is None          # test policies keep their best checkpoint
    for k in logging:
        assert len({base[k].key, other[k].key, none[k].key}) == 3
    assert base["test", 0].key == other["test", 0].key == none["test", 0].key
    assert jobs("d", eval_every=200)["test", 0].key != base["test", 0].key    # checkpoint settings count too
    plain = jobs("e", eval_every=None, target_return=None)
    assert plain["test", 0].eval_every is None and plain["test", 0].key != base["test", 0].key
    with pytest.raises(GridError, match="target_return for cartpole needs eval_every"):
        jobs("f", eval_every=None)


def test_regime_targets_give_a_regime_logging_policies_of_its_own(write_grid):
    def jobs(name, regimes, regime_targets):
        grid = {**PURE, "regimes": regimes, "policies": {**PURE["policies"], "regime_targets": regime_targets}}
        return load_grid(write_grid(grid, f"{name}.yaml"))

    grid = jobs("a", ["pure", "pure-eps-20", "pure-eps-40"], {"cartpole": {"pure-eps-40": 20.0}})
    logging = [j for j in policy_jobs(grid) if j.role == "logging"]
    assert [j.label for j in logging] == [f"logging-{i}" for i in range(5)] + [f"logging-pure-eps-40-{i}" for i in range(5)]
    shared, own = logging[:5], logging[5:]
    assert all(j.score_epsilon == 0.0 and j.target_return == 30.0 for j in shared)
    assert all(j.score_epsilon == 0.4 and j.target_return == 20.0 and j.regime == "pure-eps-40" for j in own)
    assert [j.seed for j in own] == [j.seed for j in shared]      # same training run, scored differently
    root = Path("policies")
    assert logging_policy_paths(root, grid, "cartpole", "pure-eps-40") == [j.path(root) for j in own]
    for regime in ("pure", "pure-eps-20"):
        assert logging_policy_paths(root, grid, "cartpole", regime) == [j.path(root) for j in shared]
    # the shared policies keep the keys they had before regime_targets existed
    assert [j.key for j in shared] == [j.key for j in policy_jobs(load_grid(write_grid(PURE, "plain.yaml")))
                                       if j.role == "logging"]
    # a grid whose every pure* regime has its own policies trains no shared ones
    alone = jobs("b", ["random", "pure-eps-40"], {"cartpole": {"pure-eps-40": 20.0}})
    assert [j.label for j in policy_jobs(alone) if j.role == "logging"] == [j.label for j in own]
    for bad, message in (({"cartpole": {"random": 20.0}}, "unknown regime 'random'"),
                         ({"cartpole": {"pure-eps-30": 20.0}}, "unknown regime 'pure-eps-30'"),
                         ({"cartpol": {"pure": 20.0}}, "unknown env 'cartpol'")):
        with pytest.raises(GridError, match=f"regime_targets.*{message}"):
            jobs("c", ["pure"], bad)
    grid = {**PURE, "policies": {**PURE["policies"], "eval_every": None, "target_return": None,
                                 "regime_targets": {"cartpole": {"pure-eps-40": 20.0}}}}
    with pytest.raises(GridError, match="regime_targets for cartpole needs eval_every"):
        load_grid(write_grid(grid, "d.yaml"))


def test_policies_that_run_their_whole_budget_are_submitted_first(write_grid):
    jobs = policy_jobs(load_grid(write_grid(PURE)))
    assert [j.role for j in jobs][-1] == "test"            # policy_jobs lists the test policy last
    ordered = longest_first(jobs)
    assert ordered[0].role == "test" and [j.label for j in ordered[1:]] == [j.label for j in jobs[:-1]]
    # without targets every job runs its whole budget: the larger budget first (logging 400, test 300)
    untargeted = policy_jobs(load_grid(write_grid({**PURE, "policies": {**PURE["policies"], "target_return": None}},
                                                  "untargeted.yaml")))
    assert [j.role for j in longest_first(untargeted)] == ["logging"] * 5 + ["test"]


def test_progress_lines_are_rate_limited(write_grid, capsys):
    job = policy_jobs(load_grid(write_grid(PURE)))[0]
    now = [0.0]
    progress = ProgressLines(job, every=60.0, clock=lambda: now[0])
    metrics = {"greedy_return": 12.5, "seconds": 30.0}
    progress(20, metrics)                      # too soon after the start
    now[0] = 61.0
    progress(40, {**metrics, "seconds": 61.0})
    now[0] = 100.0
    progress(60, metrics)                      # too soon after the last line
    assert capsys.readouterr().out == "cartpole logging-0: 40 of 400 env steps, greedy return 12.5, 61 s\n"


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
    for job, header in headers.items():      # every 100 env steps a checkpoint; the header lists them all
        steps, returns = map(list, zip(*header["checkpoints"]))
        assert steps == list(range(100, job.budget + 1, 100))
        score = (lambda r: r) if job.role == "test" else (lambda r: -abs(r - 30.0))   # best / nearest the target
        assert header["chosen_checkpoint"] == max(range(len(returns)), key=lambda k: (score(returns[k]), k))
        assert header["target_return"] == (30.0 if job.role == "logging" else None)
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
    pure, noisy = (read_dataset(data_root, dataset_plan(grid, "cartpole", regime, root)) for regime in ("pure", "pure-eps-40"))
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


def test_a_regimes_own_policies_are_scored_noisy_and_make_its_data(ray_cluster, write_grid, tmp_path):
    grid = load_grid(write_grid({**PURE, "policies": {**PURE["policies"], "target_rule": "first",
                                                      "regime_targets": {"cartpole": {"pure-eps-40": 1e9}}}}))
    root, family = tmp_path / "policies", get_env("cartpole")
    headers = {job.label: (job, header) for job, header in train_policies(grid, root, progress=False).items()}
    for i in range(5):
        (job, own), (_, shared) = headers[f"logging-pure-eps-40-{i}"], headers[f"logging-{i}"]
        assert own["score_epsilon"] == 0.4 and shared["score_epsilon"] == 0.0
        # a target nothing reaches: the whole run, the best checkpoint under 40% random actions
        steps, returns = map(list, zip(*own["checkpoints"]))
        assert steps == list(range(100, job.budget + 1, 100))
        assert own["chosen_checkpoint"] == max(range(len(returns)), key=lambda k: (returns[k], k))
        net = load_policy(job.path(root))[0]
        noisy = evaluate_policy(family, job.covariates, net, job.eval_episodes, np.random.default_rng([job.seed, 3]), 0.4)
        assert noisy.mean() == pytest.approx(returns[own["chosen_checkpoint"]])
        greedy = evaluate_policy(family, job.covariates, net, job.eval_episodes, np.random.default_rng([job.seed, 3]))
        assert greedy.mean() != pytest.approx(noisy.mean())        # the score really was taken with noise
    plans = {plan.regime: plan for plan in dataset_plans(grid, root)}
    assert plans["pure-eps-40"].policy_paths == tuple(str(headers[f"logging-pure-eps-40-{i}"][0].path(root))
                                                      for i in range(5))
    assert plans["pure"].policy_paths == tuple(str(headers[f"logging-{i}"][0].path(root)) for i in range(5))


def test_logging_epsilon_makes_the_logging_policies_act_at_random_and_keys_only_their_data(write_grid, tmp_path):
    family = get_env("mountaincar")
    torch.manual_seed(0)
    nets = [PolicyNet(family.obs_dim, family.n_actions, [8], discrete=True) for _ in family.policy_agents]
    covariates = family.agent_covariates(np.random.default_rng(0), 6000)
    obs = family.batch(covariates).reset(np.random.default_rng(1))

    def changed(regime, logging_epsilon):
        """Share of actions that differ from the greedy pure policy's (a uniform random one differs 2/3 of the time)."""
        act = regime_policy(family, regime, covariates, nets, logging_epsilon).act(obs, np.random.default_rng(2))
        return np.mean(act != regime_policy(family, "pure", covariates, nets).act(obs, np.random.default_rng(2)))

    assert changed("pure", 0.0) == 0
    assert changed("pure", 0.3) == pytest.approx(0.3 * 2 / 3, abs=0.02)
    assert changed("pure-eps-40", 0.3) == pytest.approx(random_action_prob("pure-eps-40", 0.3) * 2 / 3, abs=0.02)
    assert random_action_prob("pure-eps-40", 0.3) == pytest.approx(0.4 + 0.6 * 0.3)
    assert random_action_prob("random", 0.3) == 1.0 and random_action_prob("pure", 0.0) == 0.0

    def plans(**data):
        grid = load_grid(write_grid({**PURE, "regimes": ["pure", "random"], "data": {**PURE["data"], **data}}))
        return {plan.regime: plan for plan in dataset_plans(grid, tmp_path)}

    greedy, noisy = plans(), plans(logging_epsilon={"cartpole": 0.01})
    assert noisy["pure"].logging_epsilon == 0.01 and noisy["random"].logging_epsilon == 0.0
    assert noisy["pure"].fingerprint != greedy["pure"].fingerprint       # other data, another key
    assert noisy["random"].fingerprint == greedy["random"].fingerprint   # random data do not change
    assert "logging_epsilon" not in greedy["pure"].spec()                # keys made before the option stay
    for bad, field in (({"atari": 0.1}, "atari"), ({"cartpole": 1.5}, "less than or equal to 1")):
        with pytest.raises(GridError, match=f"data.logging_epsilon.*{field}"):
            plans(logging_epsilon=bad)


def test_target_rule_per_env_and_a_grid_extending_paper_changes_one_env(write_grid):
    grid = load_grid(write_grid({"extends": "paper", "name": "held", "envs": ["mountaincar", "cartpole"],
                                 "regimes": ["pure"], "policies": {"target_rule": {"mountaincar": "first-held"}}},
                                "held.yaml"))
    rules = {(j.env, j.role): j.target_rule for j in policy_jobs(grid)}
    assert rules[("mountaincar", "logging")] == "first-held" and rules[("cartpole", "logging")] == "first"
    paper = {(j.env, j.regime, j.index): j.key for j in policy_jobs(load_grid("paper")) if j.role == "logging"}
    held = {(j.env, j.regime, j.index): j.key for j in policy_jobs(grid) if j.role == "logging"}
    assert all(held[k] != paper[k] for k in held if k[0] == "mountaincar")   # another rule, another policy file
    assert all(held[k] == paper[k] for k in held if k[0] == "cartpole")
    with pytest.raises(GridError, match="target_rule"):
        load_grid(write_grid({**PURE, "policies": {**PURE["policies"], "target_rule": {"cartpole": "held"}}},
                             "bad-rule.yaml"))


def test_a_logging_policy_that_misses_its_target_is_trained_again_from_a_derived_seed(write_grid, tmp_path):
    def job(name, **policies):
        grid = load_grid(write_grid({**PURE, "policies": {**PURE["policies"], "target_rule": "first", **policies}},
                                    f"{name}.yaml"))
        return next(j for j in policy_jobs(grid) if j.role == "logging" and j.index == 0)

    plain, retried = job("plain"), job("retried", retrain_misses={"cartpole": 2})
    assert plain.retrain_misses == 0 and retried.retrain_misses == 2
    assert plain.key != retried.key != job("unreachable", retrain_misses=2, target_return=1e6).key
    assert plain.key == job("other-env", retrain_misses={"mountaincar": 2}).key   # a setting for another env
    # --dry-run's upper bound counts every run a job may train.
    assert policy_job_seconds(retried, 3.4e10) == pytest.approx(3 * policy_job_seconds(plain, 3.4e10))

    # CartPole never returns 1e6: three runs, the job's seed then two derived ones, the best run kept.
    missed = _train_task(job("unreachable", retrain_misses=2, target_return=1e6), str(tmp_path / "missed.pt"))
    seeds, bests = zip(*missed["runs"])
    assert len(seeds) == 3 and seeds[0] == plain.seed and len(set(seeds)) == 3
    assert max(score for _, score in missed["checkpoints"]) == max(bests)
    # A reachable target: the first run reaches it and no other run is trained.
    reached = _train_task(job("reachable", retrain_misses=2, target_return=5.0), str(tmp_path / "reached.pt"))
    assert [seed for seed, _ in reached["runs"]] == [plain.seed]
    assert load_policy(tmp_path / "reached.pt")[1]["runs"] == reached["runs"]
