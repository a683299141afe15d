"""The algorithm registry: every ``ALGORITHMS`` entry of every module in ``persim_bench.algos``.

Grid sections, trial expansion, MLflow params, table labels and ``--dry-run`` costs all derive
from it. Modules are found by listing the package, so a new baseline is one new file.
"""
from __future__ import annotations

import importlib
import pkgutil

from persim_bench.contracts import Algorithm


def _discover() -> dict[str, Algorithm]:
    import persim_bench.algos as package

    found: dict[str, Algorithm] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for algo in getattr(module, "ALGORITHMS", ()):
            if algo.name in found:
                raise RuntimeError(f"algorithm {algo.name!r} registered twice ({module.__name__})")
            found[algo.name] = algo
    return found


ALGORITHMS: dict[str, Algorithm] = _discover()


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}") from None


def spec_sections() -> dict[str, type]:
    """Grid section -> its spec class, one per ``spec_key`` (variants such as BCQ-P and BCQ-A share one)."""
    sections: dict[str, type] = {}
    for algo in ALGORITHMS.values():
        if algo.spec_key is None:
            continue
        known = sections.setdefault(algo.spec_key, algo.spec)
        if known is not algo.spec:
            raise RuntimeError(f"grid section {algo.spec_key!r} claimed by two spec classes ({algo.name})")
    return sections
