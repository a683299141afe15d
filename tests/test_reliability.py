"""Faults around a run, on real Ray, Tune and MLflow: a second run, crafted Tune state, Ctrl-C, dead services.

Each test starts ``persim-bench`` as a user would (a subprocess, or ``cli.main``) on a tiny grid.
"""
from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from persim_bench import cli
from persim_bench.orchestration.guard import RunLock

pytestmark = pytest.mark.integration

TINY = {
    "name": "tiny-faults", "seed": 0, "envs": ["cartpole"], "regimes": ["random"], "algos": ["persim"],
    "seeds": [0, 1],
    "data": {"n_agents": 6, "agents_per_shard": 6},
    "persim": {"rank": 2, "epochs": 2, "ensemble": 2, "state_hidden": [8], "action_hidden": [8]},
    "planner": {"horizon": 3, "candidates": 8, "elites": 2, "iterations": 1},
    "evaluation": {"prediction_policy": "heuristic", "prediction_trajectories": 2, "prediction_steps": 4,
                   "burn_in": 2, "reward_episodes": 1, "max_steps": {"cartpole": 10}},
}


def _grid(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "persim_bench.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _runs(results: Path, name: str = "tiny-faults"):
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"persim-bench/{name}")
    return [] if experiment is None else client.search_runs([experiment.experiment_id], max_results=1000)


def test_a_second_run_on_the_same_results_and_grid_is_refused_naming_the_holder(tmp_path):
    results = tmp_path / "results"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from persim_bench.orchestration.guard import RunLock\n"
        f"with RunLock(Path({str(results)!r}), 'tiny-faults', 'persim-bench run --grid holder'):\n"
        "    print('held', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as err:
            cli.main(["run", "--grid", str(_grid(tmp_path)), "--results", str(results)])
        message = str(err.value.code)
        assert f"pid {holder.pid}" in message and "held by another persim-bench" in message
        assert "\n" not in message and not (results / "mlflow.db").exists()  # refused before any work
        with pytest.raises(SystemExit, match="held by another persim-bench"):
            cli.main(["data", "--grid", str(_grid(tmp_path)), "--results", str(results)])
    finally:
        holder.kill()
        holder.wait()
    with RunLock(results, "tiny-faults", "test") as lock:  # the dead holder's lock never blocks
        assert lock.stale and f"pid {holder.pid}" in lock.stale
    with RunLock(results, "another-grid", "test"):  # other grids are independent
        pass


def test_crafted_tune_state_is_never_unpickled_on_resume(ray_cluster, tmp_path):
    results, marker = tmp_path / "results", tmp_path / "payload-ran"
    grid = _grid(tmp_path, seeds=[0])
    cli.main(["run", "--grid", str(grid), "--results", str(results)])
    (experiment,) = [p for p in (results / "ray").iterdir() if p.name.startswith("tiny-faults-main-")]

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (experiment / "tuner.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(SystemExit) as err:
        cli.main(["run", "--grid", str(grid), "--results", str(results), "--resume"])
    assert "Tune state changed since persim-bench recorded it (tuner.pkl)" in str(err.value.code)
    assert not marker.exists()


def test_ctrl_c_stops_cleanly_and_marks_runs_killed(tmp_path):
    results = tmp_path / "results"
    grid = _grid(tmp_path, persim={**TINY["persim"], "epochs": 20000})  # minutes per trial: time to interrupt
    driver = _cli("run", "--grid", str(grid), "--results", str(results))
    deadline = time.time() + 300
    while not any(r.info.status == "RUNNING" and "trial" in r.data.tags for r in _runs(results)):
        assert time.time() < deadline and driver.poll() is None, driver.stdout.read() if driver.poll() else "timeout"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
    output, _ = driver.communicate(timeout=300)
    assert driver.returncode == 130, output[-3000:]
    assert "--resume" in output.splitlines()[-1]
    # Ray may log its killed workers' tracebacks; none may come from our own code (the old TypeError did)
    assert not re.search(r'persim_bench/(cli|orchestration)/\w+\.py", line', output), output[-3000:]
    runs = _runs(results)
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    assert {r.info.status for r in runs if "persim_bench.parent" in r.data.tags} == {"KILLED"}


def test_an_unreachable_tracking_server_is_refused_before_policies_or_data(tmp_path):
    results = tmp_path / "results"
    started = time.monotonic()
    with pytest.raises(SystemExit) as err:
        cli.main(["run", "--grid", str(_grid(tmp_path)), "--results", str(results),
                  "--mlflow-uri", "http://127.0.0.1:1"])
    assert "MLflow store http://127.0.0.1:1 cannot be used" in str(err.value.code)
    assert time.monotonic() - started < 60
    assert not (results / "datasets").exists() and not (results / "policies").exists()


def test_damaged_store_and_state_and_read_only_results_are_one_line(tmp_path):
    grid = _grid(tmp_path)
    results = tmp_path / "results"
    (results / "state").mkdir(parents=True)
    (results / "state" / "tiny-faults.json").write_text("{ damaged")
    with pytest.raises(SystemExit, match=r"tiny-faults.json: damaged resume state"):
        cli.main(["run", "--grid", str(grid), "--results", str(results), "--resume"])
    (results / "mlflow.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(SystemExit, match=r"MLflow store sqlite:///.*mlflow.db cannot be used.*move the damaged"):
        cli.main(["tables", "--grid", str(grid), "--results", str(results)])


@pytest.mark.parametrize("command", [["tables", "--grid", "smoke"], ["report", "--grid", "smoke"],
                                     ["evaluate", "--run", "0123abcd"], ["ui"]])
def test_reading_a_results_folder_without_runs_is_refused_and_creates_nothing(tmp_path, monkeypatch, command):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    results = tmp_path / "typo"
    with pytest.raises(SystemExit, match=r"typo: no mlflow.db, so no runs to read; run `persim-bench run`"):
        cli.main(command + ["--results", str(results)])
    assert not results.exists()


def test_a_folder_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    MlflowClient(f"sqlite:///{results / 'mlflow.db'}").create_experiment("persim-bench/tiny-faults")
    (results / "tiny-faults").write_text("a file where the tables folder goes")  # root ignores chmod: use this
    with pytest.raises(SystemExit) as err:
        cli.main(["tables", "--grid", str(_grid(tmp_path)), "--results", str(results)])
    message = str(err.value.code)
    assert message.startswith(f"persim-bench: {results / 'tiny-faults'}: ") and "\n" not in message


def test_the_resume_state_keeps_locations_inside_results_relative(tmp_path):
    from persim_bench.config import load_grid
    from persim_bench.orchestration import tracking

    grid = load_grid(_grid(tmp_path))
    results = tmp_path / "results"
    state = tracking.new_state(grid, f"sqlite:///{results / 'mlflow.db'}", str(results / "ray"), "1", "abc", results)
    assert state["storage"] == "ray" and state["tracking_uri"] == "sqlite:results/mlflow.db"
    moved = tmp_path / "elsewhere"
    assert tracking.stores_of(state, moved) == (f"sqlite:///{moved.resolve() / 'mlflow.db'}", str(moved.resolve() / "ray"))
    outside = tracking.new_state(grid, "http://mlflow:5000", "s3://bucket/tune", "1", "abc", results)
    assert tracking.stores_of(outside, moved) == ("http://mlflow:5000", "s3://bucket/tune")
