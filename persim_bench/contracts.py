"""The contracts between the layers: dynamics models <-> the shared planner and evaluation, algorithms <->
the registry and the trials. A leaf module: it imports nothing of persim_bench at run time, so planning,
evaluation, the algorithms and the orchestration all import it downward.

A trial's run function gets its ``Trial``, its own typed spec (the grid section its registry entry
names) and a ``TrialContext`` (the shared settings, paths, device, progress), and returns a
``TrialOutput``; it never sees the whole grid and never reports by side effect.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generic, Protocol, TypeVar, runtime_checkable

import torch

if TYPE_CHECKING:
    import numpy as np

    from persim_bench.config import Grid
    from persim_bench.data.generate import DatasetPlan
    from persim_bench.specs import EvaluationSpec, PlannerSpec


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

    stage: str                      # "main", or the name of an algorithm's stage before it (``PreStage``)
    algo: str                       # a registry name
    env: str
    regime: str                     # "none" for algorithms that read no data
    seed: int
    rank: int | None = None         # PerSim only; None while rank_cv has not picked one
    rank_source: str | None = None  # PerSim only: "cv", "pinned" or "sweep"
    # A data-size cell (grid ``data_sizes``): training agents N and transitions kept per agent; None: all.
    agents: int | None = None
    steps_per_agent: int | None = None
    name: str = ""                  # deterministic, e.g. persim-cartpole-random-r5-s0, persim-cartpole-random-r5-n50-k25-s0

    @classmethod
    def named(cls, **fields) -> "Trial":
        """The trial with its deterministic name: persim-cartpole-random-r5-s0, bcq-p-mountaincar-pure-s1,
        true-env-mpc-cartpole-s0, a data-size cell bcq-p-cartpole-pure-n50-k25-s0; a stage before main:
        rank-cv-cartpole-random-r3-s0."""
        trial = cls(**{**fields, "name": ""})
        if trial.stage != "main":
            name = f"{trial.stage.replace('_', '-')}-{trial.env}-{trial.regime}-r{trial.rank}-s{trial.seed}"
        else:
            parts = [trial.algo.replace("_", "-"), trial.env] + ([trial.regime] if trial.regime != "none" else [])
            if trial.rank_source is not None:
                parts.append(f"r{trial.rank if trial.rank is not None else 'cv'}")
            if trial.agents is not None:
                parts.append(f"n{trial.agents}")
            if trial.steps_per_agent is not None:
                parts.append(f"k{trial.steps_per_agent}")
            name = "-".join(parts + [f"s{trial.seed}"])
        return cls(**{**fields, "name": name})

    @property
    def in_data_size_cell(self) -> bool:
        """Whether it trains on a subset of its dataset (a cell of the grid's ``data_sizes`` axes)."""
        return self.agents is not None or self.steps_per_agent is not None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Trial":
        return cls(**values)


class Checkpoints:
    """A fit's checkpoints: the state it may resume from, and where it offers its state after each epoch.

    ``offer`` builds and saves the state only when ``every_seconds`` have passed since the last
    save, or on the last epoch (``last``): a trial restarted after that resumes past its fit.
    """

    def __init__(self, resume: dict | None = None, save: Callable[[dict], None] | None = None,
                 every_seconds: float = 600.0):
        self.resume, self.save, self.every_seconds = resume, save, every_seconds
        self._last_save = time.monotonic()

    def offer(self, state: Callable[[], dict], last: bool = False) -> None:
        if self.save is None or not (last or time.monotonic() - self._last_save >= self.every_seconds):
            return
        self.save(state())
        self._last_save = time.monotonic()


@dataclass(frozen=True)
class TrialContext:
    """What a run function gets besides its Trial and spec: the shared settings, absolute paths, device, progress."""

    evaluation: "EvaluationSpec"
    planner: "PlannerSpec"
    work_dir: Path                  # the trial's own folder (Tune's trial directory)
    data_root: Path | None = None   # the grid's datasets folder
    dataset: "DatasetPlan | None" = None  # the trial's dataset; None for algorithms that read none
    test_policy: Path | None = None  # the policy file driving the prediction test; None: the heuristic
    device: str = "cpu"             # "cuda" when the grid reserves a GPU for this algorithm and one is there
    report: Callable[[dict], None] = lambda metrics: None
    checkpoints: Checkpoints | None = None  # the fit's checkpoints (Tune's, in a trial); None: none kept


@dataclass(frozen=True)
class AgentFactors:
    """What a model learned about every agent of its data, for the paper's Figure 1 (drawn by ``analysis``)."""

    factors: "np.ndarray"           # [members, agents, rank]
    covariates: "np.ndarray"        # [agents, covariates]: the hidden parameters they should carry
    covariate_names: tuple[str, ...]
    title: str


@dataclass
class TrialOutput:
    """What a run returns: its metrics (numbers, lists for curves, strings for tags), seconds per phase and
    model cost figures, files to keep in its MLflow run, its saved model files, its agent factors."""

    metrics: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    models: list[Path] = field(default_factory=list)
    factors: AgentFactors | None = None

    def __or__(self, other: "TrialOutput") -> "TrialOutput":
        """Both outputs in one; seconds of a phase timed twice add up, other numbers take ``other``'s."""
        costs = dict(self.costs)
        for key, value in other.costs.items():
            costs[key] = costs[key] + value if key.startswith("seconds_") and key in costs else value
        return TrialOutput({**self.metrics, **other.metrics}, costs, self.artifacts + other.artifacts,
                           self.models + other.models, other.factors or self.factors)


S = TypeVar("S")
# A trial's run: (trial, its algorithm's spec, context) -> output.
RunFn = Callable[[Trial, S, TrialContext], TrialOutput]
# A cost function for ``--dry-run``: (grid, trial, dataset rows, multiply-adds/s) -> CPU-seconds of the trial.
CostFn = Callable[["Grid", Trial, int, float], float]


@dataclass(frozen=True)
class PreStage(Generic[S]):
    """A Tune stage an algorithm runs before ``main`` (PerSim's ``rank_cv``), declared on its registry entry.

    Its trials are recorded like main trials (``stage`` = ``name``); ``resources: {<name>: ...}``
    sizes them. What the stage decides reaches the main trials through ``Algorithm.main_trials``.
    """

    name: str
    trials: Callable[["Grid"], list[Trial]]   # the stage's trials for a grid ([] when the grid needs none)
    run: RunFn
    cost: CostFn
    # (its finished trials with their metrics, grid) -> what it picked per (env, regime, seed)
    choose: Callable[[list[tuple[Trial, dict]], "Grid"], dict[tuple[str, str, int], Any]]
    picks: str                                # what it picks: MLflow params ``<picks>.<env>.<regime>.s<seed>``
    dearest: Callable[["Grid"], Any]          # the costliest possible pick: --dry-run's stand-in before it ran
    metric: str                               # what its trials optimise (every report carries it) ...
    mode: str                                 # ... "min" or "max": Tune's result grid knows the best trial


@dataclass(frozen=True)
class Algorithm(Generic[S]):
    """One registry entry: everything the orchestration, tables and estimates need to know of an algorithm.

    Each ``algos/<x>.py`` lists its entries in a module-level ``ALGORITHMS``; ``algos.registry``
    collects them, so adding a baseline is one file (and a block in the grid YAML).
    """

    name: str                                   # grid and CLI name, e.g. "bcq_p"
    label: str                                  # table label, e.g. "BCQ-P"
    run: RunFn                                  # fit (if it learns) and the shared evaluation
    spec_key: str | None = None                 # the grid section it reads (shared by variants, e.g. "bcq")
    spec: type[S] | None = None                 # that section's pydantic class; ``run`` gets an instance
    learns_dynamics: bool = False               # gets the prediction-error test (needs the test policy)
    plans: bool = False                         # acts through the shared MPC planner
    needs_data: bool = True                     # False: one trial per env x seed, regime "none"
    action_spaces: tuple[str, ...] = ("discrete", "continuous")
    cost: CostFn | None = None                  # --dry-run refuses an algorithm without one
    # ``persim-bench evaluate``: reload the saved model (its folder, device) and evaluate it again.
    reload: Callable[[Path, str], Any] | None = None
    evaluate: Callable[[Any, Trial, S, TrialContext], TrialOutput] | None = None
    pre_stage: PreStage | None = None           # a stage of its own before main (PerSim: rank_cv)
    # (grid, the main trial's fields, the pre-stage's picks) -> its main trials; None: exactly one.
    main_trials: Callable[["Grid", dict, dict], list[Trial]] | None = None

    def supports(self, discrete: bool) -> bool:
        return ("discrete" if discrete else "continuous") in self.action_spaces
