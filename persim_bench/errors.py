"""Typed errors of the library. Only ``cli.py`` turns them into an exit with a one-line message."""
from __future__ import annotations


class BenchError(Exception):
    """Something the user can fix (a file, a field, a name, a connection); the message names it."""


class GridError(BenchError, ValueError):
    """A grid file that cannot be used; the message is one line naming file and field."""


class ClusterError(BenchError):
    """Ray or a store that the run needs cannot be reached or is not shared between nodes."""


class TrackingError(BenchError):
    """MLflow does not hold what a command needs (no experiment, no finished run)."""


class Interrupted(BenchError):
    """Ctrl-C stopped a run; what finished is kept, its MLflow runs end KILLED, ``--resume`` continues it."""
