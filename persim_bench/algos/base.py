"""Contracts: dynamics models <-> the shared planner and evaluation; algorithms <-> the registry and the trials."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from persim_bench.config import Grid


class DynamicsModel(Protocol):
    """A (possibly ensembled) one-step model over the dataset's agents.

    ``step`` advances M member-specific batches of states at once: the planner rolls every
    ensemble member over every candidate in one call per horizon step.
    """

    n_members: int

    def step(self, obs: torch.Tensor, action: torch.Tensor, agent: torch.Tensor) -> torch.Tensor:
        """obs [M, B, D] (float32), action [B] long or [B, A] float, agent [B] long -> next obs [M, B, D].

        The result is a fresh tensor the caller owns (never a view of ``obs``): evaluation may clamp it in place.
        """


@runtime_checkable
class ContextualModel(DynamicsModel, Protocol):
    """A model that identifies agents by their recent real transitions (CaDM), not by agent id.

    After ``condition`` on E real episodes, ``step``'s third argument holds episode indices
    into those E (the planner and the prediction test pass ``arange(E)``).
    """

    history: int  # how many past transitions ``condition`` reads

    def condition(self, obs: torch.Tensor, action: torch.Tensor) -> None:
        """obs [E, T+1, D] and actions [E, T(, A)] of each episode so far, oldest first; T may be 0."""


@dataclass(frozen=True)
class Trial:
    """One experiment of a stage: what a run function is asked to do. A dict only at the Tune boundary."""

    stage: str                      # "rank_cv" or "main"
    algo: str                       # a registry name
    env: str
    regime: str                     # "none" for algorithms that read no data
    seed: int
    rank: int | None = None         # PerSim only; None while rank_cv has not picked one
    rank_source: str | None = None  # PerSim only: "cv", "pinned" or "sweep"
    name: str = ""                  # deterministic, e.g. persim-cartpole-random-r5-s0

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Trial":
        return cls(**values)


@dataclass(frozen=True)
class TrialContext:
    """What a run function gets besides its Trial: the grid, absolute paths, its device, a progress callback."""

    grid: "Grid"
    data_root: Path
    policy_root: Path
    work_dir: Path                  # the trial's own folder (Tune's trial directory)
    device: str = "cpu"             # "cuda" when the grid reserves a GPU for this algorithm and one is there
    report: Callable[[dict], None] = lambda metrics: None
    costs: dict = field(default_factory=dict)  # seconds per phase and model rows, filled by the shared helpers
    artifacts: list = field(default_factory=list)  # files under work_dir the trial's MLflow run should keep
    models: list = field(default_factory=list)  # saved model files under work_dir: the run's LoggedModel


# A cost function for ``--dry-run``: (grid, trial, dataset rows, multiply-adds/s) -> CPU-seconds of the trial.
CostFn = Callable[["Grid", Trial, int, float], float]


@dataclass(frozen=True)
class Algorithm:
    """One registry entry: everything the orchestration, tables and estimates need to know of an algorithm.

    Each ``algos/<x>.py`` lists its entries in a module-level ``ALGORITHMS``; ``algos.registry``
    collects them, so adding a baseline is one file (and a block in the grid YAML).
    """

    name: str                                   # grid and CLI name, e.g. "bcq_p"
    label: str                                  # table label, e.g. "BCQ-P"
    run: Callable[[Trial, TrialContext], dict]  # fit (if it learns) and the shared evaluation -> metrics
    spec_key: str | None = None                 # the grid section it reads (shared by variants, e.g. "bcq")
    spec: type | None = None                    # that section's pydantic class
    learns_dynamics: bool = False               # gets the prediction-error test (needs the test policy)
    plans: bool = False                         # acts through the shared MPC planner
    needs_data: bool = True                     # False: one trial per env x seed, regime "none"
    action_spaces: tuple[str, ...] = ("discrete", "continuous")
    cost: CostFn | None = None                  # --dry-run refuses an algorithm without one
    # ``persim-bench evaluate``: reload the saved model file (path, device) and evaluate it again.
    reload: Callable[[Path, str], Any] | None = None
    evaluate: Callable[[Any, Trial, TrialContext], dict] | None = None

    def supports(self, discrete: bool) -> bool:
        return ("discrete" if discrete else "continuous") in self.action_spaces
