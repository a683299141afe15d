"""The GPU check runs as documented, at tiny sizes on a CPU, importing nothing the device machine lacks."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from persim_bench.gpu_check import NEVER, WHEELS

ROOT = Path(__file__).parent.parent
PAGE = ROOT / "docs" / "cluster.md"

pytestmark = pytest.mark.integration  # a subprocess that imports torch, MuJoCo and plans an episode


def test_the_documented_tiny_check_runs_without_ray_mlflow_or_d3rlpy(tmp_path):
    (command,) = [line for line in PAGE.read_text().splitlines() if line.startswith("python -m persim_bench.gpu_check --tiny")]
    args = shlex.split(command)[3:] + ["--out", str(tmp_path / "check.md")]
    probe = (f"import runpy, sys; sys.argv = ['gpu_check', *{args!r}]\n"
             "try:\n    runpy.run_module('persim_bench.gpu_check', run_name='__main__')\n"
             "except SystemExit as done:\n    code = done.code\n"
             f"print('IMPORTED', sorted({{m.split('.')[0] for m in sys.modules}} & set({NEVER!r})))\n"
             "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "IMPORTED []" in done.stdout
    table = (tmp_path / "check.md").read_text()
    for row in ("dense matmul fp32", "dense matmul bf16", "planner model evaluations", "PerSim HalfCheetah fit",
                "HalfCheetah CEM episode"):
        assert f"| {row}" in table
    assert re.search(r"\| [\d.]+ s per epoch \|", table) and re.search(r"multiply-adds/s [\d.e+]+ \|", table)


def test_every_wheel_the_device_needs_is_pinned():
    pinned = set(re.findall(r"^([A-Za-z0-9_.-]+)==", (ROOT / "constraints.txt").read_text(), re.M))
    assert set(WHEELS) <= pinned  # --fetch-wheels downloads exactly these versions
