"""The command line itself: --version, help on everything, -q/-v, where MLflow and Ray are, `ui` as the server."""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import pty
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

import persim_bench
from persim_bench import cli
from persim_bench.errors import GridError
from persim_bench.orchestration import reporting

# A grid that needs no policy (random regime, no prediction test) and generates in seconds.
TINY_DATA = {
    "name": "tiny-cli",
    "seed": 7,
    "envs": ["mountaincar", "cartpole"],
    "regimes": ["random"],
    "algos": ["true_env_mpc"],
    "data": {"n_agents": 9, "agents_per_shard": 4, "max_steps": {"mountaincar": 60}},
}
TINY_RUN = {
    **TINY_DATA,
    "name": "tiny-cli-run",
    "envs": ["cartpole"],
    "seeds": [0],
    "planner": {"horizon": 5, "candidates": 20, "elites": 5},
    "evaluation": {"reward_episodes": 1, "max_steps": {"cartpole": 20}},
}


@pytest.fixture
def clean_env(monkeypatch):
    """No verbosity, Ray address or tracking URI from the caller's environment; restored afterwards."""
    for key in (reporting.ENV, "RAY_AIR_NEW_OUTPUT", "MLFLOW_LOGGING_LEVEL", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    logger = logging.getLogger("persim_bench")
    level, handlers = logger.level, list(logger.handlers)
    yield monkeypatch
    logger.setLevel(level)
    logger.handlers[:] = handlers


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in (reporting.ENV, "RAY_AIR_NEW_OUTPUT", "MLFLOW_LOGGING_LEVEL", "RAY_ADDRESS",
                        "MLFLOW_TRACKING_URI")}
    return {**env, **extra}


def test_version_prints_the_package_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"persim-bench {persim_bench.__version__}\n"


def parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def test_every_command_and_option_has_help():
    top = cli.build_parser()
    walked = list(parsers(top))
    assert {p.prog for p in walked} == {"persim-bench"} | {
        f"persim-bench {c}" for c in ("data", "export", "run", "tables", "report", "evaluate", "ui", "bench")}
    for parser in walked:
        assert parser.description and len(parser.description.split()) >= 10, parser.prog
        assert not parser.description.startswith("``persim-bench``"), parser.prog  # not the module docstring
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), (parser.prog, action)
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help and choice.help.strip(), (parser.prog, choice.dest)
    assert "persim-bench run --grid smoke" in top.epilog and "persim-bench ui" in top.epilog
    assert "MLFLOW_TRACKING_URI" in top.format_help() and "RAY_ADDRESS" in top.format_help()


@pytest.mark.parametrize("argv, quiet, verbose", [
    (["run", "--grid", "smoke"], False, 0),
    (["-q", "run", "--grid", "smoke"], True, 0),
    (["run", "--grid", "smoke", "-q"], True, 0),
    (["--quiet", "data", "--grid", "smoke"], True, 0),
    (["-v", "run", "--grid", "smoke"], False, 1),
    (["run", "-v", "--grid", "smoke"], False, 1),
    (["-v", "run", "--grid", "smoke", "-v"], False, 2),
    (["tables", "--grid", "smoke", "-vv"], False, 2),
])
def test_quiet_and_verbose_go_before_or_after_the_command(argv, quiet, verbose):
    args = cli.parse_args(argv)
    assert (args.quiet, args.verbose) == (quiet, verbose)


