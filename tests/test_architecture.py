"""The package's shape: no import cycles, a science layer free of Tune and MLflow, exits only in the CLI."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import persim_bench

PACKAGE = Path(persim_bench.__file__).parent
SCIENCE = ("envs", "data", "algos", "planning.py", "evaluate.py", "costmodel.py", "specs.py", "errors.py", "analysis",
           "contracts.py")
# Bottom to top: a module imports only from its own layer or those below it ("nothing imports upward").
# contracts is the leaf every layer above shares; analysis works on plain records and arrays only.
LAYERS = (
    ("persim_bench", "errors", "contracts", "analysis"),
    ("envs", "specs"),
    ("data",),
    ("costmodel", "planning", "roofline"),
    ("evaluate",),
    ("algos",),
    ("config",),
    ("bench", "gpu_check", "orchestration"),
    ("datasets", "cli"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """Every module imported anywhere in the file (functions included), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
               and ast.unparse(branch.test).endswith("TYPE_CHECKING") for stmt in branch.body for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@functools.cache
def package_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in runtime_imports(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source = "def f():\n    from persim_bench import cli\nif TYPE_CHECKING:\n    from persim_bench import config\n"
    tmp = PACKAGE.parent / ".cycle_probe.py"
    tmp.write_text(source)
    try:
        assert runtime_imports(tmp) == {"persim_bench", "persim_bench.cli"}
    finally:
        tmp.unlink()


def test_the_package_has_no_import_cycle():
    assert find_cycle(package_graph()) is None


def test_science_layer_imports_no_tune_mlflow_or_orchestration():
    forbidden = ("ray.tune", "ray.train", "mlflow", "persim_bench.orchestration", "persim_bench.cli",
                 "persim_bench.config")
    offenders = []
    for part in SCIENCE:
        for path in sorted((PACKAGE / part).rglob("*.py")) if (PACKAGE / part).is_dir() else [PACKAGE / part]:
            bad = sorted(m for m in runtime_imports(path) if m.startswith(forbidden))
            offenders += [f"{path.relative_to(PACKAGE)}: {m}" for m in bad]
    assert offenders == []


# gpu_check is its own command: it runs on a machine without the CLI's dependencies (docs/cluster.md).
OWN_COMMANDS = ("cli.py", "gpu_check.py")


def test_only_the_cli_exits():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in OWN_COMMANDS:
            continue
        text = path.read_text()
        if "sys.exit(" in text or "SystemExit(" in text:
            offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []


def layer_of(module: str) -> int:
    """The layer of a package module: its first part below persim_bench (the package itself for persim_bench)."""
    part = module.split(".")[1] if "." in module else module
    return next(i for i, names in enumerate(LAYERS) if part in names)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                  if layer_of(target) > layer_of(module))


def test_every_module_has_a_layer_and_nothing_imports_upward():
    graph = package_graph()
    assert all(layer_of(module) is not None for module in graph)  # a new top-level module must be placed
    assert upward_imports(graph) == []


def test_upward_imports_are_seen():
    graph = {"persim_bench.planning": {"persim_bench.algos.base"}, "persim_bench.algos.persim": {"persim_bench.evaluate"}}
    assert upward_imports(graph) == ["persim_bench.planning -> persim_bench.algos.base"]


def test_the_contracts_are_a_leaf():
    assert package_graph()["persim_bench.contracts"] == set()


def test_analysis_imports_nothing_of_the_package_outside_itself():
    """Analysis builds tables and figures from plain records: no orchestration, registry, config, MLflow or Ray."""
    graph = package_graph()
    outside = {f"{module}: {imported}" for module, imported_modules in graph.items()
               if module.startswith("persim_bench.analysis") for imported in imported_modules
               if not imported.startswith("persim_bench.analysis")}
    assert outside == set()
    libraries = {f"{path.relative_to(PACKAGE)}: {m}" for path in (PACKAGE / "analysis").rglob("*.py")
                 for m in runtime_imports(path) if m.split(".")[0] in ("mlflow", "ray")}
    assert libraries == set()


