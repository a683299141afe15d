"""What keeps a run safe from its surroundings: one run per results folder and grid, Tune state that is
verified before Ray unpickles it, services checked before any work, paths kept inside the results folder.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from persim_bench.errors import BenchError, TrackingError


class LockError(BenchError):
    """Another persim-bench process holds the grid's lock in this results folder."""


class StateError(BenchError):
    """Saved state (Tune's, or ours) that cannot be trusted or read; the message names the file."""


def inside(results: Path, path: Path) -> Path:
    """``path`` resolved, refused unless it lies under the results folder (nothing is written outside it)."""
    resolved, root = Path(path).resolve(), Path(results).resolve()
    if resolved != root and root not in resolved.parents:
        raise BenchError(f"{path}: outside the results folder {root}; refusing to write there")
    return resolved


class RunLock:
    """An exclusive ``flock`` on ``<results>/state/<grid>.lock`` for the life of the process.

    The kernel releases it when the holder dies, so a lock left by a killed run never blocks; the
    file keeps the holder's pid, host and command, for the message a second run gets.
    """

    def __init__(self, results: Path, grid_name: str, command: str):
        self.path = inside(results, Path(results) / "state" / f"{grid_name}.lock")
        self.command = command
        self.handle = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown holder"
            handle.close()
            raise LockError(f"{self.path}: held by another persim-bench ({holder}); wait for it to finish or stop "
                            f"it, then rerun (with --resume to continue an interrupted run)") from None
        handle.seek(0)
        self.stale = handle.read().strip() or None  # a dead holder's record: reported, then replaced
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                     f"{self.command}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.truncate(0)
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


# ---------------------------------------------------------------- Tune's saved state

def _tune_state_files(experiment_dir: str):
    """(filesystem, infos) of the top-level files Tune restores from (path or URI).

    Tune reads back tuner.pkl, trainable.pkl, the experiment and the searcher state, several of
    them by unpickling; trial folders are not read to restore the experiment.
    """
    from pyarrow import fs

    from persim_bench.orchestration.cluster import filesystem_of

    filesystem, root = filesystem_of(experiment_dir)
    infos = filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True))
    return filesystem, [i for i in infos if i.type == fs.FileType.File and i.base_name.endswith((".pkl", ".json"))
                        and not i.base_name.startswith(".")]


def tune_state_digest(experiment_dir: str) -> dict[str, str]:
    """sha256 of every file Tune restores from, by name."""
    filesystem, infos = _tune_state_files(experiment_dir)
    digests = {}
    for info in infos:
        with filesystem.open_input_stream(info.path) as stream:
            digests[info.base_name] = hashlib.sha256(stream.read()).hexdigest()
    return digests


def verify_tune_state(experiment_dir: str, recorded: dict[str, str] | None, state_file: Path) -> None:
    """Refuse to restore Tune state that is not byte for byte what this tool last recorded."""
    if not recorded:
        raise StateError(f"{experiment_dir}: no digest of this Tune state in {state_file}; refusing to restore it "
                         f"(Ray would unpickle it). Run without --resume to start the grid afresh")
    found = tune_state_digest(experiment_dir)
    changed = sorted(name for name in set(found) | set(recorded) if found.get(name) != recorded.get(name))
    if changed:
        raise StateError(f"{experiment_dir}: Tune state changed since persim-bench recorded it ({', '.join(changed)}); "
                         f"refusing to restore it (Ray would unpickle it). Run without --resume to start afresh")


def state_listing(experiment_dir: str) -> tuple:
    """(name, size, mtime) of those files: cheap to poll, changes whenever Tune saves."""
    return tuple(sorted((i.base_name, i.size, i.mtime_ns) for i in _tune_state_files(experiment_dir)[1]))


def state_recorder(experiment_dir: str, record):
    """A Tune callback calling ``record()`` after every step in which Tune's saved state changed on disk."""
    from ray.tune import Callback

    class RecordTuneState(Callback):
        def __init__(self):
            self.seen = None

        def _maybe_record(self):
            listing = state_listing(experiment_dir)
            if listing != self.seen:
                record()
                self.seen = listing

        def on_step_end(self, iteration, trials, **info):
            self._maybe_record()

        def on_experiment_end(self, trials, **info):
            self._maybe_record()

    return RecordTuneState()


# ---------------------------------------------------------------- services, before any work


def check_tracking_store(uri: str, timeout: float = 5.0) -> None:
    """The MLflow store answers (a server within ``timeout``, a SQLite file that is a database); else one line."""
    from mlflow.tracking import MlflowClient

    saved = {key: os.environ.get(key) for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(timeout)))
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # requests, sqlalchemy and MLflow each raise their own types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ("move the damaged file aside to start a new store" if uri.startswith("sqlite:")
                else "start the server or pass another --mlflow-uri")
        raise TrackingError(f"MLflow store {uri} cannot be used: {first[:300]}; {hint}") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def read_state_file(path: Path) -> dict:
    """The tool's own resume state, or one line naming the file."""
    try:
        state = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StateError(f"{path}: damaged resume state ({err}); delete it and run without --resume") from None
    if not isinstance(state, dict) or not {"fingerprint", "parent_run_id", "storage", "tracking_uri"} <= set(state):
        raise StateError(f"{path}: not a persim-bench resume state; delete it and run without --resume")
    return state
