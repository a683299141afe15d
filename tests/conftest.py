"""Shared fixtures: a real local Ray cluster for the session, small grids written to tmp dirs."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # address="local": a cluster of its own, never one another process on this machine started
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_torch_thread():
    """Small nets on a shared 2-core box: a second intra-op thread mostly waits, and under load it is far slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def write_grid(tmp_path):
    """Write a grid dict to a YAML file and return its path."""

    def write(grid: dict, name: str = "grid.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(grid))
        return path

    return write


def pytest_collection_modifyitems(items):
    """Tests that start Ray (the ``ray_cluster`` fixture) are integration tests; others mark themselves."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