# envs/base.py: the env families' base classes (algos/base.py became contracts.py).
SHARED_BASENAMES = {"__init__.py"}


def test_module_and_function_names_say_which_one():
    """No two modules named alike (once: analysis/report.py and orchestration/report.py), and no public function
    of analysis or orchestration named like another function of the package (once: two ``build_tables``)."""
    paths = sorted(PACKAGE.rglob("*.py"))
    by_basename: dict[str, list[str]] = {}
    for path in paths:
        by_basename.setdefault(path.name, []).append(str(path.relative_to(PACKAGE)))
    assert {name: where for name, where in by_basename.items() if len(where) > 1 and name not in SHARED_BASENAMES} == {}

    defined: dict[str, list[str]] = {}
    for path in paths:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defined.setdefault(node.name, []).append(module_name(path))
    assert len(defined.get("build_tables", [])) <= 1
    layers = ("persim_bench.analysis", "persim_bench.orchestration")
    clashes = {name: modules for name, modules in defined.items() if len(modules) > 1 and not name.startswith("_")
               and any(m.startswith(layers) for m in modules)}
    assert clashes == {}


def test_tables_label_methods_with_the_registry_labels():
    """Analysis hard-codes no labels: the rows say what orchestration's mapping (the registry's labels) says."""
    from persim_bench.algos.registry import ALGORITHMS
    from persim_bench.analysis.grid_tables import CostRecord, GridLayout, TrialRecord, cost_table, per_env_tables
    from persim_bench.analysis.reproduction import build_report
    from persim_bench.orchestration.tables import method_labels

    labels = method_labels()
    assert labels == {**{name: algo.label for name, algo in ALGORITHMS.items()}, "data": "data"}
    layout = GridLayout(envs=("cartpole",), test_agents=(0,), agent_columns={"cartpole": ("length=0.5, force=10",)},
                        methods=("persim", "bcq_p"), regimes=("pure",), labels=labels, prediction_steps=50,
                        reward_episodes=2, policy_reward_episodes=4)
    metrics = {"rmse_agent0": 0.1, "r2_agent0": 0.9, "reward_agent0": 150.0, "seconds_total": 10.0}
    records = [TrialRecord(trial=f"{algo}_cartpole_pure_s0", status="FINISHED", stage="main", algo=algo, env="cartpole",
                           regime="pure", metrics=metrics) for algo in ("bcq_p", "persim")]
    records.append(TrialRecord(trial="persim_cartpole_pure_s0_r4", status="FINISHED", stage="main", algo="persim",
                               env="cartpole", regime="pure", rank=4, rank_source="sweep", metrics=metrics))
    reward = per_env_tables(records, layout)["reward_cartpole"]
    assert [row[1] for row in reward["rows"]] == ["PerSim", "PerSim (rank 4)", "BCQ-P"]
    assert [row[1] for row in reward["rows"]] == [ALGORITHMS["persim"].label, f"{ALGORITHMS['persim'].label} (rank 4)",
                                                  ALGORITHMS["bcq_p"].label]
    costs = cost_table([CostRecord(algo=algo, env="cartpole", cpus=1, estimated_seconds=None, device="cpu",
                                   metrics=metrics) for algo in ("bcq_p", "persim")], layout, 1e9)
    assert [row[0] for row in costs["rows"]] == ["PerSim", "BCQ-P"]
    report = build_report([{"algo": algo, "env": "cartpole", "regime": "pure", "seed": 0,
                            "metrics": {"reward_agent0": 150.0}} for algo in ("persim", "bcq_p")], n_boot=10,
                          labels=labels)
    assert {row[2] for row in report.tables["paper_reward"]["rows"]} == {"PerSim", "BCQ-P"}


def test_algorithms_draw_nothing():
    """A trial returns what it learned (e.g. agent factors); analysis draws it, called by the trial runner."""
    graph = package_graph()
    drawing = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith("persim_bench.algos")
                     for t in targets if t.startswith("persim_bench.analysis"))
    assert drawing == []
