"""docs/datasets.md runs as written: every bash and python block, in order, against a freshly generated tiny grid.

The grid is a tiny ``smoke.yaml`` in the working folder (``load_grid`` looks in ./tune_configs first),
so the page keeps the names a user types after ``persim-bench run --grid smoke``.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

DOC = Path(__file__).parent.parent / "docs" / "datasets.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
TINY_SMOKE = {
    "name": "smoke", "seed": 3, "envs": ["cartpole"], "regimes": ["random"], "algos": ["true_env_mpc"],
    "data": {"n_agents": 7, "agents_per_shard": 3},
}


def code_blocks(path: Path) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall(path.read_text()) if lang in ("bash", "python")]


def test_the_page_has_the_four_readers_the_api_and_both_exports():
    text = "\n".join(body for _, body in code_blocks(DOC))
    for needle in ('partitioning="hive"', "pd.read_parquet", "pl.scan_parquet", "duckdb.sql", "hive_partitioning",
                   "datasets.load", "to_d3rlpy", ".subset(agents=", "--format minari", "--format d4rl", "recover_environment"):
        assert needle in text, needle


def test_every_block_runs_against_a_fresh_tiny_grid(ray_cluster, tmp_path, monkeypatch, capsys):
    (tmp_path / "tune_configs").mkdir()
    (tmp_path / "tune_configs" / "smoke.yaml").write_text(yaml.safe_dump(TINY_SMOKE))
    monkeypatch.chdir(tmp_path)
    saved = dict(os.environ)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    namespace: dict = {}
    try:
        for lang, body in code_blocks(DOC):
            if lang == "bash":
                for line in filter(None, (line.strip() for line in body.splitlines())):
                    done = subprocess.run(shlex.split(line), cwd=tmp_path, env=env, capture_output=True, text=True,
                                          timeout=600)
                    assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            else:
                exec(compile(body, str(DOC), "exec"), namespace)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out = capsys.readouterr().out
    manifest = tmp_path / "results" / "datasets" / "smoke" / "cartpole" / "regime=random" / "_manifest.json"
    assert manifest.exists()
    assert "smoke/cartpole/random" in out                      # datasets.available
    assert (tmp_path / "exports" / "minari" / "persim" / "cartpole" / "smoke-random-v0").is_dir()
    assert (tmp_path / "exports" / "d4rl" / "smoke-cartpole-random.hdf5").is_file()
    assert namespace["table"].num_rows == namespace["data"].table.num_rows  # pyarrow's hive read == the API's
    assert sorted(namespace["info"]) == ["reward_ctrl", "reward_run", "x_position", "x_velocity"]
    small, data = namespace["small"], namespace["data"]
    assert small.transitions.n_agents == 6 and small.agents.num_rows == 6 and small.transitions.t.max() == 4
    kept = np.isin(data.transitions.agent, small.agents["dataset_agent"].to_numpy()) & (data.transitions.t < 5)
    assert np.array_equal(small.transitions.obs, data.transitions.obs[kept])


def test_relative_links_in_the_readme_and_docs_resolve():
    root = DOC.parent.parent
    broken = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.name}: {target}")
    assert broken == []