@pytest.mark.parametrize("argv", [["-q", "-v", "run", "--grid", "s"], ["-q", "run", "--grid", "s", "-v"]])
def test_quiet_and_verbose_exclude_each_other(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and ("exclude each other" in err or "not allowed with argument" in err), err


@pytest.mark.parametrize("level, tune, ray_level, logger_level", [
    ("quiet", 0, logging.WARNING, logging.WARNING),
    ("normal", 0, logging.WARNING, logging.INFO),
    ("verbose", 1, logging.INFO, logging.DEBUG),
    ("debug", 2, logging.INFO, logging.DEBUG),
])
def test_the_level_sets_tune_ray_and_the_logger(clean_env, level, tune, ray_level, logger_level):
    assert reporting.configure(level) == level
    assert os.environ[reporting.ENV] == level
    assert reporting.tune_verbosity() == tune and reporting.ray_logging_level() == ray_level
    assert logging.getLogger("persim_bench").level == logger_level
    # quiet: Tune's legacy output, whose verbose=0 prints nothing (the new one prints a box per stage)
    assert os.environ.get("RAY_AIR_NEW_OUTPUT") == ("0" if level == "quiet" else None)
    assert os.environ.get("MLFLOW_LOGGING_LEVEL") == ("WARNING" if level == "quiet" else None)


def test_levels_from_flags_and_the_environment(clean_env):
    assert [reporting.level_of(False, n) for n in range(4)] == ["normal", "verbose", "debug", "debug"]
    assert reporting.level_of(True, 0) == "quiet"
    assert reporting.verbosity() == "normal"
    clean_env.setenv(reporting.ENV, "quiet")
    assert reporting.configure(None) == "quiet"  # no -q/-v: the environment's
    clean_env.setenv(reporting.ENV, "loud")
    assert reporting.verbosity() == "normal"
    with pytest.raises(ValueError):
        reporting.configure("loud")


def test_one_line_per_trial():
    done = {"stage": "done", "reward_agent0": 10.0, "reward_agent1": 20.0, "rmse_agent0": 3.0, "time_total_s": 12.34}
    assert (reporting.trial_line("main", 3, 107, "persim-cartpole-random-r2-s0", done)
            == "[main 3/107] persim-cartpole-random-r2-s0: done, reward 15 (mean of 2 agents), 12.3 s")
    assert reporting.trial_line("rank_cv", 1, 4, "t", {"stage": "done", "val_loss": 0.125}) == \
        "[rank_cv 1/4] t: done, val_loss 0.125"
    assert reporting.trial_line("main", 2, 2, "t", {"stage": "done", "rmse_agent0": 1.5, "reused": 1}) == \
        "[main 2/2] t: done (reused: finished in an earlier attempt), rmse 1.5 (mean of 1 agents)"
    assert reporting.trial_line("main", 1, 2, "t", {"stage": "failed", "error": "DatasetError: NaN"}) == \
        "[main 1/2] t: FAILED: DatasetError: NaN"
    assert reporting.trial_line("main", 1, None, "t", {}, errored="RayActorError: died") == \
        "[main 1] t: FAILED (Tune gave up): RayActorError: died"


class FakeTrial:
    def __init__(self, name, status, result):
        self.trial_id, self.status, self.last_result = name, status, result
        self.config = {"trial": {"name": name, "stage": "main"}}


@pytest.mark.parametrize("level", ["quiet", "normal"])
def test_the_trial_callback_prints_finished_trials_and_warns_failed_ones_when_quiet(clean_env, capsys, level):
    reporting.configure(level)
    (callback,) = reporting.trial_lines()
    callback.setup(total_num_samples=3)
    trials = [FakeTrial("a", "TERMINATED", {"stage": "done", "val_loss": 1.0}),
              FakeTrial("b", "RUNNING", {"stage": "done", "reward_agent0": 5.0, "time_total_s": 2.0}),
              FakeTrial("c", "RUNNING", {"stage": "failed", "error": "ValueError: x"})]
    logger = logging.getLogger("persim_bench")
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        callback.on_trial_complete(0, trials, trials[1])  # Tune calls this while the trial is still RUNNING
        callback.on_trial_complete(0, trials, trials[2])
    finally:
        logger.removeHandler(handler)
    out = capsys.readouterr().out.splitlines()
    if level == "normal":
        assert out == ["[main 2/3] b: done, reward 5 (mean of 1 agents), 2.0 s", "[main 2/3] c: FAILED: ValueError: x"]
        assert seen == []
    else:
        assert out == []
        assert [r.getMessage() for r in seen] == ["[main 2/3] c: FAILED: ValueError: x"]
        assert seen[0].levelno == logging.WARNING



@pytest.mark.parametrize("level", ["quiet", "normal"])
def test_a_long_fit_prints_its_epochs_at_most_once_a_minute(clean_env, capsys, level):
    """HalfCheetah epochs take minutes: a user sees the fit move; smoke's second-long epochs print nothing."""
    reporting.configure(level)
    (callback,) = reporting.trial_lines()
    slow, fast = FakeTrial("slow", "RUNNING", {}), FakeTrial("fast", "RUNNING", {})
    for epoch, seconds in ((1, 212.0), (2, 250.0), (3, 430.0)):
        callback.on_trial_result(0, [slow], slow, {"stage": "fit", "epoch": epoch, "train_loss": 0.01234,
                                                    "epoch_seconds": 210.0, "time_total_s": seconds})
    for epoch in range(1, 50):
        callback.on_trial_result(0, [fast], fast, {"stage": "fit", "epoch": epoch, "time_total_s": epoch * 0.5})
    callback.on_trial_result(0, [fast], fast, {"stage": "checkpoint", "epoch": 50, "time_total_s": 100.0})
    out = capsys.readouterr().out.splitlines()
    if level == "normal":
        assert out == ["[main] slow: fitting, epoch 1, train_loss 0.01234, 210 s per epoch, 212 s",
                       "[main] slow: fitting, epoch 3, train_loss 0.01234, 210 s per epoch, 430 s"]
    else:
        assert out == []
    assert reporting.fit_line("main", "cadm", {"iteration": 2, "epoch": 7, "val_loss": -4.0}) == \
        "[main] cadm: fitting, iteration 2, epoch 7, val_loss -4"

def test_tracking_uri_flag_then_environment_then_results(clean_env, tmp_path):
    results = tmp_path / "results"
    args = argparse.Namespace(mlflow_uri=None)
    assert cli.tracking_uri(args, results) == f"sqlite:///{results / 'mlflow.db'}"
    assert cli.given_tracking_uri(args) is None  # `run` then applies its own default (with artifacts under results/)
    clean_env.setenv("MLFLOW_TRACKING_URI", "")
    assert cli.tracking_uri(args, results) == f"sqlite:///{results / 'mlflow.db'}"
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert cli.tracking_uri(args, results) == "http://tracking:5000" == cli.given_tracking_uri(args)
    args.mlflow_uri = "sqlite:///elsewhere.db"
    assert cli.tracking_uri(args, results) == "sqlite:///elsewhere.db" == cli.given_tracking_uri(args)


def test_every_command_with_a_tracking_store_takes_mlflow_uri():
    for command in ("run", "tables", "report", "ui"):
        args = cli.parse_args([command, "--mlflow-uri", "http://x:1"] + ([] if command == "ui" else ["--grid", "g"]))
        assert cli.tracking_uri(args, None) == "http://x:1"


def test_ray_address_flag_then_environment_then_local(clean_env):
    args = cli.parse_args(["run", "--grid", "smoke"])
    assert args.address is None and cli.ray_address(args) == "local"
    clean_env.setenv("RAY_ADDRESS", "")
    assert cli.ray_address(args) == "local"
    clean_env.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cli.ray_address(args) == "10.0.0.1:6379"
    assert cli.ray_address(cli.parse_args(["data", "--grid", "smoke", "--address", "local"])) == "local"
    assert cli.ray_address(cli.parse_args(["run", "--grid", "smoke", "--address", "auto"])) == "auto"


def test_run_and_data_use_the_resolved_address_and_uri(clean_env, tmp_path, write_grid):
    """No --address / --mlflow-uri: RAY_ADDRESS and MLFLOW_TRACKING_URI reach the stages (nothing started)."""
    from persim_bench.orchestration import cluster, stages

    grid = write_grid(TINY_DATA)
    clean_env.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    seen = {}

    class Stop(Exception):
        pass

    def connect_ray(address):
        seen["data"] = address
        raise Stop

    def run_grid(grid, results, **kwargs):
        seen["run"] = kwargs
        raise Stop

    clean_env.setattr(cluster, "connect_ray", connect_ray)
    clean_env.setattr(stages, "run_grid", run_grid)
    with pytest.raises(Stop):
        cli.main(["data", "--grid", str(grid), "--results", str(tmp_path), "--yes"])
    with pytest.raises(Stop):
        cli.main(["run", "--grid", str(grid), "--results", str(tmp_path), "--yes"])
    assert seen["data"] == "10.0.0.1:6379"
    assert seen["run"]["address"] == "10.0.0.1:6379" and seen["run"]["mlflow_uri"] == "http://tracking:5000"
    with pytest.raises(Stop):
        cli.main(["run", "--grid", str(grid), "--results", str(tmp_path), "--yes", "--address", "local",
                  "--mlflow-uri", "sqlite:///x.db"])
    assert seen["run"]["address"] == "local" and seen["run"]["mlflow_uri"] == "sqlite:///x.db"


@pytest.mark.integration
def test_quiet_data_prints_no_progress_bar_and_a_few_lines(tmp_path, write_grid):
    """Even on a terminal (stderr is a pty here), -q shows no bar; piped stdout gets the stage lines only."""
    grid = write_grid(TINY_DATA)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm draws nothing 0 wide
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        done = subprocess.run([sys.executable, "-m", "persim_bench.cli", "-q", "data", "--grid", str(grid),
                               "--results", str(tmp_path / "results")], stdout=subprocess.PIPE, stderr=slave,
                              text=True, timeout=600, env=subprocess_env())
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    err = b"".join(chunks).decode(errors="replace")
    assert done.returncode == 0, done.stdout + err
    assert (tmp_path / "results" / "datasets" / "tiny-cli" / "cartpole" / "regime=random" / "_manifest.json").exists()
    lines = [line for line in (done.stdout + err).replace("\r", "\n").splitlines() if line.strip()]
    assert "datasets:" not in err and "shard/s" not in err and "%|" not in err, err
    assert len(lines) <= 5, lines
    assert all("WARNING" in line for line in err.replace("\r", "\n").splitlines() if line.strip()), err


@pytest.mark.integration
def test_run_prints_one_line_per_trial_and_no_tune_tables(tmp_path, write_grid):
    grid = write_grid(TINY_RUN)
    done = subprocess.run([sys.executable, "-m", "persim_bench.cli", "run", "--grid", str(grid),
                           "--results", str(tmp_path / "results")], capture_output=True, text=True, timeout=900,
                          env=subprocess_env())
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout + done.stderr
    trial_lines = [line for line in out.splitlines() if line.startswith("[main ")]
    assert len(trial_lines) == 1 and trial_lines[0].startswith("[main 1/1] true-env-mpc-cartpole-s0: done, reward ")
    assert "started with configuration" not in out and "Trial status:" not in out  # Tune's tables are -v
    assert len(out) < 20_000, len(out)

    # -q on the same results (data cached, a new parent run): no trial line, no Tune box, no INFO, no tables
    done = subprocess.run([sys.executable, "-m", "persim_bench.cli", "run", "-q", "--grid", str(grid),
                           "--results", str(tmp_path / "results")], capture_output=True, text=True, timeout=900,
                          env=subprocess_env())
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    assert not [line for line in lines if line.startswith("[main 1/1]") or "INFO" in line or "│" in line], lines
    assert done.stdout.splitlines()[-1].startswith("1 trials finished, 0 failed; tables in ") and len(lines) <= 6, lines


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.integration
def test_ui_becomes_the_mlflow_server_and_sigterm_stops_all_of_it(tmp_path):
    port = free_port()
    (tmp_path / "results").mkdir()
    MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}").create_experiment("persim-bench/some-grid")
    server = subprocess.Popen([sys.executable, "-m", "persim_bench.cli", "ui", "--port", str(port),
                               "--results", str(tmp_path / "results")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    family: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while not answers(port):
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the MLflow UI did not answer in 240 s"
            time.sleep(0.5)
        with open(f"/proc/{server.pid}/cmdline") as f:
            assert "mlflow\0ui" in f.read()  # the same pid is now MLflow: no persim-bench parent in between
        family = descendants(server.pid)
        assert family, "expected MLflow's web server process under it"
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) is not None
        deadline = time.monotonic() + 60
        while (answers(port) or any(alive(pid) for pid in family)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not answers(port)
        assert [pid for pid in family if alive(pid)] == []
    finally:
        for pid in [server.pid, *family]:  # only what this test started, should an assertion have failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        server.wait(timeout=30)
    assert f"MLflow UI on http://127.0.0.1:{port}" in server.stdout.read()


def test_evaluate_asking_for_episodes_scores_rewards_of_a_prediction_only_model():
    from persim_bench.orchestration.reevaluate import evaluation_overrides

    assert evaluation_overrides(None, None) == {}
    assert evaluation_overrides(None, [1]) == {"test_agents": [1]}  # a prediction-only grid stays prediction-only
    assert evaluation_overrides(2, None) == {"reward_episodes": 2, "rewards": True}
    assert evaluation_overrides(None, None, "trained") == {"prediction_policy": "trained"}
    assert evaluation_overrides(None, None, data_box=False) == {"clip_to_data_box": False}
    args = cli.parse_args(["evaluate", "--run", "abc", "--no-data-box", "--prediction-policy", "trained"])
    assert (args.data_box, args.prediction_policy) == (False, "trained")
    assert cli.parse_args(["evaluate", "--run", "abc"]).data_box is None      # the grid's setting stays
    assert evaluation_overrides(None, None, plan_ranking=4) == {"plan_ranking": 4}
    assert cli.parse_args(["evaluate", "--run", "abc", "--plan-ranking", "4"]).plan_ranking == 4


def test_evaluate_overrides_are_validated_as_grid_fields():
    from persim_bench.config import load_grid, with_evaluation

    grid = load_grid("smoke")
    assert with_evaluation(grid, {"plan_ranking": 3}, "evaluate --run x").evaluation.plan_ranking == 3
    for bad, field in (({"plan_ranking": -1}, "evaluation.plan_ranking"), ({"reward_episodes": 0}, "evaluation.reward_episodes"),
                       ({"test_agents": [7]}, "evaluation.test_agents.0")):
        with pytest.raises(GridError, match=f"evaluate --run x: {field}: "):
            with_evaluation(grid, bad, "evaluate --run x")
