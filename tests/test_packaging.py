"""`pip install .` (not editable) ships the grids, and the envs are reachable through gymnasium."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_a_built_wheel_resolves_the_shipped_grids_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                    "-w", str(tmp_path / "wheel")], check=True)
    (wheel,) = (tmp_path / "wheel").glob("persim_bench-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import persim_bench, persim_bench.config as c; "
             "assert 'site' in persim_bench.__file__, persim_bench.__file__; "
             "print(c.load_grid('paper').name, c.grid_path('smoke'))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert done.returncode == 0, done.stderr
    name, path = done.stdout.split()
    assert name == "paper" and Path(path).is_file() and str(tmp_path / "site") in path


def test_gymnasium_makes_the_envs_by_module_qualified_id():
    import gymnasium

    env = gymnasium.make("persim_bench.envs:persim/CartPole-v0", length=0.3, force=4.0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4,)
