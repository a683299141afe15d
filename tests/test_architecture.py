"""The package's shape: no import cycles, a science layer free of Tune and MLflow, exits only in the CLI."""
from __future__ import annotations

import ast
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
    ("costmodel", "planning"),
    ("evaluate",),
    ("algos",),
    ("config",),
    ("bench", "orchestration"),
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


def test_only_the_cli_exits():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "cli.py":
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


def test_the_contracts_are_a_leaf_and_analysis_imports_only_itself():
    graph = package_graph()
    assert graph["persim_bench.contracts"] == set()
    outside = {f"{m} -> {t}" for m, targets in graph.items() if m.startswith("persim_bench.analysis")
               for t in targets if not t.startswith("persim_bench.analysis")}
    assert outside == set()
